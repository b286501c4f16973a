"""pretrain.py: the schedule, one step, resuming, two processes (DDP and FSDP), bad input of every kind, run
folders in use, other model families, and the script end to end."""
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import run_in_process

import common
import corpus
import distributed
import pretrain
import tokenizer
from load_gpt2 import export_hf, load_model
from model import GPT, get_config, load_checkpoint, missing_compiler




REPO = Path(__file__).resolve().parent.parent
# the scripts run in subprocesses too, where a missing file cannot become a skip
pytestmark = pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe", "text/the-verdict.txt",
                                     "text/tinyshakespeare.txt")


@pytest.fixture(scope="module")
def verdict_tokens(offline_cache) -> Path:
    """The Verdict (about 5,000 tokens) prepared once into the test cache's token folder."""
    return pretrain.token_folder(str(offline_cache / "text" / "the-verdict.txt"))


def tiny_args(data: Path, out_dir: Path, *extra: str):
    """A 2-layer model on 32-token windows: a few steps take well under a second each."""
    return pretrain.parse_args([
        "--data", str(data), "--out-dir", str(out_dir), "--preset", "tiny", "--block-size", "32",
        "--batch-size", "4", "--max-steps", "6", "--warmup-steps", "2", "--eval-every", "3",
        "--eval-batches", "2", "--sample-tokens", "4", "--device", "cpu", *extra])


def test_lr_warms_up_linearly_then_decays_to_the_floor():
    lr = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert pretrain.get_lr(0, **lr) == pytest.approx(0.1)
    assert pretrain.get_lr(9, **lr) == pytest.approx(1.0)
    assert pretrain.get_lr(60, **lr) == pytest.approx(0.55)  # halfway through the cosine
    assert pretrain.get_lr(110, **lr) == pytest.approx(0.1)
    assert pretrain.get_lr(500, **lr) == pytest.approx(0.1)


def test_step_batch_is_the_same_for_any_split_into_processes_and_micro_steps():
    tokens = torch.arange(1000, dtype=torch.int32).numpy()
    one_process = pretrain.draw_batch(tokens, 3, 8, grad_accum=2, world_size=1, rank=0, seed=0, step=5)[0]
    ranks = [pretrain.draw_batch(tokens, 3, 8, grad_accum=1, world_size=2, rank=r, seed=0, step=5)[0] for r in range(2)]
    assert one_process.shape == (2, 3, 8) and ranks[0].shape == (1, 3, 8)
    assert torch.equal(one_process, torch.cat(ranks))
    assert not torch.equal(ranks[0], ranks[1])  # each process trains on its own windows
    next_step = pretrain.draw_batch(tokens, 3, 8, grad_accum=2, world_size=1, rank=0, seed=0, step=6)[0]
    assert not torch.equal(one_process, next_step)


def test_missing_data_is_a_user_error(tmp_path):
    with pytest.raises(common.UserError, match="does not exist"):
        pretrain.token_folder(str(tmp_path / "missing.txt"))


def test_text_is_tokenized_once_and_again_after_an_edit(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 50)
    first = pretrain.token_folder(str(text))
    written = (first / "train.bin").stat().st_mtime_ns
    assert pretrain.token_folder(str(text)) == first and (first / "train.bin").stat().st_mtime_ns == written
    assert pretrain.token_folder(str(first)) == first  # a prepared folder is used as it is
    text.write_text("Whether 'tis nobler in the mind to suffer\n" * 50)
    assert pretrain.token_folder(str(text)) != first


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = GPT(get_config("tiny", block_size=16))
    optimizer = model.configure_optimizer(lr=1e-2, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    tokens = torch.randint(0, 50257, (2, 2, 17))  # 2 micro-steps of 2 sequences
    x, y = tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous()
    losses = [pretrain.train_step(model, optimizer, scaler, x, y, grad_clip=1.0, ctx=nullcontext())[0].item()
              for _ in range(20)]
    assert losses[0] > 10 and losses[-1] < 2.0, losses


def test_resume_after_ctrl_c_equals_uninterrupted_bitwise(verdict_tokens, tmp_path, monkeypatch):
    # Dropout on, so the restored random state matters as well as the weights, optimizer and data.
    full_model, full = pretrain.train(tiny_args(verdict_tokens, tmp_path / "full", "--dropout", "0.1"))

    real_step, calls = pretrain.train_step, []

    def ctrl_c_during_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does; the step still finishes
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train_step", ctrl_c_during_third_step)
    args = tiny_args(verdict_tokens, tmp_path / "cut", "--dropout", "0.1")
    _, first = pretrain.train(args)
    assert first["interrupted"] and first["step"] == 3
    monkeypatch.setattr(pretrain, "train_step", real_step)
    args.resume = True
    resumed_model, second = pretrain.train(args)

    assert first["train_losses"] + second["train_losses"] == full["train_losses"]
    full_state, resumed_state = full_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)


def test_resume_refuses_other_model_flags_and_a_new_run_refuses_an_old_folder(verdict_tokens, tmp_path):
    pretrain.train(tiny_args(verdict_tokens, tmp_path, "--max-steps", "1", "--sample-tokens", "0"))
    with pytest.raises(common.UserError, match="--dropout"):
        pretrain.train(tiny_args(verdict_tokens, tmp_path, "--resume", "--dropout", "0.2"))
    with pytest.raises(common.UserError, match="already holds a run"):
        pretrain.train(tiny_args(verdict_tokens, tmp_path))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(verdict_tokens, tmp_path):
    # An absurd learning rate makes the weights huge after one step, and the next forward pass overflows.
    args = tiny_args(verdict_tokens, tmp_path, "--lr", "1e30", "--warmup-steps", "0", "--save-every", "1",
                     "--sample-tokens", "0")
    with pytest.raises(common.UserError, match=r"the loss became nan .* still holds the last good state"):
        pretrain.train(args)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] >= 1


def test_dtype_bfloat16_trains_in_bfloat16_autocast_on_a_cpu(verdict_tokens, tmp_path):
    """--dtype bfloat16 on a CPU: the forward passes run in bfloat16 (the losses move by its rounding,
    not more), the weights and the checkpoint stay float32."""
    _, fp32 = pretrain.train(tiny_args(verdict_tokens, tmp_path / "fp32", "--max-steps", "3", "--sample-tokens", "0"))
    model, bf16 = pretrain.train(tiny_args(verdict_tokens, tmp_path / "bf16", "--max-steps", "3", "--sample-tokens", "0",
                                           "--dtype", "bfloat16"))
    assert bf16["train_losses"] != fp32["train_losses"]
    assert bf16["train_losses"] == pytest.approx(fp32["train_losses"], rel=0.02)
    saved = torch.load(tmp_path / "bf16" / "ckpt.pt", weights_only=True)["model"]
    assert {p.dtype for p in model.parameters()} == {t.dtype for t in saved.values()} == {torch.float32}


def test_a_real_torchrun_launch_trains_as_one_process_with_the_same_global_batch(verdict_tokens, tmp_path):
    """torchrun itself (--standalone: it picks its own free port), two CPU processes: the same losses as
    one process with --grad-accum 2, and one set of files, written by rank 0."""
    common_flags = ["--data", str(verdict_tokens), "--preset", "tiny", "--block-size", "32", "--batch-size", "4",
                    "--max-steps", "2", "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "2",
                    "--sample-tokens", "0", "--device", "cpu"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(REPO / "pretrain.py"), *common_flags, "--out-dir", str(tmp_path / "torchrun")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the processes' arithmetic (see the test below)
    try:
        _, one = pretrain.train(pretrain.parse_args([*common_flags, "--grad-accum", "2", "--out-dir", str(tmp_path / "one")]))
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (tmp_path / "torchrun" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]  # one writer: no line twice
    assert records[-1]["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert result.stdout.count("step      2/2") == 1


@pytest.mark.skipif(missing_compiler(torch.device("cpu")) is not None, reason="no C++ compiler for torch.compile")
def test_compile_trains_the_whole_model_compiled_with_eagers_losses(verdict_tokens, tmp_path, monkeypatch):
    """--compile: training steps, evaluation and the saved checkpoint go through a compiled model, and the
    losses are eager's up to kernel rounding; the checkpoint's keys are the plain model's."""
    compiled_calls = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled_calls.append(model) or real_compile(model, **kw))
    flags = ["--max-steps", "2", "--eval-every", "2", "--sample-tokens", "0"]
    _, eager = pretrain.train(tiny_args(verdict_tokens, tmp_path / "eager", *flags))
    assert compiled_calls == []
    model, compiled = pretrain.train(tiny_args(verdict_tokens, tmp_path / "compiled", *flags, "--compile"))
    torch._dynamo.reset()
    assert compiled_calls == [model]
    assert compiled["train_losses"] == pytest.approx(eager["train_losses"], rel=1e-4)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
    saved = torch.load(tmp_path / "compiled" / "ckpt.pt", weights_only=True)["model"]
    assert set(saved) == set(GPT(get_config("tiny")).state_dict())


def first_val_loss(out_dir: Path) -> float:
    """The val_loss a run logged before its first step (metrics.jsonl's first record)."""
    return json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]


def test_a_run_from_a_checkpoint_starts_at_that_checkpoints_validation_loss(verdict_tokens, tmp_path):
    """--init CHECKPOINT trains on from those weights: before its first step the new run measures the
    checkpoint's own validation loss (same windows), far below a random model's."""
    pretrain.train(tiny_args(verdict_tokens, tmp_path / "a", "--max-steps", "6", "--lr", "3e-3", "--sample-tokens", "0"))
    saved = torch.load(tmp_path / "a" / "best.pt", weights_only=True)["val_loss"]
    pretrain.train(pretrain.parse_args(["--data", str(verdict_tokens), "--init", str(tmp_path / "a" / "best.pt"),
                                        "--out-dir", str(tmp_path / "b"), "--block-size", "32", "--batch-size", "4",
                                        "--max-steps", "1", "--eval-batches", "2", "--sample-tokens", "0",
                                        "--device", "cpu"]))
    assert first_val_loss(tmp_path / "b") == pytest.approx(saved, rel=1e-5)
    assert saved < first_val_loss(tmp_path / "a") - 0.5  # six steps moved the loss well away from random


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shared_port(rank: int, out: str, name: str) -> int:
    """A free port for one run, found by rank 0 just before the run starts and handed to the other
    process through a file (found long before, another program could take it in between)."""
    path = Path(out) / f"{name}.port"
    if rank == 0:
        common.atomic_write(path, str(_free_port()))
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 never chose a port for {name}")
        time.sleep(0.05)
    return int(path.read_text())


def _worker(rank: int, world_size: int, runs: list[tuple[str, list[str], int | None]], out: str) -> None:
    """One of torchrun's processes, by hand: the same environment variables, then pretrain.train once per
    run (each on its own port). interrupt_at: rank 0 gets a Ctrl-C during that training step. Records
    the dtype the first block's weights have while it computes (FSDP's mixed precision)."""
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)  # 2 processes on 2 cores
    real_step, real_shard, results = pretrain.train_step, distributed.shard, {}
    for name, argv, interrupt_at in runs:
        os.environ["MASTER_PORT"] = str(_shared_port(rank, out, name))
        calls, compute_dtypes = [], set()

        def step_with_ctrl_c(*args, **kwargs):
            calls.append(1)
            if len(calls) == interrupt_at and rank == 0:
                signal.raise_signal(signal.SIGINT)  # what Ctrl-C does; the step still finishes
            return real_step(*args, **kwargs)

        def shard_and_watch(gpt, device, dtype):
            real_shard(gpt, device, dtype)
            gpt.transformer.h[0].register_forward_pre_hook(  # runs after FSDP's own, which gathers the weights
                lambda block, inputs: compute_dtypes.add(str(next(block.parameters()).dtype)))
            return gpt

        pretrain.train_step, distributed.shard = step_with_ctrl_c, shard_and_watch
        model, results[name] = pretrain.train(pretrain.parse_args(argv))
        results[name]["weights_sum"] = sum(p.to_local().double().sum().item() if hasattr(p, "to_local")
                                           else p.double().sum().item() for p in model.parameters())
        results[name]["compute_dtypes"] = sorted(compute_dtypes)
    torch.save(results, f"{out}/rank{rank}.pt")


def spawn_with_deadline(worker, args: tuple, nprocs: int, seconds: float) -> None:
    """mp.spawn, but processes still running after `seconds` (a collective waiting for a dead peer)
    are killed and the test fails."""
    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=1):  # raises if a process failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs} processes were still running after {seconds} s")


def test_two_gloo_processes_ddp_and_fsdp_agree_with_one_process(verdict_tokens, tmp_path, capsys):
    """Two CPU processes (gloo), 4 steps of the tiny model: DDP equals one process with the same global
    batch; FSDP's losses equal DDP's while each process holds half the weights and optimizer state;
    activation checkpointing leaves the losses alone; an FSDP run interrupted at step 2 and resumed by
    ONE process (--grad-accum 2 keeps the global batch) continues with the same losses; and its sharded
    best.dcp consolidates into one file that load_model and export_hf read."""
    common = ["--data", str(verdict_tokens), "--preset", "tiny", "--block-size", "32", "--batch-size", "4",
              "--max-steps", "4", "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "3",
              "--sample-tokens", "4", "--device", "cpu"]
    fsdp = [*common, "--strategy", "fsdp"]
    # A checkpoint to start from (--init): the DDP and FSDP runs from it must begin at its val_loss
    pretrain.train(pretrain.parse_args([*common, "--max-steps", "3", "--lr", "3e-3", "--sample-tokens", "0",
                                        "--out-dir", str(tmp_path / "start")]))
    start = ["--init", str(tmp_path / "start" / "best.pt"), *common[:2], *common[4:], "--max-steps", "1"]  # no --preset
    runs = [("ddp", [*common, "--out-dir", str(tmp_path / "ddp")], None),
            ("ddp_init", [*start, "--out-dir", str(tmp_path / "ddp_init")], None),
            ("fsdp_init", [*start, "--strategy", "fsdp", "--out-dir", str(tmp_path / "fsdp_init")], None),
            ("fsdp_bf16", [*start, "--strategy", "fsdp", "--dtype", "bfloat16", "--out-dir", str(tmp_path / "fsdp_bf16")],
             None),
            ("fsdp", [*fsdp, "--out-dir", str(tmp_path / "fsdp")], None),
            ("fsdp_ac", [*fsdp, "--activation-checkpointing", "--out-dir", str(tmp_path / "fsdp_ac")], None),
            ("cut", [*fsdp, "--out-dir", str(tmp_path / "cut")], 2)]
    spawn_with_deadline(_worker, (2, runs, str(tmp_path)), nprocs=2, seconds=600)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    ddp, fsdp_run, fsdp_ac, cut = (ranks[0][name] for name in ("ddp", "fsdp", "fsdp_ac", "cut"))
    assert cut["interrupted"] and cut["step"] == 2
    started = torch.load(tmp_path / "start" / "best.pt", weights_only=True)["val_loss"]
    assert started < first_val_loss(tmp_path / "start") - 0.3
    for name in ("ddp_init", "fsdp_init"):
        assert first_val_loss(tmp_path / name) == pytest.approx(started, rel=1e-5), name
    # FSDP's mixed precision: --dtype bfloat16 computes with bfloat16 copies of the float32 weights
    assert ranks[0]["fsdp_init"]["compute_dtypes"] == ["torch.float32"]
    assert ranks[0]["fsdp_bf16"]["compute_dtypes"] == ranks[1]["fsdp_bf16"]["compute_dtypes"] == ["torch.bfloat16"]
    assert first_val_loss(tmp_path / "fsdp_bf16") == pytest.approx(started, rel=0.02)
    assert len(list((tmp_path / "cut" / "ckpt.dcp").glob("*.distcp"))) == 2  # each process wrote its own shards

    # The same global batch in one process, with the processes' arithmetic: one thread. (Matmuls split
    # over two threads add in another order, and AdamW's first steps turn a gradient that is rounding
    # noise (~1e-9) into a full +-lr step, so weights would differ by ~1e-5 for reasons that have
    # nothing to do with DDP.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_model, one = pretrain.train(pretrain.parse_args([*common, "--grad-accum", "2",
                                                             "--out-dir", str(tmp_path / "one")]))
        resumed_model, resumed = pretrain.train(pretrain.parse_args([*fsdp, "--grad-accum", "2", "--resume",
                                                                     "--out-dir", str(tmp_path / "cut")]))
    finally:
        torch.set_num_threads(threads)

    assert ranks[0]["ddp"]["weights_sum"] == ranks[1]["ddp"]["weights_sum"]  # the replicas stayed identical
    assert ddp["train_losses"] == pytest.approx(one["train_losses"], rel=1e-5)
    assert ddp["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    ddp_model, _ = load_checkpoint(tmp_path / "ddp" / "ckpt.pt")
    one_state = one_model.state_dict()
    assert all(torch.allclose(ddp_model.state_dict()[k], one_state[k], rtol=0, atol=1e-6) for k in one_state)

    assert fsdp_run["train_losses"] == pytest.approx(ddp["train_losses"], rel=1e-5)
    assert fsdp_run["val_loss"] == pytest.approx(ddp["val_loss"], rel=1e-5)
    for r in range(2):  # each process holds half of the weights and of AdamW's moments (shards pad by a row)
        held = ranks[r]["fsdp"]["param_bytes"] + ranks[r]["fsdp"]["optimizer_bytes"]
        assert 0.49 < held / (ddp["param_bytes"] + ddp["optimizer_bytes"]) < 0.51
    assert fsdp_ac["train_losses"] == pytest.approx(fsdp_run["train_losses"], rel=1e-6)

    assert cut["train_losses"] + resumed["train_losses"] == pytest.approx(fsdp_run["train_losses"], rel=1e-5)
    assert resumed["val_loss"] == pytest.approx(fsdp_run["val_loss"], rel=1e-5)

    # The sharded best weights as one file: the model FSDP evaluated, readable by every stage.
    code, _, stderr = run_in_process("pretrain.py", ["--consolidate", str(tmp_path / "fsdp" / "best.dcp")], capsys)
    assert code == 0, stderr
    best, extra = load_model(str(tmp_path / "fsdp" / "best.pt"))
    assert extra["model_type"] == "gpt2" and extra["step"] == 4
    val_tokens = pretrain.load_splits(verdict_tokens, 32, 50257, tokenizer.get_tokenizer(), "gpt2")[1]
    val = pretrain.validation_loss(best, val_tokens, batches=3, batch_size=4, block_size=32, seed=1337, ctx=nullcontext(),
                            procs=distributed.Processes(), device=torch.device("cpu"))
    assert val == pytest.approx(fsdp_run["best_val_loss"], rel=1e-6) == extra["val_loss"]
    exported, _ = load_model(str(export_hf(best, tmp_path / "hf", extra)))
    x = torch.randint(0, 50257, (1, 8))
    assert torch.allclose(exported(x)[0], best(x)[0], atol=1e-5)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "pretrain.py"), *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("content, expected", [
    (b"", "holds no text"),
    (b"Too short.", "too few for one window"),
    (b"\xff\xfe not UTF-8", "not valid UTF-8"),
])
def test_bad_data_gives_one_clear_error_line(tmp_path, content, expected):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    result = run_script("--data", str(data), "--preset", "tiny", "--out-dir", str(tmp_path / "out"), "--device", "cpu")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(errors) == 1 and expected in errors[0], result.stderr


def test_script_end_to_end_with_the_default_corpus_ctrl_c_and_resume(tmp_path):
    out = tmp_path / "run"
    flags = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2",
             "--sample-tokens", "8", "--out-dir", str(out), "--device", "cpu"]
    # A long run, stopped by Ctrl-C once it has printed its step-2 progress line.
    proc = subprocess.Popen([sys.executable, str(REPO / "pretrain.py"), *flags, "--max-steps", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = lines_until(proc, "step      2/1000")
    proc.send_signal(signal.SIGINT)
    rest, stderr = proc.communicate(timeout=120)
    lines += rest.splitlines()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert any(line.startswith("interrupted at step") for line in lines)
    stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert stopped_at >= 2

    result = run_script(*flags, "--max-steps", str(stopped_at + 2), "--resume")
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert all(f in progress[-1] for f in ("loss", "lr", "norm", "ms/step", "tok/s", "eta", "val", "ppl"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[-1]["step"] == stopped_at + 2
    assert all(math.isfinite(r["val_loss"]) and r["sample"] for r in records) and "mfu" in records[-1]
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["step"] == stopped_at + 2
    assert {"model", "config", "optimizer", "scaler", "rng", "best_val_loss", "args", "model_type", "tokenizer"} <= set(state)
    best, extra = load_checkpoint(out / "best.pt")
    assert best.config.block_size == 32 and extra["val_loss"] == min(r["val_loss"] for r in records)


# ---------------------------------------------------------------------------------------------------
# Bad input (issue 14): refused when parsed or before any work, in one sentence, nothing written

@pytest.mark.parametrize("flags, words", [
    ("--lr nan", "--lr"), ("--lr -1", "--lr"), ("--lr 0", "--lr"), ("--grad-clip -1", "--grad-clip"),
    ("--weight-decay -1", "--weight-decay"), ("--min-lr 0.1 --lr 0.01", "--min-lr 0.1 is above --lr 0.01"),
    ("--max-steps 0", "--max-steps"), ("--batch-size 0", "--batch-size"), ("--grad-accum 0", "--grad-accum"),
    ("--dropout 1.5", "--dropout"), ("--dropout nan", "--dropout"), ("--warmup-steps -1", "--warmup-steps"),
    ("--block-size 0", "--block-size"), ("--eval-every 0", "--eval-every"), ("--save-every -1", "--save-every"),
    ("--preset nope", "--preset"), ("--init gpt2 --preset tiny", "--preset only applies"),
    ("--strategy fsdp --dtype float16", "float16"), ("--strategy fsdp --compile", "--compile"),
    ("--strategy zero", "--strategy"), ("--plan-processes 2", "--plan-processes only applies with --plan"),
    ("--device cuda:7", "--device"),
])
def test_flags_that_mean_nothing_are_refused_when_parsed(flags, words):
    with pytest.raises(common.UserError) as error:
        pretrain.parse_args(flags.split())
    assert words in str(error.value)


def test_an_out_dir_that_cannot_hold_a_run_stops_before_any_work(verdict_tokens, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "build", lambda *a: pytest.fail("work started before the out-dir was checked"))
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    with pytest.raises(common.UserError, match="is a file, not a folder"):
        pretrain.train(tiny_args(verdict_tokens, a_file))
    with pytest.raises(common.UserError, match="not a writable folder"):
        pretrain.train(tiny_args(verdict_tokens, a_file / "sub"))
    with pytest.raises(common.UserError, match="is a file"):
        pretrain.main(pretrain.parse_args(["--plan", "--preset", "tiny", "--out-dir", str(a_file)]))
    assert a_file.read_text() == "not a folder"


def test_resume_refuses_changed_flags_naming_each_and_accepts_the_harmless_ones(verdict_tokens, tmp_path):
    pretrain.train(tiny_args(verdict_tokens, tmp_path, "--max-steps", "1", "--sample-tokens", "0"))
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(common.UserError) as error:
        pretrain.train(tiny_args(verdict_tokens, tmp_path, "--resume", "--lr", "0.002", "--batch-size", "8"))
    assert "--lr 0.001 (now 0.002)" in str(error.value) and "--batch-size 4 (now 8)" in str(error.value)
    other = tmp_path.parent / "other.txt"
    other.write_text("Some other text. " * 400)
    for changed in (["--data", str(other)], ["--seed", "1"], ["--dtype", "bfloat16"], ["--grad-accum", "2"],
                    ["--strategy", "fsdp"]):
        with pytest.raises(common.UserError, match=changed[0]):
            args = tiny_args(verdict_tokens, tmp_path, "--resume")
            for flag, value in zip(changed[::2], changed[1::2]):
                setattr(args, flag[2:].replace("-", "_"), value if flag != "--grad-accum" else int(value))
            pretrain.train(args)
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    # What does not change the run may change: its length, the intervals, the device, checkpointing.
    _, metrics = pretrain.train(tiny_args(verdict_tokens, tmp_path, "--resume", "--max-steps", "2", "--eval-every",
                                          "5", "--save-every", "0", "--sample-tokens", "0",
                                          "--activation-checkpointing"))
    assert metrics["step"] == 2


def test_empty_or_corrupt_checkpoints_give_one_sentence(verdict_tokens, tmp_path):
    for name, content, words in (("empty", b"", "empty"),
                                 ("junk", np.random.default_rng(0).bytes(2048), "not a readable checkpoint|neither a checkpoint")):
        run = tmp_path / name
        run.mkdir()
        (run / "ckpt.pt").write_bytes(content)
        with pytest.raises(common.UserError, match=words):
            pretrain.train(tiny_args(verdict_tokens, run, "--resume"))
        assert (run / "ckpt.pt").read_bytes() == content and not (run / "metrics.jsonl").exists()
        with pytest.raises(common.UserError, match=words):
            pretrain.train(pretrain.parse_args(["--data", str(verdict_tokens), "--init", str(run / "ckpt.pt"),
                                                "--out-dir", str(tmp_path / f"{name}-init"), "--device", "cpu"]))


class RunsCode:
    """A pickle that would run a command if unpickled without restrictions."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_sharded_checkpoint_is_read_without_unpickling_anything_but_its_metadata(tmp_path):
    """DCP keeps its index in a pickle (.metadata): ours reads it with an unpickler that knows only the
    index's own classes, so a planted object is refused, not run; a damaged train_state.pt too."""
    folder = tmp_path / "ckpt.dcp"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    torch.save({"config": {}, "card": {}}, folder / "train_state.pt")
    with pytest.raises(common.UserError, match="not a readable checkpoint's metadata"):
        distributed.load_sharded(folder, GPT(get_config("tiny")), None)
    assert not marker.exists()
    (folder / "train_state.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(common.UserError, match="damaged"):
        distributed.read_train_state(folder)
    with pytest.raises(common.UserError, match="not a folder"):
        distributed.consolidate(tmp_path / "nothing.dcp")


class OtherTokenizer:
    n_vocab, eot_token, bos_id, eos_id = 32000, 2, 1, 2


def test_a_token_folder_made_with_another_tokenizer_is_refused(verdict_tokens):
    with pytest.raises(common.UserError, match="tokenized with gpt2, but the model's tokenizer is other"):
        pretrain.load_splits(verdict_tokens, 32, 50257, OtherTokenizer(), "other")
    with pytest.raises(common.UserError, match="larger than the model's 32000"):
        pretrain.load_splits(verdict_tokens, 32, 32000, OtherTokenizer(), "other")


def _pretrain_process(*flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "pretrain.py"), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def lines_until(proc: subprocess.Popen, prefix: str, seconds: float = 300) -> list[str]:
    """proc's stdout lines up to the first that starts with prefix; a process that has not printed it
    within `seconds` is killed (its stdout then ends) and the test fails instead of waiting for ever."""
    watchdog = threading.Timer(seconds, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(prefix):
                return lines
    finally:
        watchdog.cancel()
    pytest.fail(f"no line starting {prefix!r} within {seconds} s; the output was:\n{''.join(lines)[-2000:]}")


def test_a_second_run_into_a_busy_folder_stops_at_once_and_a_killed_runs_lock_is_taken_over(verdict_tokens, tmp_path):
    out = tmp_path / "run"
    flags = ["--data", str(verdict_tokens), "--preset", "tiny", "--block-size", "32", "--batch-size", "2",
             "--eval-every", "1", "--eval-batches", "1", "--sample-tokens", "0", "--save-every", "1",
             "--out-dir", str(out), "--device", "cpu"]
    first = _pretrain_process(*flags, "--max-steps", "100000")
    try:
        lines_until(first, "step      2/")  # the first run has a checkpoint to resume
        second = run_script(*flags, "--max-steps", "100000")
        assert second.returncode == 1 and "Traceback" not in second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by another run" in lines[0] and f"pid {first.pid}" in lines[0], lines
    finally:
        first.kill()  # SIGKILL: no clean-up, the lock file stays behind
        first.communicate(timeout=60)
    assert (out / ".lock").exists()
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    third = run_script(*flags, "--max-steps", str(step + 1), "--resume")
    assert third.returncode == 0, third.stderr
    assert "taking over" in third.stderr and not (out / ".lock").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # no torn lines
    assert records[-1]["step"] == step + 1


# ---------------------------------------------------------------------------------------------------
# Other model families: the model's own tokenizer, BOS, and card

class Recorder(torch.nn.Module):
    """Stands in for a model in sample_text: records what it is fed, always predicts token 7."""

    def __init__(self):
        super().__init__()
        self.fed = []

    def forward(self, ids, last_only=False):
        self.fed.append(ids.tolist())
        logits = torch.full((1, 1, 10), -1e9)
        logits[..., 7] = 0
        return logits, None


class BosTokenizer:
    n_vocab, eot_token, bos_id, eos_id = 10, 2, 1, 2

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_samples_start_from_the_tokenizers_bos_or_gpt2s_end_of_text():
    model = Recorder()
    text = pretrain.sample_text(model, BosTokenizer(), 3, block_size=16, seed=0, ctx=nullcontext(),
                                device=torch.device("cpu"))
    assert model.fed[0] == [[1]] and model.fed[-1] == [[1, 7, 7]] and text == "7 7 7"
    model = Recorder()
    pretrain.sample_text(model, tokenizer.get_tokenizer(), 2, block_size=16, seed=0, ctx=nullcontext(),
                         device=torch.device("cpu"))
    assert model.fed[0] == [[50256]]


def test_another_family_trains_with_its_card_from_random_and_from_a_hub_folder(tmp_path, offline_cache):
    """Phi-2's maths (parallel block, partial rotary, untied head with a bias) at a few million
    parameters, with its tokenizer (GPT-2's BPE): from random, then from its own Hub-layout export."""
    data = offline_cache / "text" / "the-verdict.txt"
    common = ["--data", str(data), "--block-size", "32", "--batch-size", "2", "--max-steps", "2",
              "--eval-every", "2", "--eval-batches", "1", "--sample-tokens", "4", "--device", "cpu"]
    model, metrics = pretrain.train(pretrain.parse_args([*common, "--preset", "phi-2-tiny",
                                                         "--out-dir", str(tmp_path / "random")]))
    state = torch.load(tmp_path / "random" / "ckpt.pt", weights_only=True)
    assert (state["model_type"], state["tokenizer"]) == ("phi", "gpt2") and metrics["step"] == 2
    best, card = load_model(str(tmp_path / "random" / "best.pt"))
    folder = export_hf(best, tmp_path / "hub", card, tokenizer=tokenizer.get_tokenizer())
    _, again = pretrain.train(pretrain.parse_args([*common, "--init", str(folder), "--dropout", "0.1",
                                                   "--out-dir", str(tmp_path / "from_hub")]))
    state = torch.load(tmp_path / "from_hub" / "ckpt.pt", weights_only=True)
    assert (state["model_type"], state["tokenizer"]) == ("phi", "gpt2") and state["config"]["dropout"] == 0.1
    assert math.isfinite(again["val_loss"])


def test_resume_keeps_the_runs_tokenizer(verdict_tokens, tmp_path):
    """The tokenizer comes from the checkpoint's card, not from today's flags: a card naming a
    tokenizer that is not there stops the resumed run, naming it."""
    pretrain.train(tiny_args(verdict_tokens, tmp_path, "--max-steps", "1", "--sample-tokens", "0"))
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state["tokenizer"] = str(tmp_path / "gone" / "tokenizer.model")
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(common.UserError, match="gone"):
        pretrain.train(tiny_args(verdict_tokens, tmp_path, "--resume", "--max-steps", "2"))


def test_mistral_tiny_trains_with_its_own_tokenizer_from_random_and_from_a_hub_folder(tmp_path, offline_cache):
    """Mistral's maths and its 32,000-token SentencePiece vocabulary: the corpus is tokenized with it
    (its own token folder), and the Hub-layout export (weights, config.json, tokenizer.model) trains too."""
    text = offline_cache / "text" / "the-verdict.txt"
    common = ["--data", str(text), "--block-size", "64", "--batch-size", "2", "--max-steps", "2", "--eval-every",
              "2", "--eval-batches", "1", "--sample-tokens", "4", "--device", "cpu"]
    _, metrics = pretrain.train(pretrain.parse_args([*common, "--preset", "mistral-tiny",
                                                     "--out-dir", str(tmp_path / "random")]))
    state = torch.load(tmp_path / "random" / "ckpt.pt", weights_only=True)
    assert state["model_type"] == "mistral" and state["tokenizer"].endswith("tokenizer.model")
    folder = pretrain.token_folder(str(text), state["tokenizer"])
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tokenizer_name"] == state["tokenizer"] and meta["vocab_size"] == 32000
    assert folder != pretrain.token_folder(str(text))  # GPT-2's tokens of the same text live elsewhere
    assert math.isfinite(metrics["val_loss"])
    best, card = load_model(str(tmp_path / "random" / "best.pt"))
    hub = export_hf(best, tmp_path / "hub", card)
    _, again = pretrain.train(pretrain.parse_args([*common, "--init", str(hub), "--out-dir", str(tmp_path / "hub_run")]))
    state = torch.load(tmp_path / "hub_run" / "ckpt.pt", weights_only=True)
    assert state["model_type"] == "mistral" and Path(state["tokenizer"]) == hub.resolve()
    assert math.isfinite(again["val_loss"])


# ---------------------------------------------------------------------------------------------------
# A learner's first hour: --force, progress between evaluations, short runs, own tokenizers, loss.svg

def test_force_replaces_a_finished_run_and_refuses_to_go_with_resume(verdict_tokens, tmp_path, capsys):
    pretrain.train(tiny_args(verdict_tokens, tmp_path, "--max-steps", "3", "--sample-tokens", "0"))
    with pytest.raises(common.UserError, match="--force to replace it"):
        pretrain.train(tiny_args(verdict_tokens, tmp_path, "--max-steps", "2"))
    with pytest.raises(common.UserError, match="choose one"):
        tiny_args(verdict_tokens, tmp_path, "--force", "--resume")
    capsys.readouterr()
    pretrain.train(tiny_args(verdict_tokens, tmp_path, "--max-steps", "2", "--eval-every", "1", "--force",
                             "--sample-tokens", "0"))
    assert "removed the earlier run's ckpt.pt" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]  # the new run's alone
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    assert load_checkpoint(tmp_path / "best.pt")[1]["step"] <= 2


def test_progress_lines_between_evaluations_and_a_run_shorter_than_its_warmup(verdict_tokens, tmp_path, capsys):
    """--log-every 1 prints a training line at each step between the evaluations (at 0 and 4), and a
    run of 4 steps with --warmup-steps 20 warms up for a tenth of itself, so its learning rate decays."""
    args = tiny_args(verdict_tokens, tmp_path, "--max-steps", "4", "--warmup-steps", "20", "--eval-every", "4",
                     "--log-every", "1", "--sample-tokens", "0")
    pretrain.train(args)
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("step")]
    assert len(lines) == 5 and all("val" not in line for line in lines[1:4]) and "val" in lines[4]
    assert "mean training loss over the steps since the last evaluation" in out
    assert "--warmup-steps 20 is not shorter than --max-steps 4" in err and pretrain.warmup_steps(args) == 0
    lrs = [float(line.split("| lr ")[1].split()[0]) for line in lines[1:]]
    assert lrs[0] == args.lr and lrs == sorted(lrs, reverse=True) and lrs[-1] < args.lr


def test_a_self_trained_tokenizer_pretrains_a_model_that_later_stages_read_with_it(tmp_path, offline_cache):
    """tokenizer.py train -> prepare with it -> pretrain.py --tokenizer on that folder: the model's
    vocabulary is the tokenizer's, and the checkpoint's card names the file, so tokenizer_for finds it."""
    text = offline_cache / "text" / "the-verdict.txt"
    bpe = tmp_path / "bpe.json"
    tokenizer.BPETokenizer().train(text.read_text(encoding="utf-8"), 300).save(bpe)
    folder = tmp_path / "tok-bpe"
    corpus.prepare_corpus(text, folder, tokenizer=tokenizer.load_tokenizer(bpe), tokenizer_name=str(bpe.resolve()))
    args = pretrain.parse_args(["--data", str(folder), "--tokenizer", str(bpe), "--preset", "tiny", "--block-size",
                                "32", "--batch-size", "2", "--max-steps", "2", "--eval-every", "2", "--eval-batches",
                                "1", "--sample-tokens", "4", "--device", "cpu", "--out-dir", str(tmp_path / "run")])
    model, metrics = pretrain.train(args)
    assert model.config.vocab_size == 300 and math.isfinite(metrics["val_loss"])
    best, card = load_model(str(tmp_path / "run" / "best.pt"))
    assert card["tokenizer"] == str(bpe.resolve()) and best.config.vocab_size == 300
    from load_gpt2 import tokenizer_for
    assert tokenizer_for(card).encode_ordinary("the picture") == tokenizer.load_tokenizer(bpe).encode_ordinary(
        "the picture")
    with pytest.raises(common.UserError, match="only applies to --init random"):
        pretrain.parse_args(["--init", "gpt2", "--tokenizer", str(bpe)])
    with pytest.raises(common.UserError, match="tokenizer.py train"):
        pretrain.train(pretrain.parse_args(["--tokenizer", str(tmp_path / "none.json"), "--preset", "tiny",
                                            "--device", "cpu", "--out-dir", str(tmp_path / "none")]))


def test_loss_svg_holds_one_point_per_evaluation_and_grows_on_resume(verdict_tokens, tmp_path):
    import xml.etree.ElementTree as ET

    def points(key: str) -> int:
        root = ET.parse(tmp_path / "loss.svg").getroot()
        series = root.find(f"{{http://www.w3.org/2000/svg}}g[@data-key='{key}']")
        return len(series.findall("{http://www.w3.org/2000/svg}circle"))

    pretrain.train(tiny_args(verdict_tokens, tmp_path, "--max-steps", "4", "--eval-every", "2", "--sample-tokens", "0"))
    assert (points("val_loss"), points("train_loss")) == (3, 2)  # steps 0, 2, 4; no training loss at step 0
    pretrain.train(tiny_args(verdict_tokens, tmp_path, "--max-steps", "6", "--eval-every", "2", "--sample-tokens", "0",
                             "--resume"))
    assert (points("val_loss"), points("train_loss")) == (4, 3)
    assert "tokens seen" in (tmp_path / "loss.svg").read_text()


def test_files_from_before_model_cards_and_tokenizer_names_are_refused_with_what_to_do(verdict_tokens, tmp_path):
    """No shims for the project's older files: a ckpt.pt without a model card, and a token folder whose
    meta.json names no tokenizer, each stop with one sentence that says what to do."""
    pretrain.train(tiny_args(verdict_tokens, tmp_path, "--max-steps", "1", "--sample-tokens", "0"))
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del state["model_type"], state["tokenizer"]
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(common.UserError, match="before checkpoints carried a model card.*--init"):
        pretrain.train(tiny_args(verdict_tokens, tmp_path, "--resume", "--max-steps", "2"))
    old = tmp_path / "old-tokens"
    old.mkdir()
    for name in ("train.bin", "val.bin"):
        (old / name).write_bytes((verdict_tokens / name).read_bytes())
    meta = json.loads((verdict_tokens / "meta.json").read_text())
    del meta["tokenizer_name"]
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(common.UserError, match="does not name the tokenizer.*tokenizer.py prepare"):
        pretrain.train(tiny_args(old, tmp_path / "new"))
