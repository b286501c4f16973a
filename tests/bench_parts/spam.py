"""Benchmark of finetune_spam.py on the real SMS data, on this machine's CPU.

1. Speed: our default run (GPT-2 124M, last block, 5 epochs) against the recipe of "LLMs from
   scratch" ch. 6, re-implemented below as the book runs it, timed in the same process. Random
   weights stand in for GPT-2's (the cost is the same; none can be downloaded here).
2. Accuracy without pretrained weights: a small random model (--trainable all).
3. The settings table (which parts train, LoRA) for the README, on the small model.

    python tests/bench.py spam
"""
import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import finetune_spam as fs  # noqa: E402

from tokenizer import get_tokenizer


BOOK_PAD_TO = 120  # the longest training message of the book's split (its pandas split, seed 123)
BOOK_STEPS_PER_EPOCH = 130  # 1045 training messages, batch 8, drop_last
BOOK_EPOCHS, BOOK_EVAL_FREQ, BOOK_EVAL_ITER = 5, 50, 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spam-book-steps", type=int, default=BOOK_STEPS_PER_EPOCH,
                        help="training steps of the book's recipe to time (one epoch is 130); its 5-epoch time "
                             "is extrapolated from the measured step, evaluation and accuracy times")
    parser.add_argument("--spam-small-preset", default="mini", help="model of the accuracy run and the table")
    parser.add_argument("--spam-small-lr", type=float, default=3e-4, help="learning rate of the small-model runs")
    parser.add_argument("--spam-small-epochs", type=int, default=4, help="epochs of the small-model runs")
    parser.add_argument("--spam-table", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the settings table (head, last blocks, LoRA) on the small model")


# ---------------------------------------------------------------------------------------------------
# The book's recipe, as its code runs it: its own GPTModel, every message padded to the longest training
# message, logits read at position -1, the last block + final norm + a new head trained with
# AdamW(lr 5e-5, wd 0.1), batch 8, and every 50 steps the loss of 5 train and 5 validation batches;
# after each epoch the accuracy of 5 batches of each. Everything recomputed through all 12 blocks.

class BookLayerNorm(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class BookGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class BookAttention(nn.Module):
    def __init__(self, d: int, context_length: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.W_query, self.W_key, self.W_value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)  # qkv_bias
        self.out_proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(0.0)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, n, d = x.shape
        keys = self.W_key(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        scores = queries @ keys.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:n, :n], -torch.inf)
        weights = self.dropout(torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1))
        return self.out_proj((weights @ values).transpose(1, 2).contiguous().view(b, n, d))


class BookBlock(nn.Module):
    def __init__(self, d: int, context_length: int, n_heads: int):
        super().__init__()
        self.att = BookAttention(d, context_length, n_heads)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), BookGELU(), nn.Linear(4 * d, d))
        self.norm1, self.norm2 = BookLayerNorm(d), BookLayerNorm(d)
        self.drop_shortcut = nn.Dropout(0.0)

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BookGPTModel(nn.Module):
    def __init__(self, vocab_size=50257, context_length=1024, d=768, n_layers=12, n_heads=12):
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab_size, d), nn.Embedding(context_length, d)
        self.drop_emb = nn.Dropout(0.0)
        self.trf_blocks = nn.Sequential(*[BookBlock(d, context_length, n_heads) for _ in range(n_layers)])
        self.final_norm = BookLayerNorm(d)
        self.out_head = nn.Linear(d, vocab_size, bias=False)

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        return self.out_head(self.final_norm(self.trf_blocks(self.drop_emb(x))))


def book_loader(split: fs.Split, shuffle: bool, generator: torch.Generator | None = None):
    """The book's DataLoader over pre-padded messages: batch 8, shuffled with drop_last for training."""
    x = torch.full((len(split.tokens), BOOK_PAD_TO), 50256)  # <|endoftext|> pads every message to 120
    for i, t in enumerate(split.tokens):
        x[i, :min(len(t), BOOK_PAD_TO)] = t[:BOOK_PAD_TO]
    dataset = torch.utils.data.TensorDataset(x, split.labels)
    return torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=shuffle, drop_last=shuffle, generator=generator)


def book_loss(model, loader, num_batches):
    total = 0.0
    for i, (x, y) in enumerate(loader):
        if i >= num_batches:
            break
        total += F.cross_entropy(model(x)[:, -1, :], y).item()
    return total / num_batches


def book_accuracy(model, loader, num_batches):
    model.eval()
    correct = seen = 0
    for i, (x, y) in enumerate(loader):
        if i >= num_batches:
            break
        with torch.no_grad():
            correct += (model(x)[:, -1, :].argmax(-1) == y).sum().item()
        seen += len(y)
    return correct / seen


def time_book_recipe(splits: dict[str, fs.Split], steps: int) -> dict:
    """Run the book's training loop for `steps` steps; time its parts and extrapolate to 5 epochs."""
    torch.manual_seed(123)
    model = BookGPTModel()
    model.requires_grad_(False)
    model.out_head = nn.Linear(768, 2)
    model.trf_blocks[-1].requires_grad_(True)
    model.final_norm.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    train = book_loader(splits["train"], True, torch.Generator().manual_seed(123))
    val = book_loader(splits["val"], False)
    t_steps = t_evals = t_acc = 0.0
    n_evals = n_acc = global_step = 0
    while global_step < steps:
        model.train()
        for x, y in train:
            t0 = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(x)[:, -1, :], y).backward()
            optimizer.step()
            t_steps += time.perf_counter() - t0
            if global_step % BOOK_EVAL_FREQ == 0:
                t0 = time.perf_counter()
                model.eval()
                with torch.no_grad():
                    book_loss(model, train, BOOK_EVAL_ITER), book_loss(model, val, BOOK_EVAL_ITER)
                model.train()
                t_evals += time.perf_counter() - t0
                n_evals += 1
            global_step += 1
            if global_step == steps:
                break
        if global_step % BOOK_STEPS_PER_EPOCH == 0:
            t0 = time.perf_counter()
            book_accuracy(model, train, BOOK_EVAL_ITER), book_accuracy(model, val, BOOK_EVAL_ITER)
            t_acc += time.perf_counter() - t0
            n_acc += 1
    total_steps = BOOK_EPOCHS * BOOK_STEPS_PER_EPOCH
    five_epochs = (total_steps * t_steps / steps + math.ceil(total_steps / BOOK_EVAL_FREQ) * t_evals / n_evals
                   + (BOOK_EPOCHS * t_acc / n_acc if n_acc else 0.0))
    return {"measured_s": t_steps + t_evals + t_acc, "steps": steps, "five_epochs_s": five_epochs}


# ---------------------------------------------------------------------------------------------------
# Our runs

def ours(argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        metrics = fs.main(fs.parse_args([*argv, "--out-dir", out, "--eval-every", "1000"]))
        metrics["wall_s"] = time.perf_counter() - t0
    return metrics


def row(name: str, preset: str, trainable: str, metrics: dict, note: str = "") -> dict:
    best = metrics["history"][metrics["best_epoch"] - 1]
    return {"benchmark": "spam", "setting": name, "model": f"{preset} (random weights)", "trainable": trainable,
            "trainable_params": metrics["trainable_params"], "epochs": len(metrics["history"]),
            "train_acc": f"{best['train_accuracy']:.2%}", "val_acc": f"{best['val_accuracy']:.2%}",
            "test_acc": f"{metrics['test']['accuracy']:.2%}", "time_s": round(metrics["wall_s"], 1), "note": note}


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    messages = fs.load_messages(fs.default_data())
    splits, data = fs.prepare_splits(messages, get_tokenizer(), 1024)
    longest = max(len(t) for t in splits["train"].tokens)
    book = time_book_recipe(splits, args.spam_book_steps)
    extrapolated = args.spam_book_steps < BOOK_EPOCHS * BOOK_STEPS_PER_EPOCH
    rows.append({"benchmark": "spam", "setting": "book recipe (ch. 6), default", "model": "gpt2 124M (random weights)",
                 "trainable": "last_block", "epochs": BOOK_EPOCHS, "time_s": round(book["five_epochs_s"], 1),
                 "note": (f"{book['steps']} steps timed ({book['measured_s']:.0f} s), 5 epochs extrapolated; "
                          if extrapolated else "") + f"padded to {BOOK_PAD_TO} tokens (ours: longest train "
                                                     f"message {longest}, mean {data['mean_tokens']:.0f})"})
    default = ours(["--init", "random", "--preset", "gpt2"])
    speedup = book["five_epochs_s"] / default["wall_s"]
    rows.append(row("ours, default (python finetune_spam.py)", "gpt2 124M", "last_block", default,
                    f"{speedup:.1f}x faster than the book; whole run incl. init, features "
                    f"{default['feature_seconds']:.0f} s, test and saving"))

    small = ["--init", "random", "--preset", args.spam_small_preset, "--lr", str(args.spam_small_lr),
             "--epochs", str(args.spam_small_epochs)]
    settings = ["all"] + (["last_block", "last_two_blocks", "head", "lora"] if args.spam_table else [])
    for trainable in settings:
        metrics = ours([*small, "--trainable", trainable])
        rows.append(row(f"ours, --lr {args.spam_small_lr:g}", args.spam_small_preset, trainable, metrics,
                        "target: >= 96% test accuracy" if trainable == "all" else ""))
    return rows
