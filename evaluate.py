"""Measuring a language model honestly: perplexity, multiple choice, contamination, recall, answers.

    python evaluate.py perplexity --init gpt2 --data book.txt --context 1024 --stride 512
    python evaluate.py choice --init gpt2 --data astronomy_test.csv --shots 5 --shots-from astronomy_dev.csv
    python evaluate.py contamination --eval items.jsonl --corpus out/tokens --json contamination.json
    python evaluate.py choice --init gpt2 --data items.jsonl --exclude contamination.json
    python evaluate.py memorization --init out/pretrain/ckpt.pt --data train.txt
    python evaluate.py answers out/instruct/test-responses.json --judge microsoft/Phi-3-mini-4k-instruct

One subcommand per question. Each works on any model the project loads (--init, as in the other stages,
with that model's own tokenizer), prints a table, and with --json FILE writes its figures as JSON.
`python evaluate.py` alone measures GPT-2's perplexity on "The Verdict".

Reading order (the evaluation files themselves are read and checked by benchmarks.py): perplexity with
sliding windows, multiple-choice scoring as EleutherAI's lm-evaluation-harness does it (the context runs
once per question, its keys and values shared by the choices), n-gram contamination streamed over a
corpus of any size, extractable memorisation, the scoring of instruction answers (ROUGE-L, exact match,
a judge model), the command line.
"""
import argparse
import bisect
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import LAYOUTS, MMLU_LETTERS, Item, field, load_items, load_questions, load_records

from common import (ArgumentParser, ProgressLine, SEED, UserError, atomic_write, non_negative_int, positive_int,
                    run_stage, writable_folder)
from corpus import corpus_files, document_ids, load_token_folder, read_blocks, read_text
from data import degenerate_answers, degenerate_note
from download import fetch
from generate import answer, generate, left_pad
from load_gpt2 import add_init_args, check_preset, load_model, tokenizer_for
from model import GPT, IGNORE, KVCache, PRESETS, add_device_args, device_and_dtype
from scoring import exact_match, judge_prompt, parse_score, rouge_l
from templates import TEMPLATES, default_template, prompt_ids
from tokenizer_base import bos


DEFAULT_TEXT = "text/the-verdict.txt"  # a short story, downloaded once into the cache


# ---------------------------------------------------------------------------------------------------
# Perplexity with sliding windows

def start_ids(tokenizer) -> list[int]:
    """What a scored text starts with: the family's BOS, or (GPT-2) <|endoftext|>, which separates the
    documents GPT-2 was trained on. Either way the text's first token is scored too, as the harness does."""
    return bos(tokenizer) or [tokenizer.eos_id]


def sliding_windows(n_ids: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score every token of a sequence of n_ids tokens but the first, each once.

    A window (begin, first, end) reads ids[begin:end] (at most `context` tokens) and scores the targets
    ids[first:end + 1]. Windows start every `stride` tokens; each scores the targets that earlier ones
    did not reach, so a scored token sees at least context - stride + 1 tokens before it (all of them
    in the first window). stride == context: no overlap, cheapest; stride 1: the most context, slowest."""
    assert 1 <= stride <= context, f"stride {stride} must be in 1..context ({context})"
    windows, begin, scored = [], 0, 0  # targets 1..scored are done
    while scored < n_ids - 1:
        end = min(begin + context, n_ids - 1)
        windows.append((begin, scored + 1, end))
        begin, scored = begin + stride, end
    return windows


@torch.inference_mode()
def sequence_nll(model: GPT, documents: Sequence[Sequence[int]], context: int, stride: int, batch_size: int,
                 device: torch.device, on_progress: Callable[[int, int], None] | None = None) -> tuple[float, int]:
    """Total negative log-likelihood in nats of every document's tokens after its first, and how many
    tokens that is. Windows of all documents are batched; a short last window is padded on the right,
    which no real position attends to (causal attention), and its padding is not scored. model: a GPT
    (its hidden() and lm_head are used, not a torch.compile'd wrapper)."""
    docs = [torch.as_tensor(list(d), dtype=torch.long) for d in documents]
    windows = [(d, *w) for d, ids in enumerate(docs) for w in sliding_windows(len(ids), context, stride)]
    total, tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        width = max(end - begin for _, begin, _, end in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), IGNORE, dtype=torch.long)  # not scored unless set below
        for row, (d, begin, first, end) in enumerate(batch):
            inputs[row, :end - begin] = docs[d][begin:end]
            targets[row, first - begin - 1:end - begin] = docs[d][first:end + 1]  # column j predicts ids[begin + j + 1]
        targets = targets.to(device)
        scored = targets != IGNORE  # (B, T)
        # The LM head (the largest matmul of a small model) runs only where a token is scored: with a
        # stride of half the context, half the positions of each window only give context.
        logits = model.lm_head(model.hidden(inputs.to(device))[scored])  # (N, V)
        total += F.cross_entropy(logits.float(), targets[scored], reduction="sum").item()
        tokens += int(scored.sum())
        if on_progress:
            on_progress(min(start + batch_size, len(windows)), len(windows))
    return total, tokens


# ---------------------------------------------------------------------------------------------------
# Multiple choice, as EleutherAI's lm-evaluation-harness scores it
#
# Each question becomes one context (the task's description, K solved examples, the question) and one
# continuation per choice: the choice's text after a space (the harness's target delimiter). The score of
# a choice is log p(continuation | context), summed over its tokens; the prediction is the highest score
# (acc), or the highest score per character of the choice's text (acc_norm, the harness's
# completion_len = len(choice): long choices are not punished for their length). MMLU lists the options in the prompt and scores the letters " A".." D".

def prompt_text(item: Item) -> str:
    """The question as the model reads it (the harness's doc_to_text)."""
    if item.layout == "mmlu":
        options = "".join(f"\n{letter}. {option}" for letter, option in zip(MMLU_LETTERS, item.options))
        return f"{item.question.strip()}{options}\nAnswer:"
    return item.question


def choice_texts(item: Item) -> list[str]:
    """What each choice's continuation says, without the space before it (the harness's doc_to_choice)."""
    return list(MMLU_LETTERS[:len(item.options)]) if item.layout == "mmlu" else item.options


def context_text(item: Item, shots: Sequence[Item] = ()) -> str:
    """MMLU's description, then each solved example and its answer, two newlines apart, then the question."""
    description = (f"The following are multiple choice questions (with answers) about {item.subject}.\n\n"
                   if item.layout == "mmlu" else "")
    examples = "".join(f"{prompt_text(s)} {choice_texts(s)[s.answer]}\n\n" for s in shots)
    return description + examples + prompt_text(item)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation as token ids, split the harness's way: spaces that end the context move
    to the continuation; the continuation's ids are those of context + continuation after the context's
    own ids (so a word is tokenized as it is in running text). The context starts as the model's texts
    do (bos(tokenizer)); an empty one is GPT-2's <|endoftext|>."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = tokenizer.encode_ordinary(context)
    whole = tokenizer.encode_ordinary(context + continuation)
    return (bos(tokenizer) + context_ids) or [tokenizer.eos_id], whole[len(context_ids):]


@dataclasses.dataclass
class Request:
    """One question as token ids: its context, read once, and each choice's continuation."""
    context: list[int]
    continuations: list[list[int]]
    truncated: bool  # the context lost its first tokens to fit the model's context


def make_request(tokenizer, item: Item, shots: Sequence[Item], block_size: int) -> Request:
    """The question's ids. The model reads the context and every continuation token but the last, so that
    must fit block_size; a longer context keeps its start (the BOS, where the family has one) and its last
    tokens (the harness keeps the last tokens only)."""
    text = context_text(item, shots)
    pairs = [encode_pair(tokenizer, text, " " + choice) for choice in choice_texts(item)]
    context, continuations = pairs[0][0], [continuation for _, continuation in pairs]
    longest = max(len(c) for c in continuations)
    if min(len(c) for c in continuations) == 0:
        raise UserError(f"{item.where}: a choice tokenizes to nothing after its context; check its text")
    if longest > block_size:
        raise UserError(f"{item.where}: a choice is {longest} tokens long, more than the model's context of "
                        f"{block_size}")
    keep = block_size + 1 - longest
    if len(context) <= keep:
        return Request(context, continuations, False)
    start = bos(tokenizer)[:keep - 1]
    return Request(start + context[len(context) - (keep - len(start)):], continuations, True)


def repeat_rows(cache: KVCache, config, rows: torch.Tensor) -> KVCache:
    """A KV cache whose row i is row rows[i] of `cache`: the context's keys and values, one copy per choice."""
    out = KVCache(config, len(rows), cache.max_length, rows.device, cache.keys[0].dtype)
    for source, target in zip(cache.keys + cache.values, out.keys + out.values):
        target.copy_(source[rows])
    out.valid.copy_(cache.valid[rows])
    return out


@torch.inference_mode()
def score_batch(model: GPT, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]],
                device: torch.device) -> list[list[float]]:
    """log p(continuation | context) for every choice of every question, reading each context once.

    1. The contexts, left-padded to one batch (Q, T), fill a KV cache; the logits at their last token
       give every choice's first continuation token.
    2. The cache rows are copied, one per choice (R rows in all), and the continuations (right-padded,
       minus their last token) run on top of them: the context's keys and values are reused, never
       recomputed. Padding is masked out of attention, so each row equals its choice run alone."""
    config = model.config
    counts = torch.tensor([len(c) for c in continuations])
    rows = [list(c) for question in continuations for c in question]  # (question, choice) pairs, in order
    owner = torch.repeat_interleave(torch.arange(len(contexts)), counts).to(device)  # (R,) each row's question
    L = max(len(r) for r in rows)
    ids, mask = left_pad(contexts, 0, device)  # (Q, T) each
    T = ids.size(1)
    dtype = next(model.parameters()).dtype
    cache = KVCache(config, len(contexts), T + L - 1, device, dtype)
    logits, _ = model(ids, attention_mask=mask, kv_cache=cache, cache_positions=torch.arange(T, device=device),
                      last_only=True)  # (Q, 1, V)
    first = logits[:, -1].float().log_softmax(-1)  # (Q, V)
    scores = first[owner, torch.tensor([r[0] for r in rows], device=device)]  # (R,)
    if L > 1:
        inputs = torch.zeros(len(rows), L - 1, dtype=torch.long)
        targets = torch.full((len(rows), L - 1), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            inputs[i, :len(r) - 1] = torch.tensor(r[:-1])
            targets[i, :len(r) - 1] = torch.tensor(r[1:])
        inputs, targets = inputs.to(device), targets.to(device)
        logits, _ = model(inputs, attention_mask=(targets != IGNORE).long(), kv_cache=repeat_rows(cache, config, owner),
                          cache_positions=torch.arange(T, T + L - 1, device=device))  # (R, L - 1, V)
        logits = logits.float()
        picked = logits.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (R, L - 1)
        scores = scores + picked.masked_fill(targets == IGNORE, 0).sum(-1)
    return [part.tolist() for part in scores.cpu().split(counts.tolist())]


def question_batches(requests: Sequence[Request], batch_size: int, block_size: int) -> list[list[int]]:
    """The requests' indices in batches: questions of similar context length together (less padding), at
    most batch_size of them, and a batch's longest context plus its longest continuation within the
    model's context (they share one KV cache)."""
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].context), reverse=True)
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in order:
        grown = batch + [i]
        longest = max(len(c) for j in grown for c in requests[j].continuations)
        if batch and (len(grown) > batch_size or len(requests[grown[0]].context) + longest - 1 > block_size):
            batches.append(batch)
            grown = [i]
        batch = grown
    return batches + [batch] if batch else batches


def score_requests(model: GPT, requests: Sequence[Request], batch_size: int, device: torch.device,
                   on_progress: Callable[[int, int], None] | None = None) -> list[list[float]]:
    """Every request's choice scores, in the requests' order."""
    scores: list[list[float]] = [[] for _ in requests]
    done = 0
    for batch in question_batches(requests, batch_size, model.config.block_size):
        found = score_batch(model, [requests[i].context for i in batch], [requests[i].continuations for i in batch],
                            device)
        for i, s in zip(batch, found):
            scores[i] = s
        done += len(batch)
        if on_progress:
            on_progress(done, len(requests))
    return scores


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as numpy's


def shuffled(item: Item, rng: random.Random) -> tuple[Item, list[int]]:
    """The item with its options in another order (never the same one), and order: new position -> old index."""
    order = list(range(len(item.options)))
    assert len(order) > 1, "one option has no other order"
    while order == sorted(order):
        rng.shuffle(order)
    return dataclasses.replace(item, options=[item.options[k] for k in order], answer=order.index(item.answer)), order


def choice_figures(items: Sequence[Item], scores: Sequence[Sequence[float]],
                   orders: Sequence[Sequence[int]] | None = None) -> dict:
    """Accuracy from the raw scores and from the scores per character of each choice's text; with orders (the
    items were shuffled), predictions are mapped back to the original options first."""
    predictions, norm_predictions = [], []
    for k, (item, s) in enumerate(zip(items, scores)):
        lengths = [len(text) for text in choice_texts(item)]  # characters, as the harness counts, not bytes
        prediction, norm = argmax(s), argmax([v / n for v, n in zip(s, lengths)])
        if orders is not None:
            prediction, norm = orders[k][prediction], orders[k][norm]
        predictions.append(prediction)
        norm_predictions.append(norm)
    answers = [item.answer if orders is None else orders[k][item.answer] for k, item in enumerate(items)]
    n = max(len(items), 1)
    return {"accuracy": sum(p == a for p, a in zip(predictions, answers)) / n,
            "accuracy_norm": sum(p == a for p, a in zip(norm_predictions, answers)) / n,
            "predictions": predictions, "norm_predictions": norm_predictions}


# ---------------------------------------------------------------------------------------------------
# Contamination: which evaluation items share an n-gram of tokens with a training corpus
#
# GPT-3's test: an item is contaminated when any n consecutive tokens of one of its text fields (n = 13)
# also occur in the corpus. The items' n-grams are few: they are hashed into a sorted array and a bitmap.
# The corpus is streamed past them in chunks (text files are read, split at line breaks and tokenized on
# several threads; token files are read a chunk at a time), each chunk's n-grams hashed at once with
# numpy, so memory stays bounded by the chunk and the items, whatever the corpus's size. A hash that hits
# is checked token by token, so a reported overlap is a real one.

HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
MIX_MULTIPLIER = np.uint64(0xBF58476D1CE4E5B9)
CHUNK_TOKENS = 1 << 18  # corpus tokens hashed at once (a few arrays of 8 bytes per token)
TEXT_BLOCK_BYTES = 1 << 20  # text read and tokenized at once, per thread


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every n-gram of tokens: (len(tokens) - n + 1,) uint64 (numpy wraps on overflow).

    A polynomial in the tokens (h = h * M + token, n times), then mixed so that its low bits, which index
    the bitmap, depend on every token."""
    count = len(tokens) - n + 1
    tokens = tokens.astype(np.uint64)
    h = np.zeros(max(count, 0), dtype=np.uint64)
    for j in range(n):
        h *= HASH_MULTIPLIER
        h += tokens[j:j + count]
    h ^= h >> np.uint64(31)
    h *= MIX_MULTIPLIER
    h ^= h >> np.uint64(29)
    return h


class NgramIndex:
    """The n-grams of the evaluation items' fields, ready for looking up a corpus chunk by chunk.

    Kept as numpy arrays sorted by hash (8 + 12 bytes per n-gram), not as Python objects: a benchmark of
    ten thousand items has about a million n-grams."""

    def __init__(self, items: Sequence[Sequence[Sequence[int]]], n: int):
        """items[i][f]: the token ids of text field f of item i."""
        self.n = n
        self.fields = [[np.asarray(ids, dtype=np.int64) for ids in item] for item in items]
        hashes, owners = [np.zeros(0, dtype=np.uint64)], [np.zeros((0, 3), dtype=np.int32)]
        for i, item in enumerate(self.fields):
            for f, ids in enumerate(item):
                if len(ids) >= n:
                    hashes.append(ngram_hashes(ids, n))
                    count = len(ids) - n + 1
                    owners.append(np.stack([np.full(count, i), np.full(count, f), np.arange(count)], 1).astype(np.int32))
        hashes = np.concatenate(hashes)
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]  # (G,) uint64, sorted
        self.owners = np.concatenate(owners)[order]  # (G, 3): item, field, position of each n-gram
        # The bitmap turns away almost every corpus n-gram with one memory read; the rest are looked up.
        bits = min(max(20, (16 * len(self.hashes)).bit_length()), 26)  # 1-64 MB; a few % of it set
        self.mask = np.uint64((1 << bits) - 1)
        self.bitmap = np.zeros(1 << bits, dtype=bool)
        self.bitmap[self.hashes & self.mask] = True

    def matches(self, tokens: np.ndarray) -> Iterator[tuple[int, int]]:
        """(item, position in tokens) for every n-gram of tokens that is also an n-gram of the item."""
        if len(tokens) < self.n or not len(self.hashes):
            return
        h = ngram_hashes(tokens, self.n)
        candidates = np.flatnonzero(self.bitmap[h & self.mask])
        first = np.searchsorted(self.hashes, h[candidates], side="left")
        last = np.searchsorted(self.hashes, h[candidates], side="right")
        hits = last > first  # the bitmap's false alarms drop out here
        for position, lo, hi in zip(candidates[hits].tolist(), first[hits].tolist(), last[hits].tolist()):
            window = tokens[position:position + self.n]
            for i, f, at in self.owners[lo:hi].tolist():
                if np.array_equal(window, self.fields[i][f][at:at + self.n]):
                    yield i, position


def file_texts(path: Path, before: int, on_bytes: Callable[[int], None]) -> Iterator[str]:
    """A text file's text, block by block; on_bytes gets the bytes read so far, `before` this file included."""
    for text, n_bytes in read_blocks(path, "replace", TEXT_BLOCK_BYTES):
        before += n_bytes
        on_bytes(before)
        yield text


def text_token_chunks(files: Sequence[Path], tokenizer, threads: int,
                      on_bytes: Callable[[int], None]) -> Iterator[tuple[Path, int, np.ndarray]]:
    """(file, index of its first token in the file, tokens) for every piece of every text file: each file
    is read in blocks and tokenized as tokenizer.py prepares corpora (cut only where the ids cannot
    change; tiktoken on `threads` threads). Bytes that are not UTF-8 become U+FFFD: they cannot be
    part of an item's text anyway."""
    before = 0
    for path in files:
        offset = 0
        for ids in document_ids(tokenizer, file_texts(path, before, on_bytes), threads):
            yield path, offset, np.asarray(ids, dtype=np.int64)
            offset += len(ids)
        before += path.stat().st_size  # what file_texts read of it


def is_token_folder(source: str | Path) -> bool:
    path = Path(source)
    return path.is_dir() and (path / "meta.json").is_file()


def token_folder_chunks(folder: Path, train: np.ndarray, val: np.ndarray,
                        on_bytes: Callable[[int], None]) -> Iterator[tuple[Path, int, np.ndarray]]:
    """(folder, index of the first token, tokens) in chunks of CHUNK_TOKENS: train.bin, then val.bin, which
    continues it (prepare cuts one token stream in two), so token indices count through both.

    The files behind the memmaps are read with plain reads: every page read through a memmap stays in
    the process's resident memory, which would then grow with the corpus."""
    done = 0
    for offset, tokens in ((0, train), (len(train), val)):
        source = open(tokens.filename, "rb") if isinstance(tokens, np.memmap) else None
        try:
            if source is not None:
                source.seek(tokens.offset)
            for start in range(0, len(tokens), CHUNK_TOKENS):
                count = min(CHUNK_TOKENS, len(tokens) - start)
                chunk = (np.fromfile(source, dtype=tokens.dtype, count=count) if source is not None
                         else tokens[start:start + count])
                yield folder, offset + start, chunk.astype(np.int64)
                done += count * tokens.dtype.itemsize
                on_bytes(done)
        finally:
            if source is not None:
                source.close()


def find_overlaps(index: NgramIndex, chunks: Iterator[tuple[Path, int, np.ndarray]]) -> tuple[dict, int]:
    """The first corpus match of every item that has one, item -> (file, token index), and the corpus's
    token count. Each chunk is looked up together with the last n - 1 tokens of the chunk before it (of the
    same file), so n-grams that cross a chunk's edge are found too."""
    first: dict[int, tuple[Path, int]] = {}
    tail, tail_file, n_tokens = np.zeros(0, dtype=np.int64), None, 0
    for path, offset, tokens in chunks:
        n_tokens += len(tokens)
        if path != tail_file:
            tail, tail_file = np.zeros(0, dtype=np.int64), path
        window = np.concatenate([tail, tokens])
        for item, position in index.matches(window):
            first.setdefault(item, (path, offset - len(tail) + position))
        tail = window[max(len(window) - (index.n - 1), 0):]
    return first, n_tokens


# ---------------------------------------------------------------------------------------------------
# Memorisation: does the model continue a training text with its exact next tokens?

def sample_positions(lengths: Sequence[int], span: int, samples: int, seed: int) -> list[tuple[int, int]]:
    """Up to `samples` different (document, start) pairs where `span` tokens fit, drawn uniformly with a
    fixed seed (the same text and flags give the same positions), in document order."""
    counts = [max(0, n - span + 1) for n in lengths]
    ends = np.cumsum(counts).tolist()  # positions in all documents up to each one's end
    picks = sorted(random.Random(seed).sample(range(sum(counts)), min(samples, sum(counts))))
    positions = []
    for pick in picks:
        doc = bisect.bisect_right(ends, pick)
        positions.append((doc, pick - (ends[doc - 1] if doc else 0)))
    return positions


@torch.inference_mode()
def greedy_continuations(model: GPT, prompts: Sequence[Sequence[int]], new_tokens: int, batch_size: int,
                         device: torch.device) -> list[list[int]]:
    """The model's greedy continuation of each prompt, new_tokens tokens each (it never stops early)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start:start + batch_size], 0, device)
        steps = list(generate(model, ids, new_tokens, temperature=0, attention_mask=mask))  # new_tokens x (B,)
        out += torch.stack(steps, dim=1).tolist()
    return out


# ---------------------------------------------------------------------------------------------------
# Instruction answers: ROUGE-L and exact match against the reference, and a judge model's score
# (the scoring functions live in scoring.py, which rag.py's compare shares)

def read_answers(path: Path, need_instruction: bool) -> list[dict]:
    """The entries of an answers file (finetune_instruct.py's test-responses.json: a JSON list or JSONL)."""
    entries = []
    for line, record in load_records(path):
        where = f"{path} line {line}"
        entry = {"output": field(record, "output", str, where),
                 "model_response": field(record, "model_response", str, where)}
        if need_instruction:
            entry["instruction"] = field(record, "instruction", str, where)
            entry["input"] = field(record, "input", str, where) if "input" in record else ""
        entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------------
# Command line

def json_target(args: argparse.Namespace) -> Path | None:
    """--json's file, checked before any work: its folder writable, an existing file kept unless --force."""
    if args.json is None:
        return None
    path = Path(args.json)
    if path.is_dir():
        raise UserError(f"--json {path} is a folder; name a file")
    if path.exists() and not args.force:
        raise UserError(f"--json {path} already exists; add --force to replace it, or name another file")
    writable_folder(path.parent, "--json's folder")
    return path


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        atomic_write(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {path}")


def print_figures(title: str, figures: dict[str, str]) -> None:
    width = max(len(name) for name in figures)
    print(title)
    for name, value in figures.items():
        print(f"  {name:<{width}}  {value}")


def model_name(init: str, preset: str | None) -> str:
    return f"{init} {preset}" if init == "random" and preset else init


def language_model(init: str, preset: str | None, seed: int, device: torch.device, dtype: torch.dtype,
                   flag: str = "--init") -> tuple[GPT, object, dict]:
    """The model `init` names, in eval mode, with its own tokenizer and its card (what load_model says of it)."""
    torch.manual_seed(seed)  # makes a random model reproducible
    model, card = load_model(init, preset=preset, device=device, dtype=dtype)
    if model.config.num_classes is not None:
        raise UserError(f"{flag} {init} is a classifier ({model.config.num_classes} classes), not a language model")
    tokenizer = tokenizer_for(card)
    if tokenizer.n_vocab > model.config.vocab_size:
        raise UserError(f"{flag} {init}: its tokenizer has {tokenizer.n_vocab} tokens but the model only "
                        f"{model.config.vocab_size} embeddings; they do not belong together")
    return model.eval(), tokenizer, card


def text_documents(source: str | None) -> list[tuple[Path, str]]:
    """(file, text) of every file of --data (a file, folder or glob); by default the cached sample text."""
    files = corpus_files(source) if source else [fetch(DEFAULT_TEXT)]
    return [(path, read_text(path)) for path in files]


def perplexity_main(args: argparse.Namespace) -> dict:
    json_path = json_target(args)
    documents = text_documents(args.data)
    text_bytes = sum(len(text.encode("utf-8")) for _, text in documents)
    if not text_bytes:
        raise UserError(f"{documents[0][0]} holds no text" if len(documents) == 1 else f"{args.data} holds no text")
    device, dtype = device_and_dtype(args.device, args.dtype)
    model, tokenizer, _ = language_model(args.init, args.preset, args.seed, device, dtype)
    block_size = model.config.block_size
    context = args.context or block_size
    if context > block_size:
        raise UserError(f"--context {context} is longer than the model's context of {block_size} tokens")
    stride = args.stride or max(context // 2, 1)
    if stride > context:
        raise UserError(f"--stride {stride} is larger than the context ({context}); some tokens would never be scored")
    ids = [start_ids(tokenizer) + tokenizer.encode_ordinary(text) for _, text in documents]
    start = time.perf_counter()
    nats, tokens = sequence_nll(model, ids, context, stride, args.batch_size, device, ProgressLine("perplexity", unit="windows").count)
    seconds = time.perf_counter() - start
    if not math.isfinite(nats):
        raise UserError(f"the loss of {args.init} on this text is not finite ({nats}); its weights are broken")
    loss = nats / tokens
    result = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"),
              "bits_per_byte": nats / math.log(2) / text_bytes, "tokens": tokens, "bytes": text_bytes,
              "context": context, "stride": stride, "init": args.init, "data": [str(p) for p, _ in documents],
              "seconds": seconds, "tokens_per_second": tokens / seconds}
    print_figures(f"perplexity of {model_name(args.init, args.preset)} on {', '.join(p.name for p, _ in documents)[:80]} "
                  f"(context {context}, stride {stride})",
                  {"tokens": f"{tokens:,}", "loss": f"{loss:.4f}", "perplexity": f"{result['perplexity']:.3f}",
                   "bits per byte": f"{result['bits_per_byte']:.4f}",
                   "speed": f"{result['tokens_per_second']:.0f} tokens/s"})
    write_json(json_path, result)
    return result


def read_exclusions(path: str, n_items: int) -> set[int]:
    """The contaminated items' indices from a contamination --json file made for the same items."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"--exclude {path} cannot be read as JSON ({getattr(e, 'strerror', None) or e})") from None
    indices = data.get("contaminated") if isinstance(data, dict) else None
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise UserError(f"--exclude {path} has no field 'contaminated' with a list of item indices; write it with "
                        f"python evaluate.py contamination ... --json FILE")
    if data.get("items", n_items) != n_items or any(not 0 <= i < n_items for i in indices):
        raise UserError(f"--exclude {path} was made for {data.get('items')} items, but --data has {n_items}; "
                        f"run contamination on the same --eval file")
    return set(indices)


def shots_for(items: Sequence[Item], args: argparse.Namespace) -> Callable[[Item], list[Item]]:
    """item -> its --shots solved examples: the first K of --shots-from (of the item's MMLU subject when
    --shots-from holds several subjects), as the harness takes MMLU's dev examples."""
    if not args.shots:
        return lambda item: []
    pool = load_questions(args.shots_from, args.layout)
    if pool[0].layout != items[0].layout:
        raise UserError(f"--shots-from {args.shots_from} is {pool[0].layout} data but --data is {items[0].layout}; "
                        f"take the examples from the same benchmark")
    by_subject: dict[str, list[Item]] = {}
    for shot in pool:
        by_subject.setdefault(shot.subject, []).append(shot)
    if len(by_subject) == 1:
        by_subject = {item.subject: pool for item in items}
    for item in items:
        found = by_subject.get(item.subject, [])
        if len(found) < args.shots:
            raise UserError(f"--shots-from {args.shots_from} holds {len(found)} examples"
                            + (f" for {item.subject!r}" if item.subject else "") + f", fewer than --shots {args.shots}")
    return lambda item: by_subject[item.subject][:args.shots]


def score_choices(model: GPT, tokenizer, items: Sequence[Item], shots: Callable[[Item], list[Item]],
                  batch_size: int, device: torch.device, label: str) -> tuple[list[list[float]], int]:
    requests = [make_request(tokenizer, item, shots(item), model.config.block_size) for item in items]
    scores = score_requests(model, requests, batch_size, device, ProgressLine(label, unit="questions").count)
    if not all(math.isfinite(v) for s in scores for v in s):
        raise UserError("the model's scores are not finite; its weights are broken")
    return scores, sum(r.truncated for r in requests)


def choice_main(args: argparse.Namespace) -> dict:
    json_path = json_target(args)
    items = load_questions(args.data, args.layout)
    excluded = read_exclusions(args.exclude, len(items)) if args.exclude else set()
    chosen = [i for i in range(len(items)) if i not in excluded][:args.limit]
    if not chosen:
        raise UserError(f"every item of {args.data} is excluded by --exclude {args.exclude}; nothing is left to score")
    selected = [items[i] for i in chosen]
    shots = shots_for(selected, args)
    device, dtype = device_and_dtype(args.device, args.dtype)
    model, tokenizer, _ = language_model(args.init, args.preset, args.seed, device, dtype)
    start = time.perf_counter()
    scores, truncated = score_choices(model, tokenizer, selected, shots, args.batch_size, device, "choice")
    seconds = time.perf_counter() - start
    figures = choice_figures(selected, scores)
    result = {"accuracy": figures["accuracy"], "accuracy_norm": figures["accuracy_norm"],
              "questions": len(selected), "excluded": len(excluded), "shots": args.shots,
              "layout": selected[0].layout, "init": args.init, "data": str(args.data),
              "truncated_contexts": truncated, "seconds": seconds, "questions_per_second": len(selected) / seconds}
    subjects = sorted({item.subject for item in selected if item.subject})
    if len(subjects) > 1:
        result["subjects"] = {s: sum(figures["predictions"][k] == item.answer for k, item in enumerate(selected)
                                     if item.subject == s) / sum(item.subject == s for item in selected)
                              for s in subjects}
    table = {"questions": f"{len(selected):,}" + (f" ({len(excluded)} contaminated ones excluded)" if excluded else ""),
             "accuracy": f"{figures['accuracy']:.4f}", "accuracy_norm": f"{figures['accuracy_norm']:.4f}"}
    if args.shuffle_choices:
        rng = random.Random(args.seed)
        pairs = [shuffled(item, rng) for item in selected]
        moved = [item for item, _ in pairs]
        orders = [order for _, order in pairs]
        moved_scores, _ = score_choices(model, tokenizer, moved, shots, args.batch_size, device, "shuffled")
        again = choice_figures(moved, moved_scores, orders)
        result.update(accuracy_shuffled=again["accuracy"], accuracy_norm_shuffled=again["accuracy_norm"],
                      same_prediction=sum(a == b for a, b in zip(figures["predictions"], again["predictions"]))
                      / len(selected))
        table.update({"accuracy, choices shuffled": f"{again['accuracy']:.4f}",
                      "same answer after shuffling": f"{result['same_prediction']:.4f}"})
    result["items"] = []
    for k, (index, item) in enumerate(zip(chosen, selected)):
        entry = {"index": index, "scores": scores[k], "prediction": figures["predictions"][k],
                 "prediction_norm": figures["norm_predictions"][k], "answer": item.answer}
        if args.shuffle_choices:
            entry.update(order=orders[k], scores_shuffled=moved_scores[k], prediction_shuffled=again["predictions"][k])
        result["items"].append(entry)
    if truncated:
        table["note"] = f"{truncated} contexts lost their first tokens to fit the model's context"
    print_figures(f"{model_name(args.init, args.preset)} on {args.data} ({selected[0].layout}, {args.shots} shots; "
                  f"{len(selected) / seconds:.1f} questions/s)", table)
    write_json(json_path, result)
    return result


def contamination_main(args: argparse.Namespace) -> dict:
    json_path = json_target(args)
    items = load_items(args.eval, args.layout)
    folder = Path(args.corpus) if is_token_folder(args.corpus) else None
    if folder is not None:
        train, val, meta = load_token_folder(folder)
        name = args.tokenizer or (meta["tokenizer_name"] if isinstance(meta.get("tokenizer_name"), str) else "gpt2")
        files, total_bytes = [folder / "train.bin", folder / "val.bin"], train.nbytes + val.nbytes
    else:
        name, files = args.tokenizer or "gpt2", corpus_files(args.corpus)
        total_bytes = sum(path.stat().st_size for path in files)
    if total_bytes == 0:
        raise UserError(f"the corpus {args.corpus} is empty ({', '.join(str(f) for f in files[:3])} "
                        f"{'hold' if len(files) > 1 else 'holds'} nothing)")
    tokenizer = tokenizer_for({"tokenizer": name})
    if folder is not None and meta.get("vocab_size", tokenizer.n_vocab) != tokenizer.n_vocab:
        raise UserError(f"{folder} was prepared with a vocabulary of {meta['vocab_size']} tokens, but the tokenizer "
                        f"{name} has {tokenizer.n_vocab}; pass --tokenizer with the one it was prepared with")
    index = NgramIndex([[tokenizer.encode_ordinary(text) for text in item.texts] for item in items], args.n)
    too_short = [i for i, item in enumerate(index.fields) if all(len(ids) < args.n for ids in item)]
    start = time.perf_counter()
    progress = ProgressLine(f"contamination in {args.corpus}", total_bytes)
    chunks = (token_folder_chunks(folder, train, val, progress.update) if folder is not None
              else text_token_chunks(files, tokenizer, args.threads, progress.update))
    first, corpus_tokens = find_overlaps(index, chunks)
    if progress.shown:
        progress.close()
    seconds = time.perf_counter() - start
    if corpus_tokens == 0:
        raise UserError(f"the corpus {args.corpus} holds no tokens")
    contaminated = sorted(first)
    result = {"contaminated": contaminated, "fraction": len(contaminated) / len(items), "n": args.n,
              "items": len(items), "eval": str(args.eval), "corpus": str(args.corpus), "tokenizer": name or "gpt2",
              "too_short": too_short, "corpus_tokens": corpus_tokens, "corpus_bytes": total_bytes,
              "seconds": seconds, "mb_per_second": total_bytes / 1e6 / max(seconds, 1e-9),
              "matches": [{"index": i, "where": items[i].where, "corpus_file": str(first[i][0]),
                           "corpus_token": first[i][1]} for i in contaminated]}
    print_figures(f"{args.n}-gram overlap of {args.eval} with {args.corpus}",
                  {"items": f"{len(items):,}", "contaminated": f"{len(contaminated):,} ({result['fraction']:.2%})",
                   "too short to test": f"{len(too_short):,} (no field of {args.n} tokens)",
                   "corpus": f"{corpus_tokens:,} tokens, {total_bytes / 1e6:.1f} MB at "
                             f"{result['mb_per_second']:.1f} MB/s"})
    for match in result["matches"][:5]:
        print(f"  item {match['index']} ({match['where']}) is in {match['corpus_file']} at token {match['corpus_token']}")
    write_json(json_path, result)
    return result


def memorization_main(args: argparse.Namespace) -> dict:
    json_path = json_target(args)
    documents = text_documents(args.data)
    device, dtype = device_and_dtype(args.device, args.dtype)
    model, tokenizer, _ = language_model(args.init, args.preset, args.seed, device, dtype)
    start = bos(tokenizer)
    if len(start) + args.prefix + args.suffix > model.config.block_size:
        raise UserError(f"--prefix {args.prefix} plus --suffix {args.suffix} tokens exceed the model's context of "
                        f"{model.config.block_size}")
    ids = [tokenizer.encode_ordinary(text) for _, text in documents]
    positions = sample_positions([len(d) for d in ids], args.prefix + args.suffix, args.samples, args.seed)
    if not positions:
        raise UserError(f"the text has {max(len(d) for d in ids)} tokens, fewer than --prefix + --suffix "
                        f"({args.prefix + args.suffix}); use a longer text or shorter spans")
    prompts = [start + ids[d][p:p + args.prefix] for d, p in positions]
    truths = [ids[d][p + args.prefix:p + args.prefix + args.suffix] for d, p in positions]
    t0 = time.perf_counter()
    continuations = greedy_continuations(model, prompts, args.suffix, args.batch_size, device)
    seconds = time.perf_counter() - t0
    samples = []
    for (d, p), truth, got in zip(positions, truths, continuations):
        same = sum(a == b for a, b in zip(truth, got))
        samples.append({"file": str(documents[d][0]), "token": p, "exact": got == truth, "matched_tokens": same})
    exact = sum(s["exact"] for s in samples)
    result = {"exact_fraction": exact / len(samples), "samples": len(samples), "prefix": args.prefix,
              "suffix": args.suffix, "token_fraction": sum(s["matched_tokens"] for s in samples)
              / (len(samples) * args.suffix), "init": args.init, "data": [str(p) for p, _ in documents],
              "seed": args.seed, "seconds": seconds, "positions": samples}
    print_figures(f"extractable memorisation of {model_name(args.init, args.preset)} on {', '.join(p.name for p, _ in documents)[:80]}",
                  {"samples": f"{len(samples)}" + (f" (all the text has; asked for {args.samples})"
                                                   if len(samples) < args.samples else ""),
                   "recalled exactly": f"{exact} ({result['exact_fraction']:.2%}) of {args.suffix} tokens after "
                                       f"{args.prefix}",
                   "tokens recalled": f"{result['token_fraction']:.2%} (position by position)"})
    write_json(json_path, result)
    return result


def answers_main(args: argparse.Namespace) -> dict:
    json_path = json_target(args)
    path = Path(args.file)
    entries = read_answers(path, need_instruction=args.judge is not None)
    items = [{"rouge_l": rouge_l(e["output"], e["model_response"]),
              "exact_match": exact_match(e["output"], e["model_response"])} for e in entries]
    result = {"rouge_l": sum(i["rouge_l"] for i in items) / len(items),
              "exact_match": sum(i["exact_match"] for i in items) / len(items),
              "judge_mean": None, "judge_unparsed": None, "answers": len(items), "file": str(path)}
    table = {"answers": f"{len(items):,}", "ROUGE-L F1": f"{result['rouge_l']:.4f}",
             "exact match": f"{result['exact_match']:.4f}"}
    counts = degenerate_answers([e["model_response"] for e in entries])
    result.update(empty_answers=counts["empty"], repeating_answers=counts["repeating"])
    table.update({"empty answers": f"{counts['empty']:,}", "answers repeating one word": f"{counts['repeating']:,}"})
    note = degenerate_note(counts, len(items), "they score 0; the model that wrote them has not learned to answer")
    if args.judge is not None:
        device, dtype = device_and_dtype(args.device, args.dtype)
        judge, tokenizer, card = language_model(args.judge, args.preset, args.seed, device, dtype, "--judge")
        template = TEMPLATES[args.judge_template or default_template(card)]
        prompts = [prompt_ids(tokenizer, template, judge_prompt(e)) for e in entries]
        cut = sum(len(p) >= judge.config.block_size for p in prompts)
        if cut:
            print(f"note: {cut} scoring prompts are longer than the judge's context of {judge.config.block_size} "
                  f"tokens; it reads their last tokens", file=sys.stderr)
        replies = answer(judge, prompts, tokenizer, template, max_new_tokens=args.judge_max_new_tokens,
                         batch_size=args.batch_size, device=device, dtype=dtype)
        scores = [parse_score(reply) for reply in replies]
        parsed = [s for s in scores if s is not None]
        result.update(judge_mean=sum(parsed) / len(parsed) if parsed else None,
                      judge_unparsed=len(scores) - len(parsed), judge=args.judge, judge_template=template.name)
        for item, reply, score in zip(items, replies, scores):
            item.update(judge=score, judge_reply=reply)
        table["judge mean"] = f"{result['judge_mean']:.2f} ({len(parsed)} scored)" if parsed else "no reply held a score"
        unparsed = [reply for reply, score in zip(replies, scores) if score is None]
        table["judge replies without a score"] = f"{len(unparsed)}" + (
            f" (e.g. {', '.join(repr(reply[:40]) for reply in unparsed[:2])})" if unparsed else "")
    result["items"] = items
    print_figures(f"answers in {path}", table)
    if note:
        print(note)
    write_json(json_path, result)
    return result


COMMANDS = {"perplexity": perplexity_main, "choice": choice_main, "contamination": contamination_main,
            "memorization": memorization_main, "answers": answers_main}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(description=__doc__.split("\n\n")[0] + " Without a subcommand: perplexity with its "
                            "defaults.", prog="evaluate.py")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    def output_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE as JSON")
        p.add_argument("--force", action=argparse.BooleanOptionalAction, default=False,
                       help="replace an existing --json file")

    def model_args(p: argparse.ArgumentParser, batch: int, batch_help: str, seed_help: str = "") -> None:
        add_init_args(p, "gpt2", "the model to evaluate")
        add_device_args(p)
        p.add_argument("--batch-size", type=positive_int, default=batch, help=batch_help)
        p.add_argument("--seed", type=int, default=SEED, help="seed of --init random" + seed_help)
        output_args(p)

    layout_help = "the file's layout; by default MMLU for .csv, otherwise told by the first record's fields"
    p = commands.add_parser("perplexity", help="loss, perplexity and bits per byte of a text")
    p.add_argument("--data", default=None, help="a text file, a folder of them or a glob (each file is one document); "
                                                "by default the short story 'The Verdict', downloaded once")
    p.add_argument("--context", type=positive_int, default=None,
                   help="tokens per window; by default the model's context")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="tokens between window starts: each token is scored once, with at least context - stride "
                        "tokens before it; by default half the context")
    model_args(p, 4, "windows per forward pass")

    p = commands.add_parser("choice", help="multiple-choice accuracy by log-likelihood, as lm-evaluation-harness")
    p.add_argument("--data", required=True, help="questions: plain JSONL (question, choices, answer), MMLU CSV or "
                                                 "HellaSwag JSONL; a file, folder or glob")
    p.add_argument("--layout", choices=LAYOUTS[:3], default=None, help=layout_help)
    p.add_argument("--shots", type=non_negative_int, default=0, help="solved examples before each question")
    p.add_argument("--shots-from", default=None, help="the file the examples come from (the first --shots of it)")
    p.add_argument("--exclude", default=None, metavar="CONTAMINATION_JSON",
                   help="score only the items that `contamination --json` did not find in the corpus")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N questions")
    p.add_argument("--shuffle-choices", action=argparse.BooleanOptionalAction, default=False,
                   help="score again with each question's options in another order: an accuracy that drops only "
                        "because the order changed points at memorised answers (for MMLU, which lists them)")
    model_args(p, 8, "questions per forward pass", " and of --shuffle-choices' orders")

    p = commands.add_parser("contamination", help="which evaluation items share an n-gram with a training corpus")
    p.add_argument("--eval", required=True, help="evaluation items (any layout above, or instruction data); a file, "
                                                 "folder or glob")
    p.add_argument("--corpus", required=True, help="a text file, folder or glob, or a token folder from "
                                                   "tokenizer.py prepare")
    p.add_argument("--n", type=positive_int, default=13, help="tokens per n-gram (GPT-3 used 13)")
    p.add_argument("--tokenizer", default=None,
                   help="the tokenizer of the corpus: gpt2, a tokenizer.json or tokenizer.model (or its folder), or "
                        "hf/<repo>; by default the token folder's, else gpt2")
    p.add_argument("--layout", choices=LAYOUTS, default=None, help=layout_help)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1, help="tokenizing threads for text")
    output_args(p)

    p = commands.add_parser("memorization", help="how often greedy decoding recalls a training text verbatim")
    p.add_argument("--data", default=None, help="a text file, folder or glob (by default 'The Verdict')")
    p.add_argument("--prefix", type=positive_int, default=32, help="tokens of the text in each prompt")
    p.add_argument("--suffix", type=positive_int, default=32, help="tokens that must follow exactly")
    p.add_argument("--samples", type=positive_int, default=200, help="prompts, at positions drawn with --seed")
    model_args(p, 16, "prompts per batch", " and of the sampled positions")

    p = commands.add_parser("answers", help="ROUGE-L, exact match and a judge's score of instruction answers")
    p.add_argument("file", help="answers in the book's instruction-data-with-response.json layout (output, "
                                "model_response), as finetune_instruct.py writes them")
    p.add_argument("--judge", default=None, help="a model that rates each answer 0-100 with the book's prompt, greedy: "
                                                 "an instruct model's folder, Hub repo id or checkpoint")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="model size for --judge random")
    p.add_argument("--judge-template", default=None, choices=list(TEMPLATES),
                   help="the judge's prompt format; by default the one it was finetuned with or its family's own")
    p.add_argument("--judge-max-new-tokens", type=positive_int, default=16, help="length of the judge's reply")
    p.add_argument("--batch-size", type=positive_int, default=8, help="judge prompts per batch")
    p.add_argument("--seed", type=int, default=SEED, help="seed of --judge random")
    add_device_args(p)
    output_args(p)

    args = parser.parse_args(argv or ["perplexity"])
    model_flag = {"answers": "judge", "contamination": None}.get(args.command, "init")
    if model_flag:
        check_preset(parser, getattr(args, model_flag), args.preset, f"--{model_flag}")
    if args.command == "choice" and bool(args.shots) != bool(args.shots_from):
        parser.error("--shots K and --shots-from FILE go together: K solved examples from FILE before each question")
    return args


def main(args: argparse.Namespace) -> dict:
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    run_stage(main, parse_args)
