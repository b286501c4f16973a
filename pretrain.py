"""Pretraining: next-token prediction on a text corpus, from a laptop CPU to many GPUs.

    python pretrain.py        # Tiny Shakespeare, the "mini" model, a few minutes on a laptop CPU

With no flags this downloads Tiny Shakespeare once, tokenizes it once into the download cache, and
trains a small GPT whose samples, printed every --eval-every steps, go from noise to play-like text;
OUT_DIR/loss.svg draws its training and validation loss. Any family trains the same way, each with
its own tokenizer (--preset mistral-tiny, --init FOLDER of a Hub-layout model), and a new model can
take a tokenizer you trained:

    python tokenizer.py train corpus.txt --out out/bpe.json         # a BPE vocabulary of your own text
    python pretrain.py --data corpus.txt --tokenizer out/bpe.json    # a new model that reads with it

Before a big run, ask what it needs; several processes run under torchrun:

    python pretrain.py --plan --preset gpt2 --block-size 1024 --batch-size 16   # memory and time, no training
    torchrun --standalone --nproc_per_node=8 pretrain.py --preset gpt2 --data 'corpus/*.txt'
    torchrun --standalone --nproc_per_node=8 pretrain.py --init mistralai/Mistral-7B-v0.1 --strategy fsdp \\
        --activation-checkpointing --block-size 4096 --batch-size 1
    python pretrain.py --consolidate out/pretrain/best.dcp    # an FSDP checkpoint -> best.pt, one file

Reading order: the command line; the learning-rate schedule; --plan (planner.py does the sums); data
(text is prepared once into token files, with the model's own tokenizer); the model a run starts
from; one optimizer step; validation loss and samples; checkpoints; the run's set-up (replicated or
sharded, distributed.py holds the multi-process plumbing); then train(), the loop that ties them
together.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import corpus
import download
import tokenizer
from common import (ArgumentParser, SEED, UserError, clock, non_negative_float, non_negative_int, positive_float,
                    positive_int, refuse_changed_flags, run_stage, unit_interval, writable_folder)
from corpus import sample_windows
from distributed import (Processes, StopOnCtrlC, broadcast_weights, checkpoint_activations, consolidate, from_rank0,
                         gathered_rng, load_sharded, local_bytes, local_leader_first, processes, read_train_state,
                         restore_rng, run_folder_lock, save_sharded, sharded_model)
from generate import sample_next
from load_gpt2 import add_init_args, check_preset, load_model, model_card, tokenizer_for
from loss_curve import write_loss_svg
from model import (DTYPES, GPT, GPTConfig, add_device_args, autocast, get_config, load_checkpoint, missing_compiler,
                   resolve_device, resolve_dtype, save_checkpoint)
from planner import init_config, make_plan, peak_flops, peak_memory, report_plan
from tokenizer_base import bos





STRATEGIES = ("ddp", "fsdp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None,
                   help="a text file, folder or glob (tokenized once, with the model's tokenizer, into the download "
                        "cache's tokens/ folder and reused while the files are unchanged), or a folder holding "
                        "train.bin, val.bin and meta.json from `tokenizer.py prepare`; None: Tiny Shakespeare, "
                        "downloaded once")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="text that is not UTF-8: stop with an error, or decode bad bytes as U+FFFD")
    add_init_args(p, "random", "starting weights (to continue pretraining them; 'random' uses --preset mini unless "
                               "told otherwise)")
    p.add_argument("--tokenizer", metavar="FILE", default=None,
                   help="a new model's tokenizer (--init random): a file from `tokenizer.py train`, a tokenizer.json "
                        "or tokenizer.model, or 'mistral'; its vocabulary sets the model's, and the checkpoint's card "
                        "records it for every later stage. None: the preset's own tokenizer")
    p.add_argument("--block-size", type=positive_int, default=None,
                   help="training context in tokens; None: the model's block_size. A random model gets "
                        "exactly this context; a loaded one must have at least this much")
    p.add_argument("--dropout", type=unit_interval, default=0.0, help="dropout probability in the model while training")
    p.add_argument("--out-dir", default="out/pretrain",
                   help="run folder: ckpt.pt (latest, to resume), best.pt (best validation loss), metrics.jsonl "
                        "(one record per evaluation), loss.svg (its curves, for a browser); under --strategy fsdp "
                        "the folders ckpt.dcp and best.dcp instead (see --consolidate); plan.json with --plan")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=False,
                   help="start a new run even if OUT_DIR already holds one, replacing its checkpoints and metrics")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue the run saved in OUT_DIR: repeat the run's command and add --resume (--max-steps, "
                        "--device, the evaluation and saving intervals and the process count may change)")
    p.add_argument("--max-steps", type=positive_int, default=200, help="optimizer steps in the whole run")
    p.add_argument("--batch-size", type=positive_int, default=4, help="sequences per micro-step in each process")
    p.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-steps per optimizer step; an optimizer step sees "
                        "batch-size x grad-accum x processes sequences")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate, reached after the warmup")
    p.add_argument("--min-lr", type=non_negative_float, default=1e-4,
                   help="floor the cosine decay reaches at --max-steps (at most --lr)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=20, help="steps of linear learning-rate warmup")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1,
                   help="AdamW weight decay, on weight matrices only")
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                   help="clip the gradient norm to this; 0 turns clipping off")
    p.add_argument("--eval-every", type=positive_int, default=25,
                   help="steps between evaluations: validation loss, a sample, a progress line, a metrics record")
    p.add_argument("--log-every", type=non_negative_int, default=5,
                   help="steps between progress lines without an evaluation (their loss is the mean since the last "
                        "evaluation); 0: lines at evaluations only")
    p.add_argument("--eval-batches", type=positive_int, default=8,
                   help="validation batches of --batch-size sequences; the same windows at every evaluation")
    p.add_argument("--save-every", type=non_negative_int, default=100,
                   help="steps between checkpoints (one is also written at the end and on Ctrl-C); 0: never between")
    p.add_argument("--sample-tokens", type=non_negative_int, default=64,
                   help="tokens in each printed sample; 0: no samples")
    add_device_args(p, ("auto", *DTYPES), "autocast precision (float16 adds a gradient scaler)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model: a slow first step, then faster steps")
    p.add_argument("--seed", type=int, default=SEED, help="seeds the model's initialisation, data order and dropout")
    p.add_argument("--strategy", choices=STRATEGIES, default="ddp",
                   help="several processes: ddp keeps a whole copy of the model, its gradients and optimizer state "
                        "in every process; fsdp shards all three across the processes (one unit per block), so "
                        "each holds 1/N of them (bfloat16 weights in the matmuls, float32 gradient reduction on "
                        "GPUs). Without torchrun, fsdp runs one process")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="keep only each block's input for the backward pass and recompute the rest there: "
                        "much less activation memory for about a third more compute")
    p.add_argument("--plan", action="store_true",
                   help="print what the run needs (parameters, memory per process, FLOPs, time on this CPU and on "
                        "A100, H100, H200, L4) and whether it fits, write OUT_DIR/plan.json, and train nothing")
    p.add_argument("--plan-processes", type=positive_int, default=None,
                   help="processes the plan assumes; None: torchrun's WORLD_SIZE, else 1")
    p.add_argument("--consolidate", metavar="DCP_FOLDER", default=None,
                   help="convert an FSDP checkpoint folder (OUT_DIR/best.dcp or ckpt.dcp) into the project's "
                        "single-file checkpoint beside it (best.pt, ckpt.pt), which generate.py, the finetunes "
                        "and load_gpt2.py --export read; trains nothing")
    args = p.parse_args(argv)
    check_preset(p, args.init, args.preset)
    if args.init == "random":
        args.preset = args.preset or "mini"
    elif args.tokenizer is not None:
        p.error(f"--tokenizer only applies to --init random; {args.init} brings its own tokenizer")
    if args.resume and args.force:
        p.error("--resume continues a run and --force replaces it; choose one")
    if args.min_lr > args.lr:
        p.error(f"--min-lr {args.min_lr} is above --lr {args.lr}; the schedule decays from --lr down to --min-lr")
    if args.strategy == "fsdp" and args.dtype == "float16":
        p.error("--strategy fsdp trains in bfloat16 or float32, not float16 (which needs a gradient scaler)")
    if args.strategy == "fsdp" and args.compile:
        p.error("--compile is not supported with --strategy fsdp; leave one of them out")
    if args.plan and args.consolidate:
        p.error("--plan and --consolidate are separate jobs; give one of them")
    if args.plan_processes is not None and not args.plan:
        p.error("--plan-processes only applies with --plan")
    return args


# ---------------------------------------------------------------------------------------------------
# The learning-rate schedule

def get_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr, then cosine decay to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def warmup_steps(args: argparse.Namespace) -> int:
    """--warmup-steps, or a tenth of a run that would end inside its warm-up and so never decay."""
    return args.warmup_steps if args.warmup_steps < args.max_steps else args.max_steps // 10


# ---------------------------------------------------------------------------------------------------
# Planning: what a run needs, before it starts (planner.py)

def plan_main(args: argparse.Namespace) -> dict:
    writable_folder(args.out_dir)
    config, what = init_config(args.init, args.preset)
    if args.init == "random" and args.block_size:  # a random model gets exactly the training context
        config = dataclasses.replace(config, block_size=args.block_size)
    config = dataclasses.replace(config, dropout=args.dropout)
    if args.tokenizer:
        config = dataclasses.replace(config, vocab_size=tokenizer_for(
            {"tokenizer": tokenizer_card_name(args.tokenizer)}).n_vocab)
    block_size = args.block_size or config.block_size
    if block_size > config.block_size:
        raise UserError(f"--block-size {block_size} is longer than {what}'s context of {config.block_size} tokens")
    plan = make_plan(config, batch_size=args.batch_size, block_size=block_size, grad_accum=args.grad_accum,
                     processes=args.plan_processes or int(os.environ.get("WORLD_SIZE", "1")),
                     strategy=args.strategy, activation_checkpointing=args.activation_checkpointing,
                     dtype_name=args.dtype, device=resolve_device(args.device), steps=args.max_steps,
                     eval_tokens=evaluations(args.max_steps, args.eval_every) * args.eval_batches * args.batch_size
                     * block_size, what=what)
    return report_plan(plan, args.out_dir)


def evaluations(max_steps: int, eval_every: int) -> int:
    """How many evaluations a run makes: at step 0, every eval_every steps, and after the last step."""
    return len(set(range(0, max_steps, eval_every)) | {max_steps})


# ---------------------------------------------------------------------------------------------------
# Data: text -> token files, prepared once with the model's own tokenizer

def tokenizer_fingerprint(tok, name: str) -> str:
    """What tells two tokenizers apart: the card's name, the vocabulary size and a probe's token ids."""
    probe = tok.encode_ordinary("Fingerprint: the quick brown fox, 1234 naïve café \u00e9\u4e16\u754c 🤖\n\tend")
    return f"{name}\0{tok.n_vocab}\0{tok.eot_token}\0{probe}"


def token_folder(data: str | None, tokenizer_name: str = "gpt2", errors: str = "strict") -> Path:
    """The folder holding train.bin, val.bin and meta.json for --data, tokenizing text the first time it
    is seen with the tokenizer the model card names (load_gpt2.tokenizer_for).

    Text goes to <download cache>/tokens/<name>-<fingerprint>/, where the fingerprint covers the
    tokenizer and every source file's path, size and modification time: an unchanged corpus is reused,
    an edited one (or another tokenizer) is tokenized again into a new folder."""
    if data is not None and (Path(data) / "train.bin").is_file():
        return Path(data)
    source = download.fetch("text/tinyshakespeare.txt") if data is None else data
    tok = tokenizer_for({"tokenizer": tokenizer_name})
    fingerprint = hashlib.sha256(f"{errors}\0{tokenizer_fingerprint(tok, tokenizer_name)}\n".encode())
    for path in corpus.corpus_files(source):
        stat = path.stat()
        fingerprint.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    name = re.sub(r"[^\w.-]", "", Path(source).stem) or "corpus"
    folder = download.cache_dir() / "tokens" / f"{name}-{fingerprint.hexdigest()[:16]}"
    if not (folder / "meta.json").is_file():
        # Tokenize into a private folder and rename it into place, so a crash or a concurrent run never
        # leaves a half-written folder that looks finished.
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        try:
            corpus.prepare_corpus(source, tmp, tokenizer=tok, tokenizer_name=tokenizer_name, errors=errors)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same folder first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_splits(folder: Path, block_size: int, vocab_size: int, tok,
                tokenizer_name: str) -> tuple[np.ndarray, np.ndarray]:
    """train.bin and val.bin of a token folder, checked against its meta.json (corpus.load_token_folder)
    and against the model: its tokenizer, its vocabulary, and at least one window per split."""
    train, val, meta = corpus.load_token_folder(folder)
    if meta.get("vocab_size", 0) > vocab_size:
        raise UserError(f"{folder} was tokenized with a vocabulary of {meta['vocab_size']} tokens, larger than the "
                        f"model's {vocab_size}; prepare the text with the model's tokenizer")
    made_with = meta.get("tokenizer_name")
    if made_with is None:
        raise UserError(f"{folder / 'meta.json'} does not name the tokenizer its tokens come from (it was prepared "
                        f"before meta.json recorded one); prepare it again with: python tokenizer.py prepare INPUT "
                        f"--out {folder}")
    if made_with != tokenizer_name:
        if meta.get("vocab_size") != tok.n_vocab or meta.get("eot_token", tok.eos_id) != tok.eos_id:
            raise UserError(f"{folder} was tokenized with {made_with}, but the model's tokenizer is {tokenizer_name}; "
                            f"give the text itself as --data, or prepare it with the model's tokenizer")
        print(f"note: {folder} names its tokenizer {made_with}, the model {tokenizer_name}; their vocabularies "
              f"agree, so it is used", file=sys.stderr)
    for split, tokens in (("train", train), ("val", val)):
        if len(tokens) <= block_size:
            raise UserError(f"{folder / (split + '.bin')} holds {len(tokens)} tokens, too few for one window of "
                            f"{block_size} tokens plus its target; use more text (validation is its last 10%) "
                            f"or a smaller --block-size")
    return train, val


def draw_batch(tokens: np.ndarray, batch_size: int, block_size: int, *, grad_accum: int, world_size: int,
               rank: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's micro-batches of optimizer step `step`: x, y (grad_accum, batch_size, block_size).

    The step's batch is grad_accum x world_size micro-batches; micro-batch i = micro * world_size + rank
    comes from a generator seeded by (seed, step, i). So every process draws different windows, and
    only its own; the step's whole batch is the same for any split into processes and micro-steps
    with the same product (1 process x 2 micro-steps = 2 processes x 1); and the data position of a
    checkpoint is just its step."""
    xs, ys = [], []
    for micro in range(grad_accum):
        key = hashlib.sha256(f"{seed}:{step}:{micro * world_size + rank}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
        x, y = sample_windows(tokens, batch_size, block_size, generator)  # (B, T) each
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


# ---------------------------------------------------------------------------------------------------
# The model a run starts from

def tokenizer_card_name(value: str) -> str:
    """--tokenizer as a model card names it (and `tokenizer.py prepare` in meta.json): a name's place in
    the download cache, or the file's absolute path, so the card finds it from any folder."""
    if value in tokenizer.NAMED_TOKENIZERS:
        return tokenizer.NAMED_TOKENIZERS[value]
    if not Path(value).is_file():
        raise UserError(f"--tokenizer {value} is not a file; train one with: python tokenizer.py train INPUT "
                        f"--out {value}")
    return str(Path(value).resolve())


def initial_model(args: argparse.Namespace) -> tuple[GPT, dict]:
    """A new run's model (on the CPU) and its card: a random one of --preset, or --init's weights."""
    overrides = {"dropout": args.dropout} | ({"block_size": args.block_size} if args.block_size else {})
    if args.init == "random":
        _, card = load_model("random", preset=args.preset, device="meta")  # the preset's card; no weights
        card = model_card(card)
        if args.tokenizer:
            card["tokenizer"] = tokenizer_card_name(args.tokenizer)
            overrides["vocab_size"] = tokenizer_for(card).n_vocab
        torch.manual_seed(args.seed)
        return GPT(get_config(args.preset, **overrides)), card
    loaded, extra = load_model(args.init)
    if loaded.config.num_classes is not None:
        raise UserError(f"{args.init} is a classifier; pretraining needs a language model")
    if args.block_size and args.block_size > loaded.config.block_size:
        raise UserError(f"--block-size {args.block_size} is longer than {args.init}'s context of "
                        f"{loaded.config.block_size} tokens")
    if loaded.config.dropout == args.dropout:
        return loaded, model_card(extra)
    # Dropout is a config field: a model of the new config on the meta device takes over the loaded
    # tensors themselves (assign), so the weights are never in memory twice.
    with torch.device("meta"):
        model = GPT(dataclasses.replace(loaded.config, dropout=args.dropout))
    model.load_state_dict(loaded.state_dict(), assign=True)
    if model.config.tie_embeddings:
        model.tie_weights()  # assign gave the head its own Parameter object; share the embedding's again
    return model, model_card(extra)


# ---------------------------------------------------------------------------------------------------
# One optimizer step

def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               x: torch.Tensor, y: torch.Tensor, *, grad_clip: float, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over the micro-batches x, y (accum, B, T), then one optimizer step.

    Returns (mean loss over the micro-batches, gradient norm before clipping), both 0-dim tensors.
    A non-finite gradient norm skips the update (the gradient scaler's own rule under float16), so
    the weights stay as they were and the caller can stop with the last good state. Under FSDP every
    micro-step reduce-scatters its gradients, which keeps only the shards between micro-steps."""
    accum = x.size(0)
    loss_sum = torch.zeros((), device=x.device)
    for micro in range(accum):
        # DDP all-reduces gradients during backward; only the last micro-step needs that.
        last = micro == accum - 1
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with ctx:
                loss = model(x[micro], y[micro])[1]  # the logits (B, T, V) are not kept: freed before backward
            # Gradients add up over micro-steps, so each micro-batch's mean loss is divided by accum:
            # the sum is then the gradient of the mean loss over the step's whole batch.
            scaler.scale(loss / accum).backward()
        loss_sum += loss.detach() / accum
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if isinstance(norm, DTensor):  # sharded gradients: the norm of the whole gradient, the same everywhere
        norm = norm.full_tensor()
    if scaler.is_enabled() or torch.isfinite(norm):
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm


# ---------------------------------------------------------------------------------------------------
# Evaluation and samples

@torch.no_grad()
def validation_loss(model: torch.nn.Module, tokens: np.ndarray, *, batches: int, batch_size: int, block_size: int,
             seed: int, ctx, procs: Processes, device: torch.device) -> float:
    """Mean loss over the same `batches` x `batch_size` windows every time, whatever the process count.

    Every process draws all the batches from a generator seeded the same each time and evaluates
    batches rank, rank + world_size, ...; the processes add up their sums. Every process runs the same
    number of forward passes (one without a batch of its own repeats batch 0 and counts nothing), as
    FSDP's gathers in each forward pass need all of them."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    windows = [sample_windows(tokens, batch_size, block_size, generator) for _ in range(batches)]  # (B, T) pairs
    total = torch.zeros(2, device=device)  # (sum of batch losses, batches)
    for first in range(0, batches, procs.world_size):
        i = first + procs.rank
        x, y = windows[i if i < batches else 0]
        with ctx:
            loss = model(x.to(device), y.to(device))[1]
        if i < batches:
            total += torch.stack([loss.float(), torch.ones((), device=device)])
    if procs.distributed:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


@torch.no_grad()
def sample_text(model: torch.nn.Module, tok, max_new_tokens: int, *, block_size: int, seed: int, ctx,
                device: torch.device) -> str:
    """A short sample that starts a new document (the tokenizer's BOS, or GPT-2's <|endoftext|>), the
    same seed every time, so samples taken at different steps differ only by what the model learned.

    The whole sequence runs again for every token, without a KV cache: under FSDP every process must
    run the same forward passes (each gathers the weights), which a plain model call does, and a few
    dozen tokens cost little next to training. Every process gets the same text."""
    ids = torch.tensor([bos(tok) or [tok.eot_token]], device=device)  # (1, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    new = []
    model.eval()
    for _ in range(min(max_new_tokens, block_size - ids.size(1))):
        with ctx:
            logits = model(ids, last_only=True)[0]  # (1, 1, V)
        next_id = sample_next(logits[:, -1].float(), temperature=0.8, top_k=200, generator=generator)  # (1,)
        if int(next_id) in (tok.eot_token, tok.eos_id):
            break
        new.append(int(next_id))
        ids = torch.cat([ids, next_id[:, None]], dim=1)
    model.train()
    return tok.decode(new)


def progress_line(step: int, max_steps: int, record: dict) -> str:
    """One fixed-width line: step, losses, lr, grad norm, ms/step, tokens/s, MFU (when known), memory, ETA;
    the validation loss at an evaluation."""
    line = f"step {step:>6}/{max_steps}"
    if record.get("train_loss") is not None:
        line += (f" | loss {record['train_loss']:7.4f} | lr {record['lr']:.2e} | norm {record['grad_norm']:7.3f}"
                 f" | {record['ms_per_step']:8.1f} ms/step | {record['tokens_per_s']:9.0f} tok/s")
        if record.get("mfu") is not None:
            line += f" | mfu {100 * record['mfu']:5.1f}%"
        if record.get("peak_memory") is not None:
            line += f" | mem {record['peak_memory'] / 1e9:6.2f} GB"
        line += f" | eta {clock((max_steps - step) * record['ms_per_step'] / 1000)}"
    if "val_loss" in record:
        line += f" | val {record['val_loss']:7.4f} ppl {record['val_ppl']:9.2f}"
    return line


# ---------------------------------------------------------------------------------------------------
# Checkpoints
#
# One process (or DDP): ckpt.pt, the latest state for --resume, and best.pt, the weights of the best
# validation loss; both are save_checkpoint files with the model card. FSDP: the folders ckpt.dcp and
# best.dcp, written by torch.distributed.checkpoint, in which every process writes only its own
# shards (distributed.save_sharded). Such a folder loads into any number of processes (the shards are
# re-cut on load), and --consolidate turns it into one save_checkpoint file.

CKPT, BEST, METRICS, LOSS_SVG = "ckpt.pt", "best.pt", "metrics.jsonl", "loss.svg"
SHARDED_CKPT, SHARDED_BEST = "ckpt.dcp", "best.dcp"
# Flags that would silently change a resumed run (its model, data, schedule or numerics). The rest may
# change: --max-steps (a longer or shorter run; the schedule follows, with a note), --device, --compile,
# --activation-checkpointing, the evaluation and saving intervals, and the process count when
# --grad-accum x processes stays the same (draw_batch then draws the same windows).
RESUME_MUST_MATCH = ("data", "errors", "init", "preset", "tokenizer", "block_size", "dropout", "batch_size", "lr",
                     "min_lr", "warmup_steps", "weight_decay", "grad_clip", "eval_batches", "seed", "dtype", "strategy")


def check_resume_flags(saved: dict, args: argparse.Namespace, procs: Processes, state_path: Path) -> None:
    """Refuse a --resume whose flags differ from the run's where that changes the run; say which."""
    more = ()
    if "world_size" in saved and saved["grad_accum"] * saved["world_size"] != args.grad_accum * procs.world_size:
        more = (f"--grad-accum {saved['grad_accum']} with {saved['world_size']} process(es) "
                f"(now {args.grad_accum} with {procs.world_size}; their product must stay the same)",)
    weights = f"--init {state_path}" if state_path.suffix == ".pt" else \
        f"--init {state_path.with_suffix('.pt')} after python pretrain.py --consolidate {state_path}"
    refuse_changed_flags(saved, args, RESUME_MUST_MATCH, state_path.parent,
                         f"start a new run from its weights in another --out-dir ({weights})", more)
    if saved.get("max_steps", args.max_steps) != args.max_steps and procs.is_main:
        print(f"note: --max-steps changed from {saved['max_steps']} to {args.max_steps}: the learning rate's "
              f"cosine now ends at step {args.max_steps}", file=sys.stderr)


def run_args(args: argparse.Namespace, procs: Processes) -> dict:
    return vars(args) | {"world_size": procs.world_size}


# ---------------------------------------------------------------------------------------------------
# The run: the model, its optimizer and its data, built (or restored) once

def build(args: argparse.Namespace, procs: Processes, device: torch.device,
          resume: Path | None) -> tuple[GPT, torch.optim.Optimizer, dict, dict]:
    """The model on its device, its optimizer, the model card and, when resuming, the saved training
    state (step, best_val_loss, rng, scaler), with the weights and the optimizer's state restored."""
    if resume is not None:
        try:
            gpt, state = local_leader_first(procs, lambda: load_checkpoint(resume))
        except ValueError as e:
            raise UserError(f"--resume: {e}") from None
        if "optimizer" not in state:
            raise UserError(f"--resume: {resume} holds no training state (written by another stage, or "
                            f"consolidated from a sharded checkpoint?)")
        if "model_type" not in state:
            raise UserError(f"--resume: {resume} was written before checkpoints carried a model card; start a new "
                            f"run from its weights in another --out-dir (--init {resume})")
        check_resume_flags(state["args"], args, procs, resume)
        card = model_card(state)
    else:
        gpt, card = local_leader_first(procs, lambda: initial_model(args))
        state = {}
    if args.activation_checkpointing:
        checkpoint_activations(gpt)
    gpt.to(device)
    optimizer = gpt.configure_optimizer(args.lr, args.weight_decay, device_type=device.type)
    if state:
        optimizer.load_state_dict(state["optimizer"])
    return gpt, optimizer, card, state


def build_sharded(args: argparse.Namespace, procs: Processes, device: torch.device, dtype: torch.dtype,
                  resume: Path | None) -> tuple[GPT, torch.optim.Optimizer, dict, dict]:
    """build() under FSDP: every process holds its own shards only (distributed.sharded_model); the
    weights come from rank 0's model (a new run) or from the sharded checkpoint."""
    full = None
    if resume is not None:
        state = read_train_state(resume)
        check_resume_flags(state["args"], args, procs, resume)
        config, card = GPTConfig(**state["config"]), state["card"]
    else:
        state, config_and_card = {}, None
        if procs.is_main:
            try:
                full, card = initial_model(args)
                config_and_card = (dataclasses.asdict(full.config), card)
            except UserError as e:  # a bad --init: the others, waiting for the config, stop with it
                config_and_card = str(e)
        config_and_card = from_rank0(procs, config_and_card)
        if isinstance(config_and_card, str):
            raise UserError(config_and_card)
        config, card = GPTConfig(**config_and_card[0]), config_and_card[1]
    gpt = sharded_model(config, device, dtype, args.activation_checkpointing)
    optimizer = gpt.configure_optimizer(args.lr, args.weight_decay, device_type=device.type)
    if resume is not None:
        load_sharded(resume, gpt, optimizer)
    else:
        broadcast_weights(gpt, full)
    return gpt, optimizer, card, state


@dataclasses.dataclass
class Run:
    """Everything the training loop works with, made once by start_run. The loop itself changes only
    `step` and `best_val_loss`, and a checkpoint saves those with the weights."""
    args: argparse.Namespace
    procs: Processes
    device: torch.device
    dtype: torch.dtype  # the forward passes' precision
    ctx: Any  # autocast(device, dtype)
    gpt: GPT  # the model itself (each process's shards under FSDP): what is saved
    compiled: torch.nn.Module  # gpt, or torch.compile(gpt): evaluation and samples
    model: torch.nn.Module  # compiled, wrapped in DDP with several processes: the training steps
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled under float16 only
    card: dict  # the model card (family, tokenizer), saved with every checkpoint
    tok: Any  # the card's tokenizer, for the samples
    block_size: int
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    state_path: Path  # the latest state, for --resume (ckpt.pt or ckpt.dcp)
    best_path: Path  # the weights of the best validation loss (best.pt or best.dcp)
    tokens_per_step: int  # the whole batch of one optimizer step, over all processes
    step: int = 0
    best_val_loss: float = math.inf
    records: list[dict] = dataclasses.field(default_factory=list)  # metrics.jsonl's, for loss.svg (main process)

    @property
    def sharded(self) -> bool:
        return self.args.strategy == "fsdp"


def check_out_dir(args: argparse.Namespace, out_dir: Path, is_main: bool) -> tuple[Path, Path]:
    """(state_path, best_path) of the run in out_dir, after checking that --resume finds a run there and
    that a new run does not write over one (--force: the main process removes the old run's files)."""
    sharded = args.strategy == "fsdp"
    state_path = out_dir / (SHARDED_CKPT if sharded else CKPT)
    best_path = out_dir / (SHARDED_BEST if sharded else BEST)
    existing = [name for name in (CKPT, SHARDED_CKPT, BEST, SHARDED_BEST, METRICS) if (out_dir / name).exists()]
    if args.resume and not state_path.exists():
        other = out_dir / (CKPT if sharded else SHARDED_CKPT)
        if other.exists():
            raise UserError(f"--resume: the run in {out_dir} was trained with --strategy "
                            f"{'ddp' if sharded else 'fsdp'} ({other.name}); resume it with that strategy")
        left = f" (it holds {', '.join(existing)} of a run that stopped before its first checkpoint; delete " \
               f"them or pick another --out-dir)" if existing else "; start the run without --resume"
        raise UserError(f"--resume: {state_path} does not exist{left}")
    if not args.resume and existing and not args.force:
        raise UserError(f"{out_dir} already holds a run ({existing[0]}); add --resume to continue it, --force to "
                        f"replace it, or pick another --out-dir")
    if args.force and existing and is_main:
        for name in (CKPT, SHARDED_CKPT, BEST, SHARDED_BEST, METRICS, LOSS_SVG):
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        print(f"note: --force: removed the earlier run's {', '.join(existing)} from {out_dir}", file=sys.stderr)
    return state_path, best_path


def start_run(args: argparse.Namespace, procs: Processes, device: torch.device, out_dir: Path) -> Run:
    """The model, optimizer and data of a new run, or of the saved one under --resume."""
    state_path, best_path = check_out_dir(args, out_dir, procs.is_main)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    resume = state_path if args.resume else None
    gpt, optimizer, card, state = build_sharded(args, procs, device, dtype, resume) if args.strategy == "fsdp" \
        else build(args, procs, device, resume)
    tok = tokenizer_for(card)  # the run's own tokenizer, kept by --resume through the saved card
    block_size = args.block_size or gpt.config.block_size
    data = local_leader_first(procs, lambda: token_folder(args.data, card["tokenizer"], args.errors))
    train_tokens, val_tokens = load_splits(data, block_size, gpt.config.vocab_size, tok, card["tokenizer"])

    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(args.seed + procs.rank)  # different dropout masks in each process
    if state:
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"], procs)
    compiled = torch.compile(gpt) if args.compile else gpt
    model = compiled
    if procs.distributed and args.strategy == "ddp":
        model = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)  # gradients live in DDP's buckets: no second copy
    run = Run(args, procs, device, dtype, autocast(device, dtype), gpt, compiled, model, optimizer, scaler, card, tok,
              block_size, train_tokens, val_tokens, state_path, best_path,
              tokens_per_step=args.batch_size * block_size * args.grad_accum * procs.world_size,
              step=state.get("step", 0), best_val_loss=state.get("best_val_loss", math.inf))
    if procs.is_main:
        run.records = read_metrics(out_dir / METRICS) if args.resume else []
        describe_run(run, data)
    return run


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a line cut short by a killed run is left out."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def describe_run(run: Run, data: Path) -> None:
    """The run's first lines: model, batch, data and device, and what the progress lines' columns mean."""
    args, procs, gpt = run.args, run.procs, run.gpt
    print(f"{gpt.num_params() / 1e6:.1f}M parameters ({run.card['model_type']}), context {run.block_size}, "
          f"{run.tokens_per_step:,} tokens per step ({procs.world_size} process(es) x {args.grad_accum} "
          f"micro-steps x {args.batch_size} x {run.block_size}), {len(run.train_tokens):,} training tokens in "
          f"{data}, {run.device} {str(run.dtype).removeprefix('torch.')}" + (", fsdp" if run.sharded else "")
          + (", activation checkpointing" if args.activation_checkpointing else ""))
    print(f"progress lines: loss is the mean training loss over the steps since the last evaluation; val is the "
          f"loss on the same {args.eval_batches} x {args.batch_size} validation windows at every evaluation")
    if warmup_steps(args) != args.warmup_steps:
        print(f"note: --warmup-steps {args.warmup_steps} is not shorter than --max-steps {args.max_steps}, so the "
              f"learning rate would never decay; this run warms up for {warmup_steps(args)} steps", file=sys.stderr)
    if args.resume:
        print(f"resuming {run.state_path} at step {run.step}")


# ---------------------------------------------------------------------------------------------------
# Saving and logging, at the loop's intervals

def train_state(run: Run) -> dict:
    """What --resume needs besides the weights and the optimizer. Every process must call it (each
    gives its random state)."""
    return {"step": run.step, "best_val_loss": run.best_val_loss, "args": run_args(run.args, run.procs),
            "card": run.card, "config": dataclasses.asdict(run.gpt.config), "rng": gathered_rng(run.procs)}


def save_latest(run: Run) -> None:
    """ckpt.pt (or ckpt.dcp): the weights, the optimizer and everything --resume needs."""
    if run.sharded:
        save_sharded(run.state_path, run.gpt, run.optimizer, run.procs, train_state(run))
        return
    state = train_state(run)  # every process takes part (its random state)
    if run.procs.is_main:
        kept = {k: state[k] for k in ("step", "best_val_loss", "args", "rng")}
        save_checkpoint(run.state_path, run.gpt, optimizer=run.optimizer.state_dict(),
                        scaler=run.scaler.state_dict(), **kept, **run.card)


def save_best(run: Run, val_loss: float) -> None:
    """best.pt (or best.dcp): the weights of the best validation loss so far, with the model card."""
    if run.sharded:
        save_sharded(run.best_path, run.gpt, None, run.procs, {**train_state(run), "val_loss": val_loss})
    elif run.procs.is_main:
        save_checkpoint(run.best_path, run.gpt, step=run.step, val_loss=val_loss,
                        args=run_args(run.args, run.procs), **run.card)


def log_evaluation(run: Run, metrics_file, training: dict) -> dict:
    """Validation loss (and a sample) at run.step: one progress line, one metrics.jsonl record (with
    `training`, the averages since the last evaluation), loss.svg redrawn, and best.pt when the loss is
    the best yet."""
    args = run.args
    val_loss = validation_loss(run.compiled, run.val_tokens, batches=args.eval_batches, batch_size=args.batch_size,
                               block_size=run.block_size, seed=args.seed, ctx=run.ctx, procs=run.procs,
                               device=run.device)
    record = {"step": run.step, **training, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
              "tokens_seen": run.step * run.tokens_per_step}
    if args.sample_tokens and (run.sharded or run.procs.is_main):  # under FSDP every process takes part
        record["sample"] = sample_text(run.compiled, run.tok, args.sample_tokens, block_size=run.block_size,
                                       seed=args.seed, ctx=run.ctx, device=run.device)
    if run.procs.is_main:
        print(progress_line(run.step, args.max_steps, record), flush=True)
        if "sample" in record:
            print("    " + record["sample"].replace("\n", "\n    "), flush=True)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        run.records.append(record)
        write_loss_svg(run.state_path.parent / LOSS_SVG, run.records,
                       title=f"pretrain.py: {run.card['model_type']}, {run.gpt.num_params() / 1e6:.1f}M parameters")
    if val_loss < run.best_val_loss:
        save_best(run, val_loss)
    run.best_val_loss = min(run.best_val_loss, val_loss)
    return record


@dataclasses.dataclass
class Interval:
    """The training steps since the last evaluation, which its progress line and record average."""
    steps: int = 0
    seconds: float = 0.0
    loss: float = 0.0

    def add(self, loss: float, seconds: float) -> None:
        self.steps, self.seconds, self.loss = self.steps + 1, self.seconds + seconds, self.loss + loss

    def record(self, run: Run, lr: float, grad_norm: float) -> dict:
        """The averages of a progress line and a metrics record; lr and grad_norm of the last step."""
        tokens_per_s = run.tokens_per_step * self.steps / self.seconds
        return {"train_loss": self.loss / self.steps, "lr": lr, "grad_norm": grad_norm,
                "ms_per_step": 1000 * self.seconds / self.steps, "tokens_per_s": tokens_per_s,
                "mfu": model_flops_utilization(run, tokens_per_s), "peak_memory": peak_memory(run.device)}


def model_flops_utilization(run: Run, tokens_per_s: float | None) -> float | None:
    """The share of the devices' peak FLOP/s that training at tokens_per_s uses (known GPUs only)."""
    peak = peak_flops(run.device, run.dtype)
    if not peak or not tokens_per_s:
        return None
    return tokens_per_s * run.gpt.flops_per_token(run.block_size) / (peak * run.procs.world_size)


# ---------------------------------------------------------------------------------------------------
# The loop

def optimizer_step(run: Run, ctrl_c: StopOnCtrlC) -> tuple[float, float, float, bool]:
    """One optimizer step of the whole batch at run.step's learning rate, then run.step + 1.

    Returns (loss, gradient norm, learning rate, whether any process saw Ctrl-C). A loss or norm that
    is not finite stops the run with the last good checkpoint kept."""
    args, procs, device = run.args, run.procs, run.device
    lr = get_lr(run.step, lr=args.lr, min_lr=args.min_lr, warmup_steps=warmup_steps(args), max_steps=args.max_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    x, y = draw_batch(run.train_tokens, args.batch_size, run.block_size, grad_accum=args.grad_accum,
                      world_size=procs.world_size, rank=procs.rank, seed=args.seed, step=run.step)  # (accum, B, T)
    if device.type == "cuda":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    loss, norm = train_step(run.model, run.optimizer, run.scaler, x, y, grad_clip=args.grad_clip, ctx=run.ctx)
    # One all-reduce per step gives every process the global loss and whether anyone saw Ctrl-C, so
    # they all stop together.
    shared = torch.stack([loss.float(), torch.tensor(float(ctrl_c.requested), device=device)])
    if procs.distributed:
        dist.all_reduce(shared)
    loss_value, interrupted, norm_value = shared[0].item() / procs.world_size, shared[1].item() > 0, norm.item()
    if not math.isfinite(loss_value) or (not run.scaler.is_enabled() and not math.isfinite(norm_value)):
        kept = f"{run.state_path} still holds the last good state" if run.state_path.exists() \
            else "no checkpoint was written"
        raise UserError(f"the loss became {loss_value} (gradient norm {norm_value}) at step {run.step + 1}, so "
                        f"training stopped; {kept} (try a lower --lr or --grad-clip)")
    run.step += 1
    return loss_value, norm_value, lr, interrupted


def train(args: argparse.Namespace) -> tuple[GPT, dict]:
    """Run (or continue) the training; return the trained model and what was measured.

    Under FSDP the model returned is the sharded one (each process holds its shards)."""
    with processes(args.device, args.strategy) as (procs, device):
        if args.compile and (why := missing_compiler(device)):
            raise UserError(why)
        out_dir = writable_folder(args.out_dir)  # every process: under FSDP each writes its own shards there
        with run_folder_lock(out_dir, procs):
            run = start_run(args, procs, device, out_dir)
            first_step, losses, last_record, interrupted = run.step, [], {}, False
            since_eval, total = Interval(), Interval()
            with StopOnCtrlC(procs) as ctrl_c, \
                    open(out_dir / METRICS, "a" if args.resume else "w") if procs.is_main else nullcontext() as metrics:
                if run.step == 0:
                    last_record = log_evaluation(run, metrics, {})  # the untrained baseline the samples improve on
                while run.step < args.max_steps and not interrupted:
                    start = time.perf_counter()
                    loss, norm, lr, interrupted = optimizer_step(run, ctrl_c)
                    seconds = time.perf_counter() - start
                    losses.append(loss)
                    since_eval.add(loss, seconds)
                    total.add(loss, seconds)
                    if run.step % args.eval_every == 0 or run.step == args.max_steps:
                        last_record = log_evaluation(run, metrics, since_eval.record(run, lr, norm))
                        since_eval = Interval()
                    elif args.log_every and run.step % args.log_every == 0 and procs.is_main:
                        print(progress_line(run.step, args.max_steps, since_eval.record(run, lr, norm)), flush=True)
                    if run.step == args.max_steps or interrupted or (args.save_every
                                                                     and run.step % args.save_every == 0):
                        save_latest(run)
            report_end(run, first_step, interrupted)
            outcome = run.gpt, results(run, losses, last_record, total, interrupted)
            # The DDP wrapper goes before the process group: freed after it, its reducer would end the
            # group's gloo threads while holding the GIL that one of them waits for (a hang at exit).
            del run
    return outcome


def report_end(run: Run, first_step: int, interrupted: bool) -> None:
    """The run's last line: how it ended and where its checkpoints are."""
    if not run.procs.is_main:
        return
    if interrupted:
        print(f"interrupted at step {run.step}; saved {run.state_path}; continue with the same command plus --resume")
    elif run.step == first_step:
        print(f"no steps to run: the run is at step {run.step} of --max-steps {run.args.max_steps}")
    else:
        print(f"done: step {run.step}, best validation loss {run.best_val_loss:.4f}; saved {run.state_path} and "
              f"{run.best_path}" + (f" (one file each: python pretrain.py --consolidate {run.best_path})"
                                    if run.sharded else ""))


def results(run: Run, losses: list[float], last_record: dict, total: Interval, interrupted: bool) -> dict:
    """What main() returns: the losses, speed and memory of this invocation's steps."""
    tokens_per_s = run.tokens_per_step * total.steps / total.seconds if total.seconds else None
    optimizer_tensors = [t for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"step": run.step, "train_losses": losses, "train_loss": losses[-1] if losses else None,
            "val_loss": last_record.get("val_loss"), "best_val_loss": run.best_val_loss,
            "tokens_per_s": tokens_per_s, "mfu": model_flops_utilization(run, tokens_per_s),
            "interrupted": interrupted, "checkpoint": str(run.state_path), "strategy": run.args.strategy,
            "peak_memory": peak_memory(run.device), "param_bytes": local_bytes(run.gpt.parameters()),
            "optimizer_bytes": local_bytes(optimizer_tensors)}


def main(args: argparse.Namespace) -> dict:
    if args.consolidate:
        return consolidate(args.consolidate)
    if args.plan:
        return plan_main(args)
    return train(args)[1]


if __name__ == "__main__":
    run_stage(main, parse_args)
