"""Decoding benchmarks of generate.py: GPT-2 124M, batch 1, greedy, random weights.

    python tests/bench.py generate --hf-python VENV/bin/python     # this CPU, fp32
    python tests/bench.py gpu                                      # CUDA, bf16 (decoding part)

`generate` (CPU, fp32): a 16-token prompt and 256 new tokens through generate() with its KV cache,
eager and compiled the way `generate.py --compile` compiles on a CPU; a loop that recomputes the
whole sequence for every token; and Hugging Face transformers' GPT2LMHeadModel.generate on the same
weights. transformers is not a dependency of this project: it runs in a subprocess with the Python of
a throwaway venv that has it (--hf-python). Targets (issue 3): the cache >= 3x the recomputing loop,
and >= transformers' tokens/s in the same run.
`gpu` (CUDA, bf16): eager, torch.compile as `generate.py --compile`, and torch.compile with CUDA
graphs; target >= 1000 tokens/s compiled. The training step is in bench_parts/train.py.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: model.py & co.
from generate import generate  # noqa: E402
from load_gpt2 import export_hf  # noqa: E402
from model import GPT, get_config  # noqa: E402
from tokenizer import UserError  # noqa: E402

# Run by the venv's Python: argv = folder (Hub layout), prompt ids (JSON), new tokens, threads.
HF_SCRIPT = """
import json, sys, time
import torch
from transformers import GPT2LMHeadModel
folder, prompt, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
model.generation_config.eos_token_id = None  # like ours here: always generate new_tokens tokens
ids = torch.tensor([prompt])
kwargs = dict(do_sample=False, use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(ids))
with torch.inference_mode():
    model.generate(ids, max_new_tokens=8, **kwargs)  # warm-up
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, **kwargs)
    seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tokens": out[0, len(prompt):].tolist(),
                  "attn_implementation": model.config._attn_implementation}))
"""


def add_arguments(parser: argparse.ArgumentParser, gpu: bool = False) -> None:
    """The decoding flags; the gpu run has no transformers comparison, so no --hf-python."""
    group = parser.add_argument_group("generate")
    if not gpu:
        group.add_argument("--hf-python", default=None,
                           help="Python of a venv with transformers, for the comparison (skipped without)")
    group.add_argument("--decode-prompt-tokens", type=int, default=16, help="prompt length (random ids)")
    group.add_argument("--decode-new-tokens", type=int, default=256, help="greedy tokens to generate")


def random_gpt2(device: str = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(0)
    with torch.device(device):
        return GPT(get_config("gpt2")).to(dtype).eval()


def decode_row(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, setting: str) -> tuple[list[int], dict]:
    """Time generate() (greedy, KV cache) after a warm-up run, which also triggers any compilation."""
    run = lambda: [int(t) for t in generate(model, prompt, new_tokens, temperature=0)]  # int() waits for the device
    run()
    start = time.perf_counter()
    tokens = run()
    seconds = time.perf_counter() - start
    return tokens, {"benchmark": "decode", "setting": setting, "tokens_per_s": round(new_tokens / seconds, 1)}


def greedy_without_cache(model: GPT, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """The baseline the KV cache saves us from: the whole sequence again for every token."""
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits, _ = model(ids, last_only=True)  # (1, 1, V)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -new_tokens:].tolist()


def transformers_decode(hf_python: str, model: GPT, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Run HF_SCRIPT in the venv of hf_python on model's weights, exported in the Hub's layout."""
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder)
        out = subprocess.run([hf_python, "-c", HF_SCRIPT, folder, json.dumps(prompt[0].tolist()), str(new_tokens),
                              str(torch.get_num_threads())], capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the transformers run with {hf_python} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_generate(args: argparse.Namespace) -> list[dict]:
    model = random_gpt2()
    n = args.decode_new_tokens
    prompt = torch.randint(0, 50257, (1, args.decode_prompt_tokens), generator=torch.Generator().manual_seed(0))
    setting = f"GPT-2 124M fp32 CPU ({torch.get_num_threads()} threads), batch 1, prompt {prompt.size(1)}, {n} new"
    ours, cached = decode_row(model, prompt, n, f"{setting}: KV cache (ours)")
    with torch._inductor.config.patch(freezing=True):  # as generate.py --compile does on a CPU
        compiled_tokens, compiled = decode_row(torch.compile(model), prompt, n,
                                               f"{setting}: KV cache, --compile: frozen weights (ours)")
    compiled["same_tokens"] = compiled_tokens == ours
    start = time.perf_counter()
    plain = greedy_without_cache(model, prompt, n)
    recompute = {"benchmark": "decode", "setting": f"{setting}: recompute every step (ours)",
                 "tokens_per_s": round(n / (time.perf_counter() - start), 1), "same_tokens": plain == ours}
    cached["note"] = f"{cached['tokens_per_s'] / recompute['tokens_per_s']:.1f}x recompute (target >= 3x)"
    rows = [cached, compiled, recompute]
    if args.hf_python:
        hf = transformers_decode(args.hf_python, model, prompt, n)
        hf_tokens_per_s = n / hf["seconds"]
        rows.append({"benchmark": "decode", "setting": f"{setting}: transformers GPT2LMHeadModel.generate "
                     f"({hf['attn_implementation']} attention)", "tokens_per_s": round(hf_tokens_per_s, 1),
                     "same_tokens": hf["tokens"] == ours})
        for row in (cached, compiled):
            vs = f"{row['tokens_per_s'] / hf_tokens_per_s:.2f}x transformers (target >= 1x)"
            row["note"] = f"{row['note']}, {vs}" if "note" in row else vs
    return rows


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
