"""The run planner: what a training run needs before it starts (memory per process, FLOPs, time on
a named GPU or on this machine) and which flag would make it fit. pretrain.py and
finetune_instruct.py both print their --plan from here.

    python pretrain.py --plan --preset gpt2 --block-size 1024 --batch-size 16    # trains nothing

Reading order: the devices' figures (data sheets, and what is measured on this machine); the memory
and FLOPs of one training step, term by term; then the plan itself, its report and the configs it
is made for.
"""
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import load_gpt2
from common import UserError, atomic_write, clock, writable_folder
from model import DTYPES, GPT, GPTConfig, checkpoint_kind, get_config, resolve_dtype


# ---------------------------------------------------------------------------------------------------
# The devices: data-sheet figures, assumptions, and what this machine measures

# Dense 16-bit tensor-core peaks (FLOP/s) from the vendors' data sheets; the first name found in the
# device's name wins, so the more specific names come first.
PEAK_FLOPS_16BIT = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("RTX 4090", 165e12), ("V100", 125e12),
]

# The GPUs --plan prices every run on, with their memory as nvidia-smi reports it (MiB), which is what
# the data sheets' "80 GB", "141 GB", "24 GB" amount to (A100: the 80 GB model; H100: SXM).
PLAN_GPUS = {"H100": 81559 * 2**20, "H200": 143771 * 2**20, "A100": 81920 * 2**20, "L4": 23034 * 2**20}

GPU_MFU = 0.40  # the share of the bf16 peak assumed sustained on GPUs (well-tuned GPT-2 training reaches more)
CPU_MFU = 0.50  # the share of the measured float32 matmul rate assumed sustained on this CPU
CUDA_CONTEXT_BYTES = 1e9  # the CUDA runtime's own memory on each GPU, outside PyTorch's allocations


# What a training step adds on a CPU beyond its tensors: thread pools, matmul scratch buffers and the
# memory the allocator keeps after frees (130-150 MB with any model size: tests/bench.py train's plan case).
CPU_STEP_BYTES = 150e6


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for this dtype when the table knows it (16-bit on known GPUs), else None."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    return data_sheet_peak(torch.cuda.get_device_name(device))


def data_sheet_peak(gpu_name: str) -> float | None:
    """PEAK_FLOPS_16BIT's figure for a GPU's name, None for a GPU the table does not know."""
    return next((peak for key, peak in PEAK_FLOPS_16BIT if key in gpu_name), None)


def peak_memory(device: torch.device) -> int | None:
    """The most memory this process has held: PyTorch's allocations on a GPU, the resident set on a CPU.

    On Linux the resident peak is /proc's VmHWM, which starts afresh in a new program; getrusage's
    ru_maxrss would also count the memory of the process it was started from (a fork, then exec)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """This CPU's float32 matmul rate, FLOP/s: the best of a few n x n products (~0.1 s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm the thread pool and the kernels
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def current_rss() -> float:
    """This process's resident memory now, in bytes (Linux; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return float(peak_memory(torch.device("cpu")) or 0)


def machine_memory() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------------
# One training step's memory and FLOPs
#
# Memory per process, in bytes, at the peak of a training step. AdamW keeps two float32 moments per
# trainable weight, so weights, gradients and optimizer state take 4 + 4 + 8 = 16 bytes per
# parameter (DDP: all of it in every process; FSDP: 1/N of it). Activations are what the forward pass
# keeps for the backward pass; their count per token follows the blocks' code in model.py term by term
# (see block_activations) and is checked against what autograd really saves in tests/test_plan.py.

def block_activations(config: GPTConfig, tokens: int, block_size: int, half: bool) -> float:
    """Bytes one block keeps for backward over `tokens` tokens (micro-batch x context), per model.py.

    In float32 every value takes 4 bytes; under 16-bit autocast the matmuls' inputs and outputs take
    2, while the residual stream and RMSNorm's normalised values stay float32."""
    C, H = config.n_embd, config.mlp_size
    q, kv = config.n_head * config.head_size, config.kv_heads * config.head_size  # query, key/value widths
    norms = 1 if config.parallel_block else 2
    wide = 4  # float32 values: the residual stream, and RMSNorm's x * rsqrt(mean(x^2))
    stream = C * (1 if config.parallel_block else 2)  # the block's input, and after attention (sequential)
    if config.norm == "rmsnorm":
        stream += norms * C
    narrow = norms * C  # the normalised input of each matmul after a norm
    narrow += q + 2 * kv  # c_attn's output: q, k, v
    if config.positions == "rotary":
        rotating = config.rotary_dim
        narrow += (q + kv) + (config.n_head + config.kv_heads) * rotating  # rotated q and k, their rotated halves
    narrow += q  # attention's output, c_proj's input
    narrow += 4 * H if config.mlp == "swiglu" else 2 * H  # gate|up, silu(gate), their product; or c_fc out, gelu out
    per_token = stream * wide + narrow * (2 if half else 4) + config.n_head * 4  # + attention's logsumexp
    if config.dropout > 0:  # one byte of mask per value after each dropout (attention output, MLP output);
        per_token += 2 * C  # on a CPU, attention's dropout also keeps its (T, T) weights: not counted here
    total = tokens * per_token
    if config.sliding_window is not None and config.sliding_window < block_size:
        total += 4 * block_size * block_size  # the window's mask, as the float mask attention keeps (T, T)
    return total


def head_activations(config: GPTConfig, tokens: int, half: bool) -> tuple[float, float]:
    """(kept through the backward pass, extra at its start) by the final norm, the LM head and the loss.

    The loss keeps log-softmax's float32 output (tokens x vocabulary); its backward briefly adds the
    incoming gradient and log-softmax's own (under autocast also their 16-bit cast), the largest
    moment of a small model's step."""
    norm = (3 if config.norm == "rmsnorm" else 2) * config.n_embd * tokens * 4
    logits = tokens * config.vocab_size * 4
    return norm + logits, 2 * logits + (tokens * config.vocab_size * 2 if half else 0)


def parameter_counts(config: GPTConfig) -> tuple[int, int, bool]:
    """(all parameters, those of one block, whether the head is tied to the embedding), counted on
    the meta device (no memory) once per config."""
    return _parameter_counts(dataclasses.astuple(config))


@functools.lru_cache(maxsize=16)
def _parameter_counts(fields: tuple) -> tuple[int, int, bool]:
    with torch.device("meta"):
        gpt = GPT(GPTConfig(*fields))
    return gpt.num_params(), sum(p.numel() for p in gpt.transformer.h[0].parameters()), gpt.tied


def memory_per_process(config: GPTConfig, *, batch_size: int, block_size: int, grad_accum: int = 1,
                       processes: int = 1, strategy: str = "ddp", activation_checkpointing: bool = False,
                       dtype: torch.dtype = torch.float32, trainable_params: int | None = None,
                       baseline: float = 0.0) -> dict:
    """Bytes one process holds at the peak of a training step, by part, and their sum ("total").

    trainable_params: weights that get gradients and optimizer state (LoRA: the adapters); None: all.
    baseline: the process's memory before the model exists (Python, torch, the CUDA context)."""
    n, block_params, tied = parameter_counts(config)
    outer_params = n - config.n_layer * block_params
    n_train = n if trainable_params is None else trainable_params
    half = dtype in (torch.bfloat16, torch.float16)
    sharded = strategy == "fsdp"
    share = processes if sharded else 1
    weights, gradients, optimizer = 4 * n / share, 4 * n_train / share, 8 * n_train / share
    working = 0.0  # copies that exist only during the forward and backward passes
    if sharded:
        # FSDP gathers each unit's whole weights when it runs and keeps its gradients whole until they
        # are reduce-scattered: the outer unit (embeddings, final norm, head) for the whole step, and
        # about two blocks at a time (the one running and the next, fetched ahead). bf16 on GPUs.
        working = (outer_params + 2 * block_params) * ((2 if half else 4) + 4)
    elif half:
        working = 2 * (n - config.vocab_size * config.n_embd * (0 if tied else 1))  # autocast's bf16 weights
    tokens = batch_size * block_size
    per_block = block_activations(config, tokens, block_size, half)
    if activation_checkpointing:  # every block's input, plus one block recomputed at a time in backward
        activations = config.n_layer * tokens * config.n_embd * 4 + per_block
    else:
        activations = config.n_layer * per_block
    kept, loss_peak = head_activations(config, tokens, half)
    activations += kept
    # The embedding's gradient arrives last, as a dense (vocabulary x n_embd) tensor that is then added
    # to the head's (tied) gradient: two such tensors at the end of the backward pass (none when the
    # embedding is frozen, as under LoRA).
    embedding_grad = (2 if tied else 1) * 4 * config.vocab_size * config.n_embd if n_train == n else 0
    # Gradients stay allocated between steps under DDP (its buckets) and FSDP, and between micro-steps;
    # a lone process frees them after each step, and its backward starts before the first exists.
    # (Under FSDP the embedding's gradient is part of the outer unit's working copies.)
    if processes > 1 or grad_accum > 1 or sharded:
        step_peak = gradients + max(activations + loss_peak, 0 if sharded else embedding_grad)
    else:
        step_peak = max(activations + loss_peak, gradients + embedding_grad)
    total = baseline + weights + optimizer + working + step_peak
    return {"parameters": n, "trainable_parameters": n_train, "weights": weights, "gradients": gradients,
            "optimizer": optimizer, "activations": activations, "loss_peak": loss_peak, "working_copies": working,
            "baseline": baseline, "total": total}


def training_flops(config: GPTConfig, block_size: int, *, trainable_params: int | None = None,
                   activation_checkpointing: bool = False) -> tuple[float, float]:
    """(model FLOPs per token, FLOPs the hardware runs per token) for training at this context.

    Model FLOPs are model.flops_per_token (6N + attention). Frozen weights (LoRA) skip their weight
    gradient, 2 of the 6 FLOPs per weight; activation checkpointing runs each block's forward twice."""
    with torch.device("meta"):
        flops = GPT(config).flops_per_token(block_size)
    n, block_params, _ = parameter_counts(config)
    if trainable_params is not None:
        flops -= 2 * max(0, n - trainable_params)
    hardware = flops
    if activation_checkpointing:
        keys = min(block_size, config.sliding_window or block_size)
        hardware += config.n_layer * (2 * block_params + 4 * config.n_head * config.head_size * keys)
    return flops, hardware


# ---------------------------------------------------------------------------------------------------
# The plan

# How a run that does not fit can be made to: changes to try, least disruptive first. A change that
# raises the process count keeps the global batch (the micro-steps shrink) where it can.
def fit_changes(run: dict, gpu: bool) -> list[tuple[str, dict]]:
    changes = []
    if not run["activation_checkpointing"]:
        changes.append(("--activation-checkpointing", {"activation_checkpointing": True}))
    if run["processes"] > 1 and run["strategy"] == "ddp":
        changes.append(("--strategy fsdp", {"strategy": "fsdp"}))
        changes.append(("--strategy fsdp --activation-checkpointing",
                        {"strategy": "fsdp", "activation_checkpointing": True}))
    batch = run["batch_size"]
    while batch > 1:
        batch //= 2
        accum = run["grad_accum"] * run["batch_size"] // batch
        changes.append((f"--batch-size {batch} --grad-accum {accum} --activation-checkpointing",
                        {"batch_size": batch, "grad_accum": accum, "activation_checkpointing": True}))
    if gpu:
        for n in (2, 4, 8):
            if n > run["processes"]:
                accum = max(1, run["grad_accum"] * run["processes"] // n)
                changes.append((f"torchrun --nproc_per_node={n} ... --strategy fsdp --activation-checkpointing"
                                f" --grad-accum {accum}",
                                {"processes": n, "strategy": "fsdp", "activation_checkpointing": True,
                                 "grad_accum": accum}))
    return changes


def make_plan(config: GPTConfig, *, batch_size: int, block_size: int, grad_accum: int = 1, processes: int = 1,
              strategy: str = "ddp", activation_checkpointing: bool = False, dtype_name: str = "auto",
              device: torch.device = torch.device("cpu"), steps: int | None = None, eval_tokens: int = 0,
              trainable_params: int | None = None, what: str = "") -> dict:
    """Everything --plan reports, as a JSON-ready dict: the run, its FLOPs and, per device (this CPU,
    the PLAN_GPUS, and the run's own GPU if it has one), the bytes one process holds, whether that
    fits, the first change that makes it fit, and the time per step and per run. eval_tokens: the
    tokens the run's evaluations read over the whole run (a forward pass each, a third of a training
    token's FLOPs), which the time per run includes.

    "bytes_per_process" and "memory" are the chosen device's (--device). finetune_instruct.py plans
    its runs with this too (trainable_params for LoRA, steps when known)."""
    run = {"batch_size": batch_size, "block_size": block_size, "grad_accum": grad_accum, "processes": processes,
           "strategy": strategy, "activation_checkpointing": activation_checkpointing}
    cpu_flops = cpu_matmul_flops()
    runtime = current_rss() + CPU_STEP_BYTES  # this process so far (Python, torch) and a step's own overhead
    flops, hardware_flops = training_flops(config, block_size, trainable_params=trainable_params,
                                           activation_checkpointing=activation_checkpointing)
    tokens_per_step = batch_size * block_size * grad_accum * processes

    def memory(on_gpu: bool, dtype: torch.dtype, **changes) -> dict:
        return memory_per_process(config, **{**run, **changes}, dtype=dtype, trainable_params=trainable_params,
                                  baseline=CUDA_CONTEXT_BYTES if on_gpu else runtime)

    def price(name: str, flops_per_s: float | None, capacity: float | None, on_gpu: bool, dtype: torch.dtype) -> dict:
        need = memory(on_gpu, dtype)
        # One GPU per process; the processes on one CPU share its memory and its cores.
        available = None if capacity is None else capacity if on_gpu else capacity / processes
        fits = None if available is None else need["total"] <= available
        fits_with = None
        if fits is False:
            fits_with = next((flag for flag, changes in fit_changes(run, on_gpu)
                              if memory(on_gpu, dtype, **changes)["total"]
                              <= (capacity if on_gpu else available)), None)
        rate = flops_per_s * (processes if on_gpu else 1) if flops_per_s else None
        seconds = hardware_flops * tokens_per_step / rate if rate else None
        evaluating = flops / 3 * eval_tokens / rate if rate else 0.0  # forward only: 2 of training's 6 FLOPs per weight
        return {"device": name, "memory_bytes": capacity, "bytes_per_process": need["total"], "memory": need,
                "dtype": str(dtype).removeprefix("torch."), "fits": fits, "fits_with": fits_with,
                "sustained_flops_per_s": rate, "seconds_per_step": seconds,
                "seconds_per_run": seconds * steps + evaluating if seconds and steps else None}

    gpu_dtype = DTYPES.get(dtype_name, torch.bfloat16)  # auto: bfloat16 on these GPUs, float32 on a CPU
    devices = [price("this CPU", cpu_flops * CPU_MFU, machine_memory(), False, DTYPES.get(dtype_name, torch.float32))]
    devices += [price(gpu, data_sheet_peak(gpu) * GPU_MFU, size, True, gpu_dtype) for gpu, size in PLAN_GPUS.items()]
    chosen = devices[0]
    if device.type == "cuda":  # the run's own GPU, with the memory CUDA reports
        dtype = resolve_dtype(dtype_name, device)
        peak = peak_flops(device, dtype)
        chosen = price(torch.cuda.get_device_name(device), peak * GPU_MFU if peak else None,
                       torch.cuda.get_device_properties(device).total_memory, True, dtype)
        devices.append(chosen)
    other_way = memory(device.type == "cuda", DTYPES.get(chosen["dtype"], torch.float32),
                       activation_checkpointing=not activation_checkpointing)["activations"]
    return {
        "model": what, "parameters": chosen["memory"]["parameters"],
        "trainable_parameters": chosen["memory"]["trainable_parameters"], "run": run,
        "tokens_per_step": tokens_per_step, "steps": steps, "eval_tokens": eval_tokens,
        "flops_per_token": flops, "flops_per_step": flops * tokens_per_step,
        "hardware_flops_per_step": hardware_flops * tokens_per_step,
        "device": chosen["device"], "bytes_per_process": chosen["bytes_per_process"], "memory": chosen["memory"],
        "activations_without_checkpointing" if activation_checkpointing else "activations_with_checkpointing":
            other_way,
        "devices": devices,
        "assumptions": {"gpu_mfu": GPU_MFU, "cpu_mfu": CPU_MFU, "cpu_matmul_flops_per_s": cpu_flops,
                        "cuda_context_bytes": CUDA_CONTEXT_BYTES, "cpu_step_bytes": CPU_STEP_BYTES,
                        "gpus": "dense bf16 tensor-core peaks from the vendors' data sheets; memory as nvidia-smi "
                                "reports it"},
    }


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    return clock(seconds) if seconds >= 59.5 else f"{seconds:.1f} s"


def format_plan(plan: dict) -> str:
    run, mem = plan["run"], plan["memory"]
    lines = [
        f"plan: {plan['model']}, {plan['parameters'] / 1e6:,.1f}M parameters"
        + (f" ({plan['trainable_parameters'] / 1e6:,.2f}M trained)"
           if plan["trainable_parameters"] != plan["parameters"] else "")
        + f"; context {run['block_size']}, {run['batch_size']} sequences x {run['grad_accum']} micro-steps x "
        f"{run['processes']} process(es) = {plan['tokens_per_step']:,} tokens per step; {run['strategy']}, "
        f"activation checkpointing {'on' if run['activation_checkpointing'] else 'off'}",
        f"per process on {plan['device']}: weights {_size(mem['weights'])}, gradients {_size(mem['gradients'])}, "
        f"optimizer state {_size(mem['optimizer'])}, activations {_size(mem['activations'])} (the loss's backward "
        f"adds {_size(mem['loss_peak'])}), working copies {_size(mem['working_copies'])}, runtime "
        f"{_size(mem['baseline'])}: {_size(plan['bytes_per_process'])} at the peak",
    ]
    other = "activations_with_checkpointing" if "activations_with_checkpointing" in plan else \
        "activations_without_checkpointing"
    lines.append(f"activations {'with' if other.endswith('with_checkpointing') else 'without'} activation "
                 f"checkpointing: {_size(plan[other])}")
    lines.append(f"FLOPs: {plan['flops_per_token']:.3g} per token, {plan['flops_per_step']:.3g} per step"
                 + (f" ({plan['hardware_flops_per_step']:.3g} run, with the recomputation)"
                    if plan["hardware_flops_per_step"] != plan["flops_per_step"] else ""))
    run_title = f"run ({plan['steps']} steps{', evaluations' if plan['eval_tokens'] else ''})" if plan["steps"] else "run"
    header = f"{'device':<10} {'memory':>10} {'per process':>12} {'dtype':>9} {'fits':>5} {'time/step':>10} " \
             f"{run_title:>18}"
    lines += [header, "-" * len(header)]
    for d in plan["devices"]:
        fits = "?" if d["fits"] is None else "yes" if d["fits"] else "no"
        line = f"{d['device']:<10} {_size(d['memory_bytes']):>10} {_size(d['bytes_per_process']):>12} " \
               f"{d['dtype']:>9} {fits:>5} {_duration(d['seconds_per_step']):>10} " \
               f"{_duration(d['seconds_per_run']):>18}"
        if d["fits"] is False:
            line += f"  fits with: {d['fits_with']}" if d["fits_with"] else "  does not fit with any change tried"
        lines.append(line)
    a = plan["assumptions"]
    lines.append(f"times assume {100 * a['gpu_mfu']:.0f} % of each GPU's data-sheet bf16 peak and "
                 f"{100 * a['cpu_mfu']:.0f} % of this CPU's measured float32 matmul rate "
                 f"({a['cpu_matmul_flops_per_s'] / 1e9:.0f} GFLOP/s); a GPU's memory includes "
                 f"{_size(a['cuda_context_bytes'])} for the CUDA runtime; one GPU per process")
    return "\n".join(lines)


def init_config(init: str, preset: str | None = None) -> tuple[GPTConfig, str]:
    """The config of the model --init (and --preset) name, and a name for it, without loading weights:
    a preset, a GPT-2 name, one of our checkpoints (read memory-mapped), a Hub-layout folder or file
    (its config.json), or a Hub repo id (its config.json alone is downloaded)."""
    if init == "random":
        try:
            return get_config(preset or "mini"), f"{preset} (random)"
        except ValueError as e:
            raise UserError(str(e)) from None
    path = Path(init)
    if init in load_gpt2.GPT2_REPOS:
        return get_config(init), init  # our presets have the Hub's GPT-2 shapes
    if path.is_file() and checkpoint_kind(path) == "torch":
        try:  # mmap: the config without reading the weights
            return GPTConfig(**torch.load(path, map_location="cpu", mmap=True, weights_only=True)["config"]), init
        except Exception:
            raise UserError(f"{path} is not a readable checkpoint") from None
    if path.exists():
        config_path = (path if path.is_dir() else path.parent) / "config.json"
    elif load_gpt2.is_hub_repo(init):
        listing = load_gpt2.hub_listing(init)
        config_path = load_gpt2.fetch_hub_files(init, ["config.json"], listing) / "config.json"
    else:
        raise UserError(f"--init {init} is neither 'random', a GPT-2 name, a checkpoint, a folder nor a Hub repo id")
    if not config_path.is_file():
        raise UserError(f"{config_path} does not exist; a Hub-layout model needs its config.json")
    return load_gpt2.config_from_hf(config_path)[1], init


def report_plan(plan: dict, out_dir: str | Path) -> dict:
    """Print a plan and write it to OUT_DIR/plan.json (atomically); returns it."""
    out_dir = writable_folder(out_dir)
    print(format_plan(plan))
    atomic_write(out_dir / "plan.json", json.dumps(plan, indent=2) + "\n")
    print(f"wrote {out_dir / 'plan.json'}")
    return plan
