"""Several processes training one model: torchrun's process group, the model replicated (DDP) or
sharded (FSDP2), activation checkpointing, and sharded checkpoints (torch.distributed.checkpoint)
that load into any number of processes and consolidate into one file.

    torchrun --standalone --nproc_per_node=2 pretrain.py --strategy fsdp    # pretrain.py uses all of it
    python pretrain.py --consolidate out/pretrain/best.dcp                 # the sharded checkpoint -> best.pt

Without torchrun everything here reduces to one plain process: `procs.distributed` is False and the
collective helpers return their input. Reading order: processes; the model, sharded; random states;
sharded checkpoints; consolidation.
"""
import dataclasses
import functools
import io
import os
import pickle
import shutil
import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from common import RunLock, UserError, atomic_write, writable_folder
from model import GPT, GPTConfig, resolve_device, save_checkpoint


# ---------------------------------------------------------------------------------------------------
# Processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one plain process

@dataclasses.dataclass
class Processes:
    """Where this process stands among the run's processes."""
    rank: int = 0  # this process among all of them
    local_rank: int = 0  # this process on its machine; picks the GPU
    world_size: int = 1
    torchrun: bool = False  # started by torchrun (which also forwards Ctrl-C to every process)

    @property
    def is_main(self) -> bool:
        """The process that prints and writes the shared files (rank 0; see common.is_main_process)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()


def init_processes(device_name: str, strategy: str = "ddp") -> tuple[Processes, torch.device]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) if there is one; pick the device.

    FSDP needs a process group even alone, so without torchrun it gets one of a single process."""
    try:
        device = resolve_device(device_name)
    except ValueError as e:
        raise UserError(f"--device: {e}") from None
    if "RANK" not in os.environ:
        procs = Processes()
    else:
        procs = Processes(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]),
                          torchrun=True)
    if not procs.torchrun and strategy != "fsdp":
        return procs, device
    if device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"several processes and FSDP need CUDA GPUs (NCCL) or CPUs (gloo), not {device.type}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if procs.torchrun:
        dist.init_process_group(backend)
    else:  # one process: an in-memory store, no port to find
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return procs, device


@contextmanager
def processes(device_name: str, strategy: str = "ddp"):
    """init_processes for the length of a with-block: (procs, device), and the process group is left
    when the block ends, also on an error."""
    procs, device = init_processes(device_name, strategy)
    try:
        yield procs, device
    finally:
        if procs.distributed:
            dist.destroy_process_group()


def local_leader_first(procs: Processes, fn):
    """fn() on each machine's first process, then on the others: downloads and tokenizing happen once."""
    if procs.distributed and procs.local_rank != 0:
        dist.barrier()
    result = fn()
    if procs.distributed and procs.local_rank == 0:
        dist.barrier()
    return result


def from_rank0(procs: Processes, value):
    """Rank 0's value of a small picklable object (a config, an error message), in every process."""
    if not procs.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def run_folder_lock(out_dir: Path, procs: Processes):
    """Hold OUT_DIR's RunLock (common.RunLock) on rank 0 while the run writes there; every process
    learns whether it was taken, so all of them stop at once when another run holds the folder."""
    lock, problem = RunLock(out_dir), None
    if procs.is_main:
        try:
            lock.__enter__()
        except UserError as e:
            problem = str(e)
    problem = from_rank0(procs, problem)
    if problem:
        raise UserError(problem)
    try:
        yield
    finally:
        if procs.is_main:
            lock.__exit__(None, None, None)


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
        if self.requested and not self.procs.torchrun:
            raise KeyboardInterrupt
        if not self.requested and self.procs.is_main:
            again = "" if self.procs.torchrun else " (Ctrl-C again quits without saving)"
            print(f"\nCtrl-C: saving a checkpoint after this step{again}", flush=True)
        self.requested = True


# ---------------------------------------------------------------------------------------------------
# The model, sharded: FSDP2 units and activation checkpointing

def _recompute_in_backward(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation and sampling keep nothing anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_activations(gpt: GPT) -> None:
    """--activation-checkpointing: each block keeps only its inputs for the backward pass and runs
    its forward again there. The blocks' own forward is wrapped in place, so names and the state_dict
    stay the same (and FSDP, applied afterwards, gathers the weights around the recomputation too)."""
    for block in gpt.transformer.h:
        block.forward = functools.partial(_recompute_in_backward, block.forward)


def shard(gpt: GPT, device: torch.device, dtype: torch.dtype) -> GPT:
    """FSDP2: one unit per block plus one for the rest (embeddings, final norm, head); each process
    keeps 1/N of every weight, gradient and optimizer state and gathers a unit's weights only while it
    runs. bfloat16 training computes with bfloat16 copies of the weights and reduces gradients in
    float32 (the float32 weights, sharded, stay the optimizer's). The model is changed in place."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == torch.bfloat16 else MixedPrecisionPolicy()
    mesh = dist.init_device_mesh(device.type, (dist.get_world_size(),))
    for block in gpt.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(gpt, mesh=mesh, mp_policy=policy)
    return gpt


def sharded_model(config: GPTConfig, device: torch.device, dtype: torch.dtype,
                  activation_checkpointing: bool) -> GPT:
    """A model of config in which this process holds its shards only: made on the meta device (no
    memory), sharded, and only then given memory. The shards hold garbage until broadcast_weights or
    load_sharded fills them."""
    with torch.device("meta"):
        gpt = GPT(config)
    if activation_checkpointing:
        checkpoint_activations(gpt)
    shard(gpt, device, dtype)
    gpt.to_empty(device=device)
    return gpt


def broadcast_weights(gpt: GPT, full: GPT | None) -> None:
    """Fill every process's shards of gpt from `full`, rank 0's whole model on the CPU (None in the
    other processes). Every process must call it."""
    set_model_state_dict(gpt, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def local_bytes(tensors) -> int:
    """Bytes this process holds of these tensors (its own shard of a sharded one)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


# ---------------------------------------------------------------------------------------------------
# Random states: each process's own, saved with a checkpoint so that dropout resumes exactly

def gathered_rng(procs: Processes) -> list[dict]:
    """Every process's random state (dropout masks), gathered on all of them."""
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if not procs.distributed:
        return [rng]
    rngs = [None] * procs.world_size
    dist.all_gather_object(rngs, rng)
    return rngs


def restore_rng(rngs: list[dict], procs: Processes) -> None:
    if len(rngs) == procs.world_size:  # with another process count, dropout keeps its new seeds
        rng = rngs[procs.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

# ---------------------------------------------------------------------------------------------------
# Sharded checkpoints
#
# A folder written by torch.distributed.checkpoint, in which every process writes only its own shards
# (no process ever holds the whole model), plus train_state.pt (step, flags, card, random states) from
# rank 0. Such a folder loads into any number of processes (the shards are re-cut on load), and
# consolidate() turns it into one save_checkpoint file.

TRAIN_STATE = "train_state.pt"


class TensorsOnlyReader(dcp.FileSystemReader):
    """torch.distributed.checkpoint's reader, holding to the project's rule that loading a checkpoint
    never unpickles arbitrary objects: the folder's .metadata (a pickle) is read with an unpickler that
    knows only the checkpoint metadata's own classes, and every entry must be a tensor (DCP reads any
    other entry by unpickling it whole)."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            known = (module, name) in TensorsOnlyReader.ALLOWED or module == "torch.distributed.checkpoint.metadata"
            value = super().find_class(module, name) if known or module == "torch" else None
            if not known and not isinstance(value, torch.dtype):
                raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata")
            return value

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = self._Unpickler(f).load()
        except FileNotFoundError:
            raise UserError(f"{self.path} is not a sharded checkpoint (it has no .metadata file)") from None
        except Exception as e:
            raise UserError(f"{path} is not a readable checkpoint's metadata ({type(e).__name__})") from None
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
        if not isinstance(metadata, Metadata) or not all(
                isinstance(entry, TensorStorageMetadata) for entry in metadata.state_dict_metadata.values()):
            raise UserError(f"{self.path} holds entries other than tensors; this project does not load it")
        for where in metadata.storage_data.values():  # every shard file there and long enough: no torn reads
            shard = Path(self.path) / str(where.relative_path)
            if not shard.is_file() or shard.stat().st_size < where.offset + where.length:
                raise UserError(f"{self.path} is incomplete: {shard.name} is missing or cut short")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def save_sharded(folder: Path, gpt: GPT, optimizer: torch.optim.Optimizer | None, procs: Processes,
                 train_state: dict) -> None:
    """Every process writes its shards of the model (and of the optimizer state) into folder; rank 0
    adds train_state.pt. Written into folder.tmp first and renamed when complete, so a crash leaves
    the previous checkpoint. Every process must call it."""
    tmp = folder.with_name(folder.name + ".tmp")
    if procs.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    state = {"model": get_model_state_dict(gpt)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(gpt, optimizer)["state"]  # tensors only: see TensorsOnlyReader
    dcp.save(state, checkpoint_id=tmp)
    if procs.is_main:
        atomic_write(tmp / TRAIN_STATE, _torch_bytes(train_state))
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def read_train_state(folder: Path) -> dict:
    """A sharded checkpoint's train_state.pt (step, flags, config, card), loaded with weights_only."""
    path = folder / TRAIN_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{folder} is not a checkpoint of this project (it has no {TRAIN_STATE})") from None
    except Exception as e:
        raise UserError(f"{path} is not readable ({type(e).__name__}); the checkpoint is damaged") from None


def load_sharded(folder: Path, gpt: GPT, optimizer: torch.optim.Optimizer | None) -> None:
    """Fill a sharded (or a lone process's) model, and the optimizer's state, from a sharded checkpoint
    written with any number of processes."""
    state = {"model": get_model_state_dict(gpt)}
    full_optimizer_state = None
    if optimizer is not None:
        full_optimizer_state = get_optimizer_state_dict(gpt, optimizer)  # creates the state to load into
        state["optimizer"] = full_optimizer_state["state"]
    reader = TensorsOnlyReader(folder)
    reader.read_metadata()  # checked here, so that a bad folder is one clear sentence, not DCP's per-rank report
    try:
        with warnings.catch_warnings():  # in one process without a group DCP warns that it assumes just that
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{folder} is not a readable checkpoint ({type(e).__name__}: {first_line})") from None
    set_model_state_dict(gpt, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(gpt, optimizer, {**full_optimizer_state, "state": state["optimizer"]})


def consolidate(folder: str | Path) -> dict:
    """--consolidate: a sharded checkpoint folder -> the project's single-file checkpoint beside it
    (FOLDER with .pt for .dcp), in one process, with the model card: load_model, generate.py, the
    finetunes and load_gpt2.py --export then read it. The file holds the whole model, so it needs the
    model's size in memory once."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--consolidate: {folder} is not a folder; name an FSDP checkpoint such as "
                        f"out/pretrain/best.dcp")
    out = folder.with_suffix(".pt")
    if out.exists():
        raise UserError(f"{out} already exists; move it away first")
    info = read_train_state(folder)
    with torch.device("meta"):
        gpt = GPT(GPTConfig(**info["config"]))
    gpt.to_empty(device="cpu")
    if gpt.config.tie_embeddings:
        gpt.tie_weights()  # to_empty made the head's tensor a copy of the embedding's
    load_sharded(folder, gpt, None)
    extra = {k: info[k] for k in ("step", "val_loss", "args") if k in info}
    writable_folder(out.parent, "--consolidate's folder")
    save_checkpoint(out, gpt, **info["card"], **extra)
    print(f"wrote {out}: {gpt.num_params() / 1e6:.1f}M parameters, step {info.get('step')}")
    return {"checkpoint": str(out), "step": info.get("step")}
