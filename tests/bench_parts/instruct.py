"""Benchmark of finetune_instruct.py on the book's instruction data, on this machine's CPU.

1. The whole job: our default run (2 epochs over the 935 training entries, validation, the 110 test
   answers of at most 256 tokens) against the recipe of "LLMs from scratch" ch. 7, re-implemented
   below from the book's description and timed in the same process. Both at GPT-2 124M size with
   random weights (the cost is the same as with GPT-2's; none can be downloaded here; a random
   model never writes the end token, so every answer runs to 256 tokens in both). The book's
   training is timed for --instruct-book-steps steps and its answers for --instruct-book-answers
   answers, then extrapolated; ours runs whole.
2. What grouping examples by length saves: the tokens an epoch computes, and its time, from the
   same number of timed steps of each kind.
3. Ours at gpt2-medium size, the book's model (the book: 15.7 min of training and about 7 min of
   answers on a laptop CPU).

    python tests/bench.py instruct
    python tests/bench.py instruct --instruct-preset tiny --instruct-book-steps 3 --instruct-book-answers 1 \\
        --instruct-group-steps 2 --no-instruct-medium        # a smoke run, a minute or two
"""
import argparse
import math
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import finetune_instruct as fi  # noqa: E402
from bench_parts.spam import BookGPTModel  # noqa: E402  (the book's GPTModel, written once for both benches)

from model import GPT, get_config
from tokenizer import get_tokenizer


BOOK_EPOCHS, BOOK_BATCH, BOOK_EVAL_FREQ, BOOK_EVAL_ITER = 2, 8, 5, 5
BOOK_MAX_NEW_TOKENS, BOOK_SAMPLE_TOKENS = 256, 50  # test answers; the sample printed after each epoch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instruct-preset", default="gpt2",
                        help="model size of the book-vs-ours comparison (random weights); tiny for a smoke run")
    parser.add_argument("--instruct-book-steps", type=int, default=20,
                        help="training steps of the book's recipe to time (2 epochs are 232, with a validation "
                             "every 5); the rest is extrapolated")
    parser.add_argument("--instruct-book-answers", type=int, default=2,
                        help="test answers of the book's recipe to time (each runs to 256 new tokens without a KV "
                             "cache); the 110 are extrapolated")
    parser.add_argument("--instruct-group-steps", type=int, default=10,
                        help="training steps timed with and without grouping by length")
    parser.add_argument("--instruct-medium", action=argparse.BooleanOptionalAction, default=True,
                        help="also run our whole job at gpt2-medium size (random weights)")


# ---------------------------------------------------------------------------------------------------
# The book's recipe (ch. 7), as its code runs it: every entry formatted and encoded whole; batches of
# 8 from a shuffled DataLoader (drop_last), each padded with <|endoftext|> to its longest entry + 1 and
# targets -100 after the first end token; its GPTModel; AdamW(lr 5e-5, weight decay 0.1) on every
# parameter; every 5 steps the loss of 5 training and 5 validation batches; after each epoch a 50-token
# sample; then the test answers, one at a time, each new token from the whole sequence (no KV cache).

def book_format_input(entry: dict) -> str:
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            f"the request.\n\n### Instruction:\n{entry['instruction']}")
    return text + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")


class BookInstructionDataset(torch.utils.data.Dataset):
    def __init__(self, data: list[dict], tokenizer):
        self.encoded_texts = [tokenizer.encode(book_format_input(e) + f"\n\n### Response:\n{e['output']}")
                              for e in data]

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.encoded_texts)


def book_collate(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None):
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy() + [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs, targets = torch.tensor(padded[:-1]), torch.tensor(padded[1:])
        indices = torch.nonzero(targets == pad_token_id).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index  # every padding token after the first end token
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


def book_loss_batch(input_batch, target_batch, model):
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def book_loss_loader(loader, model, num_batches):
    total = 0.0
    num_batches = min(num_batches, len(loader))
    for i, (input_batch, target_batch) in enumerate(loader):
        if i >= num_batches:
            break
        total += book_loss_batch(input_batch, target_batch, model).item()
    return total / num_batches


def book_evaluate(model, train_loader, val_loader, eval_iter):
    model.eval()
    with torch.no_grad():
        book_loss_loader(train_loader, model, eval_iter), book_loss_loader(val_loader, model, eval_iter)
    model.train()


def book_generate(model, idx, max_new_tokens, context_size, eos_id=None):
    """The book's greedy generate: the whole (cropped) sequence through the model for every new token."""
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if eos_id is not None and idx_next == eos_id:
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def book_model(preset: str) -> BookGPTModel:
    c = get_config(preset)
    return BookGPTModel(vocab_size=c.vocab_size, context_length=c.block_size, d=c.n_embd, n_layers=c.n_layer,
                        n_heads=c.n_head)


def time_book_recipe(splits: dict[str, list[dict]], preset: str, steps: int, answers: int) -> dict:
    """Run the book's loop for `steps` steps and `answers` test answers; extrapolate to the whole job."""
    tokenizer = get_tokenizer()
    torch.manual_seed(123)
    model = book_model(preset)
    context = model.pos_emb.weight.shape[0]
    collate = partial(book_collate, allowed_max_length=context)
    loader = partial(torch.utils.data.DataLoader, batch_size=BOOK_BATCH, collate_fn=collate)
    train_loader = loader(BookInstructionDataset(splits["train"], tokenizer), shuffle=True, drop_last=True)
    val_loader = loader(BookInstructionDataset(splits["val"], tokenizer), shuffle=False, drop_last=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    t_steps = t_evals = 0.0
    n_steps = n_evals = 0
    model.train()
    while n_steps < steps:
        for input_batch, target_batch in train_loader:
            t0 = time.perf_counter()
            optimizer.zero_grad()
            book_loss_batch(input_batch, target_batch, model).backward()
            optimizer.step()
            t_steps += time.perf_counter() - t0
            if n_steps % BOOK_EVAL_FREQ == 0:  # the book's global_step counts from 0
                t0 = time.perf_counter()
                book_evaluate(model, train_loader, val_loader, BOOK_EVAL_ITER)
                t_evals += time.perf_counter() - t0
                n_evals += 1
            n_steps += 1
            if n_steps == steps:
                break
    t0 = time.perf_counter()  # the sample after each epoch, from the first validation entry
    model.eval()
    book_generate(model, torch.tensor([tokenizer.encode(book_format_input(splits["val"][0]))]),
                  BOOK_SAMPLE_TOKENS, context)
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    for entry in splits["test"][:answers]:
        prompt = book_format_input(entry)
        ids = book_generate(model, torch.tensor([tokenizer.encode(prompt)]), BOOK_MAX_NEW_TOKENS, context, eos_id=50256)
        tokenizer.decode(ids[0].tolist())[len(prompt):].replace("### Response:", "").strip()
    t_answers = time.perf_counter() - t0
    total_steps = BOOK_EPOCHS * len(train_loader)
    train_s = (total_steps * t_steps / n_steps + math.ceil(total_steps / BOOK_EVAL_FREQ) * t_evals / n_evals
               + BOOK_EPOCHS * t_sample)
    answers_s = len(splits["test"]) * t_answers / answers
    return {"train_s": train_s, "answers_s": answers_s, "measured_s": t_steps + t_evals + t_sample + t_answers,
            "s_per_answer": t_answers / answers, "s_per_step": t_steps / n_steps, "s_per_eval": t_evals / n_evals}


# ---------------------------------------------------------------------------------------------------
# Ours

def ours(preset: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        args = fi.parse_args(["--init", "random", "--preset", preset, "--out-dir", out, "--log-every", "20"])
        metrics = fi.main(args)
        metrics["wall_s"] = time.perf_counter() - t0
    return metrics


def time_grouping(splits: dict[str, list[dict]], preset: str, steps: int) -> list[dict]:
    """Tokens computed per epoch (exact) and seconds per epoch of our training step with and without
    grouping by length: the same examples, the same loss per example. The epoch's time is its computed
    tokens times the seconds per computed token of `steps` timed steps (after one untimed step)."""
    tokenizer, template = get_tokenizer(), fi.TEMPLATES["alpaca"]
    torch.manual_seed(123)
    model = GPT(get_config(preset))
    train = [fi.make_example(tokenizer, template, e, model.config.block_size)[0] for e in splits["train"]]
    lengths = [len(e.ids) - 1 for e in train]
    optimizer = model.configure_optimizer(5e-5, 0.1, betas=(0.9, 0.999))
    model.train()

    def step(index: list[int]) -> int:
        inputs, targets = fi.collate([train[i] for i in index], tokenizer.eos_id)
        loss, _ = fi.target_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return inputs.numel()

    rows = []
    for grouped in (False, True):
        generator = torch.Generator().manual_seed(123)
        batches = (fi.length_grouped_batches(lengths, BOOK_BATCH, generator) if grouped
                   else fi.random_batches(len(train), BOOK_BATCH, generator))
        computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        step(batches[-1])  # warm-up
        t0, timed_tokens = time.perf_counter(), sum(step(index) for index in batches[:steps])
        seconds = (time.perf_counter() - t0) / timed_tokens * computed
        setting = "ours, grouped by length" if grouped else "ours, random batches"
        rows.append({"benchmark": "instruct", "setting": setting, "model": f"{preset} (random weights)",
                     "train_s": round(seconds, 1),
                     "note": f"one epoch, from {steps} timed steps; it computes {computed:,} tokens for "
                             f"{sum(lengths):,} ({computed / sum(lengths) - 1:.1%} padding)"})
    rows[1]["note"] += f"; {1 - rows[1]['train_s'] / rows[0]['train_s']:.0%} less time per epoch"
    return rows


def row(setting: str, preset: str, train_s: float, answers_s: float, total_s: float, note: str) -> dict:
    return {"benchmark": "instruct", "setting": setting, "model": f"{preset} (random weights)",
            "train_s": round(train_s, 1), "answers_s": round(answers_s, 1), "total_s": round(total_s, 1), "note": note}


def run(args: argparse.Namespace) -> list[dict]:
    splits = fi.split_entries(fi.load_entries(fi.default_data()))
    preset = args.instruct_preset
    book = time_book_recipe(splits, preset, args.instruct_book_steps, args.instruct_book_answers)
    rows = [row("book recipe (ch. 7)", preset, book["train_s"], book["answers_s"], book["train_s"] + book["answers_s"],
                f"{args.instruct_book_steps} steps ({book['s_per_step']:.2f} s each, validation "
                f"{book['s_per_eval']:.1f} s every 5) and {args.instruct_book_answers} answers "
                f"({book['s_per_answer']:.1f} s each) timed in {book['measured_s']:.0f} s; the rest extrapolated")]
    mine = ours(preset)
    whole = (book["train_s"] + book["answers_s"]) / mine["wall_s"]
    rows.append(row("ours (python finetune_instruct.py)", preset, mine["train_seconds"], mine["answers_seconds"],
                    mine["wall_s"], f"whole job {whole:.1f}x faster (target 5x), answers "
                                    f"{book['answers_s'] / mine['answers_seconds']:.0f}x faster (target 20x); "
                                    f"total includes init, data, validation and saving"))
    rows += time_grouping(splits, preset, args.instruct_group_steps)
    if args.instruct_medium:
        medium = ours("gpt2-medium")
        rows.append(row("ours (python finetune_instruct.py)", "gpt2-medium", medium["train_seconds"],
                        medium["answers_seconds"], medium["wall_s"],
                        "the book reports 15.7 min of training and ~7 min of answers on a laptop CPU"))
    return rows

