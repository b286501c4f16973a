"""Pretraining: next-token prediction on a text corpus, from a laptop CPU to many GPUs.

    python pretrain.py        # Tiny Shakespeare, the "mini" model, a few minutes on a laptop CPU

With no flags this downloads Tiny Shakespeare once, tokenizes it once into the download cache, and
trains a small GPT whose samples, printed every --eval-every steps, go from noise to play-like text.
Several processes (GPUs, or CPU processes) run the same script under torchrun:

    torchrun --standalone --nproc_per_node=8 pretrain.py --preset gpt2 --data 'corpus/*.txt'

Reading order: the command line; the learning-rate schedule and known device peaks; data (text is
prepared once into token files); processes (torchrun + DistributedDataParallel); one training step;
evaluation and samples; checkpoints; then train(), the loop that ties them together.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import tokenizer
from generate import generate
from load_gpt2 import load_model
from model import (DTYPES, GPT, PRESETS, autocast, get_config, load_checkpoint, resolve_device,
                   resolve_dtype, save_checkpoint)
from tokenizer import UserError, load_tokens, prepare_corpus, run_stage, sample_windows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None,
                   help="a text file, folder or glob (tokenized once into the download cache's tokens/ "
                        "folder and reused while the files are unchanged), or a folder holding train.bin "
                        "and val.bin from `tokenizer.py prepare`; None: Tiny Shakespeare, downloaded once")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="text that is not UTF-8: stop with an error, or decode bad bytes as U+FFFD")
    p.add_argument("--init", default="random",
                   help="'random' (a new model of --preset), a GPT-2 name (gpt2, gpt2-medium, ...) to "
                        "continue pretraining OpenAI's weights, or a checkpoint path (ours or the Hub's layout)")
    p.add_argument("--preset", default="mini", choices=list(PRESETS),
                   help="model size for --init random")
    p.add_argument("--block-size", type=int, default=None,
                   help="training context in tokens; None: the model's block_size. A random model gets "
                        "exactly this context; a loaded one must have at least this much")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability in the model while training")
    p.add_argument("--out-dir", default="out/pretrain",
                   help="run folder: ckpt.pt (latest, to resume), best.pt (best validation loss), metrics.jsonl")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue the run saved in OUT_DIR/ckpt.pt: repeat the run's command and add --resume")
    p.add_argument("--max-steps", type=int, default=200, help="optimizer steps in the whole run")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-step in each process")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-steps per optimizer step; an optimizer step sees "
                        "batch-size x grad-accum x processes sequences")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, reached after the warmup")
    p.add_argument("--min-lr", type=float, default=1e-4, help="floor the cosine decay reaches at --max-steps")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps of linear learning-rate warmup")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay, on weight matrices only")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this; 0 turns clipping off")
    p.add_argument("--eval-every", type=int, default=25,
                   help="steps between evaluations: validation loss, a sample, a progress line, a metrics record")
    p.add_argument("--eval-batches", type=int, default=8,
                   help="validation batches of --batch-size sequences; the same windows at every evaluation")
    p.add_argument("--save-every", type=int, default=100,
                   help="steps between checkpoints (one is also written at the end and on Ctrl-C); 0: never between")
    p.add_argument("--sample-tokens", type=int, default=64, help="tokens in each printed sample; 0: no samples")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="autocast precision; auto is bfloat16 on a GPU that supports it, else float32. "
                        "float16 adds a gradient scaler")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model: a slow first step, then faster steps")
    p.add_argument("--seed", type=int, default=1337, help="seeds the model's initialisation, data order and dropout")
    args = p.parse_args(argv)
    for name in ("max_steps", "warmup_steps", "save_every", "sample_tokens"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("batch_size", "grad_accum", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.block_size is not None and args.block_size < 1:
        p.error("--block-size must be at least 1")
    if not 0 <= args.dropout < 1:
        p.error("--dropout must be in [0, 1)")
    return args


# ---------------------------------------------------------------------------------------------------
# Schedule and speed

def get_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr, then cosine decay to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


# Dense 16-bit tensor-core peaks (FLOP/s) from the vendors' data sheets; the first name found in the
# device's name wins, so the more specific names come first.
PEAK_FLOPS_16BIT = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("RTX 4090", 165e12), ("V100", 125e12),
]


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for this dtype when the table knows it (16-bit on known GPUs), else None."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS_16BIT if key in name), None)


# ---------------------------------------------------------------------------------------------------
# Data: text -> token files, prepared once

def token_folder(data: str | None, errors: str = "strict") -> Path:
    """The folder holding train.bin and val.bin for --data, tokenizing text the first time it is seen.

    Text goes to <download cache>/tokens/<name>-<fingerprint>/, where the fingerprint covers every
    source file's path, size and modification time: an unchanged corpus is reused, an edited one is
    tokenized again into a new folder."""
    if data is not None and (Path(data) / "train.bin").is_file():
        return Path(data)
    source = tokenizer.fetch("text/tinyshakespeare.txt") if data is None else data
    fingerprint = hashlib.sha256(errors.encode())
    for path in tokenizer.corpus_files(source):
        stat = path.stat()
        fingerprint.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    name = re.sub(r"[^\w.-]", "", Path(source).stem) or "corpus"
    folder = tokenizer.cache_dir() / "tokens" / f"{name}-{fingerprint.hexdigest()[:16]}"
    if not (folder / "meta.json").is_file():
        # Tokenize into a private folder and rename it into place, so a crash or a concurrent run never
        # leaves a half-written folder that looks finished.
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        try:
            prepare_corpus(source, tmp, errors=errors)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same folder first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_splits(folder: Path, block_size: int, vocab_size: int) -> tuple[np.memmap, np.memmap]:
    """train.bin and val.bin of a token folder, each checked to hold at least one window."""
    splits = []
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        n_tokens = path.stat().st_size // 2 if path.is_file() else None  # uint16 tokens
        if n_tokens is not None and n_tokens <= block_size:
            raise UserError(f"{path} holds {n_tokens} tokens, too few for one window of {block_size} tokens plus "
                            f"its target; use more text (validation is its last 10%) or a smaller --block-size")
        splits.append(load_tokens(path))
    meta = folder / "meta.json"
    if meta.is_file() and json.loads(meta.read_text())["vocab_size"] > vocab_size:
        raise UserError(f"{folder} was tokenized with a vocabulary larger than the model's {vocab_size} tokens")
    return splits[0], splits[1]


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
    rank: int = 0  # this process among all of them; rank 0 prints and writes files
    local_rank: int = 0  # this process on its machine; picks the GPU
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()


def init_processes(device_name: str) -> tuple[Processes, torch.device]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) if there is one; pick the device."""
    try:
        device = resolve_device(device_name)
    except ValueError as e:
        raise UserError(f"--device: {e}") from None
    if "RANK" not in os.environ:
        return Processes(), device
    procs = Processes(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"several processes need CUDA GPUs (NCCL) or CPUs (gloo), not {device.type}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return procs, device


def local_leader_first(procs: Processes, fn):
    """fn() on each machine's first process, then on the others: downloads and tokenizing happen once."""
    if procs.distributed and procs.local_rank != 0:
        dist.barrier()
    result = fn()
    if procs.distributed and procs.local_rank == 0:
        dist.barrier()
    return result


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
        if self.requested and not self.procs.distributed:
            raise KeyboardInterrupt
        if not self.requested and self.procs.rank == 0:
            again = "" if self.procs.distributed else " (Ctrl-C again quits without saving)"
            print(f"\nCtrl-C: saving a checkpoint after this step{again}", flush=True)
        self.requested = True


# ---------------------------------------------------------------------------------------------------
# One optimizer step

def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               x: torch.Tensor, y: torch.Tensor, *, grad_clip: float, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over the micro-batches x, y (accum, B, T), then one optimizer step.

    Returns (mean loss over the micro-batches, gradient norm before clipping), both 0-dim tensors.
    A non-finite gradient norm skips the update (the gradient scaler's own rule under float16), so
    the weights stay as they were and the caller can stop with the last good state."""
    accum = x.size(0)
    loss_sum = torch.zeros((), device=x.device)
    for micro in range(accum):
        # DDP all-reduces gradients during backward; only the last micro-step needs that.
        last = micro == accum - 1
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with ctx:
                _, loss = model(x[micro], y[micro])
            # Gradients add up over micro-steps, so each micro-batch's mean loss is divided by accum:
            # the sum is then the gradient of the mean loss over the step's whole batch.
            scaler.scale(loss / accum).backward()
        loss_sum += loss.detach() / accum
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
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

    Every process draws all the batches from a generator seeded the same each time, evaluates batches
    rank, rank + world_size, ..., and the processes add up their sums."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(2, device=device)  # (sum of batch losses, batches)
    for i in range(batches):
        x, y = sample_windows(tokens, batch_size, block_size, generator)  # (B, T) each
        if i % procs.world_size == procs.rank:
            with ctx:
                _, loss = model(x.to(device), y.to(device))
            total += torch.stack([loss.float(), torch.ones((), device=device)])
    if procs.distributed:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def sample_text(model: GPT, max_new_tokens: int, *, seed: int, ctx, device: torch.device) -> str:
    """A short sample that starts a new document (<|endoftext|>), the same seed every time, so samples
    taken at different steps differ only by what the model has learned."""
    enc = tokenizer.get_tokenizer()
    max_new_tokens = min(max_new_tokens, model.config.block_size - 1)
    ids = torch.tensor([[enc.eot_token]], device=device)  # (1, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    with ctx:
        new = [int(t) for t in generate(model, ids, max_new_tokens, temperature=0.8, top_k=200,
                                        eos_id=enc.eot_token, generator=generator)]
    model.train()
    return enc.decode([t for t in new if t != enc.eot_token])


def progress_line(step: int, max_steps: int, record: dict) -> str:
    """One fixed-width line: step, losses, lr, grad norm, ms/step, tokens/s, MFU (when known), ETA."""
    line = f"step {step:>6}/{max_steps}"
    if record.get("train_loss") is not None:
        line += (f" | loss {record['train_loss']:7.4f} | lr {record['lr']:.2e} | norm {record['grad_norm']:7.3f}"
                 f" | {record['ms_per_step']:8.1f} ms/step | {record['tokens_per_s']:9.0f} tok/s")
        if record.get("mfu") is not None:
            line += f" | mfu {100 * record['mfu']:5.1f}%"
        eta = round((max_steps - step) * record["ms_per_step"] / 1000)
        line += f" | eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
    return line + f" | val {record['val_loss']:7.4f} ppl {record['val_ppl']:9.2f}"


# ---------------------------------------------------------------------------------------------------
# Checkpoints

RESUME_MUST_MATCH = ("init", "preset", "block_size", "dropout")  # flags that shape the saved model


def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, *, step: int,
               best_val_loss: float, args: argparse.Namespace, procs: Processes) -> None:
    """Everything --resume needs, written atomically by rank 0; every process must call it.

    Only tensors, numbers, strings, lists and dicts, so it loads with weights_only=True. The data
    position is the step itself (see draw_batch): the next step draws exactly the windows it would have."""
    rng = {"torch": torch.get_rng_state(),  # dropout masks, per process
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [rng]
    if procs.distributed:
        rngs = [None] * procs.world_size
        dist.all_gather_object(rngs, rng)
    if procs.rank == 0:
        save_checkpoint(path, model, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                        rng=rngs, best_val_loss=best_val_loss,
                        args=vars(args))


def restore_rng(state: dict, procs: Processes) -> None:
    if len(state["rng"]) == procs.world_size:  # with another process count, dropout keeps its new seeds
        rng = state["rng"][procs.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


def build_model(args: argparse.Namespace, resume_path: Path | None) -> tuple[GPT, dict]:
    """The model to train (on the CPU) and, when resuming, the rest of the checkpoint."""
    if resume_path is not None:
        if not resume_path.is_file():
            raise UserError(f"--resume: {resume_path} does not exist; start the run without --resume")
        try:
            model, state = load_checkpoint(resume_path)
        except ValueError as e:
            raise UserError(str(e)) from None
        if "optimizer" not in state:
            raise UserError(f"--resume: {resume_path} holds no training state (written by another stage?)")
        for name in RESUME_MUST_MATCH:
            if state["args"].get(name) != getattr(args, name):
                raise UserError(f"--resume: the run in {resume_path.parent} used --{name.replace('_', '-')} "
                                f"{state['args'].get(name)}, this command says {getattr(args, name)}; repeat the "
                                f"run's flags, or use --init {resume_path} to start a new run from its weights")
        return model, state
    overrides = {"dropout": args.dropout} | ({"block_size": args.block_size} if args.block_size else {})
    if args.init == "random":
        torch.manual_seed(args.seed)
        return GPT(get_config(args.preset, **overrides)), {}
    loaded, _ = load_model(args.init)
    if loaded.config.num_classes is not None:
        raise UserError(f"{args.init} is a classifier; pretraining needs a language model")
    if args.block_size and args.block_size > loaded.config.block_size:
        raise UserError(f"--block-size {args.block_size} is longer than {args.init}'s context of "
                        f"{loaded.config.block_size} tokens")
    # Rebuilt only to set the dropout (a config field); the training context is args.block_size.
    model = GPT(dataclasses.replace(loaded.config, dropout=args.dropout))
    model.load_state_dict(loaded.state_dict())
    return model, {}


# ---------------------------------------------------------------------------------------------------
# The loop

def train(args: argparse.Namespace) -> tuple[GPT, dict]:
    """Run (or continue) the training; return the trained model and what was measured."""
    procs, device = init_processes(args.device)
    try:
        return _train(args, procs, device)
    finally:
        if procs.distributed:
            dist.destroy_process_group()


def _train(args: argparse.Namespace, procs: Processes, device: torch.device) -> tuple[GPT, dict]:
    master = procs.rank == 0
    out_dir = Path(args.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    if not args.resume and ckpt_path.exists():
        raise UserError(f"{out_dir} already holds a run; add --resume to continue it, or pick another --out-dir")
    dtype = resolve_dtype(args.dtype, device)
    ctx = autocast(device, dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    data = local_leader_first(procs, lambda: token_folder(args.data, args.errors))
    gpt, state = local_leader_first(procs, lambda: build_model(args, ckpt_path if args.resume else None))
    block_size = args.block_size or gpt.config.block_size
    train_tokens, val_tokens = load_splits(data, block_size, gpt.config.vocab_size)

    gpt.to(device)
    optimizer = gpt.configure_optimizer(args.lr, args.weight_decay, device_type=device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(args.seed + procs.rank)  # different dropout masks in each process
    step, best_val_loss = 0, math.inf
    if state:
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        restore_rng(state, procs)
        step, best_val_loss = state["step"], state["best_val_loss"]
    compiled = torch.compile(gpt) if args.compile else gpt
    model = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None) \
        if procs.distributed else compiled

    tokens_per_step = args.batch_size * block_size * args.grad_accum * procs.world_size
    flops_per_step = gpt.flops_per_token(block_size) * tokens_per_step
    peak = peak_flops(device, dtype)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"{gpt.num_params() / 1e6:.1f}M parameters, context {block_size}, {tokens_per_step:,} tokens per step "
              f"({procs.world_size} process(es) x {args.grad_accum} micro-steps x {args.batch_size} x {block_size}), "
              f"{len(train_tokens):,} training tokens in {data}, {device} {str(dtype).removeprefix('torch.')}")
        if state:
            print(f"resuming {ckpt_path} at step {step}")

    def evaluate_and_log(extra: dict) -> dict:
        nonlocal best_val_loss
        val_loss = evaluate(compiled, val_tokens, batches=args.eval_batches, batch_size=args.batch_size,
                            block_size=block_size, seed=args.seed, ctx=ctx, procs=procs, device=device)
        record = {"step": step, **extra, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                  "tokens_seen": step * tokens_per_step}
        if master:
            print(progress_line(step, args.max_steps, record), flush=True)
            if args.sample_tokens:
                record["sample"] = sample_text(gpt, args.sample_tokens, seed=args.seed, ctx=ctx, device=device)
                print("    " + record["sample"].replace("\n", "\n    "), flush=True)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if val_loss < best_val_loss:
                save_checkpoint(out_dir / "best.pt", gpt, step=step, val_loss=val_loss, args=vars(args))
        best_val_loss = min(best_val_loss, val_loss)
        return record

    def save() -> None:
        save_state(ckpt_path, gpt, optimizer, scaler, step=step, best_val_loss=best_val_loss,
                   args=args, procs=procs)

    train_losses, last_record, interrupted = [], {}, False
    first_step, total_time = step, 0.0
    interval_steps, interval_time, interval_loss = 0, 0.0, 0.0  # since the last evaluation
    with StopOnCtrlC(procs) as ctrl_c, \
            open(out_dir / "metrics.jsonl", "a" if args.resume else "w") if master else nullcontext() as metrics_file:
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
                kept = (f"{ckpt_path} still holds the last good state" if ckpt_path.exists()
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
                    "mfu": flops_per_step / seconds / (peak * procs.world_size) if peak else None})
                interval_steps, interval_time, interval_loss = 0, 0.0, 0.0
            if step == args.max_steps or interrupted or (args.save_every and step % args.save_every == 0):
                save()
    if master:
        if interrupted:
            print(f"interrupted at step {step}; saved {ckpt_path}; continue with the same command plus --resume")
        elif step == first_step:
            print(f"no steps to run: the run is at step {step} of --max-steps {args.max_steps}")
        else:
            print(f"done: step {step}, best validation loss {best_val_loss:.4f}; saved {ckpt_path} and "
                  f"{out_dir / 'best.pt'}")
    steps_run = step - first_step
    tokens_per_s = steps_run * tokens_per_step / total_time if total_time else None
    mfu = tokens_per_s * flops_per_step / tokens_per_step / (peak * procs.world_size) if peak and tokens_per_s else None
    return gpt, {
        "step": step, "train_losses": train_losses, "train_loss": train_losses[-1] if train_losses else None,
        "val_loss": last_record.get("val_loss"), "best_val_loss": best_val_loss, "tokens_per_s": tokens_per_s,
        "mfu": mfu, "interrupted": interrupted, "checkpoint": str(ckpt_path)}


def main(args: argparse.Namespace) -> dict:
    return train(args)[1]


if __name__ == "__main__":
    run_stage(main, parse_args)
