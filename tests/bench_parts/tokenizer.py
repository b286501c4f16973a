"""Tokenizer benchmarks: BPE training (incremental vs naive recount), GPT-2 encoding, corpus preparation,
and Mistral's SentencePiece encoding against the `sentencepiece` package.

    python tests/bench.py tokenizer --naive-merges 50 --sp-python /tmp/hfvenv/bin/python
    python tests/bench.py tokenizer --parts mistral --sp-python /tmp/hfvenv/bin/python

All on tinyshakespeare.txt (fetched into the download cache). Rows: what, value, unit, detail.
sentencepiece runs in a subprocess with the Python of a throwaway venv that has it (--sp-python);
the project never imports it.
"""
import argparse
import hashlib
import json
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import regex

from common import UserError
from download import fetch
from corpus import prepare_corpus
from tokenizer import BPETokenizer, GPT2_PATTERN, get_tokenizer, load_tokenizer, merge_pair



PARTS = ("train", "gpt2", "prepare", "mistral")
MISTRAL_TOKENIZER = "hf/mistralai/Mistral-7B-v0.1/tokenizer.model"

# Run by --sp-python: time sentencepiece's encode of one text with one model (best of N), print JSON.
SENTENCEPIECE_SCRIPT = """
import hashlib, json, sys, time
import numpy as np
import sentencepiece
model, text_path, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
sp = sentencepiece.SentencePieceProcessor(model_file=model)
text = open(text_path, encoding="utf-8").read()
best = float("inf")
for _ in range(repeats):
    start = time.perf_counter()
    ids = sp.encode(text)
    best = min(best, time.perf_counter() - start)
digest = hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()
print(json.dumps({"seconds": best, "n": len(ids), "sha256": digest, "version": sentencepiece.__version__}))
"""


def naive_train(text: str, vocab_size: int, max_merges: int | None = None) -> tuple[list[bytes], float]:
    """The straightforward BPE trainer: after every merge, recount every pair in the whole corpus.

    Same pre-tokenization and tie-breaking (most frequent pair, then the smallest ids) as
    BPETokenizer.train, so the merges should match. Each pre-tokenized piece of the corpus is kept
    (no counting of distinct words), as in the well-known minimal implementations; pairs are merged
    with the same merge_pair as ours. Stops after `max_merges` merges when given. Returns (merged
    tokens in order, seconds spent on the merges, pre-tokenization excluded)."""
    ids = [list(piece.encode("utf-8")) for piece in regex.findall(GPT2_PATTERN, text)]
    vocab = [bytes([b]) for b in range(256)]
    n_merges = vocab_size - 256 if max_merges is None else min(max_merges, vocab_size - 256)
    start = time.perf_counter()
    for _ in range(n_merges):
        stats = Counter()
        for piece in ids:
            stats.update(zip(piece, piece[1:]))
        if not stats:
            break
        best = max(stats.values())
        pair = min(p for p, count in stats.items() if count == best)
        new_id = len(vocab)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        ids = [merge_pair(piece, pair, new_id) for piece in ids]
    return vocab[256:], time.perf_counter() - start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="which measurements to run: BPE training, GPT-2 encoding, corpus preparation, "
                             "Mistral's SentencePiece encoding")
    parser.add_argument("--vocab-size", type=int, default=1000, help="BPE training target vocabulary")
    parser.add_argument("--naive-merges", type=int, default=0,
                        help="time only this many merges of the naive trainer and extrapolate per merge "
                             "(0: run all of them, a few minutes)")
    parser.add_argument("--prepare-copies", type=int, default=20,
                        help="copies of tinyshakespeare.txt in the corpus timed for prepare_corpus")
    parser.add_argument("--sp-python", default=None,
                        help="the Python of a venv with the sentencepiece package: Mistral's encoding is timed "
                             "with it too, in the same run (without it, ours alone)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Mistral encoding: best of this many runs, ours and sentencepiece's taking turns")


def run(args: argparse.Namespace) -> list[dict]:
    path = fetch("text/tinyshakespeare.txt")
    text = path.read_text(encoding="utf-8")
    rows = []
    if "train" in args.parts:
        rows += training_rows(args, text)
    if "gpt2" in args.parts:
        rows += gpt2_encoding_rows(text)
    if "prepare" in args.parts:
        rows += prepare_rows(args, text)
    if "mistral" in args.parts:
        rows += mistral_rows(args, path, text)
    return rows


def training_rows(args: argparse.Namespace, text: str) -> list[dict]:
    """BPE training, ours against the naive trainer. No special tokens, so both learn vocab_size - 256 merges."""
    mb = len(text.encode("utf-8")) / 1e6
    rows = []

    def train_ours(vocab_size: int) -> tuple[BPETokenizer, float]:
        start = time.perf_counter()
        tok = BPETokenizer().train(text, vocab_size, special_tokens=())
        return tok, time.perf_counter() - start

    ours, ours_s = train_ours(args.vocab_size)
    n_merges = args.vocab_size - 256
    timed = min(args.naive_merges or n_merges, n_merges)
    naive_tokens, naive_s = naive_train(text, args.vocab_size, timed)
    same = [ours.vocab[i] for i in range(256, 256 + timed)] == naive_tokens
    rows.append({"what": f"BPE train to {args.vocab_size}, incremental (ours)", "value": ours_s, "unit": "s",
                 "detail": f"tinyshakespeare {mb:.1f} MB, {n_merges} merges, pre-tokenization included"})
    if timed == n_merges:
        rows += [
            {"what": f"BPE train to {args.vocab_size}, naive recount", "value": naive_s, "unit": "s",
             "detail": f"all {n_merges} merges measured"},
            {"what": "BPE train speed-up", "value": naive_s / ours_s, "unit": "x",
             "detail": f"target >= 30x; same merges: {'yes' if same else 'NO'}"},
        ]
    else:
        # Compare the same first `timed` merges. Conservative: ours' fixed cost (pre-tokenization, the
        # first count) weighs more in a short run, and the naive trainer's first merges are its slowest.
        _, ours_part_s = train_ours(256 + timed)
        rows += [
            {"what": f"BPE train, naive recount, first {timed} merges", "value": naive_s, "unit": "s",
             "detail": f"~{naive_s / timed * n_merges:.0f} s for all {n_merges} if every merge cost as much "
                       f"(an overestimate: later merges are cheaper)"},
            {"what": f"BPE train speed-up, first {timed} merges", "value": naive_s / ours_part_s, "unit": "x",
             "detail": f"target >= 30x (on all merges); ours {ours_part_s:.2f} s; same merges: "
                       f"{'yes' if same else 'NO'}"},
        ]
    return rows


def gpt2_encoding_rows(text: str) -> list[dict]:
    """GPT-2 encoding of the whole file: ours from an empty piece cache, then tiktoken on one thread."""
    mb = len(text.encode("utf-8")) / 1e6
    scratch, fast = get_tokenizer("scratch"), get_tokenizer("tiktoken")
    scratch._cache.clear()
    start = time.perf_counter()
    ids = scratch.encode_ordinary(text)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    scratch.encode_ordinary(text)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    same = fast.encode_ordinary(text) == ids
    fast_s = time.perf_counter() - start
    return [
        {"what": "GPT-2 encode, from scratch (pure Python)", "value": mb / cold, "unit": "MB/s",
         "detail": f"empty piece cache; {mb / warm:.1f} MB/s with it warm; target >= 2; same ids as tiktoken: "
                   f"{'yes' if same else 'NO'}"},
        {"what": "GPT-2 encode, tiktoken (one thread)", "value": mb / fast_s, "unit": "MB/s", "detail": ""},
    ]


def prepare_rows(args: argparse.Namespace, text: str) -> list[dict]:
    """Corpus preparation: a folder of copies, so the threads have several documents to share."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for i in range(args.prepare_copies):
            (corpus / f"{i:03d}.txt").write_text(text, encoding="utf-8")
        result = prepare_corpus(corpus, Path(tmp) / "out", tokenizer=get_tokenizer())
    return [{"what": "prepare_corpus (tiktoken, threads)", "value": result["mb_per_s"], "unit": "MB/s",
             "detail": f"{result['bytes'] / 1e6:.0f} MB, {args.prepare_copies} files, "
                       f"{result['train_tokens'] + result['val_tokens']:,} tokens"}]


def sentencepiece_encode(sp_python: str, model: Path, text_path: Path, repeats: int) -> dict:
    """sentencepiece's best time to encode the text, in a subprocess: {"seconds", "n", "sha256", "version"}."""
    try:
        done = subprocess.run([sp_python, "-c", SENTENCEPIECE_SCRIPT, str(model), str(text_path), str(repeats)],
                              capture_output=True, text=True, timeout=600)
    except OSError as e:
        raise UserError(f"cannot run --sp-python {sp_python} ({e.strerror})") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--sp-python {sp_python} could not run sentencepiece ({last})")
    return json.loads(done.stdout)


def mistral_rows(args: argparse.Namespace, text_path: Path, text: str) -> list[dict]:
    """Mistral 7B's tokenizer.model encoding all of Tiny Shakespeare in one call, one thread: ours
    from an empty chunk cache, and sentencepiece (C++) when --sp-python is given, taking turns."""
    model = fetch(MISTRAL_TOKENIZER)
    tok = load_tokenizer(model)
    mb = len(text.encode("utf-8")) / 1e6
    ours_s = sp_s = float("inf")
    reference = None
    for _ in range(args.repeats):
        tok._cache.clear()
        start = time.perf_counter()
        ids = tok.encode(text)
        ours_s = min(ours_s, time.perf_counter() - start)
        if args.sp_python:
            reference = sentencepiece_encode(args.sp_python, model, text_path, 1)
            sp_s = min(sp_s, reference["seconds"])
    start = time.perf_counter()
    tok.encode(text)
    warm = time.perf_counter() - start
    detail = f"empty chunk cache, best of {args.repeats}; {mb / warm:.1f} MB/s with it warm"
    if reference is None:
        return [{"what": "Mistral encode, ours (pure Python, one thread)", "value": mb / ours_s, "unit": "MB/s",
                 "detail": detail + "; pass --sp-python to compare with sentencepiece"}]
    same = reference["sha256"] == hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()
    return [
        {"what": "Mistral encode, ours (pure Python, one thread)", "value": mb / ours_s, "unit": "MB/s",
         "detail": f"{detail}; same ids as sentencepiece: {'yes' if same else 'NO'} ({len(ids):,} tokens)"},
        {"what": f"Mistral encode, sentencepiece {reference['version']} (C++)", "value": mb / sp_s, "unit": "MB/s",
         "detail": f"best of {args.repeats}, in the same run"},
        {"what": "Mistral encode, ours / sentencepiece", "value": sp_s / ours_s, "unit": "x",
         "detail": "target >= 0.5x, goal 1x"},
    ]

