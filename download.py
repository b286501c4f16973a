"""Downloads: one cache folder ($LLM_CACHE_DIR, else ~/.cache/llm-lifecycle) and one helper that
fetches a file once, verifies it (sha256 where known, else its size) and renames it into place only
when it is complete, so every stage finds either a whole, checked file or none.

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
    """A file could not be downloaded or did not verify."""


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
MISTRAL_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
HF_TOKEN_ENV = "HF_TOKEN"


# path under cache_dir() -> (url, sha256 or None): the files any stage may fetch by name
KNOWN_FILES: dict[str, tuple[str, str | None]] = {
    "instruct/instruction-data.json": (INSTRUCTION_DATA_URL, INSTRUCTION_DATA_SHA256),
    "instruct/instruction-data-with-preference.json": (PREFERENCE_DATA_URL, PREFERENCE_DATA_SHA256),
    f"hf/{MISTRAL_REPO}/tokenizer.model": (HUB_URL.format(repo=MISTRAL_REPO, filename="tokenizer.model"),
                                           MISTRAL_TOKENIZER_SHA256),
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


def _request_problem(e: requests.RequestException) -> str:
    """A short reason for a failed request (requests' own messages run over several lines)."""
    if isinstance(e, requests.HTTPError) and e.response.status_code in (401, 403):
        token = "the token in $HF_TOKEN was refused" if os.environ.get(HF_TOKEN_ENV) else "no $HF_TOKEN is set"
        return (f"the server refused access (HTTP {e.response.status_code}; {token}): a gated Hugging Face repo "
                f"needs its licence accepted on its page and HF_TOKEN set to an access token of that account")
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
                             f"connection, or download the file by hand and save it as {dest}")

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
        raise failure(_request_problem(e)) from None
    except OSError as e:
        raise failure(f"cannot write {tmp}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)  # a no-op after the rename; otherwise nothing half-written stays
    return dest


def fetch(relpath: str, cache: Path | None = None) -> Path:
    """download() one of KNOWN_FILES by its cache path, e.g. fetch("text/tinyshakespeare.txt")."""
    if relpath not in KNOWN_FILES:
        raise UserError(f"unknown file {relpath!r}; known files are {', '.join(KNOWN_FILES)}")
    url, sha256 = KNOWN_FILES[relpath]
    headers = hub_headers() if url.startswith("https://huggingface.co/") else None
    return download(url, relpath, sha256=sha256, cache=cache, headers=headers)
