"""Pretraining: next-token prediction on a text corpus, from a laptop CPU to many GPUs.

    python pretrain.py        # Tiny Shakespeare, the "mini" model, a few minutes on a laptop CPU

With no flags this downloads Tiny Shakespeare once, tokenizes it once into the download cache, and
trains a small GPT whose samples, printed every --eval-every steps, go from noise to play-like text.
Any family trains the same way, each with its own tokenizer (--preset mistral-tiny, --init FOLDER of
a Hub-layout model). Before a big run, ask what it needs; several processes run under torchrun:

    python pretrain.py --plan --preset gpt2 --block-size 1024 --batch-size 16   # memory and time, no training
    torchrun --standalone --nproc_per_node=8 pretrain.py --preset gpt2 --data 'corpus/*.txt'
    torchrun --standalone --nproc_per_node=8 pretrain.py --init mistralai/Mistral-7B-v0.1 --strategy fsdp \\
        --activation-checkpointing --block-size 4096 --batch-size 1
    python pretrain.py --consolidate out/pretrain/best.dcp    # an FSDP checkpoint -> best.pt, one file

Reading order: the command line; the schedule and the devices' data-sheet figures; planning (what a
run needs in memory and time, before it starts); data (text is prepared once into token files, with
the model's own tokenizer); processes (torchrun); the model, replicated (DDP) or sharded (FSDP); one
training step; evaluation and samples; checkpoints, single-file and sharded; then train(), the loop
that ties them together.
"""
import argparse
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import download
import tokenizer
from common import (ArgumentParser, RunLock, UserError, atomic_write, clock, non_negative_float, non_negative_int,
                    positive_float, positive_int, run_stage, unit_interval, writable_folder)
from generate import sample_next
from load_gpt2 import add_init_args, check_preset, load_model, model_card, tokenizer_for
from model import (DTYPES, GPT, GPTConfig, add_device_args, autocast, get_config, load_checkpoint, missing_compiler,
                   resolve_device, resolve_dtype, save_checkpoint)
from planner import init_config, make_plan, peak_flops, peak_memory, report_plan
from tokenizer import bos, sample_windows


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
    p.add_argument("--block-size", type=positive_int, default=None,
                   help="training context in tokens; None: the model's block_size. A random model gets "
                        "exactly this context; a loaded one must have at least this much")
    p.add_argument("--dropout", type=unit_interval, default=0.0, help="dropout probability in the model while training")
    p.add_argument("--out-dir", default="out/pretrain",
                   help="run folder: ckpt.pt (latest, to resume), best.pt (best validation loss), metrics.jsonl; "
                        "under --strategy fsdp the folders ckpt.dcp and best.dcp instead (see --consolidate); "
                        "plan.json with --plan")
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
    p.add_argument("--eval-batches", type=positive_int, default=8,
                   help="validation batches of --batch-size sequences; the same windows at every evaluation")
    p.add_argument("--save-every", type=non_negative_int, default=100,
                   help="steps between checkpoints (one is also written at the end and on Ctrl-C); 0: never between")
    p.add_argument("--sample-tokens", type=non_negative_int, default=64,
                   help="tokens in each printed sample; 0: no samples")
    add_device_args(p, ("auto", *DTYPES), "autocast precision (float16 adds a gradient scaler)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model: a slow first step, then faster steps")
    p.add_argument("--seed", type=int, default=1337, help="seeds the model's initialisation, data order and dropout")
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
# Schedule and devices

def get_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr, then cosine decay to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


# ---------------------------------------------------------------------------------------------------
# Planning: what a run needs, before it starts
#
# Memory per process, in bytes, at the peak of a training step. AdamW keeps two float32 moments per
# trainable weight, so weights, gradients and optimizer state take 4 + 4 + 8 = 16 bytes per
# parameter (DDP: all of it in every process; FSDP: 1/N of it). Activations are what the forward pass
# keeps for the backward pass; their count per token follows the blocks' code in model.py term by term
# (see block_activations) and is checked against what autograd really saves in tests/test_plan.py.


def plan_main(args: argparse.Namespace) -> dict:
    writable_folder(args.out_dir)
    config, what = init_config(args.init, args.preset)
    if args.init == "random" and args.block_size:  # a random model gets exactly the training context
        config = dataclasses.replace(config, block_size=args.block_size)
    config = dataclasses.replace(config, dropout=args.dropout)
    block_size = args.block_size or config.block_size
    if block_size > config.block_size:
        raise UserError(f"--block-size {block_size} is longer than {what}'s context of {config.block_size} tokens")
    plan = make_plan(config, batch_size=args.batch_size, block_size=block_size, grad_accum=args.grad_accum,
                     processes=args.plan_processes or int(os.environ.get("WORLD_SIZE", "1")),
                     strategy=args.strategy, activation_checkpointing=args.activation_checkpointing,
                     dtype_name=args.dtype, device=resolve_device(args.device), steps=args.max_steps, what=what)
    return report_plan(plan, args.out_dir)


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
    for path in tokenizer.corpus_files(source):
        stat = path.stat()
        fingerprint.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    name = re.sub(r"[^\w.-]", "", Path(source).stem) or "corpus"
    folder = download.cache_dir() / "tokens" / f"{name}-{fingerprint.hexdigest()[:16]}"
    if not (folder / "meta.json").is_file():
        # Tokenize into a private folder and rename it into place, so a crash or a concurrent run never
        # leaves a half-written folder that looks finished.
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        try:
            tokenizer.prepare_corpus(source, tmp, tokenizer=tok, tokenizer_name=tokenizer_name, errors=errors)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same folder first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_splits(folder: Path, block_size: int, vocab_size: int, tok, tokenizer_name: str) -> tuple[np.ndarray, np.ndarray]:
    """train.bin and val.bin of a token folder, checked against its meta.json (tokenizer.load_token_folder)
    and against the model: its tokenizer, its vocabulary, and at least one window per split."""
    train, val, meta = tokenizer.load_token_folder(folder)
    if meta.get("vocab_size", 0) > vocab_size:
        raise UserError(f"{folder} was tokenized with a vocabulary of {meta['vocab_size']} tokens, larger than the "
                        f"model's {vocab_size}; prepare the text with the model's tokenizer")
    made_with = meta.get("tokenizer_name", "gpt2")  # folders from before tokenizer names were recorded are GPT-2's
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
# Processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one plain process

@dataclasses.dataclass
class Processes:
    rank: int = 0  # this process among all of them; rank 0 prints and writes the shared files
    local_rank: int = 0  # this process on its machine; picks the GPU
    world_size: int = 1
    torchrun: bool = False  # started by torchrun (which also forwards Ctrl-C to every process)

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()


def init_processes(device_name: str, strategy: str = "ddp") -> tuple[Processes, torch.device]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) if there is one; pick the device.

    FSDP needs a process group even alone, so without torchrun it gets one of a single process."""
    try:
        device = resolve_device(device_name)
    except ValueError as e:
        raise UserError(f"--device: {e}") from None
    if "RANK" not in os.environ:
        procs = Processes()
    else:
        procs = Processes(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]),
                          torchrun=True)
    if not procs.torchrun and strategy != "fsdp":
        return procs, device
    if device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"several processes and FSDP need CUDA GPUs (NCCL) or CPUs (gloo), not {device.type}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if procs.torchrun:
        dist.init_process_group(backend)
    else:  # one process: an in-memory store, no port to find
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return procs, device


def local_leader_first(procs: Processes, fn):
    """fn() on each machine's first process, then on the others: downloads and tokenizing happen once."""
    if procs.distributed and procs.local_rank != 0:
        dist.barrier()
    result = fn()
    if procs.distributed and procs.local_rank == 0:
        dist.barrier()
    return result


def from_rank0(procs: Processes, value):
    """Rank 0's value of a small picklable object (a config, an error message), in every process."""
    if not procs.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def run_folder_lock(out_dir: Path, procs: Processes):
    """Hold OUT_DIR's RunLock (common.RunLock) on rank 0 while the run writes there; every process
    learns whether it was taken, so all of them stop at once when another run holds the folder."""
    lock, problem = RunLock(out_dir), None
    if procs.rank == 0:
        try:
            lock.__enter__()
        except UserError as e:
            problem = str(e)
    problem = from_rank0(procs, problem)
    if problem:
        raise UserError(problem)
    try:
        yield
    finally:
        if procs.rank == 0:
            lock.__exit__(None, None, None)


class StopOnCtrlC:
    """Ctrl-C asks the loop to stop after the current step and save a checkpoint.

    A signal handler rather than `except KeyboardInterrupt`: the step is never cut in half (a
    half-applied optimizer step cannot be resumed), and every process stops at the same step. In a
    single process a second Ctrl-C quits at once; under torchrun every process gets each Ctrl-C twice
    (from the terminal and from torchrun), so there it only ever asks to stop."""

    def __init__(self, procs: Processes):
        self.procs, self.requested, self.previous = procs, False, None

    def __enter__(self) -> "StopOnCtrlC":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        if self.requested and not self.procs.torchrun:
            raise KeyboardInterrupt
        if not self.requested and self.procs.rank == 0:
            again = "" if self.procs.torchrun else " (Ctrl-C again quits without saving)"
            print(f"\nCtrl-C: saving a checkpoint after this step{again}", flush=True)
        self.requested = True


# ---------------------------------------------------------------------------------------------------
# The model: where it starts, and how several processes share it

def initial_model(args: argparse.Namespace) -> tuple[GPT, dict]:
    """A new run's model (on the CPU) and its card: a random one of --preset, or --init's weights."""
    overrides = {"dropout": args.dropout} | ({"block_size": args.block_size} if args.block_size else {})
    if args.init == "random":
        _, card = load_model("random", preset=args.preset, device="meta")  # the preset's card; no weights
        torch.manual_seed(args.seed)
        return GPT(get_config(args.preset, **overrides)), model_card(card)
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


def _recompute_in_backward(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation and sampling keep nothing anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_activations(gpt: GPT) -> None:
    """--activation-checkpointing: each block keeps only its inputs for the backward pass and runs
    its forward again there. The blocks' own forward is wrapped in place, so names and the state_dict
    stay the same (and FSDP, applied afterwards, gathers the weights around the recomputation too)."""
    for block in gpt.transformer.h:
        block.forward = functools.partial(_recompute_in_backward, block.forward)


def shard(gpt: GPT, device: torch.device, dtype: torch.dtype) -> GPT:
    """FSDP2: one unit per block plus one for the rest (embeddings, final norm, head); each process
    keeps 1/N of every weight, gradient and optimizer state and gathers a unit's weights only while it
    runs. bfloat16 training computes with bfloat16 copies of the weights and reduces gradients in
    float32 (the float32 weights, sharded, stay the optimizer's). The model is changed in place."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == torch.bfloat16 else MixedPrecisionPolicy()
    mesh = dist.init_device_mesh(device.type, (dist.get_world_size(),))
    for block in gpt.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(gpt, mesh=mesh, mp_policy=policy)
    return gpt


def local_bytes(tensors) -> int:
    """Bytes this process holds of these tensors (its own shard of a sharded one)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


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
def evaluate(model: torch.nn.Module, tokens: np.ndarray, *, batches: int, batch_size: int, block_size: int,
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
    """One fixed-width line: step, losses, lr, grad norm, ms/step, tokens/s, MFU (when known), memory, ETA."""
    line = f"step {step:>6}/{max_steps}"
    if record.get("train_loss") is not None:
        line += (f" | loss {record['train_loss']:7.4f} | lr {record['lr']:.2e} | norm {record['grad_norm']:7.3f}"
                 f" | {record['ms_per_step']:8.1f} ms/step | {record['tokens_per_s']:9.0f} tok/s")
        if record.get("mfu") is not None:
            line += f" | mfu {100 * record['mfu']:5.1f}%"
        if record.get("peak_memory") is not None:
            line += f" | mem {record['peak_memory'] / 1e9:6.2f} GB"
        line += f" | eta {clock((max_steps - step) * record['ms_per_step'] / 1000)}"
    return line + f" | val {record['val_loss']:7.4f} ppl {record['val_ppl']:9.2f}"


# ---------------------------------------------------------------------------------------------------
# Checkpoints
#
# One process (or DDP): ckpt.pt, the latest state for --resume, and best.pt, the weights of the best
# validation loss; both are save_checkpoint files with the model card. FSDP: the folders ckpt.dcp and
# best.dcp, written by torch.distributed.checkpoint, in which every process writes only its own
# shards (no process ever holds the whole model), plus train_state.pt (step, flags, card, random
# states) from rank 0. Such a folder loads into any number of processes (the shards are re-cut on
# load), and --consolidate turns it into one save_checkpoint file.

CKPT, BEST, METRICS = "ckpt.pt", "best.pt", "metrics.jsonl"
SHARDED_CKPT, SHARDED_BEST, TRAIN_STATE = "ckpt.dcp", "best.dcp", "train_state.pt"
# Flags that would silently change a resumed run (its model, data, schedule or numerics). The rest may
# change: --max-steps (a longer or shorter run; the schedule follows, with a note), --device, --compile,
# --activation-checkpointing, the evaluation and saving intervals, and the process count when
# --grad-accum x processes stays the same (draw_batch then draws the same windows).
RESUME_MUST_MATCH = ("data", "errors", "init", "preset", "block_size", "dropout", "batch_size", "lr", "min_lr",
                     "warmup_steps", "weight_decay", "grad_clip", "eval_batches", "seed", "dtype", "strategy")


def check_resume_flags(saved: dict, args: argparse.Namespace, procs: Processes, state_path: Path) -> None:
    """Refuse a --resume whose flags differ from the run's where that changes the run; say which."""
    changed = [f"--{name.replace('_', '-')} {saved[name]} (now {getattr(args, name)})"
               for name in RESUME_MUST_MATCH if name in saved and saved[name] != getattr(args, name)]
    if "world_size" in saved and saved["grad_accum"] * saved["world_size"] != args.grad_accum * procs.world_size:
        changed.append(f"--grad-accum {saved['grad_accum']} with {saved['world_size']} process(es) "
                       f"(now {args.grad_accum} with {procs.world_size}; their product must stay the same)")
    if changed:
        weights = f"--init {state_path}" if state_path.suffix == ".pt" else \
            f"--init {state_path.with_suffix('.pt')} after python pretrain.py --consolidate {state_path}"
        raise UserError(f"--resume: the run in {state_path.parent} used {', '.join(changed)}; repeat the run's flags "
                        f"to resume it, or start a new run from its weights in another --out-dir ({weights})")
    if saved.get("max_steps", args.max_steps) != args.max_steps and procs.rank == 0:
        print(f"note: --max-steps changed from {saved['max_steps']} to {args.max_steps}: the learning rate's "
              f"cosine now ends at step {args.max_steps}", file=sys.stderr)


def run_args(args: argparse.Namespace, procs: Processes) -> dict:
    return vars(args) | {"world_size": procs.world_size}


def gathered_rng(procs: Processes) -> list[dict]:
    """Every process's random state (dropout masks), gathered on all of them."""
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if not procs.distributed:
        return [rng]
    rngs = [None] * procs.world_size
    dist.all_gather_object(rngs, rng)
    return rngs


def restore_rng(rngs: list[dict], procs: Processes) -> None:
    if len(rngs) == procs.world_size:  # with another process count, dropout keeps its new seeds
        rng = rngs[procs.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


class TensorsOnlyReader(dcp.FileSystemReader):
    """torch.distributed.checkpoint's reader, holding to the project's rule that loading a checkpoint
    never unpickles arbitrary objects: the folder's .metadata (a pickle) is read with an unpickler that
    knows only the checkpoint metadata's own classes, and every entry must be a tensor (DCP reads any
    other entry by unpickling it whole)."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            known = (module, name) in TensorsOnlyReader.ALLOWED or module == "torch.distributed.checkpoint.metadata"
            value = super().find_class(module, name) if known or module == "torch" else None
            if not known and not isinstance(value, torch.dtype):
                raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata")
            return value

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = self._Unpickler(f).load()
        except FileNotFoundError:
            raise UserError(f"{self.path} is not a sharded checkpoint (it has no .metadata file)") from None
        except Exception as e:
            raise UserError(f"{path} is not a readable checkpoint's metadata ({type(e).__name__})") from None
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
        if not isinstance(metadata, Metadata) or not all(
                isinstance(entry, TensorStorageMetadata) for entry in metadata.state_dict_metadata.values()):
            raise UserError(f"{self.path} holds entries other than tensors; this project does not load it")
        for where in metadata.storage_data.values():  # every shard file there and long enough: no torn reads
            shard = Path(self.path) / str(where.relative_path)
            if not shard.is_file() or shard.stat().st_size < where.offset + where.length:
                raise UserError(f"{self.path} is incomplete: {shard.name} is missing or cut short")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def save_sharded(folder: Path, gpt: GPT, optimizer: torch.optim.Optimizer | None, procs: Processes,
                 train_state: dict) -> None:
    """Every process writes its shards of the model (and of the optimizer state) into folder; rank 0
    adds train_state.pt. Written into folder.tmp first and renamed when complete, so a crash leaves
    the previous checkpoint. Every process must call it."""
    tmp = folder.with_name(folder.name + ".tmp")
    if procs.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    state = {"model": get_model_state_dict(gpt)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(gpt, optimizer)["state"]  # tensors only: see TensorsOnlyReader
    dcp.save(state, checkpoint_id=tmp)
    if procs.rank == 0:
        atomic_write(tmp / TRAIN_STATE, _torch_bytes(train_state))
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def read_train_state(folder: Path) -> dict:
    """A sharded checkpoint's train_state.pt (step, flags, config, card), loaded with weights_only."""
    path = folder / TRAIN_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{folder} is not a checkpoint of this project (it has no {TRAIN_STATE})") from None
    except Exception as e:
        raise UserError(f"{path} is not readable ({type(e).__name__}); the checkpoint is damaged") from None


def load_sharded(folder: Path, gpt: GPT, optimizer: torch.optim.Optimizer | None) -> None:
    """Fill a sharded (or a lone process's) model, and the optimizer's state, from a sharded checkpoint
    written with any number of processes."""
    state = {"model": get_model_state_dict(gpt)}
    full_optimizer_state = None
    if optimizer is not None:
        full_optimizer_state = get_optimizer_state_dict(gpt, optimizer)  # creates the state to load into
        state["optimizer"] = full_optimizer_state["state"]
    reader = TensorsOnlyReader(folder)
    reader.read_metadata()  # checked here, so that a bad folder is one clear sentence, not DCP's per-rank report
    try:
        with warnings.catch_warnings():  # in one process without a group DCP warns that it assumes just that
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{folder} is not a readable checkpoint ({type(e).__name__}: {first_line})") from None
    set_model_state_dict(gpt, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(gpt, optimizer, {**full_optimizer_state, "state": state["optimizer"]})


def consolidate(folder: str | Path) -> dict:
    """--consolidate: a sharded checkpoint folder -> the project's single-file checkpoint beside it
    (FOLDER with .pt for .dcp), in one process, with the model card: load_model, generate.py, the
    finetunes and load_gpt2.py --export then read it. The file holds the whole model, so it needs the
    model's size in memory once."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--consolidate: {folder} is not a folder; name an FSDP checkpoint such as "
                        f"out/pretrain/best.dcp")
    out = folder.with_suffix(".pt")
    if out.exists():
        raise UserError(f"{out} already exists; move it away first")
    info = read_train_state(folder)
    with torch.device("meta"):
        gpt = GPT(GPTConfig(**info["config"]))
    gpt.to_empty(device="cpu")
    if gpt.config.tie_embeddings:
        gpt.tie_weights()  # to_empty made the head's tensor a copy of the embedding's
    load_sharded(folder, gpt, None)
    extra = {k: info[k] for k in ("step", "val_loss", "args") if k in info}
    writable_folder(out.parent, "--consolidate's folder")
    save_checkpoint(out, gpt, **info["card"], **extra)
    print(f"wrote {out}: {gpt.num_params() / 1e6:.1f}M parameters, step {info.get('step')}")
    return {"checkpoint": str(out), "step": info.get("step")}


# ---------------------------------------------------------------------------------------------------
# The loop

def train(args: argparse.Namespace) -> tuple[GPT, dict]:
    """Run (or continue) the training; return the trained model and what was measured.

    Under FSDP the model returned is the sharded one (each process holds its shards)."""
    procs, device = init_processes(args.device, args.strategy)
    try:
        if args.compile and (why := missing_compiler(device)):
            raise UserError(why)
        out_dir = writable_folder(args.out_dir)  # every process: under FSDP each writes its own shards there
        with run_folder_lock(out_dir, procs):
            return _train(args, procs, device, out_dir)
    finally:
        if procs.distributed:
            dist.destroy_process_group()


def build(args: argparse.Namespace, procs: Processes, device: torch.device, dtype: torch.dtype,
          resume: Path | None) -> tuple[GPT, torch.optim.Optimizer, dict, dict]:
    """The model on its device (sharded under FSDP), its optimizer, the model card and, when resuming,
    the saved training state (step, best_val_loss, rng), all restored."""
    sharded = args.strategy == "fsdp"
    if not sharded:
        if resume is not None:
            try:
                gpt, state = local_leader_first(procs, lambda: load_checkpoint(resume))
            except ValueError as e:
                raise UserError(f"--resume: {e}") from None
            if "optimizer" not in state:
                raise UserError(f"--resume: {resume} holds no training state (written by another stage, or "
                                f"consolidated from a sharded checkpoint?)")
            check_resume_flags(state["args"], args, procs, resume)
            card = model_card({"model_type": "gpt2", "tokenizer": "gpt2", **state})  # older runs were GPT-2's
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

    # FSDP: the model is built on the meta device (no memory) in every process, sharded, and only then
    # given memory, its own shards only; the weights come from rank 0 (a new run) or the checkpoint.
    if resume is not None:
        state = read_train_state(resume)
        check_resume_flags(state["args"], args, procs, resume)
        config, card, full = GPTConfig(**state["config"]), state["card"], None
    else:
        state, full, config_and_card = {}, None, None
        if procs.rank == 0:
            try:
                full, card = initial_model(args)
                config_and_card = (dataclasses.asdict(full.config), card)
            except UserError as e:  # a bad --init: the others, waiting for the config, stop with it
                config_and_card = str(e)
        config_and_card = from_rank0(procs, config_and_card)
        if isinstance(config_and_card, str):
            raise UserError(config_and_card)
        config, card = GPTConfig(**config_and_card[0]), config_and_card[1]
    with torch.device("meta"):
        gpt = GPT(config)
    if args.activation_checkpointing:
        checkpoint_activations(gpt)
    shard(gpt, device, dtype)
    gpt.to_empty(device=device)
    optimizer = gpt.configure_optimizer(args.lr, args.weight_decay, device_type=device.type)
    if resume is not None:
        load_sharded(resume, gpt, optimizer)
    else:
        set_model_state_dict(gpt, full.state_dict() if full is not None else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
    return gpt, optimizer, card, state


def _train(args: argparse.Namespace, procs: Processes, device: torch.device, out_dir: Path) -> tuple[GPT, dict]:
    master = procs.rank == 0
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
    if not args.resume and existing:
        raise UserError(f"{out_dir} already holds a run ({existing[0]}); add --resume to continue it, or pick "
                        f"another --out-dir")
    dtype = resolve_dtype(args.dtype, device)
    ctx = autocast(device, dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)

    gpt, optimizer, card, state = build(args, procs, device, dtype, state_path if args.resume else None)
    tok = tokenizer_for(card)  # the run's own tokenizer, kept by --resume through the saved card
    block_size = args.block_size or gpt.config.block_size
    data = local_leader_first(procs, lambda: token_folder(args.data, card["tokenizer"], args.errors))
    train_tokens, val_tokens = load_splits(data, block_size, gpt.config.vocab_size, tok, card["tokenizer"])

    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(args.seed + procs.rank)  # different dropout masks in each process
    step, best_val_loss = 0, math.inf
    if state:
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"], procs)
        step, best_val_loss = state["step"], state["best_val_loss"]
    compiled = torch.compile(gpt) if args.compile else gpt
    model = compiled
    if procs.distributed and not sharded:
        model = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)  # gradients live in DDP's buckets: no second copy

    tokens_per_step = args.batch_size * block_size * args.grad_accum * procs.world_size
    flops_per_step = gpt.flops_per_token(block_size) * tokens_per_step
    peak = peak_flops(device, dtype)
    if master:
        print(f"{gpt.num_params() / 1e6:.1f}M parameters ({card['model_type']}), context {block_size}, "
              f"{tokens_per_step:,} tokens per step ({procs.world_size} process(es) x {args.grad_accum} micro-steps x "
              f"{args.batch_size} x {block_size}), {len(train_tokens):,} training tokens in {data}, {device} "
              f"{str(dtype).removeprefix('torch.')}" + (", fsdp" if sharded else "")
              + (", activation checkpointing" if args.activation_checkpointing else ""))
        if state:
            print(f"resuming {state_path} at step {step}")

    def train_state() -> dict:
        return {"step": step, "best_val_loss": best_val_loss, "args": run_args(args, procs), "card": card,
                "config": dataclasses.asdict(gpt.config), "rng": gathered_rng(procs)}

    def save_best(val_loss: float) -> None:
        if sharded:
            save_sharded(best_path, gpt, None, procs, {**train_state(), "val_loss": val_loss})
        elif master:
            save_checkpoint(best_path, gpt, step=step, val_loss=val_loss, args=run_args(args, procs), **card)

    def save() -> None:
        if sharded:
            save_sharded(state_path, gpt, optimizer, procs, train_state())
            return
        everything = train_state()  # every process takes part (its random state)
        if master:
            save_checkpoint(state_path, gpt, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                            **{k: everything[k] for k in ("step", "best_val_loss", "args", "rng")}, **card)

    def evaluate_and_log(extra: dict) -> dict:
        nonlocal best_val_loss
        val_loss = evaluate(compiled, val_tokens, batches=args.eval_batches, batch_size=args.batch_size,
                            block_size=block_size, seed=args.seed, ctx=ctx, procs=procs, device=device)
        record = {"step": step, **extra, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                  "tokens_seen": step * tokens_per_step}
        if args.sample_tokens and (sharded or master):  # under FSDP every process takes part in sampling
            record["sample"] = sample_text(compiled, tok, args.sample_tokens, block_size=block_size,
                                           seed=args.seed, ctx=ctx, device=device)
        if master:
            print(progress_line(step, args.max_steps, record), flush=True)
            if "sample" in record:
                print("    " + record["sample"].replace("\n", "\n    "), flush=True)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if val_loss < best_val_loss:
            save_best(val_loss)
        best_val_loss = min(best_val_loss, val_loss)
        return record

    train_losses, last_record, interrupted = [], {}, False
    first_step, total_time = step, 0.0
    interval_steps, interval_time, interval_loss = 0, 0.0, 0.0  # since the last evaluation
    with StopOnCtrlC(procs) as ctrl_c, \
            open(out_dir / METRICS, "a" if args.resume else "w") if master else nullcontext() as metrics_file:
        if step == 0:
            last_record = evaluate_and_log({})  # the untrained baseline the samples improve on
        while step < args.max_steps and not interrupted:
            start = time.perf_counter()
            lr = get_lr(step, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                        max_steps=args.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = draw_batch(train_tokens, args.batch_size, block_size, grad_accum=args.grad_accum,
                              world_size=procs.world_size, rank=procs.rank, seed=args.seed,
                              step=step)  # (accum, B, T) each
            if device.type == "cuda":
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            else:
                x, y = x.to(device), y.to(device)
            loss, norm = train_step(model, optimizer, scaler, x, y, grad_clip=args.grad_clip, ctx=ctx)
            # One all-reduce per step gives every process the global loss and whether anyone saw Ctrl-C,
            # so they all stop together.
            shared = torch.stack([loss.float(), torch.tensor(float(ctrl_c.requested), device=device)])
            if procs.distributed:
                dist.all_reduce(shared)
            loss_value, interrupted = shared[0].item() / procs.world_size, shared[1].item() > 0
            norm_value = norm.item()
            if not math.isfinite(loss_value) or (not scaler.is_enabled() and not math.isfinite(norm_value)):
                kept = (f"{state_path} still holds the last good state" if state_path.exists()
                        else "no checkpoint was written")
                raise UserError(f"the loss became {loss_value} (gradient norm {norm_value}) at step {step + 1}, so "
                                f"training stopped; {kept} (try a lower --lr or --grad-clip)")
            step += 1
            step_time = time.perf_counter() - start
            train_losses.append(loss_value)
            interval_steps, interval_time, interval_loss = (interval_steps + 1, interval_time + step_time,
                                                            interval_loss + loss_value)
            total_time += step_time

            if step % args.eval_every == 0 or step == args.max_steps:
                seconds = interval_time / interval_steps
                last_record = evaluate_and_log({
                    "train_loss": interval_loss / interval_steps, "lr": lr, "grad_norm": norm_value,
                    "ms_per_step": 1000 * seconds, "tokens_per_s": tokens_per_step / seconds,
                    "mfu": flops_per_step / seconds / (peak * procs.world_size) if peak else None,
                    "peak_memory": peak_memory(device)})
                interval_steps, interval_time, interval_loss = 0, 0.0, 0.0
            if step == args.max_steps or interrupted or (args.save_every and step % args.save_every == 0):
                save()
    if master:
        saved = f"{state_path} and {best_path}"
        if interrupted:
            print(f"interrupted at step {step}; saved {state_path}; continue with the same command plus --resume")
        elif step == first_step:
            print(f"no steps to run: the run is at step {step} of --max-steps {args.max_steps}")
        else:
            print(f"done: step {step}, best validation loss {best_val_loss:.4f}; saved {saved}"
                  + (f" (one file each: python pretrain.py --consolidate {best_path})" if sharded else ""))
    steps_run = step - first_step
    tokens_per_s = steps_run * tokens_per_step / total_time if total_time else None
    mfu = tokens_per_s * flops_per_step / tokens_per_step / (peak * procs.world_size) if peak and tokens_per_s else None
    optimizer_tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return gpt, {
        "step": step, "train_losses": train_losses, "train_loss": train_losses[-1] if train_losses else None,
        "val_loss": last_record.get("val_loss"), "best_val_loss": best_val_loss, "tokens_per_s": tokens_per_s,
        "mfu": mfu, "interrupted": interrupted, "checkpoint": str(state_path), "strategy": args.strategy,
        "peak_memory": peak_memory(device), "param_bytes": local_bytes(gpt.parameters()),
        "optimizer_bytes": local_bytes(optimizer_tensors)}


def main(args: argparse.Namespace) -> dict:
    if args.consolidate:
        return consolidate(args.consolidate)
    if args.plan:
        return plan_main(args)
    return train(args)[1]


if __name__ == "__main__":
    run_stage(main, parse_args)
