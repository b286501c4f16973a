"""rag.py's retrieval benchmark: BM25 build time, index size and query latency (p50, p95 at k=5) side by
side with rank_bm25 (the reference whose scores ours equal) and bm25s (the fast sparse-matrix package).

    python tests/bench.py rag --ref-python /work/refvenv/bin/python
    python tests/bench.py rag --ref-python VENV/bin/python --rag-corpora books --rag-queries 50

Two corpora: Tiny Shakespeare plus the book's instruction data, and a synthetic corpus of --rag-mb MB
(Zipf-distributed made-up words, generated here). Both are cut into chunks by rag.py (200 words, 20
overlapping) and every engine gets the same chunks as the same word lists (rag.words), so only indexing
and scoring are timed. rank_bm25 and bm25s run in a subprocess with the Python of a throwaway venv that
has them (--ref-python); neither is a dependency of the project. rank_bm25 keeps one Python dict per
chunk and scores a query by visiting every chunk, so on the large corpus it runs on its first
--rag-reference-mb MB of chunks only (the row says so), where ours is timed on the same sample too.

Rows: corpus, engine, chunks, build_s (from the chunks' word lists), index_mb (the saved index without
the chunks' text, which rag.py keeps too: texts_mb), p50_ms, p95_ms at k=5 (one query at a time), and the
top-5 agreement with rank_bm25 (identical up to the order of equal scores).
"""
import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import rag
from download import fetch


ENGINE_SCRIPT = r'''
import json, sys, time
import numpy as np
engine, chunks_path, queries_path, out_path, k = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
chunks = [line.split() for line in open(chunks_path, encoding="utf-8").read().split("\n")]
queries = [line.split() for line in open(queries_path, encoding="utf-8").read().split("\n")]
start = time.perf_counter()
if engine == "rank_bm25":
    from rank_bm25 import BM25Okapi
    index = BM25Okapi(chunks)
    def top(q):
        scores = index.get_scores(q)
        ids = np.argsort(scores)[::-1][:k]  # what BM25Okapi.get_top_n does
        return ids.tolist(), scores[ids].tolist()
    size = None
else:
    import bm25s, os, tempfile
    index = bm25s.BM25(k1=1.5, b=0.75, method="robertson")
    index.index(chunks, show_progress=False)
    def top(q):
        ids, scores = index.retrieve([q], k=k, show_progress=False, n_threads=1)
        return ids[0].tolist(), scores[0].tolist()
    folder = tempfile.mkdtemp()
    index.save(folder)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
build = time.perf_counter() - start
times, results = [], []
for q in queries:
    t = time.perf_counter()
    results.append(top(q))
    times.append(time.perf_counter() - t)
json.dump({"build_s": build, "bytes": size, "times": times, "results": results}, open(out_path, "w"))
'''


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ref-python", default=None, help="a Python with rank_bm25 and bm25s (a throwaway venv)")
    parser.add_argument("--rag-corpora", nargs="+", choices=("books", "synthetic"), default=["books", "synthetic"])
    parser.add_argument("--rag-mb", type=int, default=100, help="size of the synthetic corpus")
    parser.add_argument("--rag-reference-mb", type=int, default=10,
                        help="rank_bm25 runs on this many MB of the synthetic corpus' chunks")
    parser.add_argument("--rag-queries", type=int, default=200, help="queries per corpus (2 to 6 words each)")


def books() -> list[rag.Document]:
    """Tiny Shakespeare, and the instruction data one record a document."""
    return (rag.read_documents(fetch("text/tinyshakespeare.txt"))
            + rag.read_documents(fetch("instruct/instruction-data.json")))


def synthetic(mb: int, folder: Path) -> list[Path]:
    """mb MB of made-up words (3 to 9 letters, 50,000 of them, Zipf-distributed), in files of 10 MB."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = np.array(["".join(rng.choice(letters, rng.integers(3, 10))) for _ in range(50_000)])
    p = 1 / np.arange(1, len(vocab) + 1)
    files = []
    for i in range((mb + 9) // 10):
        words = vocab[rng.choice(len(vocab), size=min(10, mb - 10 * i) * 1_000_000 // 7, p=p / p.sum())]
        lines = [" ".join(words[j:j + 12]) for j in range(0, len(words), 12)]
        files.append(folder / f"part{i:02d}.txt")
        files[-1].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def make_queries(chunks: list[list[str]], n: int) -> list[list[str]]:
    """n queries of 2 to 6 words, each drawn from one chunk (so most queries have answers)."""
    rng = random.Random(0)
    full = [c for c in chunks if len(c) >= 6]
    return [rng.sample(rng.choice(full), rng.randint(2, 6)) for _ in range(n)]


def ours(chunks: list[list[str]], queries: list[list[str]], k: int) -> dict:
    start = time.perf_counter()
    bm25 = rag.build_bm25(chunks)
    build = time.perf_counter() - start
    times, results = [], []
    for q in queries:
        t = time.perf_counter()
        ids, scores = bm25.top(q, k)
        times.append(time.perf_counter() - t)
        results.append((ids.tolist(), scores.tolist()))
    return {"build_s": build, "times": times, "results": results}


def reference(engine: str, python: str, chunks: list[list[str]], queries: list[list[str]], k: int, tmp: Path) -> dict:
    (tmp / "chunks.txt").write_text("\n".join(" ".join(c) for c in chunks), encoding="utf-8")
    (tmp / "queries.txt").write_text("\n".join(" ".join(q) for q in queries), encoding="utf-8")
    subprocess.run([python, "-c", ENGINE_SCRIPT, engine, str(tmp / "chunks.txt"), str(tmp / "queries.txt"),
                    str(tmp / "out.json"), str(k)], check=True, timeout=7200)
    return json.loads((tmp / "out.json").read_text())


def agreement(mine: list, theirs: list) -> str:
    """How many queries' top k equal the reference's: the same scores (to 1e-9), and the same chunks
    wherever a score is not tied with another."""
    same = 0
    for (ids, scores), (ref_ids, ref_scores) in zip(mine, theirs):
        close = np.allclose(scores, ref_scores, rtol=1e-9, atol=1e-12)
        untied = [i for i, s in zip(ref_ids, ref_scores) if sum(abs(s - t) <= 1e-9 * abs(s) for t in ref_scores) == 1
                  and s != ref_scores[-1]]
        same += close and set(untied) <= set(ids)
    return f"{same}/{len(mine)} identical"


def row(corpus: str, engine: str, n_chunks: int, result: dict, index_bytes, agree: str = "") -> dict:
    ms = np.array(result["times"]) * 1e3
    return {"corpus": corpus, "engine": engine, "chunks": n_chunks, "build_s": result["build_s"],
            "index_mb": "-" if index_bytes is None else round(index_bytes / 1e6, 1),
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "top5_vs_rank_bm25": agree}


def corpus_rows(name: str, documents: list[rag.Document], args: argparse.Namespace, tmp: Path,
                reference_mb: int | None) -> list[dict]:
    start = time.perf_counter()
    chunks = [c for d in documents for c in rag.chunk_document(d, 200, 20)]
    index = rag.build_index(chunks, {"k1": 1.5, "b": 0.75, "epsilon": 0.25, "stop_words": False})
    (tmp / name).mkdir()
    rag.save_index(index, tmp / name)
    full_s = time.perf_counter() - start
    # the postings and chunk tables only: bm25s saves no texts, rag.py keeps the chunks' text beside them
    texts = ("chunks.bin", "sources.json")
    index_bytes = sum(f.stat().st_size for f in (tmp / name).iterdir() if f.name not in texts)
    text_bytes = sum((tmp / name / f).stat().st_size for f in texts)
    print(f"{name}: {len(chunks):,} chunks; chunk + index + save in {full_s:.1f} s", file=sys.stderr)
    words = [rag.words(c.text) for c in chunks]
    del index, chunks
    queries = make_queries(words, args.rag_queries)
    mine = ours(words, queries, 5)
    rows = [row(name, "rag.py", len(words), mine, index_bytes) | {"texts_mb": round(text_bytes / 1e6, 1)}]
    if args.ref_python:
        fast = reference("bm25s", args.ref_python, words, queries, 5, tmp)
        rows.append(row(name, "bm25s", len(words), fast, fast["bytes"]))
        sample, label = words, name
        if reference_mb is not None:  # rank_bm25 on the first chunks only
            sample = words[:max(1, len(words) * reference_mb // args.rag_mb)]
            label = f"{name}, first {reference_mb} MB"
            mine = ours(sample, queries, 5)
            rows.append(row(label, "rag.py", len(sample), mine, None))
        slow = reference("rank_bm25", args.ref_python, sample, queries, 5, tmp)
        rows.append(row(label, "rank_bm25", len(sample), slow, None))
        rows[-2 if reference_mb is not None else 0]["top5_vs_rank_bm25"] = agreement(mine["results"], slow["results"])
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "books" in args.rag_corpora:
            rows += corpus_rows("shakespeare+instruct", books(), args, tmp, None)
        if "synthetic" in args.rag_corpora:
            (tmp / "synthetic_files").mkdir()
            files = synthetic(args.rag_mb, tmp / "synthetic_files")
            documents = [d for f in files for d in rag.read_documents(f)]
            rows += corpus_rows(f"synthetic {args.rag_mb} MB", documents, args, tmp, args.rag_reference_mb)
    return rows
