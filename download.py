"""Downloads: one cache folder ($LLM_CACHE_DIR, else ~/.cache/llm-lifecycle) and one helper that
fetches a file once, verifies it (sha256 where known, else its size) and renames it into place only
when it is complete, so every stage finds either a whole, checked file or none. Hugging Face Hub
repos are listed through the Hub's API (sizes and sha256 digests) and their files fetched the same way.

    from download import fetch
    path = fetch("text/tinyshakespeare.txt")
"""
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import requests

from common import ProgressLine, UserError


class DownloadError(UserError):
    """A file could not be downloaded or did not verify; `reason` says why in a few words, when known."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


CACHE_ENV = "LLM_CACHE_DIR"
GPT2_ENCODER_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
GPT2_ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
GPT2_VOCAB_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
THE_VERDICT_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
)
THE_VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
SMS_SPAM_ZIP_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"


# the zip's hash is not published; this is the hash of its member SMSSpamCollection once extracted
SMS_SPAM_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
INSTRUCTION_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
                        "instruction-data.json")
INSTRUCTION_DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
PREFERENCE_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
                       "instruction-data-with-preference.json")
PREFERENCE_DATA_SHA256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"


# Hugging Face Hub files live under hf/<repo>/<file> in the cache, whichever stage fetches them.
HUB_URL = "https://huggingface.co/{repo}/resolve/main/{filename}"
MISTRAL_REPO = "mistralai/Mistral-7B-v0.1"  # gated: the Hub asks for an access token (HF_TOKEN)
# Mistral's SentencePiece model (Apache-2.0), for the tiny Mistral-, Llama- and Phi-3-shaped presets: the
# same bytes as the gated repo's tokenizer.model, published ungated in mistral-common's repository, so a
# learner needs no Hub account. It is cached where the repo's own file goes, beside the real model's.
MISTRAL_TOKENIZER_URL = ("https://raw.githubusercontent.com/mistralai/mistral-common/main/src/mistral_common/data/"
                         "tokenizer.model.v1")
MISTRAL_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
HF_TOKEN_ENV = "HF_TOKEN"


# path under cache_dir() -> (url, sha256 or None): the files any stage may fetch by name
KNOWN_FILES: dict[str, tuple[str, str | None]] = {
    "instruct/instruction-data.json": (INSTRUCTION_DATA_URL, INSTRUCTION_DATA_SHA256),
    "instruct/instruction-data-with-preference.json": (PREFERENCE_DATA_URL, PREFERENCE_DATA_SHA256),
    f"hf/{MISTRAL_REPO}/tokenizer.model": (MISTRAL_TOKENIZER_URL, MISTRAL_TOKENIZER_SHA256),
    "gpt2/encoder.json": (GPT2_ENCODER_URL, GPT2_ENCODER_SHA256),
    "gpt2/vocab.bpe": (GPT2_VOCAB_URL, GPT2_VOCAB_SHA256),
    "text/tinyshakespeare.txt": (TINYSHAKESPEARE_URL, TINYSHAKESPEARE_SHA256),
    "text/the-verdict.txt": (THE_VERDICT_URL, THE_VERDICT_SHA256),
    "sms_spam/sms_spam_collection.zip": (SMS_SPAM_ZIP_URL, None),
}


PROGRESS_MIN_BYTES = 1_000_000  # downloads at least this large (or of unknown size) show a progress line


def cache_dir() -> Path:
    """The one folder for everything downloaded: $LLM_CACHE_DIR, else ~/.cache/llm-lifecycle."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llm-lifecycle")


def _file_problem(path: Path, sha256: str | None, size: int | None) -> str | None:
    """Why the file at `path` fails its check, or None when it passes (hash first, else size)."""
    if sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != sha256:
            return f"its sha256 is {digest.hexdigest()}, expected {sha256}"
    elif size is not None and path.stat().st_size != size:
        return f"it has {path.stat().st_size} bytes, expected {size}"
    return None


def hub_headers() -> dict[str, str]:
    """The Hugging Face Hub's access token from $HF_TOKEN, as a request header; {} without one.

    Gated repos (Mistral's, Meta's Llama) serve their files only to accounts that accepted the
    licence on the repo's page, identified by such a token."""
    token = os.environ.get(HF_TOKEN_ENV, "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def hub_refusal(status: int, repo: str) -> str:
    """What the Hub's HTTP 401 or 403 for a repo means, and what to do about it: a gated repo (Mistral's,
    Meta's) serves its files only to an account that accepted its licence, through that account's token."""
    token = "the token in $HF_TOKEN was refused" if hub_headers() else "no $HF_TOKEN is set"
    return (f"the Hugging Face Hub refused access to {repo} (HTTP {status}; {token}): accept its licence on "
            f"https://huggingface.co/{repo} and set HF_TOKEN to an access token of that account")


def _request_problem(e: requests.RequestException, url: str) -> str:
    """A short reason for a failed request (requests' own messages run over several lines)."""
    hub_file = url.startswith(HUB_URL.split("{")[0])
    if isinstance(e, requests.HTTPError) and e.response.status_code in (401, 403) and hub_file:
        repo = "/".join(url.removeprefix(HUB_URL.split("{")[0]).split("/")[:2])
        return hub_refusal(e.response.status_code, repo)
    if isinstance(e, requests.HTTPError):
        return f"the server answered HTTP {e.response.status_code}"
    if isinstance(e, requests.Timeout):
        return "the server did not answer in time"
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return "the transfer was cut off"
    if isinstance(e, requests.ConnectionError):
        return "no connection to the server"
    return type(e).__name__


def _stream(url: str, f, label: str, headers: dict[str, str] | None = None) -> tuple[int, int | None]:
    """Write the body of `url` to the open file `f`; returns (bytes received, Content-Length or None)."""
    # identity encoding: Content-Length is then the file's size, which tells a cut-off transfer
    headers = {"Accept-Encoding": "identity", **(headers or {})}
    with requests.get(url, stream=True, timeout=(10, 60), headers=headers) as response:
        response.raise_for_status()
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        progress = ProgressLine(label, expected) if expected is None or expected >= PROGRESS_MIN_BYTES else None
        got = 0
        try:
            for block in response.iter_content(chunk_size=1 << 20):
                f.write(block)
                got += len(block)
                if progress:
                    progress.update(got)
        finally:
            if progress:
                progress.close()  # ends the line, also when the transfer fails
    return got, expected


def download(url: str, relpath: str, *, sha256: str | None = None, size: int | None = None,
             cache: Path | None = None, headers: dict[str, str] | None = None) -> Path:
    """Fetch `url` once into cache/relpath and return that path (headers: e.g. an access token).

    A cached file that verifies (sha256 when known, else size) is returned without touching the
    network; a cached file that fails its check is fetched again. The body streams into a temporary
    file next to the destination, which is renamed into place only when complete and verified, so
    an interrupted download never leaves a file that looks finished."""
    dest = Path(cache if cache is not None else cache_dir()) / relpath
    if dest.is_file():
        problem = _file_problem(dest, sha256, size)
        if problem is None:
            return dest
        print(f"cached {dest} failed its check ({problem}); downloading it again", file=sys.stderr)

    def failure(reason: str) -> DownloadError:
        return DownloadError(f"could not download {url} to {dest} ({reason}); check your network "
                             f"connection, or download the file by hand and save it as {dest}", reason)

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise failure(f"cannot write to {dest.parent}: {e.strerror}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            got, expected = _stream(url, f, f"downloading {dest.name}", headers)
        if expected is not None and got != expected:
            raise failure(f"the transfer ended after {got} of {expected} bytes")
        problem = _file_problem(tmp, sha256, size)
        if problem is not None:
            raise failure(f"the downloaded file fails its check: {problem}")
        os.chmod(tmp, 0o644)  # mkstemp made it private to us; a cached download is an ordinary file
        os.replace(tmp, dest)
    except requests.RequestException as e:
        raise failure(_request_problem(e, url)) from None
    except OSError as e:
        raise failure(f"cannot write {tmp}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)  # a no-op after the rename; otherwise nothing half-written stays
    return dest


def download_set(what: str, files: list[tuple[str, str, dict]]) -> list[Path]:
    """download(url, relpath, **options) for each file of a set that is only useful whole (GPT-2's
    encoder.json and vocab.bpe; a model's config.json and weights). When any fails, one DownloadError
    names every file still missing and where each goes, so that an offline user places them all at once
    rather than learning of the next one after placing the first."""
    paths, missing, reasons = [], [], []
    for url, relpath, options in files:
        try:
            paths.append(download(url, relpath, **options))
        except DownloadError as e:
            missing.append(f"{url} as {Path(options.get('cache') or cache_dir()) / relpath}")
            reasons.append(e.reason or str(e))
    if not missing:
        return paths
    if len(missing) == 1 and len(files) == 1:
        raise DownloadError(f"could not download {what} ({reasons[0]}); check your network connection, or "
                            f"download the file by hand and save {missing[0]}", reasons[0])
    raise DownloadError(f"could not download {what} ({reasons[0]}); check your network connection, or download "
                        f"the {len(missing)} missing files by hand and save {', and '.join(missing)}", reasons[0])


def _known(relpath: str, cache: Path | None = None) -> tuple[str, str, dict]:
    """(url, relpath, download options) of one of KNOWN_FILES."""
    if relpath not in KNOWN_FILES:
        raise UserError(f"unknown file {relpath!r}; known files are {', '.join(KNOWN_FILES)}")
    url, sha256 = KNOWN_FILES[relpath]
    headers = hub_headers() if url.startswith("https://huggingface.co/") else None
    return url, relpath, {"sha256": sha256, "cache": cache, "headers": headers}


def fetch(relpath: str, cache: Path | None = None) -> Path:
    """download() one of KNOWN_FILES by its cache path, e.g. fetch("text/tinyshakespeare.txt")."""
    url, relpath, options = _known(relpath, cache)
    return download(url, relpath, **options)


def fetch_all(what: str, *relpaths: str) -> list[Path]:
    """fetch() a set of KNOWN_FILES that is only useful whole, e.g. fetch_all("GPT-2's BPE files",
    "gpt2/encoder.json", "gpt2/vocab.bpe"): every missing one is named in one message (download_set)."""
    return download_set(what, [_known(relpath) for relpath in relpaths])


# ---------------------------------------------------------------------------------------------------
# The Hugging Face Hub: a repo's files, listed by its API and downloaded once into hf/<repo>/<file>

HUB_TREE_API = "https://huggingface.co/api/models/{repo}/tree/main"
# (size, sha256) of Hub files whose digests were confirmed by several independent sources; for the
# other files the Hub's API is asked (its lfs.oid is the file's sha256) before the first download.
HUB_PINNED = {
    ("openai-community/gpt2", "model.safetensors"):
        (548105171, "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"),
    ("openai-community/gpt2", "config.json"):
        (665, "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4"),
}


def hub_listing(repo: str) -> dict[str, tuple[int, str | None]]:
    """{file: (size, sha256 or None)} of a Hub repo's top folder, from the Hub's file-listing API.

    Files stored with Git LFS report their sha256 as lfs.oid; small plain files only their size.
    Gated repos (Mistral's, Meta's) answer only with an accepted licence and its token (HF_TOKEN)."""
    url = HUB_TREE_API.format(repo=repo)
    try:
        response = requests.get(url, timeout=(10, 60), headers=hub_headers())
        response.raise_for_status()
        listing = response.json()
    except requests.HTTPError as e:
        status = e.response.status_code
        if status in (401, 403):
            raise DownloadError(hub_refusal(status, repo)) from None
        if status == 404:
            raise DownloadError(f"the Hugging Face Hub has no model repo {repo} (HTTP 404), and no such local "
                                "file or folder exists either") from None
        raise DownloadError(f"could not list {repo} on the Hugging Face Hub (HTTP {status})") from None
    except (requests.RequestException, ValueError) as e:
        raise DownloadError(f"could not ask the Hugging Face Hub about {repo} at {url} ({type(e).__name__}); "
                            f"check your network connection, or put the repo's files into {cache_dir() / 'hf' / repo}"
                            ) from None
    files = {}
    for entry in listing if isinstance(listing, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            lfs = entry.get("lfs") or {}
            size, sha256 = lfs.get("size", entry.get("size")), lfs.get("oid")
            if isinstance(size, int) and (sha256 is None or isinstance(sha256, str)):
                files[entry["path"]] = (size, sha256)
    return files


def hub_file_info(repo: str, filename: str) -> tuple[int, str | None]:
    """(size, sha256 or None) of one file of a Hub repo."""
    info = hub_listing(repo).get(filename)
    if info is None:
        raise DownloadError(f"the Hugging Face Hub's listing of {repo} at {HUB_TREE_API.format(repo=repo)} "
                            f"gives no size for {filename}")
    return info


def fetch_hub_files(repo: str, filenames: list[str], listing: dict[str, tuple[int, str | None]]) -> Path:
    """Download those of filenames that the repo has (per listing) into hf/<repo>/, each once and
    verified; returns that cache folder. A cached file was verified on the way in and is kept as is."""
    for filename in filenames:
        relpath = f"hf/{repo}/{filename}"
        if filename in listing and not (cache_dir() / relpath).is_file():
            size, sha256 = listing[filename]
            download(HUB_URL.format(repo=repo, filename=filename), relpath, sha256=sha256, size=size,
                     headers=hub_headers())
    return cache_dir() / "hf" / repo
