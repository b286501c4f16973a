"""Load benchmark: wall time and peak memory to load checkpoints in the Hub's layout from local disk.

Two cases, each written as a random checkpoint into a temporary folder (--load-dir), tensor by
tensor and in row chunks, so writing never holds the model:

- GPT-2 sizes (--load-models), float32 files in the Hub's original layout (config.json + a
  model.safetensors with unprefixed names and the attn.bias mask buffers, like openai-community/gpt2's
  file), loaded into each of --load-dtypes by load_gpt2 and, with --hf-python, by transformers'
  GPT2LMHeadModel.from_pretrained on the same folder.
- A Mistral-7B-shaped checkpoint (--mistral-layers of Mistral 7B v0.1's 32; 0 skips it) in bfloat16,
  cut into shards of at most 5 GB with model.safetensors.index.json as the Hub's are, loaded in
  bfloat16 by load_gpt2 (load time and peak RSS against the model's size, target <= 1.15x), then a
  few greedy tokens through generate() with their tokens/s; then loaded again with int8 weights, as
  generate.py --quantize int8 loads it (each matrix quantised as it leaves the file), and decoded the
  same way. The real shape needs ~15 GB of disk and of memory; a smaller --mistral-layers shows the
  same ratios on a laptop.

Files are read once before each measurement so every loader finds them in the page cache: the
loaders are timed, not the disk. Each measurement runs in a fresh subprocess; peak RSS is that
process's VmHWM (ru_maxrss elsewhere), "import" the peak before loading (Python + torch), and the
ratios divide by the model's size in the dtype. transformers leaves float32 weights in the
memory-mapped file, paged in when first read, so its load-time peak can be below the model's size:
"peak_after_use" is the peak once every weight has been read once, as the first forward pass does.

    python tests/bench.py load --hf-python VENV/bin/python
    python tests/bench.py load --load-models --mistral-layers 2       # the Mistral case, small
"""
import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch



REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import load_gpt2  # noqa: E402
from model import PRESETS, get_config

# Peak RSS of this process: Linux's VmHWM (ru_maxrss would carry over the parent's peak through
# fork and exec); elsewhere ru_maxrss (bytes on macOS).
PEAK_RSS = """
def peak_rss():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""
OURS = f"""
import json, resource, sys, time
sys.path.insert(0, {str(REPO)!r})
import torch, load_gpt2
{PEAK_RSS}
before = peak_rss()
start = time.perf_counter()
model, _ = load_gpt2.load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - start
peak = peak_rss()
for p in model.parameters():  # read every weight once, as a forward pass would
    p.sum()
print(json.dumps({{"seconds": seconds, "import_rss": before, "peak_rss": peak, "touched_rss": peak_rss()}}))
"""
TRANSFORMERS = f"""
import json, resource, sys, time
import torch, transformers
{PEAK_RSS}
before = peak_rss()
start = time.perf_counter()
dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
model = transformers.GPT2LMHeadModel.from_pretrained(sys.argv[1], **{{dtype_arg: getattr(torch, sys.argv[2])}})
seconds = time.perf_counter() - start
peak = peak_rss()
for p in model.parameters():  # read every weight once, as a forward pass would
    p.sum()
print(json.dumps({{"seconds": seconds, "import_rss": before, "peak_rss": peak, "touched_rss": peak_rss()}}))
"""
# Load in bfloat16 (or int8 weights, as generate.py --quantize int8 does), then greedy tokens:
# argv = folder, prompt length, new tokens, "bfloat16" or "int8".
OURS_DECODE = f"""
import json, resource, sys, time
sys.path.insert(0, {str(REPO)!r})
import torch, load_gpt2
from generate import generate, load_for_generation
{PEAK_RSS}
before = peak_rss()
start = time.perf_counter()
if sys.argv[4] == "int8":
    model, _ = load_for_generation(sys.argv[1], dtype=torch.bfloat16, quantize="int8")
else:
    model, _ = load_gpt2.load_model(sys.argv[1], dtype=torch.bfloat16)
model.eval()
seconds = time.perf_counter() - start
peak = peak_rss()
prompt = torch.randint(0, model.config.vocab_size, (1, int(sys.argv[2])), generator=torch.Generator().manual_seed(0))
times, tokens = [time.perf_counter()], []
for token in generate(model, prompt, int(sys.argv[3]), temperature=0):
    tokens.append(int(token))
    times.append(time.perf_counter())
print(json.dumps({{"seconds": seconds, "import_rss": before, "peak_rss": peak, "decode_rss": peak_rss(),
                  "weights_bytes": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
                  "first_token_s": times[1] - times[0], "later_tokens_s": times[-1] - times[1], "tokens": tokens}}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("load")
    group.add_argument("--load-models", nargs="*", default=["gpt2", "gpt2-medium"], choices=list(load_gpt2.GPT2_REPOS),
                       help="GPT-2 sizes to write random checkpoints of (gpt2-medium: 1.4 GB of disk); none skips them")
    group.add_argument("--load-dtypes", nargs="+", default=["float32", "bfloat16"],
                       help="dtypes to load the GPT-2 files into (the files are float32, as on the Hub)")
    group.add_argument("--mistral-layers", type=int, default=32,
                       help="layers of the Mistral-7B-shaped bfloat16 checkpoint (32: Mistral 7B's 7.24B "
                            "parameters, 14.5 GB; 0 skips it)")
    group.add_argument("--mistral-new-tokens", type=int, default=4, help="greedy tokens decoded after loading it")
    group.add_argument("--load-dir", type=Path, default=None,
                       help="folder for the temporary checkpoints (default: the system's temporary folder)")
    try:
        group.add_argument("--hf-python", default=None,
                           help="python of a venv with transformers, to time its from_pretrained on the same files")
    except argparse.ArgumentError:  # another bench part (generate) already offers the same flag
        pass


def write_random_shards(folder: Path, tensors: dict[str, tuple[tuple[int, ...], str]], dtype: torch.dtype,
                        max_shard_bytes: int = load_gpt2.MAX_SHARD_BYTES) -> None:
    """Random safetensors shards named as the Hub names them (model.safetensors when one is enough),
    plus model.safetensors.index.json, written tensor by tensor and a few MB of rows at a time.

    tensors: name -> (shape, fill), fill "normal" (std 0.02), "ones" (norm gains) or "causal" (GPT-2's
    lower-triangular mask buffer)."""
    element = torch.empty(0, dtype=dtype).element_size()
    names, shards = load_gpt2.plan_shards({name: element * torch.Size(shape).numel()
                                           for name, (shape, _) in tensors.items()}, max_shard_bytes)
    dtype_name = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    generator = torch.Generator().manual_seed(0)
    for file_name, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in shard:
            shape = tensors[name][0]
            nbytes = element * torch.Size(shape).numel()
            header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / file_name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in shard:
                shape, fill = tensors[name]
                rows = shape[0] if shape else 1
                step = max(1, (16 << 20) // max(1, torch.Size(shape[1:]).numel() * 4))
                for first in range(0, rows, step):
                    chunk_shape = (min(step, rows - first), *shape[1:])
                    if fill == "ones":
                        chunk = torch.ones(chunk_shape)
                    elif fill == "causal":
                        chunk = torch.ones(shape[-2:]).tril().expand(chunk_shape)
                    else:
                        chunk = torch.empty(chunk_shape).normal_(0.0, 0.02, generator=generator)
                    f.write(chunk.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(element * torch.Size(s).numel() for s, _ in tensors.values())},
                 "weight_map": {name: file_name for file_name, shard in zip(names, shards) for name in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_random_hub_checkpoint(name: str, folder: Path) -> int:
    """A random float32 GPT-2 `name` in the Hub's original layout; returns the parameter count."""
    config = PRESETS[name]
    model = load_gpt2.meta_model(config)
    tensors = {}
    for hub_name, (_, _, shape, _) in load_gpt2.hub_tensors("gpt2", model).items():
        short = hub_name.removeprefix("transformer.")
        tensors[short] = (shape, "ones" if ".ln_" in hub_name and short.endswith("weight") else "normal")
        if hub_name.endswith("attn.c_attn.bias"):  # the causal-mask buffer the Hub's gpt2 file carries per layer
            tensors[short.replace("c_attn.bias", "bias")] = ((1, 1, config.block_size, config.block_size), "causal")
    folder.mkdir(parents=True, exist_ok=True)
    write_random_shards(folder, tensors, torch.float32)
    (folder / "config.json").write_text(json.dumps(load_gpt2.hf_config(config, "gpt2", torch.float32)))
    return model.num_params()


def write_random_mistral(folder: Path, n_layer: int) -> int:
    """A random bfloat16 Mistral-7B-shaped checkpoint (n_layer of its 32 layers), sharded as the Hub's."""
    config = get_config("mistral-7b", n_layer=n_layer)
    model = load_gpt2.meta_model(config)
    tensors = {hub_name: (shape, "ones" if "norm" in hub_name else "normal")
               for hub_name, (_, _, shape, _) in load_gpt2.hub_tensors("mistral", model).items()}
    folder.mkdir(parents=True, exist_ok=True)
    write_random_shards(folder, tensors, torch.bfloat16)
    (folder / "config.json").write_text(json.dumps(load_gpt2.hf_config(config, "mistral", torch.bfloat16)))
    return model.num_params()


def read_through(folder: Path) -> int:
    """Read every weight file once (into the page cache); returns their total size in bytes."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            while block := f.read(64 << 20):
                total += len(block)
    return total


def measure(python: str, script: str, *argv: str) -> dict:
    result = subprocess.run([python, "-c", script, *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the measurement failed: {(result.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def export_check_rows(hf_python: str, tmp: Path) -> list[dict]:
    """transformers reads our exports: each family's fixture, loaded by us and exported (mistral's in
    shards), must give the logits transformers gave it (make_hf_fixture.py, make_hf_families.py --check-export)."""
    fixtures = REPO / "tests" / "fixtures"
    checks = [("gpt2", [str(fixtures / "make_hf_fixture.py")])] + \
        [(family, [str(fixtures / "make_hf_families.py"), "--family", family])
         for family in ("mistral", "phi", "phi3", "llama")]
    rows = []
    for family, command in checks:
        model, card = load_gpt2.load_model(str(fixtures / f"hf_tiny_{family}"))
        # the mistral export is cut into shards with an index, as the Hub's large checkpoints are
        load_gpt2.export_hf(model, tmp / f"export_{family}", card, max_shard_bytes=60_000 if family == "mistral"
                            else load_gpt2.MAX_SHARD_BYTES)
        result = subprocess.run([hf_python, *command, "--check-export", str(tmp / f"export_{family}")],
                                capture_output=True, text=True)
        rows.append({"bench": "load", "model": f"{family} fixture export", "loader": "transformers",
                     "ok": result.returncode == 0, "detail": result.stdout.strip().splitlines()[-1]
                     if result.stdout.strip() else result.stderr[-200:]})
    return rows


def memory_columns(m: dict, model_bytes: int) -> dict:
    return {"peak_rss_mb": round(m["peak_rss"] / 1e6), "import_rss_mb": round(m["import_rss"] / 1e6),
            "peak/model": round(m["peak_rss"] / model_bytes, 3),
            "(peak-import)/model": round((m["peak_rss"] - m["import_rss"]) / model_bytes, 3)}


def gpt2_rows(args: argparse.Namespace, tmp: Path) -> list[dict]:
    rows = []
    for name in args.load_models:
        folder = tmp / name
        n_params = write_random_hub_checkpoint(name, folder)
        file_bytes = read_through(folder)
        loaders = [("ours", sys.executable, OURS)]
        if args.hf_python:
            loaders.append(("transformers", args.hf_python, TRANSFORMERS))
        for dtype in args.load_dtypes:
            model_bytes = n_params * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            for loader, python, script in loaders:
                m = measure(python, script, str(folder), dtype)
                rows.append({"bench": "load", "model": name, "loader": loader, "dtype": dtype,
                             "file_mb": round(file_bytes / 1e6), "model_mb": round(model_bytes / 1e6),
                             "seconds": round(m["seconds"], 2), **memory_columns(m, model_bytes),
                             "peak_after_use_mb": round(m["touched_rss"] / 1e6)})
        for path in folder.glob("*.safetensors"):
            path.unlink()  # free the disk before the next size
    return rows


def mistral_rows(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """The bfloat16 shards loaded in bfloat16 (peak against the model's size, target <= 1.15x), then
    with int8 weights as generate.py --quantize int8 loads them (issue 13: a 7B model in about 8 GB)."""
    folder = tmp / "mistral"
    n_params = write_random_mistral(folder, args.mistral_layers)
    file_bytes = read_through(folder)
    shards = len(list(folder.glob("*.safetensors")))
    n = args.mistral_new_tokens
    rows = []
    for weights in ("bfloat16", "int8"):
        m = measure(sys.executable, OURS_DECODE, str(folder), "16", str(n), weights)
        model_bytes = n_params * 2 if weights == "bfloat16" else m["weights_bytes"]
        rows.append({"bench": "load", "model": f"Mistral-7B-shaped, {args.mistral_layers} of 32 layers, "
                     f"{n_params / 1e9:.2f}B params, {shards} shard(s)",
                     "loader": "ours" if weights == "bfloat16" else "ours, generate.py --quantize int8",
                     "dtype": weights, "file_mb": round(file_bytes / 1e6), "model_mb": round(model_bytes / 1e6),
                     "seconds": round(m["seconds"], 2), **memory_columns(m, model_bytes),
                     "peak_while_decoding_mb": round(m["decode_rss"] / 1e6),
                     "first_token_s": round(m["first_token_s"], 2),
                     "tokens_per_s": round((n - 1) / m["later_tokens_s"], 2) if n > 1 else None,
                     "note": "target peak/model <= 1.15 (the import weighs more on a small shape)"
                     if weights == "bfloat16" else "weights: int8 matrices with their scales, bfloat16 norms"})
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    if args.load_dir is not None:
        args.load_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_load_", dir=args.load_dir) as tmp:
        tmp = Path(tmp)
        if args.hf_python:
            rows += export_check_rows(args.hf_python, tmp)
        rows += gpt2_rows(args, tmp)
        if args.mistral_layers > 0:
            rows += mistral_rows(args, tmp)
    return rows
