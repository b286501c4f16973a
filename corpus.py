"""Corpora for pretraining: text files read block by block, tokenized into flat token files
(train.bin, val.bin and meta.json in one folder), and random next-token windows read back from them
through memmaps, so a corpus never has to fit in memory.

    from corpus import prepare_corpus, load_token_folder, sample_windows
    prepare_corpus("corpus/", "out/tokens", tokenizer=get_tokenizer())
    train, val, meta = load_token_folder("out/tokens")
    x, y = sample_windows(train, 8, 256, torch.Generator().manual_seed(0))  # (8, 256) each

The command line is `python tokenizer.py prepare`.
"""
import glob
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tiktoken
import torch

from common import ProgressLine, RunLock, UserError, atomic_write
from tokenizer_base import bos


def read_text(path: str | Path, errors: str = "strict") -> str:
    """A whole UTF-8 text file; errors="replace" decodes bad bytes as U+FFFD instead of failing."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise open_error(path, e) from None
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise _bad_utf8(path, e.start) from None


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


def read_blocks(path: Path, errors: str, block_bytes: int) -> Iterator[tuple[str, int]]:
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
        raise open_error(path, e) from None


class FileBlocks:
    """A text file's blocks (read_blocks), counting as they are read the bytes read so far and whether
    any text came; iterate it once."""

    def __init__(self, path: Path, errors: str, block_bytes: int):
        self.path, self.errors, self.block_bytes = path, errors, block_bytes
        self.bytes_read, self.has_text = 0, False

    def __iter__(self) -> Iterator[str]:
        for text, n_bytes in read_blocks(self.path, self.errors, self.block_bytes):
            self.bytes_read += n_bytes
            self.has_text = self.has_text or bool(text)
            yield text


def document_ids(tokenizer, blocks: Iterable[str], num_threads: int) -> Iterator[list[int]]:
    """The ids of one document (no BOS/EOS) as lists, from its text blocks. Every tokenizer of the
    project encodes a document block by block (encode_blocks), cutting it only where the ids cannot
    change; tiktoken releases the GIL, so GPT-2's tiktoken encodes on num_threads threads."""
    if isinstance(tokenizer, tiktoken.Encoding):
        return tokenizer.encode_blocks(blocks, num_threads)
    return tokenizer.encode_blocks(blocks)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2, Mistral, Llama 2), else uint32 (Llama 3's 128k tokens)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare_corpus(source: str | Path, out_dir: str | Path, *, tokenizer, tokenizer_name: str = "gpt2",
                   val_fraction: float = 0.1, errors: str = "strict", num_threads: int | None = None,
                   block_bytes: int = 1 << 20) -> dict:
    """Tokenize a text file, folder or glob into out_dir/{train,val}.bin + meta.json.

    `tokenizer` is any of the project's tokenizers (tokenizer.get_tokenizer() for GPT-2);
    `tokenizer_name` is recorded in meta.json. Each file is one document: bos(tokenizer) + its ids +
    the end-of-text id. The .bin files are flat token ids, uint16 when the vocabulary fits, else
    uint32 (read them with load_token_folder); the last `val_fraction` of the tokens is the validation
    split. Text is read `block_bytes` at a time and cut only where the ids cannot change, so a corpus
    never has to fit in memory; tiktoken encodes on `num_threads` threads, our pure-Python tokenizers
    on this one. Returns meta.json's contents plus the bytes read and the seconds taken."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = corpus_files(source)
    if tokenizer.eos_id is None:
        raise UserError(f"the tokenizer {tokenizer_name} has no end-of-text token to close each document with")
    dtype = token_dtype(tokenizer.n_vocab)
    total_bytes = sum(f.stat().st_size for f in files)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The token files are streamed to disk, larger than memory, so they are written under temporary
    # names and renamed when whole (atomic_write takes its data in memory).
    all_tmp, val_tmp = out_dir / "tokens.bin.tmp", out_dir / "val.bin.tmp"
    start = time.perf_counter()
    progress = ProgressLine(f"tokenizing {len(files)} file(s)", total_bytes)
    try:
        with RunLock(out_dir), open(all_tmp, "wb") as out:
            n_tokens = write_documents(out, files, tokenizer, dtype, errors, block_bytes,
                                       num_threads or os.cpu_count() or 1, progress)
            progress.close()  # before any error below, so that the message starts on a line of its own
            if n_tokens == 0:
                raise UserError(f"{source} holds no text to tokenize")
            out.flush()
            # The tail becomes val.bin; the file is then cut to the head and renamed train.bin.
            n_val = int(n_tokens * val_fraction)
            tokens = np.memmap(all_tmp, dtype=dtype, mode="r")
            tokens[n_tokens - n_val:].tofile(val_tmp)
            del tokens  # unmap before cutting the file
            os.truncate(all_tmp, dtype.itemsize * (n_tokens - n_val))
            os.replace(all_tmp, out_dir / "train.bin")
            os.replace(val_tmp, out_dir / "val.bin")
            meta = {"vocab_size": tokenizer.n_vocab, "dtype": dtype.name, "eot_token": tokenizer.eos_id,
                    "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "tokenizer_name": tokenizer_name,
                    "train_tokens": n_tokens - n_val, "val_tokens": n_val, "sources": [str(f) for f in files]}
            atomic_write(out_dir / "meta.json", json.dumps(meta, indent=2))
    finally:
        all_tmp.unlink(missing_ok=True)
        val_tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return {**meta, "bytes": total_bytes, "seconds": seconds, "mb_per_s": total_bytes / 1e6 / seconds}


def write_documents(out, files: list[Path], tokenizer, dtype: np.dtype, errors: str, block_bytes: int,
                    num_threads: int, progress: ProgressLine) -> int:
    """Write each file to `out` as one document, bos(tokenizer) + its ids + the end-of-text id (a file
    with no text writes nothing), showing the bytes read and tokens written; returns the tokens written."""
    n_tokens, bytes_before = 0, 0
    for path in files:
        text = FileBlocks(path, errors, block_bytes)
        started = False  # BOS goes before the first ids of a file that has text
        for ids in document_ids(tokenizer, text, num_threads):
            if text.has_text and not started:
                ids, started = [*bos(tokenizer), *ids], True
            np.asarray(ids, dtype=dtype).tofile(out)
            n_tokens += len(ids)
            progress.update(bytes_before + text.bytes_read, f"{n_tokens:,} tokens")
        if text.has_text:
            np.asarray([tokenizer.eos_id], dtype=dtype).tofile(out)
            n_tokens += 1
        bytes_before += text.bytes_read
        progress.update(bytes_before, f"{n_tokens:,} tokens")  # the total shown includes this file's end
    return n_tokens


def load_token_folder(folder: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """A folder written by prepare_corpus -> (train, val, meta): read-only memmaps of meta's dtype and
    meta.json's contents, after checking that meta.json is whole and that each .bin file holds the
    number of tokens it says."""
    folder = Path(folder)
    again = f"prepare it again with: python tokenizer.py prepare INPUT --out-dir {folder}"
    if not folder.is_dir():
        raise UserError(f"the token folder {folder} does not exist; make it with: python tokenizer.py prepare "
                        f"INPUT --out-dir {folder}")
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{meta_path} is missing; {again}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path} is not valid JSON ({e}); {again}") from None
    counts = ("train_tokens", "val_tokens", "vocab_size")
    if not isinstance(meta, dict) or not all(type(meta.get(key)) is int and meta[key] >= 0 for key in counts):
        raise UserError(f"{meta_path} does not give whole numbers for {', '.join(counts)}; {again}")
    dtype = meta.get("dtype")
    if dtype not in ("uint16", "uint32"):
        raise UserError(f"{meta_path} names the token type {dtype!r}, not uint16 or uint32 (a folder prepared "
                        f"before meta.json named it names none); {again}")
    dtype, splits = np.dtype(dtype), []
    for name, key in (("train.bin", "train_tokens"), ("val.bin", "val_tokens")):
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is missing; {again}")
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise UserError(f"{path} has {size:,} bytes, not a whole number of {dtype.name} tokens: it is cut short "
                            f"or corrupt; {again}")
        if size // dtype.itemsize != meta[key]:
            raise UserError(f"{path} holds {size // dtype.itemsize:,} tokens but meta.json says {meta[key]:,}: it "
                            f"is cut short or was changed; {again}")
        splits.append(np.memmap(path, dtype=dtype, mode="r") if size else np.empty(0, dtype=dtype))
    return splits[0], splits[1], meta


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


# -- a file that cannot be read, in one sentence ------------------------------------------------

def _bad_utf8(path: Path, offset: int) -> UserError:
    return UserError(f"{path} is not valid UTF-8 (bad byte at offset {offset}); convert it to UTF-8, or decode "
                     f"with replacement characters (errors='replace', on the command line --errors replace)")


def open_error(path: Path, e: OSError) -> UserError:
    """An OSError met opening `path` as one sentence."""
    if isinstance(e, FileNotFoundError):
        return UserError(f"{path} does not exist")
    if isinstance(e, IsADirectoryError):
        return UserError(f"{path} is a folder, not a text file")
    return UserError(f"cannot read {path} ({e.strerror})")
