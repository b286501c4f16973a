"""Text in, token ids out: GPT-2's byte-level BPE written from scratch, the downloads every stage
shares, and the datasets that turn text into next-token training windows.

    python tokenizer.py encode "Hello, world! It's 2024 <|endoftext|>"

Reading order: errors and downloads (one cached, verified fetch helper that every stage uses), then
`BPETokenizer` (training, encoding, decoding, loading OpenAI's GPT-2 files), then `get_tokenizer`, the
one way stages get GPT-2's tokenizer, then data input (in-memory sliding windows, and token files on
disk for corpora larger than memory), then the command line.
"""
import argparse
import functools
import glob
import hashlib
import heapq
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence, Set
from pathlib import Path
from typing import Literal

import numpy as np
import regex
import requests
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag value, missing file); the message is one sentence."""


class DownloadError(UserError):
    """A file could not be downloaded or did not verify."""


# ----------------------------------------------------------------------------------------------
# How every stage script starts and ends. tokenizer.py is the lowest layer (it imports nothing of
# ours), so the rules every stage shares live here: flags checked when parsed, one sentence and
# exit 1 for a user's mistake, 130 on Ctrl-C, files replaced atomically, run folders locked.

class ArgumentParser(argparse.ArgumentParser):
    """argparse with two house rules: every -h shows the defaults, and a bad flag raises UserError
    (one line on stderr and exit 1, through run_stage) instead of printing the usage and exiting 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see: python {self.prog} --help)")


def _number_flag(convert, test, wanted: str):
    """An argparse type: text -> number, refused (naming the flag, through argparse) unless test holds."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)) or not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value
    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


positive_int = _number_flag(int, lambda v: v >= 1, "a whole number of at least 1")
non_negative_int = _number_flag(int, lambda v: v >= 0, "a whole number of at least 0")
positive_float = _number_flag(float, lambda v: v > 0, "a finite number above 0")
non_negative_float = _number_flag(float, lambda v: v >= 0, "a finite number of at least 0")
unit_interval = _number_flag(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def describe_os_error(e: OSError) -> str:
    """An OSError as a short phrase that names the file: 'out/x: Permission denied'."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or type(e).__name__}"


def run_stage(main, parse_args) -> None:
    """Run a stage script, main(parse_args()), and end it the one way every stage ends.

    A UserError (a bad flag, a missing file) or an OSError (a disk full, a folder not writable) prints
    one line, `error: <sentence>`, and exits 1, never a traceback; Ctrl-C exits 130, as does a run
    whose result says it was interrupted (after saving what it had). Under torchrun only rank 0
    prints: every process meets the same error. Anything else is a bug and keeps its traceback."""
    speaks = os.environ.get("RANK", "0") == "0"
    try:
        result = main(parse_args())
    except UserError as e:
        sys.exit(f"error: {' '.join(str(e).split())}" if speaks else 1)
    except BrokenPipeError:  # the reader went away (`| head`): not an error worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        sys.exit(f"error: {describe_os_error(e)}" if speaks else 1)
    except KeyboardInterrupt:
        if speaks:
            print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, dict) and result.get("interrupted"):
        sys.exit(130)  # the shell's convention for "stopped by Ctrl-C"


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write data to path through a temporary file and a rename: a crash leaves the old file or the
    new one, never half of one. Text is written as UTF-8."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def writable_folder(path: str | Path, flag: str = "--out-dir") -> Path:
    """Create the folder if needed and check that files can be written in it, before any work starts;
    UserError naming the flag otherwise (a run should not find out after an hour of training)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; name a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} is not a writable folder ({e.strerror or e}); name another one") from None
    return path


class RunLock:
    """A run folder's lock, held while a run writes there: a second run into the same folder stops at
    once, naming the running one, instead of interleaving its files with the first run's.

    The lock is an OS file lock (flock) on OUT_DIR/.lock, which the OS drops when its process dies,
    so a lock left by a killed run is simply taken over; the file records who holds it, for messages,
    and is removed when the run ends normally."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self.file = None

    def __enter__(self) -> "RunLock":
        try:
            self.file = open(self.path, "a+")
        except OSError as e:
            raise UserError(f"cannot create the lock {self.path} ({e.strerror or e})") from None
        self.file.seek(0)
        previous = self.file.read().strip()
        if not _try_lock(self.file):
            self.file.close()
            self.file = None
            holder = f" ({previous})" if previous else ""
            raise UserError(f"{self.path.parent} is in use by another run{holder}; wait for it to finish, stop it, "
                            f"or choose another --out-dir")
        if previous:
            print(f"note: taking over {self.path}, left by a run that ended without releasing it ({previous})",
                  file=sys.stderr)
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {_hostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                        f"{' '.join(sys.argv)}")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.path.unlink(missing_ok=True)  # released properly: nothing left behind to report
            self.file.close()  # closing drops the OS lock
            self.file = None


def _try_lock(file) -> bool:
    """Take an exclusive, non-blocking OS lock on an open file; False if another process holds it."""
    try:
        import fcntl
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    except ImportError:  # Windows
        import msvcrt
        try:
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True


def _hostname() -> str:
    import socket
    return socket.gethostname()


# ----------------------------------------------------------------------------------------------
# Downloads: one cache folder, one helper

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
# Hugging Face Hub files live under hf/<repo>/<file> in the cache, whichever stage fetches them.
HUB_URL = "https://huggingface.co/{repo}/resolve/main/{filename}"
MISTRAL_REPO = "mistralai/Mistral-7B-v0.1"  # gated: the Hub asks for an access token (HF_TOKEN)
MISTRAL_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
HF_TOKEN_ENV = "HF_TOKEN"

# path under cache_dir() -> (url, sha256 or None): the files any stage may fetch by name
KNOWN_FILES: dict[str, tuple[str, str | None]] = {
    "instruct/instruction-data.json": (INSTRUCTION_DATA_URL, INSTRUCTION_DATA_SHA256),
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


class ProgressLine:
    """One status line on stderr, rewritten in place at most every `interval` seconds.

    Shows done / total MB, percent and MB/s; `extra` appends a stage-specific note (e.g. tokens)."""

    def __init__(self, label: str, total: int | None = None, interval: float = 0.5):
        self.label, self.total, self.interval = label, total, interval
        self.start = self.last = time.perf_counter()
        self.done, self.extra = 0, ""

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        self.done, self.extra = done, extra
        now = time.perf_counter()
        if force or now - self.last >= self.interval:
            self.last = now
            rate = done / 1e6 / max(now - self.start, 1e-9)
            total = f" / {self.total / 1e6:.1f} MB ({100 * done / max(self.total, 1):3.0f}%)" if self.total else " MB"
            print(f"\r{self.label}: {done / 1e6:9.1f}{total} {rate:7.1f} MB/s {extra}", end="", file=sys.stderr)

    def close(self) -> None:
        self.update(self.done, self.extra, force=True)
        print(file=sys.stderr)


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


# ----------------------------------------------------------------------------------------------
# Byte-level BPE from scratch
#
# Byte-pair encoding starts from the 256 possible bytes and learns merges: "the pair of tokens
# (b't', b'h') becomes the new token b'th'". To encode, text is first cut into pieces by a regex
# (words with their leading space, numbers, punctuation runs, whitespace), so no token ever spans
# two words; each piece's UTF-8 bytes are then merged, always applying the earliest-learned merge
# first, until no learned merge applies. Working on bytes rather than characters means any string
# can be encoded with no unknown token: at worst a character becomes its 1-4 UTF-8 bytes.
#
# The tokenizer is fully described by `ranks`: token bytes -> id, where a token's id is also its
# merge priority (a lower id was learned earlier). This is exactly how tiktoken stores it.

ENDOFTEXT = "<|endoftext|>"

# GPT-2's pre-tokenization: contractions, optional space + letters, optional space + digits,
# optional space + other symbols, then whitespace (a run of spaces gives its last space to the next
# word, so " world" keeps its space). This is tiktoken's spelling of GPT-2's pattern; the possessive
# quantifiers (++) only make it faster. Note the contractions are lower case only, as in GPT-2.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to a printable character, used only to read and write vocab files.

    OpenAI's encoder.json and vocab.bpe store tokens as text. Bytes that are printable characters
    map to themselves; the other 68 (control bytes, space, a few Latin-1 ones) map to the characters
    256, 257, ... in order, so a space becomes 'Ġ' and a newline 'Ċ'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {b: chr(b) for b in printable}, 256
    for b in range(256):
        if b not in table:
            table[b] = chr(shifted)
            shifted += 1
    return table


def _token_text(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_bytes(text: str) -> bytes:
    inverse = _unicode_to_bytes()
    return bytes(inverse[c] for c in text)


def read_gpt2_files(encoder_path: Path, vocab_path: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """OpenAI's GPT-2 files -> (ranks, special tokens).

    encoder.json maps each token (in the printable spelling above) to its id. vocab.bpe lists the
    50000 merges in the order they were learned; merge i creates token 256 + i, so a token's id is
    its merge priority. We check that, since BPE encoding relies on it."""
    try:
        encoder = json.loads(Path(encoder_path).read_text(encoding="utf-8"))
        merge_lines = Path(vocab_path).read_text(encoding="utf-8").split("\n")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the GPT-2 files {encoder_path} and {vocab_path} ({e}); delete them "
                        f"so they are downloaded again") from None
    special = {ENDOFTEXT: encoder.pop(ENDOFTEXT)}
    ranks = {_token_bytes(token): i for token, i in encoder.items()}
    merges = [line.split() for line in merge_lines[1:] if line]  # line 0 is "#version: 0.2"
    for i, (first, second) in enumerate(merges):
        if ranks.get(_token_bytes(first) + _token_bytes(second)) != 256 + i:
            raise UserError(f"{vocab_path} line {i + 2} does not match {encoder_path}; delete both files "
                            f"so they are downloaded again")
    return ranks, special


def _lone_surrogates_replaced(text: str) -> str:
    """What tiktoken does to text that is not valid Unicode: lone surrogates become U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def merge_pair(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `word`, left to right, by `new_id`."""
    out, i, first, second = [], 0, *pair
    while i < len(word):
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


class BPETokenizer:
    """Byte-level BPE with tiktoken's interface: encode, encode_ordinary, decode, eot_token, n_vocab.

    BPETokenizer() is the bare byte-level tokenizer (256 tokens); train() learns merges;
    from_gpt2_files() loads OpenAI's GPT-2 vocabulary; save() / load() keep our own."""

    def __init__(self, ranks: dict[bytes, int] | None = None, special_tokens: dict[str, int] | None = None,
                 pattern: str = GPT2_PATTERN, cache_size: int = 100_000):
        self.pattern, self.cache_size = pattern, cache_size
        self._regex = regex.compile(pattern)
        self._set_vocabulary(ranks if ranks is not None else {bytes([b]): b for b in range(256)},
                             special_tokens or {})

    def _set_vocabulary(self, ranks: dict[bytes, int], special_tokens: dict[str, int]) -> None:
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        assert not missing, f"a byte-level vocabulary needs all 256 single bytes; missing {missing[:5]}"
        self.ranks, self.special_tokens = ranks, special_tokens
        self.vocab = {i: token for token, i in ranks.items()}  # id -> bytes, for decoding
        self.vocab.update((i, token.encode("utf-8")) for token, i in special_tokens.items())
        assert len(self.vocab) == len(ranks) + len(special_tokens), "token ids must be unique"
        self._cache: dict[str, list[int]] = {}  # piece of text -> its ids; a piece repeats a lot

    @property
    def n_vocab(self) -> int:
        return max(self.vocab) + 1

    @property
    def eot_token(self) -> int:
        return self.special_tokens[ENDOFTEXT]

    # What every tokenizer of the project offers (see load_tokenizer): GPT-2 puts nothing before a
    # text, and its one special token, <|endoftext|>, ends one.
    bos_id = None

    @property
    def eos_id(self) -> int:
        return self.eot_token

    # -- training ------------------------------------------------------------------------------

    def train(self, text: str, vocab_size: int, special_tokens: Sequence[str] = (ENDOFTEXT,)) -> "BPETokenizer":
        """Learn merges from `text` until the vocabulary holds `vocab_size` tokens (special ones included).

        Each step merges the most frequent adjacent pair; ties go to the pair with the smallest ids
        (built from the earliest tokens), so training is deterministic. Special-token text is cut out
        first, so no merge crosses a document boundary. Returns self."""
        n_merged = vocab_size - len(special_tokens)  # byte tokens + merged tokens wanted
        if n_merged < 256:
            raise UserError(f"vocab_size must be at least {256 + len(special_tokens)} (256 bytes + "
                            f"{len(special_tokens)} special tokens), got {vocab_size}")
        text = _lone_surrogates_replaced(text)

        # 1. Pre-tokenize and count each distinct piece ("word") once: " the" may occur 10,000 times
        #    but is merged once, with its count as weight.
        counts: Counter[str] = Counter()
        chunks = regex.split("|".join(map(regex.escape, special_tokens)), text) if special_tokens else [text]
        for chunk in chunks:
            counts.update(self._regex.findall(chunk))
        words = [list(word.encode("utf-8")) for word in counts]  # each word as a list of token ids
        freqs = list(counts.values())

        # 2. Count every adjacent pair once, and remember which words contain it. After a merge only
        #    those words change, so only their pairs are recounted: far less work than recounting the
        #    whole corpus after every merge.
        pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> indices of words holding it
        for w, (word, freq) in enumerate(zip(words, freqs)):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += freq
                where[pair].add(w)
        # A heap finds the most frequent pair fast. Entries are (-count, pair), so ties pop the
        # smallest pair. A count change pushes a fresh entry; stale ones are skipped when popped.
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        vocab = [bytes([b]) for b in range(256)]
        ranks = {token: i for i, token in enumerate(vocab)}
        while len(vocab) < n_merged:
            while heap and pair_counts.get(heap[0][1]) != -heap[0][0]:
                heapq.heappop(heap)
            if not heap:
                raise UserError(f"the training text only supports a vocabulary of {len(vocab) + len(special_tokens)} "
                                f"tokens, fewer than the {vocab_size} asked for; use more text or a smaller vocab size")
            pair = heapq.heappop(heap)[1]
            merged = vocab[pair[0]] + vocab[pair[1]]
            # Two different pairs can spell the same bytes (b"a" + b"bc" and b"ab" + b"c"); they then
            # share one id, because an id is looked up by its bytes when encoding.
            new_id = ranks.setdefault(merged, len(vocab))
            if new_id == len(vocab):
                vocab.append(merged)

            # 3. Merge the pair in the words that hold it, and apply the count changes.
            delta: dict[tuple[int, int], int] = defaultdict(int)
            for w in where.pop(pair):
                old, freq = words[w], freqs[w]
                new = words[w] = merge_pair(old, pair, new_id)
                for p in zip(old, old[1:]):
                    delta[p] -= freq
                for p in zip(new, new[1:]):
                    delta[p] += freq
                    where[p].add(w)
                for p in set(zip(old, old[1:])) - set(zip(new, new[1:])) - {pair}:
                    where[p].discard(w)
            for p, change in delta.items():
                if change:
                    pair_counts[p] += change
                    if pair_counts[p]:
                        heapq.heappush(heap, (-pair_counts[p], p))
                    else:
                        del pair_counts[p]

        self._set_vocabulary(ranks, {token: n_merged + i for i, token in enumerate(special_tokens)})
        return self

    # -- encoding ------------------------------------------------------------------------------

    def _bpe(self, piece: bytes) -> list[int]:
        """Merge one pre-tokenized piece's bytes: repeatedly join the adjacent pair whose joined bytes
        have the lowest rank (leftmost on a tie), until no adjacent pair joins into a known token."""
        ranks = self.ranks
        if piece in ranks:  # a whole piece that is one token is emitted as is, as tiktoken does
            return [ranks[piece]]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best_rank, best = None, -1
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, i
            if best_rank is None:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return [ranks[part] for part in parts]

    def _encode_chunk(self, text: str) -> list[int]:
        ids, cache = [], self._cache
        for piece in self._regex.findall(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._bpe(piece.encode("utf-8"))
                if len(cache) >= self.cache_size:
                    cache.clear()  # bounded memory; frequent pieces come back in soon
                cache[piece] = piece_ids
            ids += piece_ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text` with special-token text treated as ordinary text."""
        try:
            return self._encode_chunk(text)
        except UnicodeEncodeError:
            return self._encode_chunk(_lone_surrogates_replaced(text))

    def encode(self, text: str, *, allowed_special: Literal["all"] | Set[str] = frozenset(),
               disallowed_special: Literal["all"] | Set[str] = "all") -> list[int]:
        """Encode `text` with tiktoken's special-token rules.

        Special-token text (e.g. "<|endoftext|>") raises ValueError unless allowed: it is there to
        stop user text from injecting control tokens. allowed_special="all" (or a set of tokens)
        encodes it as the special id; disallowed_special=() encodes it as plain text."""
        special = set(self.special_tokens)
        allowed = special if allowed_special == "all" else special & set(allowed_special)
        disallowed = special - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed and (found := regex.search("|".join(map(regex.escape, disallowed)), text)):
            raise ValueError(f"text contains the special token {found.group()!r}; pass allowed_special="
                             f"{{{found.group()!r}}} to encode it as a special token, or disallowed_special=() "
                             f"to encode it as plain text")
        if not allowed:
            return self.encode_ordinary(text)
        # Longest first, so that a special token that contains another one wins.
        specials = regex.compile("|".join(map(regex.escape, sorted(allowed, key=len, reverse=True))))
        ids, start = [], 0
        for match in specials.finditer(text):
            ids += self.encode_ordinary(text[start:match.start()])  # split apart as tiktoken does
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        return ids + self.encode_ordinary(text[start:])

    # -- decoding ------------------------------------------------------------------------------

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.vocab[token]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.vocab[i] for i in ids)

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        """Ids -> text. Ids that stop mid-character (e.g. the first byte of an emoji) decode to U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON: tokens in id order, in GPT-2's printable spelling."""
        assert sorted(self.ranks.values()) == list(range(len(self.ranks))), "save needs dense ids"
        tokens = [_token_text(token) for token, _ in sorted(self.ranks.items(), key=lambda item: item[1])]
        state = {"format": "bpe-tokenizer/1", "pattern": self.pattern, "tokens": tokens,
                 "special_tokens": self.special_tokens}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state, ensure_ascii=False, indent=0), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        """Read a vocabulary written by save()."""
        try:
            state = json.loads(Path(path).read_text(encoding="utf-8"))
            if state.get("format") != "bpe-tokenizer/1":
                raise ValueError("not a bpe-tokenizer/1 file")
            ranks = {_token_bytes(token): i for i, token in enumerate(state["tokens"])}
            return cls(ranks, state["special_tokens"], state["pattern"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot load a tokenizer from {path} ({e}); write one with: python tokenizer.py "
                            f"train INPUT --out FILE") from None

    @classmethod
    def from_gpt2_files(cls, encoder_path: Path | None = None, vocab_path: Path | None = None) -> "BPETokenizer":
        """OpenAI's GPT-2 tokenizer; the two files are downloaded into the cache when not given."""
        ranks, special = read_gpt2_files(encoder_path or fetch("gpt2/encoder.json"),
                                         vocab_path or fetch("gpt2/vocab.bpe"))
        return cls(ranks, special, GPT2_PATTERN)


# ----------------------------------------------------------------------------------------------
# The one way stages get GPT-2's tokenizer

BACKENDS = ("tiktoken", "scratch")


def bos(tokenizer) -> list[int]:
    """What a text starts with for this tokenizer's model family: [bos_id], or [] (GPT-2)."""
    return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


def get_tokenizer(backend: str = "tiktoken") -> "TiktokenGPT2 | BPETokenizer":
    """GPT-2's tokenizer, built once per backend from the cached GPT-2 files.

    "tiktoken" is fast (Rust); "scratch" is BPETokenizer above and gives the same ids. Both offer
    encode(text, allowed_special=...), encode_ordinary, decode(ids), eot_token, n_vocab, bos_id (None)
    and eos_id (<|endoftext|>)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown tokenizer backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return _build_tokenizer(backend)


class TiktokenGPT2(tiktoken.Encoding):
    """tiktoken's Encoding with the two ids every tokenizer of the project names: no BOS, and
    <|endoftext|> as EOS."""
    bos_id = None

    @property
    def eos_id(self) -> int:
        return self.eot_token


@functools.lru_cache(maxsize=None)
def _build_tokenizer(backend: str) -> "TiktokenGPT2 | BPETokenizer":
    if backend == "scratch":
        return BPETokenizer.from_gpt2_files()
    ranks, special = read_gpt2_files(fetch("gpt2/encoder.json"), fetch("gpt2/vocab.bpe"))
    # Built from our cached files rather than tiktoken.get_encoding("gpt2"), which would download
    # them again into its own cache.
    return TiktokenGPT2(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                        special_tokens=special, explicit_n_vocab=len(ranks) + len(special))


# ----------------------------------------------------------------------------------------------
# Data input: text -> next-token windows

def _bad_utf8(path: Path, offset: int) -> UserError:
    return UserError(f"{path} is not valid UTF-8 (bad byte at offset {offset}); convert it to UTF-8, or decode "
                     f"with replacement characters (errors='replace', on the command line --errors replace)")


def _open_error(path: Path, e: OSError) -> UserError:
    if isinstance(e, FileNotFoundError):
        return UserError(f"{path} does not exist")
    if isinstance(e, IsADirectoryError):
        return UserError(f"{path} is a folder, not a text file")
    return UserError(f"cannot read {path} ({e.strerror})")


def read_text(path: str | Path, errors: str = "strict") -> str:
    """A whole UTF-8 text file; errors="replace" decodes bad bytes as U+FFFD instead of failing."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _open_error(path, e) from None
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise _bad_utf8(path, e.start) from None


class GPTDataset(Dataset):
    """Next-token windows over one token sequence: item i is (x, y), both (max_length,) int64, with
    x = ids[s : s + max_length], y = ids[s + 1 : s + max_length + 1] and s = i * stride.

    stride < max_length makes windows overlap (more samples, more repetition); stride == max_length
    uses each token once as a target."""

    def __init__(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise UserError(f"max_length and stride must be positive, got {max_length} and {stride}")
        self.ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))  # (N,)
        if len(self.ids) <= max_length:
            raise UserError(f"the text has {len(self.ids)} tokens, too few for one window of {max_length} tokens "
                            f"plus its next-token target; use more text or a smaller max_length")
        self.max_length = max_length
        self.starts = range(0, len(self.ids) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.starts[i]
        return self.ids[s:s + self.max_length], self.ids[s + 1:s + 1 + self.max_length]


def create_dataloader(text: str, tokenizer: "tiktoken.Encoding | BPETokenizer | None" = None, *,
                      batch_size: int = 4, max_length: int = 256, stride: int = 128,
                      shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                      generator: torch.Generator | None = None) -> DataLoader:
    """Tokenize `text` (GPT-2 by default; "<|endoftext|>" counts as the special token) into a
    DataLoader of (x, y) batches, each (batch_size, max_length) int64."""
    tokenizer = tokenizer or get_tokenizer()
    if not text:
        raise UserError("the text is empty; give some text to train on")
    dataset = GPTDataset(tokenizer.encode(text, allowed_special="all"), max_length, stride)
    if drop_last and len(dataset) < batch_size:
        raise UserError(f"the text gives {len(dataset)} windows of {max_length} tokens, fewer than one batch of "
                        f"{batch_size}; use more text, or a smaller batch size, max_length or stride")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


# -- corpora larger than memory: a flat uint16 token file, read back through a memmap -------------

def corpus_files(source: str | Path) -> list[Path]:
    """A file, every file under a folder (hidden ones skipped), or the files a glob matches; sorted."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(f for f in path.rglob("*")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
        if not files:
            raise UserError(f"the folder {path} holds no files")
        return files
    if any(c in str(source) for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(source), recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"no files match {source}")
        return files
    raise UserError(f"{source} does not exist")


def _utf8_cut(data: bytes) -> int:
    """Where a UTF-8 character cut off at the end of `data` starts (len(data) if none is cut off)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: ASCII or the start of a character
            needed = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) - back if back < needed else len(data)
    return len(data)


def _read_blocks(path: Path, errors: str, block_bytes: int) -> Iterator[tuple[str, int]]:
    """Decode a file block by block, yielding (text, bytes it came from); a bad byte names its offset."""
    offset, carry = 0, b""
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(block_bytes)
                data = carry + block
                cut = _utf8_cut(data) if block else len(data)  # keep a cut-off character for the next block
                data, carry = data[:cut], data[cut:]
                try:
                    text = data.decode("utf-8", errors)
                except UnicodeDecodeError as e:
                    raise _bad_utf8(path, offset + e.start) from None
                yield text, len(data)
                offset += len(data)
                if not block:
                    return
    except OSError as e:
        raise _open_error(path, e) from None


def _split_safely(text: str) -> int:
    """An index at which `text` can be cut without changing how GPT-2's regex splits it, or 0.

    We cut just before a newline that follows a non-space character: no pre-tokenized piece contains
    both (the non-space piece ends there, and the whitespace pieces start at the newline), and the
    piece before the cut cannot see the cut through its look-ahead or `$`."""
    cut = text.rfind("\n")
    while cut > 0 and text[cut - 1].isspace():
        cut = text.rfind("\n", 0, cut)
    return max(cut, 0)


def prepare_corpus(source: str | Path, out_dir: Path, *, val_fraction: float = 0.1, errors: str = "strict",
                   num_threads: int | None = None, block_bytes: int = 1 << 20) -> dict:
    """Tokenize a text file, folder or glob with GPT-2 (tiktoken) into out_dir/{train,val}.bin + meta.json.

    The .bin files are flat uint16 token ids (read them with load_tokens); each file is one document,
    followed by <|endoftext|>. The last `val_fraction` of the tokens is the validation split. Text is
    read `block_bytes` at a time and encoded on `num_threads` threads, so the corpus never has to fit
    in memory (only a file without line breaks is held whole: it is cut at line breaks). Returns
    meta.json's contents plus the bytes read and the seconds taken."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = corpus_files(source)
    enc = get_tokenizer("tiktoken")
    assert enc.n_vocab <= 2**16, "token ids must fit in uint16"
    num_threads = num_threads or os.cpu_count() or 1
    total_bytes = sum(f.stat().st_size for f in files)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_tmp, val_tmp = out_dir / "tokens.bin.tmp", out_dir / "val.bin.tmp"
    start, bytes_done, n_tokens = time.perf_counter(), 0, 0
    progress = ProgressLine(f"tokenizing {len(files)} file(s)", total_bytes)
    try:
        with open(all_tmp, "wb") as out:
            def write(chunks: list[str]) -> None:
                nonlocal n_tokens
                for ids in enc.encode_ordinary_batch(chunks, num_threads=num_threads):
                    np.asarray(ids, dtype=np.uint16).tofile(out)
                    n_tokens += len(ids)

            for path in files:
                pending, chunks, has_text = "", [], False
                for text, n_bytes in _read_blocks(path, errors, block_bytes):
                    pending += text
                    has_text = has_text or bool(text)
                    if cut := _split_safely(pending):
                        chunks.append(pending[:cut])
                        pending = pending[cut:]
                    if len(chunks) >= num_threads:
                        write(chunks)
                        chunks = []
                    bytes_done += n_bytes
                    progress.update(bytes_done, f"{n_tokens:,} tokens")
                if has_text:
                    write([*chunks, pending])
                    np.asarray([enc.eot_token], dtype=np.uint16).tofile(out)
                    n_tokens += 1
        progress.close()  # before any error below, so that the message starts on a line of its own
        if n_tokens == 0:
            raise UserError(f"{source} holds no text to tokenize")
        # The tail becomes val.bin; the file is then cut to the head and renamed train.bin.
        n_val = int(n_tokens * val_fraction)
        tokens = np.memmap(all_tmp, dtype=np.uint16, mode="r")
        tokens[n_tokens - n_val:].tofile(val_tmp)
        del tokens  # unmap before cutting the file
        os.truncate(all_tmp, 2 * (n_tokens - n_val))
        os.replace(all_tmp, out_dir / "train.bin")
        os.replace(val_tmp, out_dir / "val.bin")
    finally:
        all_tmp.unlink(missing_ok=True)
        val_tmp.unlink(missing_ok=True)
    meta = {"vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "train_tokens": n_tokens - n_val,
            "val_tokens": n_val, "sources": [str(f) for f in files]}
    meta_tmp = out_dir / "meta.json.tmp"
    meta_tmp.write_text(json.dumps(meta, indent=2))
    os.replace(meta_tmp, out_dir / "meta.json")
    seconds = time.perf_counter() - start
    return {**meta, "bytes": total_bytes, "seconds": seconds, "mb_per_s": total_bytes / 1e6 / seconds}


def load_tokens(path: str | Path) -> np.memmap:
    """A token file written by prepare_corpus, as a read-only uint16 memmap (nothing is read yet)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"token file {path} does not exist; make it with: python tokenizer.py prepare INPUT --out DIR")
    if path.stat().st_size == 0:
        raise UserError(f"token file {path} is empty")
    return np.memmap(path, dtype=np.uint16, mode="r")


def sample_windows(tokens: np.ndarray, batch_size: int, block_size: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows from a flat token array: x (batch_size, block_size) int64, y = x shifted by one."""
    if len(tokens) <= block_size:
        raise UserError(f"the token file has {len(tokens)} tokens, too few for one window of {block_size} tokens "
                        f"plus its next-token target; use more text or a smaller block size")
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(tokens[s:s + block_size].astype(np.int64)) for s in starts])
    y = torch.stack([torch.from_numpy(tokens[s + 1:s + 1 + block_size].astype(np.int64)) for s in starts])
    return x, y  # (B, T), (B, T)


# ----------------------------------------------------------------------------------------------
# Command line

SAMPLE_TEXT = "Hello, world! It's 2024 and GPT-2 still splits   spaces, naïve café 🤖 <|endoftext|>"


def show_encodings(text: str, special: bool) -> dict:
    """Print ids and pieces from both backends and whether they agree."""
    ids = {}
    for backend in BACKENDS:
        tok = get_tokenizer(backend)
        ids[backend] = (tok.encode(text, allowed_special="all") if special
                        else tok.encode(text, disallowed_special=()))
        pieces = [tok.decode_single_token_bytes(i).decode("utf-8", "replace") for i in ids[backend]]
        print(f"{backend:>8} ids    ({len(ids[backend])}): {ids[backend]}")
        print(f"{backend:>8} pieces: {' | '.join(repr(p) for p in pieces)}")
    agree = ids["tiktoken"] == ids["scratch"]
    print(f"text: {text!r}\nbackends agree: {'yes' if agree else 'NO'}")
    return {"text": text, **ids, "agree": agree}


def train_command(args: argparse.Namespace) -> dict:
    files = corpus_files(args.input)
    text = ENDOFTEXT.join(read_text(f, args.errors) for f in files)  # one document per file
    start = time.perf_counter()
    tok = BPETokenizer().train(text, args.vocab_size)
    seconds = time.perf_counter() - start
    tok.save(args.out)
    n_tokens = len(tok.encode(text, allowed_special="all"))
    bytes_per_token = len(text.encode("utf-8")) / max(n_tokens, 1)
    first = [tok.vocab[i].decode("utf-8", "replace") for i in range(256, min(266, len(tok.ranks)))]
    print(f"trained {tok.n_vocab} tokens on {len(text.encode('utf-8')) / 1e6:.2f} MB in {seconds:.2f} s; "
          f"{bytes_per_token:.2f} bytes per token; first merges {first}; saved {args.out}")
    return {"vocab_size": tok.n_vocab, "seconds": seconds, "bytes_per_token": bytes_per_token, "out": str(args.out)}


def main(args: argparse.Namespace) -> dict:
    if args.command == "prepare":
        result = prepare_corpus(args.input, args.out, val_fraction=args.val_fraction, errors=args.errors,
                                num_threads=args.threads)
        print(f"{result['train_tokens']:,} train and {result['val_tokens']:,} val tokens from "
              f"{len(result['sources'])} file(s) in {result['seconds']:.2f} s ({result['mb_per_s']:.1f} MB/s); "
              f"wrote {args.out}")
        return result
    if args.command == "train":
        return train_command(args)
    return show_encodings(args.text, args.special)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description="GPT-2 BPE tokenizer from scratch, beside tiktoken. With no "
                                     "command, shows a sample sentence through both backends.",
                                     formatter_class=formatter)
    parser.set_defaults(command=None, text=SAMPLE_TEXT, special=True)
    commands = parser.add_subparsers(dest="command")

    encode = commands.add_parser("encode", help="ids and pieces of TEXT from both backends", formatter_class=formatter)
    encode.add_argument("text", help="text to encode")
    encode.add_argument("--special", action=argparse.BooleanOptionalAction, default=True,
                        help="encode special-token text such as <|endoftext|> as its special id "
                             "(--no-special: as plain text)")

    prepare = commands.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin",
                                  formatter_class=formatter)
    prepare.add_argument("input", help="a text file, a folder of text files, or a glob")
    prepare.add_argument("--out", type=Path, default=Path("out/tokens"), help="output folder")
    prepare.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of tokens kept for validation")
    prepare.add_argument("--threads", type=int, default=os.cpu_count(), help="encoding threads")

    train = commands.add_parser("train", help="train a new BPE vocabulary", formatter_class=formatter)
    train.add_argument("input", help="a text file, a folder of text files, or a glob")
    train.add_argument("--vocab-size", type=int, default=1000, help="tokens in the vocabulary, special ones included")
    train.add_argument("--out", type=Path, default=Path("out/bpe-tokenizer.json"), help="vocabulary file to write")

    for sub in (prepare, train):
        sub.add_argument("--errors", choices=("strict", "replace"), default="strict",
                         help="what to do with bytes that are not UTF-8: stop with an error, or decode as U+FFFD")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_stage(main, parse_args)
