"""Decoding benchmark of the later families: a Mistral-shaped model of GPT-2 124M's size, CPU, fp32, batch 1.

    python tests/bench.py families --hf-python VENV/bin/python

The model has Mistral's maths (RMSNorm, RoPE, grouped-query attention with 4 key/value heads for 12
query heads, SwiGLU, untied head, 32,000-token vocabulary, a sliding window) at GPT-2 124M's size:
12 layers, width 768, MLP width 2048, 124.7M parameters, random weights. Our generate() (greedy, KV
cache; eager, and compiled as `generate.py --compile` compiles on a CPU) decodes a 16-token prompt
into --decode-new-tokens tokens; transformers' MistralForCausalLM.generate does the same on the same
weights (exported with load_gpt2.export_hf) in a subprocess with the Python of a venv that has it
(--hf-python), in the same run. The decoders take turns for --family-repeats rounds (each run after a
warm-up), so a slow spell of a shared machine falls on all of them alike; each reports its best round,
and the ratio to transformers is given for every round and as their median.
Target (issue 9): at least 1.0x transformers' tokens/s, with the same tokens.

    python tests/bench.py families --family-device cuda                # where a GPU is lent

runs the same decoding in bfloat16 on the GPU, eager and compiled (torch.compile, and with CUDA graphs
through mode="reduce-overhead"); the transformers comparison is the CPU run's.
"""
import argparse
import json
import statistics
import subprocess
import tempfile
import time
from contextlib import nullcontext
from functools import partial

import torch

from common import UserError
from generate import generate
from load_gpt2 import export_hf
from model import GPT, get_config



# GPT-2 124M's size in Mistral's shape; sliding_window as Mistral 7B's (--family-window changes it)
MISTRAL_124M = dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, intermediate_size=2048, block_size=4096)

# Run by the venv's Python: argv = folder (Hub layout), prompt ids (JSON), new tokens, threads, repeats.
HF_SCRIPT = """
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
folder, prompt, new_tokens, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[5])
torch.set_num_threads(int(sys.argv[4]))
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
model.generation_config.eos_token_id = None  # like ours here: always generate new_tokens tokens
ids = torch.tensor([prompt])
kwargs = dict(do_sample=False, use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(ids))
with torch.inference_mode():
    model.generate(ids, max_new_tokens=8, **kwargs)  # warm-up
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, **kwargs)
        seconds = min(seconds, time.perf_counter() - start)
print(json.dumps({"seconds": seconds, "tokens": out[0, len(prompt):].tolist(), "class": type(model).__name__,
                  "attn_implementation": model.config._attn_implementation}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("families")
    group.add_argument("--hf-python", default=None,
                       help="Python of a venv with transformers, for the comparison (skipped without)")
    group.add_argument("--decode-prompt-tokens", type=int, default=16, help="prompt length (random ids)")
    group.add_argument("--decode-new-tokens", type=int, default=256, help="greedy tokens to generate")
    group.add_argument("--family-repeats", type=int, default=4,
                       help="interleaved rounds of every decoder; each one's best round counts")
    group.add_argument("--family-window", type=int, default=4096,
                       help="sliding window of the Mistral-shaped model (Mistral 7B's: 4096)")
    group.add_argument("--family-compile", action=argparse.BooleanOptionalAction, default=True,
                       help="also time our decoding compiled (on a CPU as generate.py --compile compiles)")
    group.add_argument("--family-device", choices=("cpu", "cuda"), default="cpu",
                       help="cpu: fp32 against transformers; cuda: bf16, eager and compiled")


def random_mistral_124m(window: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(0)
    with torch.device(device):
        return GPT(get_config("mistral-tiny", **MISTRAL_124M, sliding_window=window)).to(dtype).eval()


def best_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int,
                setting: str) -> tuple[list[int], dict]:
    """generate() greedy with its KV cache: a warm-up run (which also compiles), then the best of repeats."""
    run = lambda: [int(t) for t in generate(model, prompt, new_tokens, temperature=0)]  # int() waits for the device
    tokens, seconds = run(), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds = min(seconds, time.perf_counter() - start)
    return tokens, {"benchmark": "decode", "setting": setting, "tokens_per_s": round(new_tokens / seconds, 1)}


def transformers_decode(hf_python: str, model: GPT, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder, {"model_type": "mistral", "tokenizer": "gpt2"}, force=True)
        out = subprocess.run([hf_python, "-c", HF_SCRIPT, folder, json.dumps(prompt[0].tolist()), str(new_tokens),
                              str(torch.get_num_threads()), str(repeats)], capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the transformers run with {hf_python} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_gpu(args: argparse.Namespace) -> list[dict]:
    if not torch.cuda.is_available():
        raise UserError("--family-device cuda needs a CUDA GPU, and this machine has none")
    model = random_mistral_124m(args.family_window, "cuda", torch.bfloat16)
    n = args.decode_new_tokens
    prompt = torch.randint(0, model.config.vocab_size, (1, args.decode_prompt_tokens), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(0))
    setting = (f"Mistral-shaped {model.num_params() / 1e6:.1f}M bf16 {torch.cuda.get_device_name()}, "
               f"window {args.family_window}, batch 1, prompt {prompt.size(1)}, {n} new")
    eager, row = best_decode(model, prompt, n, args.family_repeats, f"{setting}: eager")
    rows = [row]
    variants = {"torch.compile": lambda: torch.compile(model),
                "torch.compile mode=reduce-overhead": lambda: torch.compile(model, mode="reduce-overhead")}
    for name, compile_model in variants.items() if args.family_compile else ():
        try:
            tokens, row = best_decode(compile_model(), prompt, n, args.family_repeats, f"{setting}: {name}")
            # bf16 rounding differs between fused and eager kernels, so tokens may drift apart
            row["note"] = f"same tokens as eager: {tokens == eager}"
        except Exception as e:  # one failing variant should not hide the others' numbers
            row = {"benchmark": "decode", "setting": f"{setting}: {name}",
                   "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        torch._dynamo.reset()
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    if args.family_device == "cuda":
        return run_gpu(args)
    model = random_mistral_124m(args.family_window)
    n = args.decode_new_tokens
    prompt = torch.randint(0, model.config.vocab_size, (1, args.decode_prompt_tokens),
                           generator=torch.Generator().manual_seed(0))
    setting = (f"Mistral-shaped {model.num_params() / 1e6:.1f}M fp32 CPU ({torch.get_num_threads()} threads), "
               f"window {args.family_window}, batch 1, prompt {prompt.size(1)}, {n} new")
    freezing = partial(torch._inductor.config.patch, freezing=True)  # as generate.py --compile does on a CPU
    decoders = {"ours": (model, nullcontext)}
    if args.family_compile:
        start = time.perf_counter()
        with freezing():
            compiled = torch.compile(model)
            [int(t) for t in generate(compiled, prompt, n, temperature=0)]  # compiles
        decoders["compiled"] = (compiled, freezing)
        compile_s = time.perf_counter() - start
    # Rounds interleave the decoders, so the slow spells of a shared machine fall on all of them alike;
    # each decoder's figure is its best round, and each round gives a ratio to transformers.
    rounds: dict[str, list[float]] = {name: [] for name in (*decoders, "transformers")}
    tokens = {}
    for _ in range(args.family_repeats):
        for name, (decoder, context) in decoders.items():
            with context():
                tokens[name], row = best_decode(decoder, prompt, n, 1, "")
            rounds[name].append(row["tokens_per_s"])
        if args.hf_python:
            hf = transformers_decode(args.hf_python, model, prompt, n, 1)
            tokens["transformers"], hf_class = hf["tokens"], f"{hf['class']}.generate ({hf['attn_implementation']} attention)"
            rounds["transformers"].append(round(n / hf["seconds"], 1))
    labels = {name: label for name, label in (("ours", "KV cache (ours)"),
                                              ("compiled", "KV cache, --compile: frozen weights (ours)"))
              if name in decoders}  # --no-family-compile: no compiled row
    if args.hf_python:
        labels["transformers"] = f"transformers {hf_class}"
    rows = []
    for name, label in labels.items():
        row = {"benchmark": "decode", "setting": f"{setting}: {label}", "tokens_per_s": max(rounds[name]),
               "same_tokens": tokens[name] == tokens["ours"] if name != "ours" else "",
               "note": f"best of {len(rounds[name])} interleaved rounds"}
        if name == "compiled":
            row["note"] += f"; compiling took {compile_s:.0f} s"
        if args.hf_python and name != "transformers":
            ratios = sorted(ours / theirs for ours, theirs in zip(rounds[name], rounds["transformers"]))
            row["note"] += (f"; vs transformers per round: {', '.join(f'{r:.2f}x' for r in ratios)} (median "
                            f"{statistics.median(ratios):.2f}x; target >= 1x)")
        rows.append(row)
    return rows
