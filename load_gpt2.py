"""OpenAI's GPT-2 weights in, our models out: safetensors read and written with our own code.

load_gpt2() fetches the Hugging Face Hub's openai-community GPT-2 files once into the download cache
(or takes a local model.safetensors, or a folder in the Hub's layout) and loads them into model.py's
GPT without ever holding two copies of the weights. load_model() is what every stage calls for its
--init: a GPT-2 name or file, one of our checkpoints, or a random model of a preset. export_hf()
writes any GPT-2-shaped model of ours back in the Hub's layout, for transformers'
GPT2LMHeadModel.from_pretrained.

    python load_gpt2.py --model gpt2 --prompt "Hello, I'm a language model,"
    python load_gpt2.py --export out/hf --init out/ckpt.pt
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import struct
import time
from pathlib import Path

import numpy as np
import requests
import torch

from model import GPT, GPTConfig, PRESETS, add_device_args, device_and_dtype, get_config, load_checkpoint, unwrap
from tokenizer import (HUB_URL, ArgumentParser, DownloadError, UserError, cache_dir, download, get_tokenizer, positive_int,
                       run_stage)

# ---------------------------------------------------------------------------------------------------
# Safetensors, read and written with numpy. The format: an 8-byte little-endian header length N,
# N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
# then the raw little-endian tensor bytes; offsets count from the end of the header.

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# numpy has no bfloat16: BF16 is read as uint16 and viewed as bfloat16 by torch (same bits)
NUMPY_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
COPY_CHUNK_BYTES = 16 << 20  # the file bytes loaded at a time: bounds the memory a load needs beyond the model
MAX_HEADER_BYTES = 100_000_000  # gpt2-xl's header is 60 kB; a larger claim is a corrupt file, not a big model


class SafetensorsError(UserError):
    """A file that is not a valid safetensors file; the message names the file and the problem."""


def _check_int(value, what: str) -> int:
    # bool is an int to Python, but true/false in a shape is a corrupt header
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} is {value!r}, not a non-negative integer")
    return value


def _parse_header(raw: bytes, data_length: int) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict]:
    """Validate the JSON header against the data's length; ValueError says what is wrong.

    Returns {name: (dtype, shape, begin, end)} ordered by offset, and the metadata dict."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("its header nests too deeply") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"its header is not UTF-8 JSON ({str(e)[:100]})") from None
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("its __metadata__ is not an object of strings")
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {name!r} is not described by exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype!r}; only {', '.join(SAFETENSORS_DTYPES)} are supported")
        if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
            raise ValueError(f"tensor {name!r} needs a shape list and two data_offsets")
        shape = tuple(_check_int(d, f"a dimension of {name!r}") for d in shape)
        begin, end = (_check_int(o, f"an offset of {name!r}") for o in offsets)
        if not begin <= end <= data_length:
            raise ValueError(f"tensor {name!r} lies at bytes {begin}..{end}, outside the {data_length} data bytes")
        if math.prod(max(d, 1) for d in shape) >= 2**63:  # torch's sizes and strides are int64
            raise ValueError(f"tensor {name!r} has an impossible shape {list(shape)}")
        nbytes = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise ValueError(f"tensor {name!r} of shape {list(shape)} and dtype {dtype} needs {nbytes} bytes "
                             f"but its offsets span {end - begin}")
        entries[name] = (dtype, shape, begin, end)
    entries = dict(sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])))
    previous_name, previous_end = None, 0
    for name, (_, _, begin, end) in entries.items():
        if begin < previous_end:
            raise ValueError(f"tensors {previous_name!r} and {name!r} overlap")
        if end > begin:  # an empty tensor overlaps nothing
            previous_name, previous_end = name, end
    return entries, metadata


class SafetensorsFile:
    """A validated, memory-mapped safetensors file; tensor(name) reads a tensor without copying it.

    The mapping is copy-on-write, so writing into a returned tensor never changes the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                file_size = os.fstat(f.fileno()).st_size
                if file_size < 8:
                    raise ValueError(f"it has {file_size} bytes, fewer than the 8-byte header length")
                (header_length,) = struct.unpack("<Q", f.read(8))
                if header_length > min(file_size - 8, MAX_HEADER_BYTES):
                    raise ValueError(f"it declares a {header_length}-byte header but has {file_size} bytes")
                self.data_start = 8 + header_length
                self.entries, self.metadata = _parse_header(f.read(header_length), file_size - self.data_start)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise SafetensorsError(f"cannot read {self.path}: {e.strerror or e}") from None
        except ValueError as e:
            raise SafetensorsError(f"{self.path} is not a valid safetensors file: {e}") from None

    def names(self) -> list[str]:
        """Tensor names in the order of their bytes in the file."""
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        count = (end - begin) // NUMPY_DTYPES[dtype].itemsize
        if count == 0:
            return torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])
        array = np.frombuffer(self._map, dtype=NUMPY_DTYPES[dtype], count=count, offset=self.data_start + begin)
        if not array.flags.aligned:  # files from the safetensors library are aligned; others get a copy
            array = array.copy()
        return torch.from_numpy(array).view(SAFETENSORS_DTYPES[dtype]).view(shape)

    def release(self, name: str, first_row: int = 0, end_row: int | None = None) -> None:
        """Hand the file pages behind rows [first_row, end_row) of `name` back to the OS once copied.

        Mapped pages that have been read count in this process's resident memory until the mapping
        goes; without this, loading gpt2-xl would end with the 6.4 GB file resident next to the 6.4 GB
        model. A tensor still viewing those bytes stays valid: the next read pages them in again."""
        if not hasattr(self._map, "madvise"):  # Windows: no madvise, the pages stay until close
            return
        _, shape, begin, end = self.entries[name]
        rows = shape[0] if shape else 1
        row_bytes = (end - begin) // max(rows, 1)
        end_row = rows if end_row is None else end_row
        start = (self.data_start + begin + first_row * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self.data_start + begin + end_row * row_bytes
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, memory-mapped (copy-on-write), in file order."""
    file = SafetensorsFile(path)
    return {name: file.tensor(name) for name in file.names()}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (float32, float16 or bfloat16; any device) as a safetensors file, atomically.

    Tensors are written one at a time, so a transposed or on-GPU tensor costs one tensor of memory."""
    to_name = {torch_dtype: name for name, torch_dtype in SAFETENSORS_DTYPES.items()}
    header: dict[str, dict] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in to_name:
            raise ValueError(f"tensor {name!r} is {t.dtype}; safetensors files here hold {', '.join(map(str, to_name))}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": to_name[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad with spaces so the data starts 8-byte aligned, as the library does
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            # as raw bytes: numpy has no bfloat16, and the bits are what the file stores
            f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# The Hub's GPT-2 layout <-> ours

GPT2_REPOS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HUB_TREE_API = "https://huggingface.co/api/models/{repo}/tree/main"
# (size, sha256) of Hub files whose digests were confirmed by several independent sources; for the
# other files the Hub's API is asked (its lfs.oid is the file's sha256) before the first download.
HUB_PINNED = {
    ("openai-community/gpt2", "model.safetensors"):
        (548105171, "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"),
    ("openai-community/gpt2", "config.json"):
        (665, "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4"),
}
# HF's GPT-2 uses Conv1D for these four layers: a linear layer whose weight is stored (in, out),
# the transpose of nn.Linear's (out, in) (OpenAI's TensorFlow code multiplied x @ W). Same numbers,
# other orientation, so they are transposed on the way in and on the way out.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers that older transformers versions saved with the weights; our attention builds its mask.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation model.py's MLP uses


def hub_name_to_ours(name: str) -> str | None:
    """'h.0.attn.c_attn.weight' or 'transformer.h.0...' -> 'transformer.h.0...'; None for mask buffers.

    The Hub's original GPT-2 files were saved from GPT2Model (no prefix); save_pretrained of a
    GPT2LMHeadModel writes the 'transformer.' prefix. lm_head.weight keeps its name."""
    if name.endswith(MASK_BUFFERS):
        return None
    if name == "lm_head.weight":
        return name
    return "transformer." + name.removeprefix("transformer.")


def config_from_hf(path: Path) -> GPTConfig:
    """Our GPTConfig from a Hub config.json; UserError for a model our GPT cannot reproduce."""
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the model config {path} ({str(e)[:100]})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path} is not a model config (its JSON is not an object)")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path} is not a GPT-2 config (model_type {hf['model_type']!r})")
    fields = {}
    for ours, theirs in (("vocab_size", "vocab_size"), ("block_size", "n_positions"), ("n_layer", "n_layer"),
                         ("n_head", "n_head"), ("n_embd", "n_embd")):
        value = hf.get(theirs)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{path} has no positive integer {theirs} (found {value!r})")
        fields[ours] = value
    problems = []
    if hf.get("activation_function", "gelu_new") not in TANH_GELUS:
        problems.append(f"activation_function {hf['activation_function']!r}")
    if hf.get("n_inner") not in (None, 4 * fields["n_embd"]):
        problems.append(f"n_inner {hf['n_inner']!r}")
    epsilon = hf.get("layer_norm_epsilon", 1e-5)
    if not isinstance(epsilon, (int, float)) or not math.isclose(epsilon, 1e-5):
        problems.append(f"layer_norm_epsilon {epsilon!r}")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        problems.append("a non-standard attention scale")
    if hf.get("tie_word_embeddings") is False:
        problems.append("an untied LM head")
    if fields["n_embd"] % fields["n_head"]:
        problems.append(f"n_embd {fields['n_embd']} not divisible by n_head {fields['n_head']}")
    if problems:
        raise UserError(f"{path} describes a GPT-2 variant model.py does not implement: {', '.join(problems)}")
    return GPTConfig(**fields)


def config_from_shapes(file: SafetensorsFile) -> GPTConfig:
    """The GPT-2 preset whose every weight shape matches a file that came without its config.json.

    n_head cannot be read from shapes, so only the four GPT-2 sizes are recognised."""
    shapes = {hub_name_to_ours(name): shape for name, (_, shape, _, _) in file.entries.items()}
    for name in GPT2_REPOS:
        expected = _hub_shapes(meta_model(PRESETS[name]))
        if all(shapes.get(ours) == shape for ours, shape in expected.items()):
            return PRESETS[name]
    raise UserError(f"{file.path} has no config.json beside it and its shapes are not one of "
                    f"{', '.join(GPT2_REPOS)}; put the model's config.json next to it")


def meta_model(config: GPTConfig) -> GPT:
    """A GPT with the shapes of config and no memory behind its weights (the meta device).

    GPT skips its random init there: the weights are replaced before use anyway."""
    with torch.device("meta"):
        return GPT(config)


def _hub_shapes(model: GPT) -> dict[str, tuple[int, ...]]:
    """The Hub name and shape of every tensor model needs, in our 'transformer.' prefixed naming."""
    shapes = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":  # tied: the Hub's files store only wte
            continue
        shapes[name] = tuple(t.shape[::-1]) if name.endswith(CONV1D_WEIGHTS) else tuple(t.shape)
    return shapes


def load_hf_weights(path: str | Path, config: GPTConfig, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> GPT:
    """Load a Hub-layout GPT-2 model.safetensors into a GPT(config), tensor by tensor.

    The model is built on the meta device (shapes, no memory, no random init) and each tensor is
    copied from the memory-mapped file straight into a fresh tensor of the asked dtype on the asked
    device, releasing the file's pages as it goes: peak memory is the model plus COPY_CHUNK_BYTES."""
    file = SafetensorsFile(path)
    model = meta_model(config)
    expected = _hub_shapes(model)
    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for hub_name in file.names():  # file order, so the pages are read and released front to back
        name = hub_name_to_ours(hub_name)
        if name is None or name == "lm_head.weight":
            continue
        if name not in expected:
            unexpected.append(hub_name)
            continue
        if file.shape(hub_name) != expected[name]:
            raise UserError(f"{hub_name} in {file.path} has shape {list(file.shape(hub_name))}, but a GPT-2 with "
                            f"n_layer={config.n_layer}, n_embd={config.n_embd}, vocab_size={config.vocab_size}, "
                            f"block_size={config.block_size} needs {list(expected[name])}")
        source = file.tensor(hub_name)
        conv1d = name.endswith(CONV1D_WEIGHTS)
        param = torch.empty(source.shape[::-1] if conv1d else source.shape, dtype=dtype, device=device)
        # Copy a few MB of the file's rows at a time (dtype conversion, transpose and device transfer
        # in one pass), releasing their pages as we go, so even wte never sits in memory twice.
        rows = source.shape[0]
        step = max(1, COPY_CHUNK_BYTES // max(1, source[:1].numel() * source.element_size()))
        for first in range(0, rows, step):
            chunk = source[first:first + step]
            if conv1d:  # Conv1D (in, out) -> nn.Linear (out, in); see CONV1D_WEIGHTS
                param[:, first:first + step].copy_(chunk.t())
            else:
                param[first:first + step].copy_(chunk)
            file.release(hub_name, first, min(first + step, rows))
        state[name] = param
    missing = [name for name in expected if name not in state]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
        raise UserError(f"{file.path} does not hold the tensors of a GPT-2 with n_layer={config.n_layer}: "
                        f"{' and '.join(problems)}")
    if "lm_head.weight" in file.entries:  # some exporters store the tied head too; it must be wte
        wte = next(n for n in file.names() if hub_name_to_ours(n) == "transformer.wte.weight")
        if not torch.equal(file.tensor("lm_head.weight"), file.tensor(wte)):
            raise UserError(f"{file.path} has an lm_head.weight that differs from the token embedding; "
                            "model.py's GPT ties the two")
        file.release("lm_head.weight")
        file.release(wte)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, assign=True)  # assign: keep our tensors instead of copying into meta ones
    model.tie_weights()  # assign gave lm_head its own Parameter object; share wte's again
    return model


def hub_file_info(repo: str, filename: str) -> tuple[int, str | None]:
    """(size, sha256 or None) of a file in a Hub repo, from the Hub's file-listing API.

    Files stored with Git LFS report their sha256 as lfs.oid; small plain files only their size."""
    url = HUB_TREE_API.format(repo=repo)
    try:
        response = requests.get(url, timeout=(10, 60))
        response.raise_for_status()
        listing = response.json()
    except (requests.RequestException, ValueError) as e:
        raise DownloadError(f"could not ask the Hugging Face Hub about {repo} at {url} ({type(e).__name__}); "
                            "check your network connection") from None
    for entry in listing if isinstance(listing, list) else []:
        if isinstance(entry, dict) and entry.get("path") == filename:
            lfs = entry.get("lfs") or {}
            size, sha256 = lfs.get("size", entry.get("size")), lfs.get("oid")
            if isinstance(size, int) and (sha256 is None or isinstance(sha256, str)):
                return size, sha256
    raise DownloadError(f"the Hugging Face Hub's listing of {repo} at {url} gives no size for {filename}")


def fetch_gpt2(name: str) -> Path:
    """The cache folder holding config.json and model.safetensors of GPT-2 `name`, downloaded once."""
    repo = GPT2_REPOS[name]
    for filename in ("config.json", "model.safetensors"):
        relpath = f"hf/{repo}/{filename}"
        size, sha256 = HUB_PINNED.get((repo, filename), (None, None))
        if (cache_dir() / relpath).is_file():
            # Verified by its hash on the way in; checking the size now saves hashing gigabytes per load.
            sha256 = None
        elif size is None:
            size, sha256 = hub_file_info(repo, filename)
        path = download(HUB_URL.format(repo=repo, filename=filename), relpath, sha256=sha256, size=size)
    return path.parent


def load_gpt2(name_or_path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """GPT-2 weights as our GPT: a name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), downloaded once into
    the cache; a local folder in the Hub's layout (config.json + model.safetensors); or a local
    model.safetensors file (its config.json is read from beside it when there is one)."""
    if str(name_or_path) in GPT2_REPOS:
        folder = fetch_gpt2(str(name_or_path))
        weights, config_path = folder / "model.safetensors", folder / "config.json"
    else:
        path = Path(name_or_path)
        if path.is_dir():
            weights, config_path = path / "model.safetensors", path / "config.json"
            if not weights.is_file():
                raise UserError(f"folder {path} has no model.safetensors")
        elif path.is_file():
            weights, config_path = path, path.parent / "config.json"
        else:
            raise UserError(f"{str(name_or_path)!r} is neither a GPT-2 name ({', '.join(GPT2_REPOS)}) nor an "
                            "existing model.safetensors file or folder")
    if config_path.is_file():
        config = config_from_hf(config_path)
    else:
        config = config_from_shapes(SafetensorsFile(weights))
    return load_hf_weights(weights, config, device, dtype)


def is_checkpoint(path: Path) -> bool:
    """True for a torch.save file (a zip archive, as save_checkpoint writes), by its first bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def load_model(init: str, *, preset: str | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[GPT, dict]:
    """The model a stage starts from, and what else is known about it.

    init: "random" (a fresh GPT of `preset`, which is then required), a GPT-2 name, one of our
    checkpoints (save_checkpoint's .pt), or a Hub-layout folder or model.safetensors. A checkpoint or
    GPT-2 weights bring their own architecture, so `preset` is only read for "random".

    The dict holds a checkpoint's extra entries, and always the model's card (see model_card):
    "model_type", the Hub's name of its family, and "tokenizer", where its tokenizer comes from."""
    if init == "random":
        if preset is None:
            raise UserError(f"a random model needs a preset: one of {', '.join(PRESETS)}")
        try:
            config = get_config(preset)
        except ValueError as e:
            raise UserError(str(e)) from None
        with torch.device(device):  # initialise where the model will live
            model = GPT(config)
        return model.to(dtype), {"model_type": "gpt2", "tokenizer": "gpt2"}
    path = Path(init)
    if init not in GPT2_REPOS and path.is_file() and is_checkpoint(path):
        try:
            model, extra = load_checkpoint(path, device)
        except ValueError as e:
            raise UserError(str(e)) from None
        # checkpoints written before cards existed are GPT-2's
        return model.to(dtype), {"model_type": "gpt2", "tokenizer": "gpt2", **extra}
    return load_gpt2(init, device, dtype), {"model_type": "gpt2", "tokenizer": "gpt2"}


def model_card(extra: dict) -> dict:
    """What a stage saves with a checkpoint so that its users find the model's family and tokenizer
    again: save_checkpoint(path, model, **model_card(extra), ...) with extra from load_model."""
    return {"model_type": extra["model_type"], "tokenizer": extra["tokenizer"]}


def tokenizer_for(extra: dict):
    """The tokenizer of the model load_model returned with `extra`: an object with encode,
    encode_ordinary, decode, n_vocab, eot_token, bos_id and eos_id (see tokenizer.py)."""
    return get_tokenizer()


def add_init_args(parser: argparse.ArgumentParser, default: str, what: str = "starting weights") -> None:
    """--init and --preset, defined once for every stage that loads a model."""
    parser.add_argument("--init", default=default,
                        help=f"{what}: a GPT-2 name ({', '.join(GPT2_REPOS)}), one of our checkpoints (.pt), "
                             "a Hub-layout folder or model.safetensors, or 'random' (a new model of --preset)")
    parser.add_argument("--preset", default=None, choices=list(PRESETS), help="model size for --init random")


def hf_config(config: GPTConfig, dtype: torch.dtype) -> dict:
    """transformers' GPT2Config fields for our config (n_ctx is the old name of n_positions)."""
    hf = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    # GPT-2's <|endoftext|> where the vocabulary has it; None, not transformers' default 50256, elsewhere
    hf["bos_token_id"] = hf["eos_token_id"] = 50256 if config.vocab_size > 50256 else None
    return hf


def export_hf(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write config.json and model.safetensors in the Hub's GPT-2 layout (as save_pretrained does).

    Returns out_dir. Tensors keep the model's dtype; the tied lm_head is left out, as in the Hub's files."""
    gpt = unwrap(model)
    if gpt.config.num_classes is not None:
        raise UserError(f"this model is a {gpt.config.num_classes}-class classifier; only language models "
                        "export as a GPT2LMHeadModel")
    assert gpt.lm_head.weight is gpt.transformer.wte.weight, "the LM head must be tied to wte to export"
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, t in gpt.state_dict().items():
            if name != "lm_head.weight":
                tensors[name] = t.t() if name.endswith(CONV1D_WEIGHTS) else t  # back to Conv1D's (in, out)
        write_safetensors(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
        tmp = out_dir / "config.json.tmp"
        tmp.write_text(json.dumps(hf_config(gpt.config, gpt.transformer.wte.weight.dtype), indent=2) + "\n")
        os.replace(tmp, out_dir / "config.json")
    except OSError as e:
        raise UserError(f"cannot write the export to {out_dir}: {e.strerror or e}") from None
    return out_dir


# ---------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_init_args(parser, "gpt2", "the model to load")
    parser.add_argument("--model", dest="init", help="the same as --init")
    parser.add_argument("--prompt", default="Hello, I'm a language model,",
                        help="text whose most likely next tokens are shown, a check that the weights work")
    parser.add_argument("--top", type=positive_int, default=5, help="how many next tokens to show")
    parser.add_argument("--export", type=Path, default=None,
                        help="write the model to this folder in the Hub's layout instead")
    add_device_args(parser)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    device, dtype = device_and_dtype(args.device, args.dtype)
    start = time.perf_counter()
    model, extra = load_model(args.init, preset=args.preset, device=device, dtype=dtype)
    load_seconds = time.perf_counter() - start
    result = {"model": str(args.init), "params": model.num_params(), "load_seconds": load_seconds}
    print(f"{args.init}: {result['params']:,} parameters, {dtype}, {device}, loaded in {load_seconds:.2f} s")
    if args.export is not None:
        export_hf(model, args.export)
        print(f"exported to {args.export} (config.json, model.safetensors)")
        return {**result, "export": str(args.export)}
    if model.config.num_classes is not None:
        return result
    tokenizer = tokenizer_for(extra)
    ids = tokenizer.encode_ordinary(args.prompt)[-model.config.block_size:]
    if not ids or max(ids) >= model.config.vocab_size:
        raise UserError(f"the prompt must encode to 1 or more of the model's {model.config.vocab_size} token ids")
    with torch.no_grad():
        logits, _ = model.eval()(torch.tensor([ids], device=device), last_only=True)  # (1, 1, V)
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(min(args.top, probs.numel()))
    nexts = [(tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]
    print(f"after {args.prompt!r} the model expects: " + ", ".join(f"{t!r} {p:.1%}" for t, p in nexts)
          + "\n(python generate.py --init ... --prompt ... writes whole continuations)")
    return {**result, "next_tokens": nexts}


if __name__ == "__main__":
    run_stage(main, parse_args)
