"""Load benchmark: wall time and peak memory to load GPT-2-sized checkpoints from local disk.

For each size it writes a random checkpoint in the Hub's original layout (config.json + a
model.safetensors with unprefixed names and the attn.bias mask buffers, like openai-community/gpt2's
file) to a temporary folder, reads it once so both loaders find it in the page cache, then loads it
in a fresh subprocess per measurement: load_gpt2.load_gpt2, and with --hf-python transformers'
GPT2LMHeadModel.from_pretrained on the same folder. Peak RSS is ru_maxrss of that subprocess; "import"
is the peak before loading (Python + torch), and the ratios divide by the model's size in the dtype.
transformers leaves float32 weights in the memory-mapped file, paged in when first read, so its
load-time peak can be below the model's size: "peak_after_use" is the peak once every weight has
been read once, as the first forward pass does.

    python tests/bench.py load --hf-python VENV/bin/python
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import load_gpt2  # noqa: E402
from model import PRESETS  # noqa: E402

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
model = load_gpt2.load_gpt2(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("load")
    group.add_argument("--load-models", nargs="+", default=["gpt2", "gpt2-medium"], choices=list(load_gpt2.GPT2_REPOS),
                       help="GPT-2 sizes to write random checkpoints of (gpt2-medium: 1.4 GB of disk)")
    group.add_argument("--load-dtypes", nargs="+", default=["float32", "bfloat16"],
                       help="dtypes to load into (the files are float32, as on the Hub)")
    try:
        group.add_argument("--hf-python", default=None,
                           help="python of a venv with transformers, to time its from_pretrained on the same files")
    except argparse.ArgumentError:  # another bench part (generate) already offers the same flag
        pass


def write_random_hub_checkpoint(name: str, folder: Path) -> int:
    """A random float32 GPT-2 `name` in the Hub's original layout; returns the parameter count."""
    config = PRESETS[name]
    model = load_gpt2.meta_model(config)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for ours, shape in load_gpt2._hub_shapes(model).items():
        tensors[ours.removeprefix("transformer.")] = torch.randn(shape, generator=generator) * 0.02
        if ours.endswith("attn.c_attn.bias"):  # the causal-mask buffer the Hub's gpt2 file carries per layer
            size = config.block_size
            tensors[ours.removeprefix("transformer.").replace("c_attn.bias", "bias")] = \
                torch.ones(size, size).tril().view(1, 1, size, size)
    folder.mkdir(parents=True, exist_ok=True)
    load_gpt2.write_safetensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(load_gpt2.hf_config(config, torch.float32)))
    return model.num_params()


def measure(python: str, script: str, folder: Path, dtype: str) -> dict:
    result = subprocess.run([python, "-c", script, str(folder), dtype], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def export_check_row(hf_python: str, tmp: Path) -> dict:
    """transformers reads our export: the fixture, loaded by us and exported, must give its logits."""
    fixture = REPO / "tests" / "fixtures" / "hf_tiny_gpt2"
    load_gpt2.export_hf(load_gpt2.load_gpt2(fixture), tmp / "export")
    result = subprocess.run([hf_python, str(REPO / "tests" / "fixtures" / "make_hf_fixture.py"),
                             "--check-export", str(tmp / "export")], capture_output=True, text=True)
    return {"bench": "load", "model": "fixture export", "loader": "transformers", "ok": result.returncode == 0,
            "detail": result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-200:]}


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        tmp = Path(tmp)
        if args.hf_python:
            rows.append(export_check_row(args.hf_python, tmp))
        for name in args.load_models:
            folder = tmp / name
            n_params = write_random_hub_checkpoint(name, folder)
            file_bytes = (folder / "model.safetensors").stat().st_size
            (folder / "model.safetensors").read_bytes()  # into the page cache: time the loaders, not the disk
            loaders = [("ours", sys.executable, OURS)]
            if args.hf_python:
                loaders.append(("transformers", args.hf_python, TRANSFORMERS))
            for dtype in args.load_dtypes:
                model_bytes = n_params * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
                for loader, python, script in loaders:
                    m = measure(python, script, folder, dtype)
                    rows.append({
                        "bench": "load", "model": name, "loader": loader, "dtype": dtype,
                        "file_mb": round(file_bytes / 1e6), "model_mb": round(model_bytes / 1e6),
                        "seconds": round(m["seconds"], 2),
                        "peak_rss_mb": round(m["peak_rss"] / 1e6), "import_rss_mb": round(m["import_rss"] / 1e6),
                        "peak/model": round(m["peak_rss"] / model_bytes, 2),
                        "(peak-import)/model": round((m["peak_rss"] - m["import_rss"]) / model_bytes, 2),
                        "peak_after_use_mb": round(m["touched_rss"] / 1e6),
                    })
            (folder / "model.safetensors").unlink()  # free the disk before the next size
    return rows

