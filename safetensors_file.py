"""The safetensors file format, read and written with numpy and torch alone: how the Hugging Face Hub
stores weights (load_gpt2.py maps their names onto our model).

The format: an 8-byte little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the raw little-endian tensor bytes;
offsets count from the end of the header. SafetensorsFile checks the header against the file and
memory-maps the data, so a tensor is read without a copy; write_safetensors writes one.

    from safetensors_file import SafetensorsFile
    file = SafetensorsFile("model.safetensors")
    wte = file.tensor("wte.weight")
"""
import json
import math
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import torch

from common import UserError


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# numpy has no bfloat16: BF16 is read as uint16 and viewed as bfloat16 by torch (same bits)
NUMPY_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
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
    # Not common.atomic_write, which takes the bytes whole: a shard is gigabytes, written tensor by tensor.
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
