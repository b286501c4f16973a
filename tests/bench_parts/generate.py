"""Decoding benchmarks of generate.py: GPT-2 124M, batch 1, greedy, random weights.

    python tests/bench.py generate --hf-python VENV/bin/python     # this CPU: float32, bfloat16, int8, transformers
    python tests/bench.py generate --decode-preset mini --decode-new-tokens 32 --decode-variants int8   # a quick look
    python tests/bench.py gpu                                      # CUDA, bf16 (decoding part)

`generate` (CPU): random GPT-2 124M weights (seed 0) are written once in the Hub's layout (float32, as
GPT-2 is on the Hub) to a temporary folder. Each decoder then runs in a fresh process of its own, so
that its peak memory is its own: it loads the folder as `generate.py` does (generate.load_for_generation),
decodes a 16-token prompt into 256 greedy tokens with generate() after a warm-up, and reports
tokens/s, the bytes of its weights and its peak RSS (which includes the ~240 MB that Python and torch
take before loading, given as "import"). The decoders:
  float32          generate.py's default on a CPU
  float32-compile  --compile (frozen weights, as generate.py compiles on a CPU)
  bfloat16         --dtype bfloat16
  int8             --quantize int8 (the norms and activations float32)
  int8-bfloat16    --quantize int8 --dtype bfloat16
  int8-compile     --quantize int8 --compile (frozen, autotuned: inductor's own int8 GEMM)
  recompute        float32 without the KV cache: the whole sequence again for every token
  transformers     GPT2LMHeadModel.generate, float32, same weights, in the venv of --hf-python (transformers
                   is not a dependency of this project)
Agreement with float32 over the first 64 greedy tokens: "same_first", how many tokens are identical
before the first difference, and "top1_agree", the share of the 64 positions where a decoder's greedy
choice equals float32's when both are given float32's tokens so far (teacher forcing: one near-tie
early on does not decide the other 63). Random weights make next-token distributions nearly flat, so
near-ties are far more common than with trained weights.
Targets: int8 >= 2x float32's tokens/s (issue 13); the KV cache >= 3x recomputing, and >= transformers
(issue 3).
With --decode-rounds R (3 by default), every decoder runs R times, taking turns with the others, and
the table gives its fastest round (its tokens/s, memory and tokens), every round's tokens/s, and
every round's ratio to float32's time in the same round.

`gpu` (CUDA, bf16): eager, torch.compile as `generate.py --compile`, and torch.compile with CUDA
graphs, each with its peak allocated memory; target >= 1000 tokens/s compiled. The training step is
in bench_parts/train.py.
Each run_* returns rows (dicts) for the benchmark table.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch



REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repository root: model.py & co.
from bench_parts.load import PEAK_RSS  # noqa: E402
from generate import compile_for_generation, generate, load_for_generation, pack_for_cpu
from load_gpt2 import export_hf
from model import DTYPES, GPT, PRESETS, get_config
from tokenizer import UserError

AGREEMENT_TOKENS = 64
GPT2_PRESETS = [name for name, config in PRESETS.items() if config.positions == "learned"]
# name -> how generate.py is asked for it: --dtype, --quantize, --compile, and whether the KV cache is used
VARIANTS = {
    "float32": ("float32", None, False, True),
    "float32-compile": ("float32", None, True, True),
    "bfloat16": ("bfloat16", None, False, True),
    "int8": ("float32", "int8", False, True),
    "int8-bfloat16": ("bfloat16", "int8", False, True),
    "int8-compile": ("float32", "int8", True, True),
    "recompute": ("float32", None, False, False),
}
LABELS = {"float32": "float32 (generate.py)", "float32-compile": "float32 (generate.py --compile)",
          "bfloat16": "bfloat16 (generate.py --dtype bfloat16)", "int8": "int8 (generate.py --quantize int8)",
          "int8-bfloat16": "int8 (generate.py --quantize int8 --dtype bfloat16)",
          "int8-compile": "int8 (generate.py --quantize int8 --compile)",
          "recompute": "float32 recomputing the whole sequence for every token (no KV cache)"}

# One decoder in a fresh process: argv[1] is the JSON spec of measure_variant.
WORKER = f"""
import json, resource, sys
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
import torch
{PEAK_RSS}
from bench_parts.generate import measure_variant
print(json.dumps(measure_variant(json.loads(sys.argv[1]), peak_rss)))
"""

# transformers, run by the venv's Python: argv = folder (Hub layout), prompt ids (JSON), new tokens, threads.
HF_SCRIPT = f"""
import json, resource, sys, time
import torch
from transformers import GPT2LMHeadModel
{PEAK_RSS}
folder, prompt, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
import_rss = peak_rss()
model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
model.generation_config.eos_token_id = None  # like ours here: always generate new_tokens tokens
ids = torch.tensor([prompt])
kwargs = dict(do_sample=False, use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(ids))
with torch.inference_mode():
    model.generate(ids, max_new_tokens=8, **kwargs)  # warm-up
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, **kwargs)
    seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "tokens": out[0, len(prompt):].tolist(), "import_rss": import_rss,
                  "peak_rss": peak_rss(), "attn_implementation": model.config._attn_implementation}}))
"""


def add_arguments(parser: argparse.ArgumentParser, gpu: bool = False) -> None:
    """The decoding flags; the gpu run has no transformers comparison and no variants, so fewer."""
    group = parser.add_argument_group("generate")
    if not gpu:
        group.add_argument("--hf-python", default=None,
                           help="Python of a venv with transformers, for the comparison (skipped without)")
        group.add_argument("--decode-variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                           help="our decoders to time; float32 always runs first (the others are compared with it)")
        group.add_argument("--decode-preset", default="gpt2", choices=GPT2_PRESETS,
                           help="model size (random weights); GPT-2's family, which transformers runs as GPT-2")
    group.add_argument("--decode-prompt-tokens", type=int, default=16, help="prompt length (random ids)")
    group.add_argument("--decode-new-tokens", type=int, default=256, help="greedy tokens to generate")
    if not gpu:
        group.add_argument("--decode-rounds", type=int, default=3,
                           help="times every decoder runs, taking turns; each reports its best round")


# ---------------------------------------------------------------------------------------------------
# Timing one decoder

def timed_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, warmup: int) -> tuple[list[int], float]:
    """generate() greedy with its KV cache after a warm-up of `warmup` tokens: (tokens, seconds).
    A compiled model needs a warm-up of the same length: the cache's shape depends on it."""
    list(generate(model, prompt, warmup, temperature=0))
    start = time.perf_counter()
    tokens = [int(t) for t in generate(model, prompt, new_tokens, temperature=0)]  # int() waits for the device
    return tokens, time.perf_counter() - start


def greedy_without_cache(model: GPT, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """The baseline the KV cache saves us from: the whole sequence again for every token."""
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits, _ = model(ids, last_only=True)  # (1, 1, V)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -new_tokens:].tolist()


@torch.inference_mode()
def top1_agreement(model: GPT, prompt: torch.Tensor, reference: list[int]) -> float:
    """The share of reference's tokens that model's greedy choice equals, each given the prompt and
    reference's tokens before it (teacher forcing)."""
    ids = torch.cat([prompt, torch.tensor([reference[:-1]])], dim=1)
    logits, _ = model(ids)  # (1, T, V)
    choices = logits[0, prompt.size(1) - 1:].argmax(-1)  # the predictions of reference[0], reference[1], ...
    return (choices == torch.tensor(reference)).float().mean().item()


def weights_bytes(model: torch.nn.Module) -> int:
    """The bytes of a model's parameters and buffers; a tied table counts once."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def measure_variant(spec: dict, peak_rss) -> dict:
    """Run in a fresh process (WORKER): load, decode, measure. spec: folder, variant, prompt, new_tokens,
    threads, and float32's tokens as "reference" (none for float32 itself)."""
    torch.set_num_threads(spec["threads"])
    dtype_name, quantize, compile_model, cached = VARIANTS[spec["variant"]]
    import_rss = peak_rss()
    model, _ = load_for_generation(spec["folder"], dtype=DTYPES[dtype_name], quantize=quantize)
    model.eval()
    if not compile_model:
        model = pack_for_cpu(model)  # as generate.py does when it does not compile
    prompt, n = torch.tensor([spec["prompt"]]), spec["new_tokens"]
    if not cached:
        start = time.perf_counter()
        tokens = greedy_without_cache(model, prompt, n)
        seconds = time.perf_counter() - start
    elif compile_model:
        tokens, seconds = timed_decode(compile_for_generation(model, torch.device("cpu")), prompt, n, warmup=n)
    else:
        tokens, seconds = timed_decode(model, prompt, n, warmup=8)
    result = {"tokens": tokens, "seconds": seconds, "weights_bytes": weights_bytes(model), "import_rss": import_rss,
              "peak_rss": peak_rss()}
    if spec.get("reference"):
        result["top1_agree"] = top1_agreement(model, prompt, spec["reference"][:AGREEMENT_TOKENS])
    return result


def run_in_process_of_its_own(script: list[str], what: str) -> dict:
    out = subprocess.run(script, capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the {what} run failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_first(tokens: list[int], reference: list[int]) -> str:
    """How many of reference's first AGREEMENT_TOKENS tokens `tokens` repeats before the first difference."""
    n = min(AGREEMENT_TOKENS, len(reference))
    same = next((i for i, (a, b) in enumerate(zip(tokens[:n], reference[:n])) if a != b), n)
    return f"{same}/{n}"


def keep_fastest(results: dict, rounds: dict, name: str, result: dict) -> None:
    """Record one round of a decoder: its seconds in rounds[name], and the whole result if fastest."""
    rounds.setdefault(name, []).append(result["seconds"])
    if name not in results or result["seconds"] < results[name]["seconds"]:
        results[name] = result


def megabytes(n: int) -> int:
    return round(n / 2**20)


# ---------------------------------------------------------------------------------------------------
# The CPU run

def run_generate(args: argparse.Namespace) -> list[dict]:
    n, threads = args.decode_new_tokens, torch.get_num_threads()
    config = get_config(args.decode_preset)
    prompt = torch.randint(0, config.vocab_size, (1, args.decode_prompt_tokens),
                           generator=torch.Generator().manual_seed(0))[0].tolist()
    with torch.device("meta"):
        parameters = GPT(config).num_params()
    setting = (f"{args.decode_preset} ({parameters / 1e6:.0f}M, random weights), CPU ({threads} threads), batch 1, "
               f"prompt {len(prompt)}, {n} new, greedy")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        export_hf(GPT(config), folder)
        # This shared machine has slow spells that last minutes: the decoders take turns, round after
        # round, so each meets them alike, and each keeps its fastest round.
        results, rounds = {}, {}
        for _ in range(args.decode_rounds):
            for variant in ["float32"] + [v for v in args.decode_variants if v != "float32"]:
                spec = {"folder": folder, "variant": variant, "prompt": prompt, "new_tokens": n, "threads": threads,
                        "reference": results["float32"]["tokens"] if variant != "float32" else None}
                result = run_in_process_of_its_own([sys.executable, "-c", WORKER, json.dumps(spec)], variant)
                keep_fastest(results, rounds, variant, result)
            if args.hf_python:
                result = run_in_process_of_its_own(
                    [args.hf_python, "-c", HF_SCRIPT, folder, json.dumps(prompt), str(n), str(threads)], "transformers")
                keep_fastest(results, rounds, "transformers", result)
    reference = results["float32"]["tokens"]
    per_second = {name: n / r["seconds"] for name, r in results.items()}
    for name, r in results.items():
        label = (f"transformers GPT2LMHeadModel.generate, float32 ({r['attn_implementation']} attention)"
                 if name == "transformers" else f"ours, {LABELS[name]}")
        row = {"benchmark": "decode", "setting": f"{setting}: {label}", "tokens_per_s": round(per_second[name], 1),
               "vs_float32": f"{per_second[name] / per_second['float32']:.2f}x",
               "weights_MB": megabytes(r["weights_bytes"]) if "weights_bytes" in r else "",
               "peak_RSS_MB": f"{megabytes(r['peak_rss'])} (import {megabytes(r['import_rss'])})",
               "rounds_tokens_per_s": ", ".join(f"{n / seconds:.1f}" for seconds in rounds[name]),
               # the same round's float32 beside each: a slow spell then falls on both
               "rounds_vs_float32": ", ".join(f"{f32 / seconds:.2f}x"
                                              for seconds, f32 in zip(rounds[name], rounds["float32"])),
               "same_first": same_first(r["tokens"], reference),
               "top1_agree": f"{r['top1_agree']:.1%}" if "top1_agree" in r else ""}
        notes = []
        if name.startswith("int8"):
            notes.append("target >= 2x float32")
            if name == "int8-compile" and "float32-compile" in results:
                notes.append(f"{per_second[name] / per_second['float32-compile']:.2f}x float32 --compile")
        if name == "float32" and "recompute" in results:
            notes.append(f"{per_second['float32'] / per_second['recompute']:.1f}x recompute (target >= 3x)")
        if name in ("float32", "float32-compile") and "transformers" in results:
            notes.append(f"{per_second[name] / per_second['transformers']:.2f}x transformers (target >= 1x)")
        if notes:
            row["note"] = "; ".join(notes)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# The GPU run

def random_gpt2(device: str = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(0)
    with torch.device(device):
        return GPT(get_config("gpt2")).to(dtype).eval()


def decode_row(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, setting: str) -> tuple[list[int], dict]:
    """Time generate() (greedy, KV cache) after a warm-up run of the same length, which also triggers
    any compilation; the row has tokens/s and the peak memory CUDA allocated."""
    torch.cuda.reset_peak_memory_stats()
    tokens, seconds = timed_decode(model, prompt, new_tokens, warmup=new_tokens)
    return tokens, {"benchmark": "decode", "setting": setting, "tokens_per_s": round(new_tokens / seconds, 1),
                    "peak_allocated_MB": megabytes(torch.cuda.max_memory_allocated())}


def run_gpu(args: argparse.Namespace) -> list[dict]:
    if not torch.cuda.is_available():
        raise UserError("the gpu benchmark needs a CUDA GPU, and this machine has none")
    model = random_gpt2("cuda", torch.bfloat16)
    n = args.decode_new_tokens
    prompt = torch.randint(0, 50257, (1, args.decode_prompt_tokens), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(0))
    setting = f"GPT-2 124M bf16 {torch.cuda.get_device_name()}, batch 1, prompt {prompt.size(1)}, {n} new"
    eager, row = decode_row(model, prompt, n, f"{setting}: eager")
    rows = [row]
    variants = {"torch.compile, as generate.py --compile": lambda: torch.compile(model),
                # CUDA graphs: one launch per step instead of one per kernel
                "torch.compile mode=reduce-overhead": lambda: torch.compile(model, mode="reduce-overhead")}
    for name, compile_model in variants.items():
        try:
            tokens, row = decode_row(compile_model(), prompt, n, f"{setting}: {name}")
            # bf16 rounding differs between fused and eager kernels, so tokens may drift apart
            row["note"] = f"target >= 1000 tokens/s; same tokens as eager: {tokens == eager}"
        except Exception as e:  # one failing variant should not hide the others' numbers
            row = {"benchmark": "decode", "setting": f"{setting}: {name}", "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        torch._dynamo.reset()
    return rows
