"""evaluate.py benchmarks: multiple-choice scoring against the naive way, contamination throughput and
memory on a large corpus, perplexity throughput at GPT-2 124M size.

    python tests/bench.py evaluate                      # all three, the full sizes (minutes on a laptop CPU)
    python tests/bench.py evaluate --evaluate-parts choice --evaluate-questions 20 --evaluate-preset tiny

Models have random weights (the cost is the same; none can be downloaded here). Every item and every corpus
is generated here from a word list; no benchmark's items are copied. Rows: what, value, unit, detail.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import evaluate as ev

from download import fetch
from model import GPT, get_config
from tokenizer import get_tokenizer


REPO = Path(__file__).resolve().parents[2]
PARTS = ("choice", "contamination", "perplexity")
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river stone cloud silver forest bridge candle market "
         "winter garden engine paper window button rocket castle mirror pencil table music doctor planet coffee "
         "summer island letter camera dragon ticket yellow monkey sugar wallet kitchen").split()


@torch.inference_mode()
def naive_loglikelihood(model: GPT, context: list[int], continuation: list[int]) -> float:
    """The naive way: one full forward pass of context + continuation per choice."""
    ids = torch.tensor([[*context, *continuation[:-1]]])
    logits, _ = model(ids)  # (1, T, V)
    logprobs = logits[0, len(context) - 1:].float().log_softmax(-1)  # (L, V): the rows predicting the continuation
    return logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--evaluate-parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    parser.add_argument("--evaluate-preset", default="gpt2", help="model of the choice and perplexity benchmarks")
    parser.add_argument("--evaluate-questions", type=int, default=40,
                        help="questions per choice case (the naive way runs every one too)")
    parser.add_argument("--evaluate-batch-size", type=int, default=8, help="questions per forward pass")
    parser.add_argument("--evaluate-windows", type=int, default=2, help="perplexity windows per forward pass")
    parser.add_argument("--evaluate-corpus-mb", type=int, default=100, help="size of the generated contamination corpus")
    parser.add_argument("--evaluate-items", type=int, default=1000, help="evaluation items of the contamination case")
    parser.add_argument("--evaluate-perplexity-tokens", type=int, default=8192,
                        help="tokens of tinyshakespeare scored by the perplexity benchmark")


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    if "choice" in args.evaluate_parts:
        rows += choice_rows(args)
    if "contamination" in args.evaluate_parts:
        rows += contamination_rows(args)
    if "perplexity" in args.evaluate_parts:
        rows += perplexity_rows(args)
    return rows


def sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


# ---------------------------------------------------------------------------------------------------
# choice: one context per question against one full forward pass per choice

def choice_cases(rng: np.random.Generator, n: int) -> dict[str, tuple[list[ev.Item], list[ev.Item]]]:
    """Two shapes of benchmark, as (questions, shots): HellaSwag's (a sentence of context, four endings of
    about twenty tokens, no shots) and MMLU's (five shots, four options listed, one-letter answers)."""
    hellaswag = [ev.Item("generated", "hellaswag", [], sentence(rng, 40), [sentence(rng, 18) for _ in range(4)],
                         int(rng.integers(4))) for _ in range(n)]
    mmlu = [ev.Item("generated", "mmlu", [], sentence(rng, 30) + "?", [sentence(rng, 6) for _ in range(4)],
                    int(rng.integers(4)), "generated things") for _ in range(n + 5)]
    return {"HellaSwag-shaped, 0-shot": (hellaswag, []), "MMLU-shaped, 5-shot": (mmlu[5:], mmlu[:5])}


def choice_rows(args: argparse.Namespace) -> list[dict]:
    model = GPT(get_config(args.evaluate_preset)).eval()
    tokenizer = get_tokenizer()
    cpu = torch.device("cpu")
    rows = []
    for case, (items, shots) in choice_cases(np.random.default_rng(0), args.evaluate_questions).items():
        requests = [ev.make_request(tokenizer, item, shots, model.config.block_size) for item in items]
        context = sum(len(r.context) for r in requests) / len(requests)
        choice = sum(len(c) for r in requests for c in r.continuations) / sum(len(r.continuations) for r in requests)
        ev.score_requests(model, requests[:2], args.evaluate_batch_size, cpu)  # warm-up
        start = time.perf_counter()
        ours = ev.score_requests(model, requests, args.evaluate_batch_size, cpu)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        naive = [[naive_loglikelihood(model, r.context, c) for c in r.continuations] for r in requests]
        naive_s = time.perf_counter() - start
        gap = max(abs(a - b) for x, y in zip(ours, naive) for a, b in zip(x, y))
        detail = (f"{args.evaluate_preset}, {len(items)} questions, context {context:.0f} tokens, choices "
                  f"{choice:.1f} tokens on average")
        rows += [
            {"what": f"choice {case}: context once (ours)", "value": len(items) / ours_s, "unit": "items/s",
             "detail": f"{detail}; batch {args.evaluate_batch_size} questions"},
            {"what": f"choice {case}: a full forward per choice", "value": len(items) / naive_s, "unit": "items/s",
             "detail": "the naive way, one choice at a time"},
            {"what": f"choice {case}: speed-up", "value": naive_s / ours_s, "unit": "x",
             "detail": f"largest score difference {gap:.1e} nats"},
        ]
    return rows


# ---------------------------------------------------------------------------------------------------
# contamination: MB/s and peak memory of `evaluate.py contamination`, a process of its own

# Runs evaluate.py as __main__ and then writes the process's peak RSS (VmHWM, in kB) to a file. The
# figure must come from inside: Linux keeps ru_maxrss across fork and exec, so a child's ru_maxrss starts
# at the size of the (large) benchmark process that forked it, whereas VmHWM belongs to the new program.
PEAK_WRAPPER = """
import os, runpy, sys
peak_file, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(script))  # as `python script` would
try:
    runpy.run_path(script, run_name="__main__")
finally:
    status = open("/proc/self/status").read()
    open(peak_file, "w").write(status.split("VmHWM:")[1].split()[0])
"""


def run_measured(argv: list[str], workdir: Path) -> tuple[float, float, dict]:
    """Run evaluate.py with argv (plus --json) in a process of its own: seconds, peak RSS in MB, its JSON."""
    out, peak, log = workdir / "result.json", workdir / "peak.txt", workdir / "stderr.txt"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log, "w") as stderr:
        result = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, str(peak), str(REPO / "evaluate.py"), *argv,
                                 "--json", str(out)], stdout=subprocess.DEVNULL, stderr=stderr, cwd=workdir)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"evaluate.py {' '.join(argv)} failed: {log.read_text()[-500:]}")
    return seconds, int(peak.read_text()) / 1024, json.loads(out.read_text())


def write_corpus(path: Path, megabytes: float, planted: list[str], rng: np.random.Generator) -> None:
    """Lines of random words, megabytes of them, with each planted text on a line of its own somewhere."""
    lines_per_block = 2_000  # about 200 kB
    at = set(rng.choice(max(int(megabytes * 1e6 / 100), len(planted)), len(planted), replace=False).tolist())
    line, queue = 0, list(planted)
    with open(path, "w") as f:
        while f.tell() < megabytes * 1e6:
            words = rng.choice(WORDS, (lines_per_block, 16))
            block = []
            for row in words:
                block.append(queue.pop() if line in at and queue else " ".join(row))
                line += 1
            f.write("\n".join(block) + "\n")
        f.write("\n".join(queue) + "\n")  # any not placed yet


def write_token_folder(folder: Path, megabytes: float, planted: list[list[int]], rng: np.random.Generator) -> None:
    """A prepared token folder of random GPT-2 ids (uint16, with the meta.json tokenizer.py prepare writes),
    with the planted token sequences inside train.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    n = int(megabytes * 1e6 / 2)
    tokens = rng.integers(0, 50256, n, dtype=np.uint16)
    for k, ids in enumerate(planted):
        start = (k + 1) * (n // (len(planted) + 1))
        tokens[start:start + len(ids)] = ids
    tokens.tofile(folder / "train.bin")
    np.zeros(0, np.uint16).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 50257, "dtype": "uint16", "eot_token": 50256,
                                                  "bos_id": 50256, "eos_id": 50256, "tokenizer_name": "gpt2",
                                                  "train_tokens": n, "val_tokens": 0, "sources": ["generated"]}))


def contamination_rows(args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(1)
    tokenizer = get_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        questions = [sentence(rng, 30) for _ in range(args.evaluate_items)]
        (tmp / "items.jsonl").write_text("".join(json.dumps({"question": q, "choices": [sentence(rng, 4), "no"],
                                                             "answer": 0}) + "\n" for q in questions))
        planted_items = sorted(rng.choice(len(questions), 10, replace=False).tolist())
        # Each planted question's middle 20 words: an overlap of about 20 tokens, none at the edges.
        planted = [" " + " ".join(questions[i].split()[5:25]) for i in planted_items]
        for label, megabytes in (("1 MB", 1), (f"{args.evaluate_corpus_mb} MB", args.evaluate_corpus_mb)):
            corpus = tmp / f"corpus-{megabytes}.txt"
            write_corpus(corpus, megabytes, planted, rng)
            seconds, peak, result = run_measured(["contamination", "--eval", str(tmp / "items.jsonl"), "--corpus",
                                                  str(corpus)], tmp)
            found = "yes" if result["contaminated"] == planted_items else f"NO: {result['contaminated']}"
            rows += [{"what": f"contamination, text corpus {label}", "value": result["mb_per_second"], "unit": "MB/s",
                      "detail": f"{result['corpus_bytes'] / 1e6:.1f} MB, {result['corpus_tokens']:,} tokens, "
                                f"{args.evaluate_items} items, n 13, "
                                f"{os.cpu_count()} threads; planted overlaps found exactly: {found}"},
                     {"what": f"contamination, text corpus {label}: peak memory", "value": peak, "unit": "MB",
                      "detail": f"peak RSS (VmHWM) of the whole process, Python and torch included; {seconds:.1f} s "
                                f"in all"}]
            corpus.unlink()
        for label, megabytes in (("1 MB", 1), (f"{args.evaluate_corpus_mb} MB", args.evaluate_corpus_mb)):
            folder = tmp / f"tokens-{megabytes}"
            write_token_folder(folder, megabytes, [tokenizer.encode_ordinary(p) for p in planted], rng)
            seconds, peak, result = run_measured(["contamination", "--eval", str(tmp / "items.jsonl"), "--corpus",
                                                  str(folder)], tmp)
            found = "yes" if result["contaminated"] == planted_items else f"NO: {result['contaminated']}"
            rows += [{"what": f"contamination, token folder {label}", "value": result["mb_per_second"], "unit": "MB/s",
                      "detail": f"{result['corpus_tokens']:,} uint16 tokens; planted overlaps found exactly: {found}"},
                     {"what": f"contamination, token folder {label}: peak memory", "value": peak, "unit": "MB",
                      "detail": f"peak RSS (VmHWM) of the whole process; {seconds:.1f} s in all"}]
            for path in folder.iterdir():
                path.unlink()
    return rows


# ---------------------------------------------------------------------------------------------------
# perplexity: tokens per second with sliding windows

def perplexity_rows(args: argparse.Namespace) -> list[dict]:
    model = GPT(get_config(args.evaluate_preset)).eval()
    tokenizer = get_tokenizer()
    text = fetch("text/tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = ev.start_ids(tokenizer) + tokenizer.encode_ordinary(text)[:args.evaluate_perplexity_tokens]
    context = model.config.block_size
    batch = args.evaluate_windows
    rows = []
    ev.sequence_nll(model, [ids[:context + 1]], context, context, 1, torch.device("cpu"))  # warm-up
    for stride in (context, context // 2):
        start = time.perf_counter()
        nll, tokens = ev.sequence_nll(model, [ids], context, stride, batch, torch.device("cpu"))
        seconds = time.perf_counter() - start
        rows.append({"what": f"perplexity, context {context}, stride {stride}", "value": tokens / seconds,
                     "unit": "tokens/s", "detail": f"{args.evaluate_preset} ({model.num_params() / 1e6:.0f}M), "
                                                   f"{tokens:,} tokens of tinyshakespeare, {batch} windows per "
                                                   f"forward, loss {nll / tokens:.3f}"})
    return rows
