"""pretrain.py: the schedule, one step, resuming, two processes, data errors, and the script end to end."""
import json
import math
import signal
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import pretrain
import tokenizer
from model import GPT, get_config, load_checkpoint

REPO = Path(__file__).resolve().parent.parent


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
    with pytest.raises(tokenizer.UserError, match="does not exist"):
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
    with pytest.raises(tokenizer.UserError, match="--dropout"):
        pretrain.train(tiny_args(verdict_tokens, tmp_path, "--resume", "--dropout", "0.2"))
    with pytest.raises(tokenizer.UserError, match="already holds a run"):
        pretrain.train(tiny_args(verdict_tokens, tmp_path))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(verdict_tokens, tmp_path):
    # An absurd learning rate makes the weights huge after one step, and the next forward pass overflows.
    args = tiny_args(verdict_tokens, tmp_path, "--lr", "1e30", "--warmup-steps", "0", "--save-every", "1",
                     "--sample-tokens", "0")
    with pytest.raises(tokenizer.UserError, match=r"the loss became nan .* still holds the last good state"):
        pretrain.train(args)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, argv: list[str], out: str) -> None:
    """One of torchrun's processes, by hand: the same environment variables, then pretrain.train."""
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 processes on 2 cores
    model, metrics = pretrain.train(pretrain.parse_args(argv))
    torch.save({"model": model.state_dict(), "metrics": metrics}, f"{out}/rank{rank}.pt")


def test_two_gloo_processes_agree_and_match_one_process_with_the_same_global_batch(verdict_tokens, tmp_path):
    common = ["--data", str(verdict_tokens), "--preset", "tiny", "--block-size", "32", "--batch-size", "4",
              "--max-steps", "4", "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "3",
              "--sample-tokens", "0", "--device", "cpu"]
    mp.spawn(_ddp_worker, args=(2, _free_port(), [*common, "--out-dir", str(tmp_path / "ddp")], str(tmp_path)),
             nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one_model, one = pretrain.train(pretrain.parse_args([*common, "--grad-accum", "2",
                                                         "--out-dir", str(tmp_path / "one")]))

    assert all(torch.equal(ranks[0]["model"][k], ranks[1]["model"][k]) for k in ranks[0]["model"])
    assert ranks[0]["metrics"]["train_losses"] == pytest.approx(one["train_losses"], rel=1e-5)
    assert ranks[0]["metrics"]["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    one_state = one_model.state_dict()
    assert all(torch.allclose(ranks[0]["model"][k], one_state[k], atol=1e-5) for k in one_state)


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
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step      2/1000"):
            proc.send_signal(signal.SIGINT)
            break
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
    assert {"model", "config", "optimizer", "scaler", "rng", "best_val_loss", "args"} <= set(state)
    best, extra = load_checkpoint(out / "best.pt")
    assert best.config.block_size == 32 and extra["val_loss"] == min(r["val_loss"] for r in records)
