"""Retrieval over your own documents (BM25, from scratch, on numpy), answers grounded in what it finds,
and prompting, retrieval and finetuning compared on the same test items.

    python rag.py index 'docs/*.txt' --out out/index
    python rag.py search --index out/index "how do I pay my bill" --k 5
    python rag.py ask --index out/index --init gpt2 "How do I pay my bill?"
    python rag.py compare --init gpt2-medium --finetuned out/instruct/ckpt.pt --json compare.json

`python rag.py` alone indexes the book's instruction data into out/index.

Reading order: the words retrieval sees (one function for documents and queries), documents cut into
chunks, BM25 (Okapi, the scores of the rank_bm25 package) as an inverted index of numpy arrays, the
index folder on disk, then the four subcommands: index, search, ask and compare.
"""
import argparse
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common import (ArgumentParser, RunLock, SEED, UserError, atomic_write, non_negative_float, non_negative_int,
                    positive_int, run_stage, writable_file, writable_folder)
from data import default_data, load_entries, read_records, split_entries
from generate import answer
from load_gpt2 import add_init_args, load_model, tokenizer_for
from model import add_device_args, device_and_dtype
from scoring import exact_match, judge_prompt, parse_score, rouge_l
from templates import TEMPLATES, Template, default_template, encode_template_text, prompt_ids
from tokenizer import get_tokenizer
from tokenizer_base import bos




# ---------------------------------------------------------------------------------------------------
# The words retrieval sees

WORD = re.compile(r"[^\W_]+")  # a run of Unicode letters and digits: "Naïve", "東京", "3.14" -> "3", "14"

# A short English list; --stop-words drops these from documents and queries alike.
STOP_WORDS = frozenset("""a an and are as at be but by for from has have he her his i if in into is it its
of on or she so that the their them then there these they this to was we were what when which who will
with you your""".split())


def words(text: str, stop_words: frozenset[str] = frozenset()) -> list[str]:
    """The terms of a text for BM25, documents and queries alike: its lower-cased words and numbers."""
    found = WORD.findall(text.lower())
    return [w for w in found if w not in stop_words] if stop_words else found


# ---------------------------------------------------------------------------------------------------
# Documents and chunks

@dataclasses.dataclass
class Document:
    source: str  # the file, and "#N" for the N-th record (from 0) of a JSON or JSONL file
    text: str


@dataclasses.dataclass
class Chunk:
    source: str
    offset: int  # where the chunk's text starts in its document, in characters
    text: str


TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
RECORD_SUFFIXES = (".json", ".jsonl")


def source_files(patterns: Sequence[str]) -> list[Path]:
    """The files that glob patterns, folders (searched recursively) and file names name, each once."""
    files = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = [p for p in sorted(path.rglob("*")) if p.suffix.lower() in TEXT_SUFFIXES + RECORD_SUFFIXES]
        else:
            found = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
        if not found:
            raise UserError(f"{pattern} names no file; give files, folders or quoted glob patterns like 'docs/*.txt'")
        files += found
    return list(dict.fromkeys(files))


def record_text(record) -> str:
    """A JSON record as text: a string itself, an object's string and number values one per line."""
    if isinstance(record, dict):
        return "\n".join(str(v) for v in record.values() if isinstance(v, (str, int, float)) and str(v).strip())
    return record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)


def read_documents(path: Path) -> list[Document]:
    """A text or Markdown file is one document; a JSON list or a JSONL file gives one per record."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it or leave it "
                        f"out") from None
    if path.suffix.lower() not in RECORD_SUFFIXES:
        return [Document(str(path), text)]
    records = read_records(text, str(path), objects_only=False)
    return [Document(f"{path}#{i}", record_text(record)) for i, (_, record) in enumerate(records)]


def word_spans(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (character positions) of each whitespace-separated word of text, without a Python
    loop over the words: a large file has millions."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    space = np.isin(codes, SPACE_CODES)
    edges = np.diff(np.concatenate(([0], ~space, [0])).astype(np.int8))  # +1 where a word starts, -1 after it
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


SPACE_CODES = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)  # str.isspace's set


def chunk_ranges(weights: np.ndarray, size: int, overlap: int) -> list[tuple[int, int]]:
    """Consecutive runs [first, end) of words whose weights (1 a word, or its tokens) add up to at most
    size (a longer word alone is one chunk), each run repeating the last `overlap` of the one before."""
    ends = np.cumsum(weights)  # ends[i]: weight of words 0..i
    ranges, first, n = [], 0, len(weights)
    while first < n:
        before = ends[first - 1] if first else 0
        end = max(int(np.searchsorted(ends, before + size, side="right")), first + 1)
        ranges.append((first, end))
        if end == n:
            break
        # the next chunk starts where the last `overlap` weight of this one begins (but moves on)
        back = int(np.searchsorted(ends, ends[end - 1] - overlap, side="right"))
        first = min(max(back, first + 1), end)
    return ranges


def chunk_document(document: Document, size: int, overlap: int, tokenizer=None) -> list[Chunk]:
    """A document cut into chunks of whole words: size words each, or with a tokenizer at most size of
    its tokens (a word counted with the space before it, as GPT-2's tokenizer splits text)."""
    starts, ends = word_spans(document.text)
    if len(starts) == 0:
        return []
    if tokenizer is None:
        weights = np.ones(len(starts), dtype=np.int64)
    else:
        weights = np.array([len(tokenizer.encode_ordinary(" " + document.text[s:e])) for s, e in zip(starts, ends)])
    return [Chunk(document.source, int(starts[a]), document.text[starts[a]:ends[b - 1]])
            for a, b in chunk_ranges(weights, size, overlap)]


# ---------------------------------------------------------------------------------------------------
# BM25 as an inverted index
#
# score(q, d) = sum over the query's terms t (repeats counted) of
#     idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
# with idf(t) = ln(N - n(t) + 0.5) - ln(n(t) + 0.5), N chunks, n(t) of them holding t. A term in more
# than half the chunks would get a negative idf; as in rank_bm25, such terms get epsilon times the
# average idf of all terms instead (the "floor"). Per term, the postings list the chunks that hold
# it and how often; a query reads only its own terms' postings, never the chunks without them.

@dataclasses.dataclass
class BM25:
    terms: dict[str, int]  # term -> its id, in order of first appearance
    term_start: np.ndarray  # (V + 1,) int64: term t's postings are [term_start[t], term_start[t + 1])
    posting_chunk: np.ndarray  # (P,) int32: the chunk of each posting, ascending within a term
    posting_tf: np.ndarray  # (P,) int32: how often the term occurs in that chunk
    chunk_length: np.ndarray  # (N,) int64: terms per chunk
    k1: float = 1.5
    b: float = 0.75
    epsilon: float = 0.25

    def __post_init__(self):
        n = len(self.chunk_length)
        df = np.diff(self.term_start).astype(np.float64)  # (V,) chunks holding each term
        idf = np.log(n - df + 0.5) - np.log(df + 0.5)
        # rank_bm25 averages with a running sum in first-appearance order; cumsum adds in the same order
        average = float(np.cumsum(idf)[-1]) / len(idf) if len(idf) else 0.0
        self.idf = np.where(idf < 0, self.epsilon * average, idf)  # (V,)
        tf = self.posting_tf.astype(np.float64)
        length = self.chunk_length[self.posting_chunk]  # (P,) |d| of each posting's chunk
        avgdl = self.chunk_length.sum() / n
        # Each posting's whole contribution, computed once (in rank_bm25's order of operations, so the
        # floats come out the same): a query only adds these up.
        term_of_posting = np.repeat(np.arange(len(idf)), np.diff(self.term_start))
        self.weight = self.idf[term_of_posting] * (
            tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * length / avgdl)))  # (P,)

    def __len__(self) -> int:
        return len(self.chunk_length)

    def scores(self, query: Sequence[str]) -> np.ndarray:
        """(N,) float64: every chunk's score for the query's terms (terms the index lacks add nothing)."""
        scores = np.zeros(len(self))
        for term in query:  # in the query's order, repeats included, as rank_bm25 adds them
            t = self.terms.get(term)
            if t is not None:
                s, e = self.term_start[t], self.term_start[t + 1]
                scores[self.posting_chunk[s:e]] += self.weight[s:e]  # a term lists each chunk once
        return scores

    def top(self, query: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best chunks (ids) and their scores, best first; equal scores in chunk order."""
        if k > len(self):
            raise UserError(f"--k {k} is more than the {len(self)} chunks in the index; ask for at most {len(self)}")
        scores = self.scores(query)
        pool = np.flatnonzero(scores > 0)  # the top k come from the chunks scoring above 0, if k of them do
        if len(pool) < k:
            pool = np.arange(len(self))
        pooled = scores[pool]
        kth = -np.partition(-pooled, k - 1)[k - 1]  # the k-th highest score
        above = pool[pooled > kth]  # fewer than k
        # The rest are the first chunks scoring exactly kth (taken in order: without a query term, a great
        # many chunks score 0).
        top = np.concatenate((above, pool[pooled == kth][:k - len(above)]))
        top = top[np.lexsort((top, -scores[top]))]
        return top, scores[top]


def build_bm25(chunks: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25) -> BM25:
    """The index of chunks given as their terms: the terms numbered by dicts, the postings made by numpy."""
    if not any(chunks):
        raise UserError("the documents hold no words to index; give text files, Markdown or JSON/JSONL records")
    # Numbered in order of first appearance; map and chain keep the per-word work out of Python bytecode.
    terms = {term: i for i, term in enumerate(dict.fromkeys(itertools.chain.from_iterable(chunks)))}
    length = np.array([len(c) for c in chunks], dtype=np.int64)
    ids = np.fromiter(map(terms.__getitem__, itertools.chain.from_iterable(chunks)), dtype=np.int64,
                      count=int(length.sum()))
    chunk_of = np.repeat(np.arange(len(chunks), dtype=np.int64), length)
    # one key per (term, chunk) pair, so sorting the keys groups postings by term, chunks ascending
    keys, tf = np.unique(ids * len(chunks) + chunk_of, return_counts=True)
    term_start = np.searchsorted(keys // len(chunks), np.arange(len(terms) + 1))
    return BM25(terms, term_start.astype(np.int64), (keys % len(chunks)).astype(np.int32), tf.astype(np.int32),
                length, k1, b, epsilon)


# ---------------------------------------------------------------------------------------------------
# The index folder: a format version, the chunks, the postings as .npy, and the sources' fingerprints

INDEX_FORMAT = "llm-lifecycle rag index"
INDEX_VERSION = 1
ARRAYS = ("term_start", "posting_chunk", "posting_tf", "chunk_length", "chunk_bytes", "chunk_source", "chunk_offset")


@dataclasses.dataclass
class Index:
    bm25: BM25
    text: bytes  # every chunk's text in UTF-8, one after another
    chunk_bytes: np.ndarray  # (N + 1,) int64: chunk i is text[chunk_bytes[i]:chunk_bytes[i + 1]]
    chunk_source: np.ndarray  # (N,) int32: index into sources
    chunk_offset: np.ndarray  # (N,) int64: character offset in its document
    sources: list[str]  # one per chunk source (a file, or a record of one)
    meta: dict  # settings (k1, b, epsilon, stop words, chunking) and the files' fingerprints

    def chunk(self, i: int) -> Chunk:
        text = self.text[self.chunk_bytes[i]:self.chunk_bytes[i + 1]].decode("utf-8")
        return Chunk(self.sources[self.chunk_source[i]], int(self.chunk_offset[i]), text)

    def query_words(self, query: str) -> list[str]:
        query_terms = words(query, STOP_WORDS if self.meta["stop_words"] else frozenset())
        if not query_terms:
            raise UserError(f"the query {query!r} has no words to search for; ask with words or numbers")
        return query_terms

    def search(self, query: str, k: int) -> list[dict]:
        ids, scores = self.bm25.top(self.query_words(query), k)
        return [{"score": float(s), **dataclasses.asdict(self.chunk(int(i)))} for i, s in zip(ids, scores)]


def build_index(chunks: Sequence[Chunk], meta: dict) -> Index:
    stop = STOP_WORDS if meta["stop_words"] else frozenset()
    bm25 = build_bm25([words(c.text, stop) for c in chunks], meta["k1"], meta["b"], meta["epsilon"])
    encoded = [c.text.encode("utf-8") for c in chunks]
    sources = list(dict.fromkeys(c.source for c in chunks))
    number = {s: i for i, s in enumerate(sources)}
    return Index(bm25, b"".join(encoded), np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64),
                 np.array([number[c.source] for c in chunks], dtype=np.int32),
                 np.array([c.offset for c in chunks], dtype=np.int64), sources, meta)


def fingerprint(path: Path) -> dict:
    """What tells later whether a source file changed: size, modification time and SHA-256."""
    stat = path.stat()
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}


def save_index(index: Index, folder: Path) -> None:
    """The arrays first, meta.json last: a folder without meta.json is an unfinished one."""
    (folder / "meta.json").unlink(missing_ok=True)
    bm25 = index.bm25
    arrays = {"term_start": bm25.term_start, "posting_chunk": bm25.posting_chunk, "posting_tf": bm25.posting_tf,
              "chunk_length": bm25.chunk_length, "chunk_bytes": index.chunk_bytes,
              "chunk_source": index.chunk_source, "chunk_offset": index.chunk_offset}
    for name, array in arrays.items():
        tmp = folder / f".{name}.{os.getpid()}.npy"
        np.save(tmp, array, allow_pickle=False)
        os.replace(tmp, folder / f"{name}.npy")
    atomic_write(folder / "chunks.bin", index.text)
    atomic_write(folder / "terms.txt", "\n".join(bm25.terms))  # terms hold no whitespace: one a line
    atomic_write(folder / "sources.json", json.dumps(index.sources, ensure_ascii=False))
    meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, **index.meta,
            "chunks": len(bm25), "terms": len(bm25.terms), "postings": len(bm25.posting_tf)}
    atomic_write(folder / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def read_meta(folder: Path) -> dict:
    if not folder.is_dir():
        raise UserError(f"--index {folder} is not a folder; build one with: python rag.py index FILES --out {folder}")
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"--index {folder} has no readable meta.json, so it is not a finished index; build it again "
                        f"with python rag.py index FILES --out {folder} --force") from None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise UserError(f"--index {folder} is not an index of rag.py; build one with python rag.py index")
    if meta.get("version") != INDEX_VERSION:
        raise UserError(f"--index {folder} is an index of format version {meta.get('version')}, and this rag.py "
                        f"reads version {INDEX_VERSION}; build it again with python rag.py index ... --force")
    kinds = {"k1": (int, float), "b": (int, float), "epsilon": (int, float), "stop_words": bool, "chunks": int,
             "terms": int, "postings": int, "files": list}
    wrong = [key for key, kind in kinds.items() if not isinstance(meta.get(key), kind)]
    if wrong:
        raise UserError(f"--index {folder} is damaged (meta.json has no valid {', '.join(wrong)}); build it again "
                        f"with python rag.py index ... --force")
    return meta


def load_index(folder: Path) -> Index:
    """The index saved in folder, checked for consistency: a damaged folder is one clear sentence."""
    meta = read_meta(folder)
    arrays = {name: read_part(folder / f"{name}.npy", lambda p: np.load(p, allow_pickle=False)) for name in ARRAYS}
    text = read_part(folder / "chunks.bin", Path.read_bytes)
    terms = read_part(folder / "terms.txt", lambda p: p.read_text(encoding="utf-8").split("\n"))
    sources = read_part(folder / "sources.json", lambda p: json.loads(p.read_text(encoding="utf-8")))
    problem = index_problem(arrays, len(text), terms, sources, meta)
    if problem:
        raise UserError(f"--index {folder} is damaged ({problem}); build it again with python rag.py index ... --force")
    a = arrays
    bm25 = BM25({t: i for i, t in enumerate(terms)}, a["term_start"], a["posting_chunk"], a["posting_tf"],
                a["chunk_length"], meta["k1"], meta["b"], meta["epsilon"])
    return Index(bm25, text, a["chunk_bytes"], a["chunk_source"], a["chunk_offset"], sources, meta)


def read_part(path: Path, read):
    """read(path), or UserError saying which file of the index is unreadable."""
    try:
        return read(path)
    except (OSError, ValueError, EOFError) as e:  # json's and UnicodeDecodeError are ValueErrors
        reason = e.strerror if isinstance(e, OSError) else type(e).__name__
        raise UserError(f"--index {path.parent} is damaged ({path.name} cannot be read: {reason}); build it again "
                        f"with python rag.py index ... --force") from None


def index_problem(a: dict[str, np.ndarray], text_bytes: int, terms: list[str], sources, meta: dict) -> str | None:
    """What is inconsistent in an index's arrays, or None."""
    n, v, p = meta.get("chunks"), meta.get("terms"), meta.get("postings")
    shapes = {"term_start": v + 1, "posting_chunk": p, "posting_tf": p, "chunk_length": n, "chunk_bytes": n + 1,
              "chunk_source": n, "chunk_offset": n}
    for name, size in shapes.items():
        if a[name].shape != (size,) or a[name].dtype.kind != "i":
            return f"{name}.npy holds {a[name].dtype} {a[name].shape}, not {size} integers"
    if len(terms) != v or len(set(terms)) != v or not isinstance(sources, list):
        return "terms.txt or sources.json does not match meta.json"
    if a["term_start"][0] != 0 or a["term_start"][-1] != p or np.any(np.diff(a["term_start"]) < 0):
        return "term_start.npy is not an ascending list of postings"
    if p and (a["posting_chunk"].min() < 0 or a["posting_chunk"].max() >= n or a["posting_tf"].min() < 1):
        return "the postings name chunks that do not exist"
    if not np.array_equal(np.bincount(a["posting_chunk"], weights=a["posting_tf"], minlength=n), a["chunk_length"]):
        return "the postings do not add up to the chunks' lengths"
    if a["chunk_bytes"][0] != 0 or a["chunk_bytes"][-1] != text_bytes or np.any(np.diff(a["chunk_bytes"]) < 0):
        return "chunk_bytes.npy does not cut chunks.bin"
    if n and (a["chunk_source"].min() < 0 or a["chunk_source"].max() >= len(sources)):
        return "chunk_source.npy names sources that do not exist"
    return None


def changed_sources(meta: dict) -> list[str]:
    """The source files that are gone or differ from what was indexed (the hash decides when size or
    modification time moved)."""
    changed = []
    for known in meta["files"]:
        path = Path(known["path"])
        if not path.is_file():
            changed.append(f"{path} (gone)")
            continue
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) != (known["size"], known["mtime_ns"]) and \
                fingerprint(path)["sha256"] != known["sha256"]:
            changed.append(str(path))
    return changed


def open_index(folder: str) -> tuple[Index, float]:
    """load_index with its time, and a note on stderr if sources changed since it was built."""
    start = time.perf_counter()
    index = load_index(Path(folder))
    seconds = time.perf_counter() - start
    changed = changed_sources(index.meta)
    if changed:
        print(f"note: {len(changed)} source file(s) changed since the index was built ({', '.join(changed[:3])}); "
              f"the results are from the old text: rebuild with python rag.py index ... --force", file=sys.stderr)
    return index, seconds


# ---------------------------------------------------------------------------------------------------
# index and search

def index_main(args: argparse.Namespace) -> dict:
    if args.overlap >= args.chunk:
        raise UserError(f"--overlap {args.overlap} must be smaller than --chunk {args.chunk}")
    out = Path(args.out)
    if (out / "meta.json").exists() and not args.force:
        raise UserError(f"--out {out} already holds an index; add --force to replace it, or name another folder")
    writable_folder(out, "--out")
    start = time.perf_counter()
    files = source_files(args.sources) if args.sources else [default_data()]
    tokenizer = get_tokenizer() if args.chunk_by == "tokens" else None
    chunks = [c for f in files for d in read_documents(f)
              for c in chunk_document(d, args.chunk, args.overlap, tokenizer)]
    if not chunks:
        raise UserError(f"the {len(files)} file(s) hold no words to index; the corpus is empty")
    meta = {"k1": args.k1, "b": args.b, "epsilon": args.epsilon, "stop_words": args.stop_words,
            "chunk": args.chunk, "overlap": args.overlap, "chunk_by": args.chunk_by,
            "files": [fingerprint(f) for f in files]}
    index = build_index(chunks, meta)
    with RunLock(out):  # a second `index` into the same folder stops instead of mixing its files in
        save_index(index, out)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"indexed {len(files)} file(s): {len(chunks):,} chunks, {len(index.bm25.terms):,} terms, "
          f"{len(index.bm25.posting_tf):,} postings in {seconds:.2f} s; {out} holds {size / 1e6:.1f} MB")
    return {"files": len(files), "chunks": len(chunks), "terms": len(index.bm25.terms), "seconds": seconds,
            "bytes": size, "out": str(out)}


def json_target(args: argparse.Namespace) -> Path | None:
    """--json's file, checked before any work: writable, and an existing one kept unless --force."""
    if args.json is None:
        return None
    path = writable_file(Path(args.json), "--json")
    if path.exists() and not args.force:
        raise UserError(f"--json {path} already exists; add --force to replace it, or name another file")
    return path


def read_queries(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--queries {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    queries = [line.strip() for line in lines if line.strip()]
    if not queries:
        raise UserError(f"--queries {path} holds no queries; write one a line")
    return queries


def search_main(args: argparse.Namespace) -> dict:
    if (args.query is None) == (args.queries is None):
        raise UserError("give one query, or --queries FILE with one a line (not both)")
    json_path = json_target(args)
    queries = read_queries(args.queries) if args.queries else [args.query]
    index, load_seconds = open_index(args.index)
    start = time.perf_counter()
    results = [{"query": q, "results": index.search(q, args.k)} for q in queries]
    seconds = (time.perf_counter() - start) / len(queries)
    for record in results:
        print(f"query: {record['query']}")
        for rank, r in enumerate(record["results"], 1):
            preview = " ".join(r["text"].split())[:100]
            print(f"  {rank}. {r['score']:8.4f}  {r['source']}:{r['offset']}  {preview}")
    print(f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'}: {seconds * 1e3:.3f} ms per query "
          f"(index loaded in {load_seconds:.3f} s)")
    result = {"queries": results, "seconds_per_query": seconds, "load_seconds": load_seconds}
    if json_path:
        atomic_write(json_path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {json_path}")
    return result


# ---------------------------------------------------------------------------------------------------
# ask: an answer from the retrieved chunks, with its sources

def language_model(init: str, preset: str | None, seed: int, device: torch.device, dtype: torch.dtype,
                   flag: str = "--init"):
    """The model init names, in eval mode, its tokenizer and its card."""
    torch.manual_seed(seed)  # makes --init random reproducible
    model, extra = load_model(init, preset=preset, device=device, dtype=dtype)
    if model.config.num_classes is not None:
        raise UserError(f"{flag} {init} is a classifier ({model.config.num_classes} classes), not a language model")
    return model.eval(), tokenizer_for(extra), extra


def grounded_prompt(question: str, chunks: Sequence[dict]) -> tuple[str, str]:
    """(instruction, input) of a template: the question, and the numbered sources it should answer from."""
    if not chunks:
        return question, ""
    sources = "\n\n".join(f"[{i}] {c['source']}, character {c['offset']}:\n{c['text']}"
                          for i, c in enumerate(chunks, 1))
    return f"{question}\n\nAnswer from the numbered sources below, and name the ones you use, like [1].", sources


def fit_prompt(tokenizer, template: Template, question: str, chunks: list[dict],
               room: int) -> tuple[list[int], list[dict]]:
    """The prompt's ids with as many of the chunks, best first, as leave `room` tokens of the context;
    the lowest-ranked are dropped first."""
    while True:
        text = template.prompt(*grounded_prompt(question, chunks))
        ids = bos(tokenizer) + encode_template_text(tokenizer, text, template)
        if len(ids) <= room or not chunks:
            return ids, chunks
        chunks = chunks[:-1]


def ask_main(args: argparse.Namespace) -> dict:
    device, dtype = device_and_dtype(args.device, args.dtype)
    index, _ = open_index(args.index) if not args.no_retrieval else (None, 0.0)
    found = index.search(args.question, args.k) if index else []
    found = [c for c in found if c["score"] > 0]  # a chunk that shares no term with the question is no source
    model, tokenizer, extra = language_model(args.init, args.preset, args.seed, device, dtype)
    template = TEMPLATES[args.template or default_template(extra)]
    block = model.config.block_size
    new_tokens = min(args.max_new_tokens, block - 1)
    ids, used = fit_prompt(tokenizer, template, args.question, found, block - new_tokens)
    if len(used) < len(found):
        print(f"note: dropped the {len(found) - len(used)} lowest-ranked of {len(found)} retrieved chunks so the "
              f"prompt and {new_tokens} new tokens fit the model's context of {block} tokens", file=sys.stderr)
    if index and not found:
        print("note: no chunk of the index shares a word with the question; answering without sources",
              file=sys.stderr)
    text = answer(model, [ids], tokenizer, template, max_new_tokens=new_tokens, batch_size=1, device=device,
                  dtype=dtype, on_text=lambda _, piece: print(piece, end="", flush=True))[0]
    print()
    if used:
        print("sources:")
        for i, c in enumerate(used, 1):
            print(f"  [{i}] {c['source']}, character {c['offset']} (score {c['score']:.3f})")
    return {"answer": text, "sources": used, "prompt_tokens": len(ids), "dropped": len(found) - len(used)}


# ---------------------------------------------------------------------------------------------------
# compare: prompting, retrieval and finetuning on the same test items
#
# Only the training split is ever shown to a model as an example, and an example with the test item's
# own instruction and input is skipped even there (the data could hold a duplicate).

def entry_words(entry: dict) -> list[str]:
    return words(f"{entry['instruction']}\n{entry['input']}")


def same_item(a: dict, b: dict) -> bool:
    return (a["instruction"].strip(), a["input"].strip()) == (b["instruction"].strip(), b["input"].strip())


def random_shots(train: Sequence[dict], item: dict, k: int, rng: random.Random) -> list[dict]:
    """k training entries drawn at random, never the item itself."""
    pool = [e for e in rng.sample(list(train), min(len(train), k + 8)) if not same_item(e, item)]
    return pool[:k]


def retrieved_shots(bm25: BM25, train: Sequence[dict], item: dict, k: int) -> list[dict]:
    """The k training entries whose instruction and input BM25 ranks closest to the item's, never the
    item itself; only entries that share a term with it."""
    query = entry_words(item)
    if not query:
        return []
    ids, scores = bm25.top(query, min(len(bm25), k + 8))
    return [train[i] for i, s in zip(ids, scores) if s > 0 and not same_item(train[i], item)][:k]


def shots_for(way: str, item: dict, train: Sequence[dict], bm25: BM25, k: int, rng: random.Random) -> list[dict]:
    """The solved examples an item's prompt shows: none, k random ones or the k that BM25 finds."""
    if way == "none":
        return []
    return random_shots(train, item, k, rng) if way == "random" else retrieved_shots(bm25, train, item, k)


def shot_prompt(tokenizer, template: Template, item: dict, shots: list[dict], room: int) -> list[int]:
    """The item's prompt after its solved examples (best first), dropping the last examples until the
    prompt leaves `room` tokens of the context."""
    while True:
        text = "".join(template.prompt(s["instruction"], s["input"]) + s["output"] + "\n\n" for s in shots)
        text += template.prompt(item["instruction"], item["input"])
        ids = bos(tokenizer) + encode_template_text(tokenizer, text, template)
        if len(ids) <= room or not shots:
            return ids
        shots = shots[:-1]


def answer_row(name: str, model, tokenizer, template: Template, prompts: list[list[int]], items: list[dict],
               args: argparse.Namespace, device, dtype) -> tuple[dict, list[str]]:
    """One row of the table: the answers to prompts, scored against the items' outputs."""
    start = time.perf_counter()
    replies = answer(model, prompts, tokenizer, template, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, device=device, dtype=dtype)
    seconds = time.perf_counter() - start
    row = {"name": name,
           "rouge_l": sum(rouge_l(e["output"], r) for e, r in zip(items, replies)) / len(items),
           "exact_match": sum(exact_match(e["output"], r) for e, r in zip(items, replies)) / len(items),
           "prompt_tokens_per_answer": sum(map(len, prompts)) / len(prompts),
           "seconds_per_answer": seconds / len(items)}
    print(f"{name}: ROUGE-L {row['rouge_l']:.4f}, {row['seconds_per_answer']:.2f} s per answer", file=sys.stderr)
    return row, replies


def model_rows(model, tokenizer, template: Template, name: str, ways: dict, test: list[dict], train: list[dict],
               bm25: BM25, args: argparse.Namespace, device, dtype) -> list[tuple[dict, list[str]]]:
    """The rows of one model: for each way of prompting (none, random or retrieved examples), its answers."""
    room = model.config.block_size - min(args.max_new_tokens, model.config.block_size - 1)
    rng = random.Random(args.seed)
    rows = []
    for way, label in ways.items():
        prompts = [shot_prompt(tokenizer, template, item, shots_for(way, item, train, bm25, args.k, rng), room)
                   for item in test]
        rows.append(answer_row(f"{name} {label}", model, tokenizer, template, prompts, test, args, device, dtype))
    return rows


def judge_rows(rows: list[tuple[dict, list[str]]], test: list[dict], args: argparse.Namespace, device, dtype) -> None:
    """Each row's judge_mean: the judge's 0-100 scores of its answers with the book's prompt, greedy."""
    judge, tokenizer, extra = language_model(args.judge, None, args.seed, device, dtype, "--judge")
    template = TEMPLATES[args.judge_template or default_template(extra)]
    for row, replies in rows:
        prompts = [prompt_ids(tokenizer, template, judge_prompt({**e, "model_response": r}))
                   for e, r in zip(test, replies)]
        scores = [parse_score(s) for s in answer(judge, prompts, tokenizer, template, max_new_tokens=16,
                                                 batch_size=args.batch_size, device=device, dtype=dtype)]
        parsed = [s for s in scores if s is not None]
        row["judge_mean"] = sum(parsed) / len(parsed) if parsed else None


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    show = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(show(row.get(c)) for c in columns) + " |" for row in rows])


def compare_main(args: argparse.Namespace) -> dict:
    json_path = json_target(args)
    splits = split_entries(load_entries(Path(args.data) if args.data else default_data()))
    train, test = splits["train"], splits["test"][:args.limit]
    bm25 = build_bm25([entry_words(e) for e in train])  # the training split only: test items are never found
    device, dtype = device_and_dtype(args.device, args.dtype)
    model, tokenizer, _ = language_model(args.init, args.preset, args.seed, device, dtype)
    ways = {"none": "zero-shot", "random": f"{args.k} random examples", "retrieved": f"{args.k} BM25 examples"}
    rows = model_rows(model, tokenizer, TEMPLATES["alpaca"], "base", ways, test, train, bm25, args, device, dtype)
    if args.finetuned:
        del model
        model, tokenizer, extra = language_model(args.finetuned, None, args.seed, device, dtype, "--finetuned")
        template = TEMPLATES[default_template(extra)]
        finetuned_ways = {"none": ways["none"], "retrieved": ways["retrieved"]}
        rows += model_rows(model, tokenizer, template, "finetuned", finetuned_ways, test, train, bm25, args, device,
                           dtype)
    if args.judge:
        judge_rows(rows, test, args, device, dtype)
    table = [row for row, _ in rows]
    print(markdown_table(table))
    result = {"rows": table, "items": len(test), "init": args.init, "finetuned": args.finetuned, "k": args.k,
              "max_new_tokens": args.max_new_tokens, "judge": args.judge}
    if json_path:
        atomic_write(json_path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {json_path}")
    return result


# ---------------------------------------------------------------------------------------------------
# Command line

COMMANDS = {"index": index_main, "search": search_main, "ask": ask_main, "compare": compare_main}


def fraction(text: str) -> float:
    """An argparse type for --b: a number from 0 to 1, both included (1 is full length normalisation)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(description=__doc__.split("\n\n")[0] + " Without a subcommand: index with its "
                            "defaults.", prog="rag.py")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    p = commands.add_parser("index", help="split documents into chunks and build their BM25 index")
    p.add_argument("sources", nargs="*", help="text, Markdown or JSON/JSONL files: names, folders or quoted glob "
                                              "patterns; by default the book's instruction data")
    p.add_argument("--out", default="out/index", help="the index folder")
    p.add_argument("--chunk", type=positive_int, default=200, help="words (or tokens, see --chunk-by) per chunk")
    p.add_argument("--overlap", type=non_negative_int, default=20, help="words (or tokens) a chunk repeats of the last")
    p.add_argument("--chunk-by", choices=("words", "tokens"), default="words",
                   help="measure chunks in words or in GPT-2 tokens (chunks always end between words)")
    p.add_argument("--k1", type=non_negative_float, default=1.5, help="BM25's term-frequency saturation")
    p.add_argument("--b", type=fraction, default=0.75, help="BM25's length normalisation, 0 to 1")
    p.add_argument("--epsilon", type=non_negative_float, default=0.25,
                   help="idf floor: terms in over half the chunks get epsilon times the average idf")
    p.add_argument("--stop-words", action=argparse.BooleanOptionalAction, default=False,
                   help="leave common English words out of chunks and queries")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=False, help="replace an existing index")

    p = commands.add_parser("search", help="the chunks that best match a query")
    p.add_argument("query", nargs="?", default=None, help="the query (or --queries)")
    p.add_argument("--index", default="out/index", help="an index folder from rag.py index")
    p.add_argument("--queries", default=None, metavar="FILE", help="many queries, one a line")
    p.add_argument("--k", type=positive_int, default=5, help="chunks per query")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE as JSON")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing --json file")

    p = commands.add_parser("ask", help="answer a question from the retrieved chunks, naming them")
    p.add_argument("question")
    p.add_argument("--index", default="out/index", help="an index folder from rag.py index")
    p.add_argument("--k", type=positive_int, default=3, help="chunks put into the prompt")
    p.add_argument("--no-retrieval", action="store_true", help="the same prompt without any chunk")
    p.add_argument("--template", default=None, choices=list(TEMPLATES),
                   help="the prompt format; by default the one the model was finetuned with or its family's own")
    p.add_argument("--max-new-tokens", type=positive_int, default=100, help="length of the answer")
    add_init_args(p, "gpt2", "the model that answers")
    p.add_argument("--seed", type=int, default=SEED, help="seed of --init random")
    add_device_args(p)

    p = commands.add_parser("compare", help="zero-shot, few-shot, retrieval and finetuning on the same test items")
    add_init_args(p, "gpt2", "the base model")
    p.add_argument("--finetuned", default=None, help="an instruction-finetuned model (e.g. finetune_instruct.py's "
                                                     "checkpoint): adds its zero-shot and retrieval rows")
    p.add_argument("--data", default=None, help="instruction data (JSON or JSONL); by default the book's")
    p.add_argument("--k", type=positive_int, default=3, help="examples in a few-shot prompt")
    p.add_argument("--limit", type=positive_int, default=None, help="answer only the first N test items")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="length of each answer")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts answered at once")
    p.add_argument("--judge", default=None, help="a model that rates each answer 0-100 with the book's prompt")
    p.add_argument("--judge-template", default=None, choices=list(TEMPLATES), help="the judge's prompt format")
    p.add_argument("--seed", type=int, default=SEED, help="seed of --init random and of the random examples")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the table to FILE as JSON")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing --json file")
    add_device_args(p)

    args = parser.parse_args(argv or ["index"])
    if getattr(args, "preset", None) is not None and args.init != "random":
        parser.error(f"--preset only applies to --init random; {args.init} brings its own size")
    return args


def main(args: argparse.Namespace) -> dict:
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    run_stage(main, parse_args)
