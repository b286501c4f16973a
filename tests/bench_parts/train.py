"""Training benchmarks: tokens/s and MFU of pretrain.py's training step, DDP scaling on CPU processes,
--plan's memory figures against real runs, and FSDP on one GPU.

    python tests/bench.py train                       # CPU: small preset, GPT-2 124M, DDP, --plan vs runs
    python tests/bench.py train --train-cases plan    # --plan's bytes per process vs the runs' peak memory
    python tests/bench.py gpu                         # + GPT-2 124M context 1024 bf16 compiled; FSDP Mistral

MFU (model FLOPs utilisation) is the model's training FLOPs per second (model.flops_per_token) over a
peak measured here on the same device: the best rate of large float32 matmuls on the CPU, or of
bfloat16 matmuls on the GPU. Tokens are random ids written to a temporary token folder, so nothing is
downloaded. Reference (issue 5): nanoGPT trains GPT-2 124M at context 128, batch 4, at about
167 tokens/s (68 % of the fp32 matmul peak) on this 2-core CPU, and at 48.9 % MFU on an H200.

The plan case runs pretrain.py --plan and then the same run (2 steps) in a fresh process, and compares
plan.json's bytes_per_process with the peak memory the run itself reports (VmHWM on Linux; rank 0's
under torchrun). The gpu case also trains a Mistral-7B-shaped model (its width, heads, grouped keys,
SwiGLU and vocabulary) under FSDP with bf16 weights and activation
checkpointing on the one GPU, deep enough that plain training (autocast keeps a bf16 copy of every
weight for the backward pass) would not fit by the plan; its plan is compared with
torch.cuda.max_memory_allocated. Nothing of the gpu case can run without a CUDA GPU.
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



REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import planner
from model import GPT, autocast, get_config
from tokenizer import UserError
import distributed  # noqa: E402
import pretrain  # noqa: E402

CASES = ("small", "gpt2", "ddp", "plan", "gpu")


def add_arguments(parser: argparse.ArgumentParser, cases: tuple[str, ...] | None = None) -> None:
    """The train benchmark's flags. cases: run exactly these (no --train-cases flag), and offer only
    the flags they read; None offers --train-cases and every flag."""
    group = parser.add_argument_group("train")
    if cases is None:
        group.add_argument("--train-cases", nargs="+", default=["small", "gpt2", "ddp", "plan"], choices=CASES,
                           help="small: --train-preset at context 128 on the CPU; gpt2: GPT-2 124M at context 128 "
                                "on the CPU; ddp: 1 vs 2 CPU processes under torchrun; plan: --plan's memory per "
                                "process vs real runs (1 process, DDP, FSDP, activation checkpointing); gpu: GPT-2 "
                                "124M at context 1024, bfloat16, compiled, and FSDP with a Mistral-shaped model, "
                                "on CUDA")
    else:
        parser.set_defaults(train_cases=list(cases))
    used = set(CASES if cases is None else cases)
    cpu = bool(used & {"small", "gpt2", "ddp"})
    if used & {"small", "ddp"}:
        group.add_argument("--train-preset", default="mini", help="the small and ddp cases' preset")
    if cpu:
        group.add_argument("--train-batch", type=int, default=4, help="sequences per step in the CPU cases")
    if "gpu" in used:
        group.add_argument("--train-gpu-batch", type=int, default=16, help="sequences per step in the gpu case")
        group.add_argument("--train-fsdp-context", type=int, default=2048,
                           help="context of the gpu case's FSDP Mistral-shaped model (one sequence per step)")
        group.add_argument("--train-fsdp-layers", type=int, default=None,
                           help="layers of the FSDP Mistral-shaped model; None: the fewest that plain training "
                                "cannot fit on this GPU by the plan")
    group.add_argument("--train-steps", type=int, default=5, help="timed steps per case (after the warmup steps)")
    group.add_argument("--train-warmup", type=int, default=2, help="untimed steps first (compilation, allocation)")
    if cpu:
        group.add_argument("--train-compile", action=argparse.BooleanOptionalAction, default=False,
                           help="torch.compile the model in the CPU cases too (the gpu case always compiles)")


def random_token_folder(folder: Path, n_tokens: int = 1_000_000) -> Path:
    """train.bin, val.bin and meta.json of random GPT-2 ids: the speed of a step does not depend on the text."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 50257, n_tokens, dtype=np.uint16).tofile(folder / f"{split}.bin")
    meta = {"vocab_size": 50257, "eot_token": 50256, "train_tokens": n_tokens, "val_tokens": n_tokens,
            "dtype": "uint16", "tokenizer_name": "gpt2", "sources": []}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best FLOP/s of n x n matmuls (2 n^3 FLOPs each) in `dtype`: the practical peak of the device."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 10 * 2 * n**3 / (time.perf_counter() - start))
    return best


def time_steps(model: GPT, tokens: np.ndarray, *, batch_size: int, block_size: int, device: torch.device,
               dtype: torch.dtype, compile: bool, warmup: int, steps: int) -> float:
    """Seconds per training step (pretrain.train_step on a fresh draw each step), after `warmup` steps."""
    model.to(device)
    optimizer = model.configure_optimizer(6e-4, device_type=device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step_model = torch.compile(model) if compile else model
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = pretrain.draw_batch(tokens, batch_size, block_size, grad_accum=1, world_size=1, rank=0,
                                   seed=0, step=i)  # (1, B, T) each
        loss, norm = pretrain.train_step(step_model, optimizer, scaler, x.to(device), y.to(device),
                                         grad_clip=1.0, ctx=autocast(device, dtype))
        norm.item()  # wait for the device, as the training loop does every step
    return (time.perf_counter() - start) / steps


def step_row(case: str, preset: str, block_size: int, batch_size: int, device: torch.device, dtype: torch.dtype,
             compile: bool, peak: float, tokens: np.ndarray, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = GPT(get_config(preset, block_size=block_size))
    seconds = time_steps(model, tokens, batch_size=batch_size, block_size=block_size, device=device, dtype=dtype,
                         compile=compile, warmup=args.train_warmup, steps=args.train_steps)
    tokens_per_s = batch_size * block_size / seconds
    flops = model.flops_per_token(block_size) * tokens_per_s
    return {"bench": "train", "case": case, "preset": preset, "params_M": round(model.num_params() / 1e6, 1),
            "context": block_size, "batch": batch_size, "device": device.type,
            "dtype": str(dtype).removeprefix("torch."), "compile": compile, "ms/step": round(1000 * seconds, 1),
            "tokens/s": round(tokens_per_s, 1), "TFLOP/s": round(flops / 1e12, 4),
            "peak TFLOP/s": round(peak / 1e12, 4), "MFU %": round(100 * flops / peak, 1)}


def ddp_rows(data: Path, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """pretrain.py itself, 1 process (all cores, then 1 thread) vs 2 torchrun processes of 1 thread each.

    Each process keeps its batch, so 2 processes train twice the tokens per step. tokens/s is the
    run's second evaluation interval, so start-up and the first steps are left out."""
    steps = 2 * (args.train_warmup + args.train_steps)
    common = ["pretrain.py", "--data", str(data), "--preset", args.train_preset, "--block-size", "128",
              "--batch-size", str(args.train_batch), "--max-steps", str(steps), "--eval-every", str(steps // 2),
              "--eval-batches", "1", "--sample-tokens", "0", "--save-every", "0", "--device", "cpu"]
    runs = [("1 process", [sys.executable], {}),
            ("1 process, 1 thread", [sys.executable], {"OMP_NUM_THREADS": "1"}),
            ("2 processes, 1 thread each", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                            "--nproc_per_node=2"], {"OMP_NUM_THREADS": "1"})]
    rows = []
    for i, (name, launcher, env) in enumerate(runs):
        out = tmp / f"ddp{i}"
        subprocess.run([*launcher, *common, "--out-dir", str(out)], cwd=REPO, check=True, capture_output=True,
                       env={**os.environ, **env})
        record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        rows.append({"bench": "train", "case": f"ddp: {name}", "preset": args.train_preset, "context": 128,
                     "batch": args.train_batch, "device": "cpu", "ms/step": round(record["ms_per_step"], 1),
                     "tokens/s": round(record["tokens_per_s"], 1)})
    one_thread = rows[1]["tokens/s"]
    rows[2]["scaling vs 1 process, 1 thread"] = round(rows[2]["tokens/s"] / one_thread, 2)
    rows[2]["speed-up vs 1 process"] = round(rows[2]["tokens/s"] / rows[0]["tokens/s"], 2)
    return rows


PLAN_RUNS = [  # name, pretrain.py flags, processes
    ("mini", ["--preset", "mini"], 1),
    ("mini, activation checkpointing", ["--preset", "mini", "--activation-checkpointing"], 1),
    ("GPT-2 124M", ["--preset", "gpt2"], 1),
    ("mini, DDP", ["--preset", "mini"], 2),
    ("mini, FSDP", ["--preset", "mini", "--strategy", "fsdp"], 2),
]


def plan_rows(data: Path, tmp: Path) -> list[dict]:
    """pretrain.py --plan's bytes per process against the peak memory of the same run, 2 steps at context
    128, batch 4, in fresh processes (1 thread each under torchrun)."""
    rows = []
    for i, (name, flags, processes) in enumerate(PLAN_RUNS):
        common = [*flags, "--data", str(data), "--block-size", "128", "--batch-size", "4", "--max-steps", "2",
                  "--eval-every", "2", "--eval-batches", "1", "--sample-tokens", "0", "--device", "cpu"]
        subprocess.run([sys.executable, "pretrain.py", *common, "--plan", "--plan-processes", str(processes),
                        "--out-dir", str(tmp / f"plan{i}")], cwd=REPO, check=True, capture_output=True)
        plan = json.loads((tmp / f"plan{i}" / "plan.json").read_text())
        launcher = [sys.executable] if processes == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if processes > 1 else {})}
        subprocess.run([*launcher, "pretrain.py", *common, "--out-dir", str(tmp / f"run{i}")], cwd=REPO,
                       check=True, capture_output=True, env=env)
        record = json.loads((tmp / f"run{i}" / "metrics.jsonl").read_text().splitlines()[-1])
        mem = plan["memory"]
        rows.append({"bench": "train", "case": f"plan: {name}", "processes": processes,
                     "planned MB": round(plan["bytes_per_process"] / 1e6),
                     "measured MB": round(record["peak_memory"] / 1e6),
                     "plan / measured": round(plan["bytes_per_process"] / record["peak_memory"], 3),
                     "weights+grads+optimizer MB": round((mem["weights"] + mem["gradients"] + mem["optimizer"]) / 1e6),
                     "activations MB": round(mem["activations"] / 1e6), "runtime MB": round(mem["baseline"] / 1e6),
                     "planned ms/step": round(1000 * plan["devices"][0]["seconds_per_step"], 1),
                     "ms/step": round(record["ms_per_step"], 1)})
    return rows


def fsdp_gpu_rows(args: argparse.Namespace) -> list[dict]:
    """FSDP on one GPU: the shallowest Mistral-7B-shaped model that plain training cannot fit by the plan
    (16 bytes per weight for weights, gradients and AdamW, plus autocast's bf16 copy of every weight),
    trained a few steps with pretrain.py's own pieces (distributed.sharded_model, train_step), one
    sequence of --train-fsdp-context tokens per step. FSDP's bf16 copies exist for about two blocks at a
    time. Reports tokens/s, MFU of the data-sheet peak, and the plan against the allocator's peak."""
    torch.cuda.empty_cache()  # the compiled GPT-2 case's cached blocks
    procs, device = distributed.init_processes("cuda", "fsdp")  # a process group of one
    try:
        capacity = torch.cuda.get_device_properties(device).total_memory
        T = args.train_fsdp_context

        def planned(n_layer: int, strategy: str) -> dict:
            return planner.memory_per_process(get_config("mistral-7b", n_layer=n_layer, block_size=T), batch_size=1,
                                               block_size=T, strategy=strategy, activation_checkpointing=True,
                                               dtype=torch.bfloat16, baseline=planner.CUDA_CONTEXT_BYTES)

        # Every figure of the plan grows linearly with the depth: two depths give the line.
        one, per_layer = planned(1, "ddp")["total"], planned(2, "ddp")["total"] - planned(1, "ddp")["total"]
        n_layer = args.train_fsdp_layers or max(1, int((capacity - one) // per_layer) + 2)
        plan, plain = planned(n_layer, "fsdp"), planned(n_layer, "ddp")
        row = {"bench": "train", "case": "gpu: FSDP, one GPU", "gpu": torch.cuda.get_device_name(device),
               "preset": f"mistral-7b shape, {n_layer} layers", "context": T, "batch": 1, "dtype": "bfloat16",
               "params_M": round(plan["parameters"] / 1e6), "GPU GB": round(capacity / 1e9, 2),
               "planned GB": round(plan["total"] / 1e9, 2), "plain training planned GB": round(plain["total"] / 1e9, 2)}
        gpt = distributed.sharded_model(get_config("mistral-7b", n_layer=n_layer, block_size=T), device,
                                        torch.bfloat16, activation_checkpointing=True)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in gpt.parameters():  # GPT-2's init for the matrices; the norms' weights start at 1
                if p.dim() >= 2:
                    torch.nn.init.normal_(p, std=0.02)
                else:
                    torch.nn.init.ones_(p)
        optimizer = gpt.configure_optimizer(3e-4, device_type="cuda")
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            for i in range(args.train_warmup + args.train_steps):
                if i == args.train_warmup:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                ids = torch.randint(0, gpt.config.vocab_size, (1, 1, T + 1), device=device)  # (accum, B, T + 1)
                loss, norm = pretrain.train_step(gpt, optimizer, scaler, ids[..., :-1], ids[..., 1:], grad_clip=1.0,
                                                 ctx=autocast(device, torch.bfloat16))
                norm.item()
            seconds = (time.perf_counter() - start) / args.train_steps
        except torch.cuda.OutOfMemoryError:
            return [{**row, "result": "out of memory",
                     "allocated GB": round(torch.cuda.max_memory_allocated(device) / 1e9, 2)}]
        allocated = torch.cuda.max_memory_allocated(device)
        with torch.device("meta"):
            flops_per_step = GPT(gpt.config).flops_per_token(T) * T
        peak = planner.peak_flops(device, torch.bfloat16)
        return [{**row, "ms/step": round(1000 * seconds, 1), "tokens/s": round(T / seconds),
                 "MFU % of data-sheet peak": round(100 * flops_per_step / seconds / peak, 1) if peak else None,
                 "allocated GB": round(allocated / 1e9, 2),
                 "plan / allocated": round((plan["total"] - plan["baseline"]) / allocated, 3)}]
    finally:
        torch.distributed.destroy_process_group()


def run(args: argparse.Namespace) -> list[dict]:
    if "gpu" in args.train_cases and not torch.cuda.is_available():
        raise UserError("the train benchmark's gpu case needs a CUDA GPU, and torch sees none here")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        data = random_token_folder(tmp)
        tokens = np.memmap(data / "train.bin", dtype=np.uint16, mode="r")
        cpu = torch.device("cpu")
        if {"small", "gpt2"} & set(args.train_cases):
            peak = matmul_peak(cpu, torch.float32, n=2048, repeats=3)
            for case in ("small", "gpt2"):
                if case in args.train_cases:
                    preset = args.train_preset if case == "small" else "gpt2"
                    rows.append(step_row(case, preset, 128, args.train_batch, cpu, torch.float32,
                                         args.train_compile, peak, tokens, args))
        if "ddp" in args.train_cases:
            rows += ddp_rows(data, args, tmp)
        if "plan" in args.train_cases:
            rows += plan_rows(data, tmp)
        if "gpu" in args.train_cases:
            gpu = torch.device("cuda")
            torch.backends.cuda.matmul.allow_tf32 = True
            peak = matmul_peak(gpu, torch.bfloat16, n=8192, repeats=5)
            row = step_row("gpu", "gpt2", 1024, args.train_gpu_batch, gpu, torch.bfloat16, True, peak, tokens, args)
            table_peak = planner.peak_flops(gpu, torch.bfloat16)
            row["gpu"] = torch.cuda.get_device_name(gpu)
            row["MFU % of data-sheet peak"] = round(100 * row["TFLOP/s"] * 1e12 / table_peak, 1) if table_peak else None
            rows.append(row)
            rows += fsdp_gpu_rows(args)
    return rows

