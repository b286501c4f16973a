"""finetune_spam.py: data parsing and zip safety, the classifier's forward pass, training, prediction.

Everything runs on the "tiny" preset with random weights and a small synthetic dataset in the real
file's format, offline (conftest.py seeds the download cache with the real SMSSpamCollection)."""
import copy
import os
import re
import signal
import subprocess
import threading
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import finetune_spam as fs
import training
from common import UserError
from download import DownloadError
from load_gpt2 import load_model
from model import LoRALinear, load_checkpoint
from tokenizer import get_tokenizer



REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe", "sms_spam/SMSSpamCollection")


def synthetic_lines(n_ham: int = 90, n_spam: int = 40) -> list[str]:
    """Easy, varied-length messages in the file's `label<TAB>text` format; some carry a lone quote,
    which a CSV reader would take as the start of a multi-line field."""
    ham = [f"ham\t{'ok ' * (i % 7)}see you at home later {i}, bring the \"book" for i in range(n_ham)]
    spam = [f"spam\tWIN a FREE prize!! call 0800 {i} now {'txt STOP ' * (i % 5)}" for i in range(n_spam)]
    return [line for pair in zip(ham, spam) for line in pair] + ham[n_spam:]


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "SMSSpamCollection"
    path.write_text("\n".join(synthetic_lines()) + "\n", encoding="utf-8")
    return path


def tiny_args(tmp_path, data_file, *extra: str):
    return fs.parse_args(["--init", "random", "--preset", "tiny", "--data", str(data_file), "--out-dir",
                          str(tmp_path / "out"), "--lr", "1e-3", "--epochs", "3", "--eval-every", "10", *extra])


# ---------------------------------------------------------------------------------------------------
# Data

def test_real_file_parses_to_5574_messages_747_spam():
    messages = fs.load_messages(fs.default_data())  # the seeded cache: no network
    assert (len(messages), sum(label for label, _ in messages)) == (5574, 747)


def test_lone_quotes_do_not_merge_lines(data_file):
    assert len(fs.load_messages(data_file)) == len(synthetic_lines())


def test_malformed_line_is_refused(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("ham\thello\nspam, free prize\n" * 20)
    with pytest.raises(UserError, match="line 2"):
        fs.load_messages(path)


def test_balance_and_split_sizes_are_fixed():
    messages = [(0, f"h{i}") for i in range(300)] + [(1, f"s{i}") for i in range(100)]
    splits = fs.balance_and_split(messages)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [140, 20, 40]
    assert sum(label for part in splits.values() for label, _ in part) == 100  # every spam, as many ham
    assert splits == fs.balance_and_split(messages)  # the fixed seed


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize("name", ["../SMSSpamCollection", "/SMSSpamCollection", "sub/../../SMSSpamCollection"])
def test_zip_member_escaping_the_folder_is_refused(tmp_path, data_file, name):
    archive = make_zip(tmp_path / "evil.zip", {"SMSSpamCollection": data_file.read_bytes(), name: b"ham\tx\n"})
    with pytest.raises(UserError, match="outside its folder"):
        fs.load_messages(archive)
    assert not (tmp_path.parent / "SMSSpamCollection").exists()


def test_good_zip_reads_and_default_data_extracts_from_cached_zip(tmp_path, data_file, monkeypatch):
    archive = make_zip(tmp_path / "good.zip", {"SMSSpamCollection": data_file.read_bytes(), "readme": b"hi"})
    assert fs.load_messages(archive) == fs.load_messages(data_file)
    # A cache holding only the UCI zip (as downloaded): default_data extracts the member, verified.
    cache = tmp_path / "cache"
    real = (fs.cache_dir() / fs.SMS_RELPATH).read_bytes()
    (cache / fs.SMS_ZIP_RELPATH).parent.mkdir(parents=True)
    make_zip(cache / fs.SMS_ZIP_RELPATH, {"SMSSpamCollection": real, "readme": b"UCI"})
    monkeypatch.setenv("LLM_CACHE_DIR", str(cache))
    assert fs.default_data() == cache / fs.SMS_RELPATH
    assert (cache / fs.SMS_RELPATH).read_bytes() == real


def test_offline_names_the_readme_path_and_why_a_placed_file_was_rejected(tmp_path, monkeypatch, capsys):
    def offline(relpath):
        raise DownloadError(f"could not download {relpath} (no connection to the server)")
    monkeypatch.setattr(fs, "fetch", offline)
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path))
    readme_path = tmp_path / "sms_spam" / "SMSSpamCollection"  # the path the README's table names
    with pytest.raises(DownloadError, match=re.escape(f"save the unzipped SMSSpamCollection as {readme_path}, or")):
        fs.default_data()
    placed = tmp_path / fs.SMS_RELPATH
    placed.parent.mkdir(parents=True)
    placed.write_text("ham\tnot the UCI file\n")
    with pytest.raises(DownloadError, match=r"the file there now is not it: its sha256 is [0-9a-f]{64}, not the UCI"):
        fs.default_data()
    assert "is not the UCI SMS Spam Collection (its sha256 is" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The forward pass

@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    model, _ = load_model("random", preset="tiny")
    fs.make_classifier(model, "all", 4, 4.0)
    return model.eval()


def varied_split(n: int = 6) -> fs.Split:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    tokens = [torch.randint(0, 50257, (length,), generator=g) for length in lengths]
    return fs.Split(tokens, torch.zeros(n, dtype=torch.long))


def test_predictions_do_not_depend_on_padding(tiny_model):
    split = varied_split()
    with torch.no_grad():
        batched = fs.batch_logits(tiny_model, split, list(range(6)), 0, torch.device("cpu"))  # padded to 39
        alone = torch.cat([fs.batch_logits(tiny_model, split, [i], 0, torch.device("cpu")) for i in range(6)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    assert torch.equal(batched.argmax(-1), alone.argmax(-1))


def test_last_token_block_equals_full_block(tiny_model):
    block, x, lengths = tiny_model.transformer.h[-1], torch.randn(3, 12, 64), torch.tensor([12, 1, 7])
    with torch.no_grad():
        full = block(x)[torch.arange(3), lengths - 1]  # (B, C)
        at_last = tiny_model.run_block_at(len(tiny_model.transformer.h) - 1, x, (lengths - 1)[:, None])[:, 0]
        torch.testing.assert_close(at_last, full, rtol=0, atol=1e-5)


def test_lora_merge_keeps_outputs():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 8), rank=4, alpha=8.0)
    torch.nn.init.normal_(layer.B)  # as after training; at init B = 0 and the update is zero
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = layer(x)
        torch.testing.assert_close(layer.merged()(x), before, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Training

def test_cached_features_train_exactly_like_recomputing(tmp_path, data_file):
    args = tiny_args(tmp_path, data_file, "--epochs", "2")
    splits, _ = fs.prepare_splits(fs.load_messages(data_file), get_tokenizer(), 64)
    torch.manual_seed(0)
    model, _ = load_model("random", preset="tiny")
    start = fs.make_classifier(model, "last_block", 4, 4.0)
    runs = []
    for cache in (True, False):
        fresh = {k: fs.Split(s.tokens, s.labels) for k, s in splits.items()}
        runs.append(fs.train(copy.deepcopy(model), fresh, start, args, torch.device("cpu"), torch.float32, cache,
                           tmp_path / f"state-{cache}.pt"))
    assert start == 1 and len(runs[0]["losses"]) == 2 * 7  # 56 training messages, 8 per batch
    torch.testing.assert_close(runs[0]["losses"], runs[1]["losses"], rtol=1e-4, atol=1e-6)


def test_pipeline_trains_saves_and_reloads(tmp_path, data_file):
    metrics = fs.main(tiny_args(tmp_path, data_file))
    assert metrics["cached_features"] and metrics["data"]["train"] == 56
    assert len(metrics["history"]) == 3 and {"train_accuracy", "val_accuracy"} <= set(metrics["history"][0])
    assert metrics["test"]["accuracy"] >= 0.9  # the synthetic classes are easy to tell apart
    assert (tmp_path / "out" / "metrics.json").is_file()
    model, extra = load_checkpoint(tmp_path / "out" / "classifier.pt")
    assert model.config.num_classes == 2 and extra["labels"] == ["ham", "spam"]
    assert extra["test"] == metrics["test"]


def test_lora_checkpoint_is_a_plain_gpt_with_the_reported_score(tmp_path, data_file):
    metrics = fs.main(tiny_args(tmp_path, data_file, "--trainable", "lora", "--epochs", "2", "--lora-alpha", "64"))
    model, _ = load_checkpoint(tmp_path / "out" / "classifier.pt")  # loads only with GPT's own keys
    splits, _ = fs.prepare_splits(fs.load_messages(data_file), get_tokenizer(), 64)
    probs, _ = fs.evaluate_classifier(model, splits["test"], 0, 8, torch.device("cpu"), torch.float32)
    assert fs.classification_metrics(probs, splits["test"].labels) == metrics["test"]


def test_no_network_ends_with_a_sentence_offering_random_or_a_file(tmp_path, data_file, monkeypatch):
    def offline(*args, **kwargs):
        raise DownloadError("could not download https://huggingface.co/... (no connection to the server)")
    monkeypatch.setattr(training, "load_model", offline)
    with pytest.raises(UserError, match="--init random"):
        fs.main(fs.parse_args(["--data", str(data_file), "--out-dir", str(tmp_path)]))


# ---------------------------------------------------------------------------------------------------
# Prediction, as a user runs it

def run_script(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "finetune_spam.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_predict_in_a_subprocess(tmp_path, data_file):
    fs.main(tiny_args(tmp_path, data_file))
    checkpoint = str(tmp_path / "out" / "classifier.pt")
    long_text = "hello there " * 100  # > 64 tokens, the tiny model's context
    result = run_script("--checkpoint", checkpoint, "--predict", "WIN a FREE prize!! call 0800 7 now",
                        "--predict", "-", "--predict", long_text, stdin="see you at home later 3\n\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["spam", "ham"] and len(lines) == 3  # blank stdin line skipped
    assert lines[0].split()[1].endswith("%") and "longer than the model's context of 64" in result.stderr

    empty = run_script("--checkpoint", checkpoint, "--predict", "  ")
    assert empty.returncode != 0 and empty.stderr.strip().startswith("error: ") and "Traceback" not in empty.stderr


# ---------------------------------------------------------------------------------------------------
# Runs that are interrupted, go wrong, resume, or meet an earlier run

def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_ctrl_c_keeps_the_best_epoch_and_resume_finishes_like_an_uninterrupted_run(tmp_path, data_file, monkeypatch):
    whole = fs.main(tiny_args(tmp_path / "whole", data_file))

    real_evaluate, calls = fs.evaluate_classifier, []
    def interrupt_in_epoch_2(*args, **kwargs):
        # 7 steps an epoch and a progress line every 10: epoch 1 evaluates train and val (calls 1-2),
        # epoch 2 evaluates at step 10 (3), then train (4) and val (5): Ctrl-C there, before its state is saved
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(fs, "evaluate_classifier", interrupt_in_epoch_2)
    stopped = fs.main(tiny_args(tmp_path / "run", data_file))
    monkeypatch.setattr(fs, "evaluate_classifier", real_evaluate)
    assert stopped["interrupted"] and stopped["epochs_done"] == 1
    model, extra = load_checkpoint(tmp_path / "run" / "out" / "classifier.pt")  # the best (only) epoch's weights
    assert extra["test"] is None and model.config.num_classes == 2

    with pytest.raises(UserError, match="holds an unfinished run .state.pt.; add --resume"):
        fs.main(tiny_args(tmp_path / "run", data_file))
    resumed = fs.main(tiny_args(tmp_path / "run", data_file, "--resume"))
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert resumed["test"] == whole["test"]


def test_resume_refuses_changed_flags(tmp_path, data_file, monkeypatch):
    real, calls = fs.evaluate_classifier, []
    def interrupt_in_epoch_2(*args, **kwargs):  # as above: the 5th evaluation is in epoch 2
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(fs, "evaluate_classifier", interrupt_in_epoch_2)
    assert fs.main(tiny_args(tmp_path, data_file, "--epochs", "2"))["epochs_done"] == 1
    monkeypatch.setattr(fs, "evaluate_classifier", real)
    with pytest.raises(UserError, match=r"--lr 0.001 \(now 0.002\)"):
        fs.main(tiny_args(tmp_path, data_file, "--epochs", "2", "--resume", "--lr", "2e-3"))
    more = fs.main(tiny_args(tmp_path, data_file, "--epochs", "3", "--resume"))  # more epochs is fine
    assert [row["epoch"] for row in more["history"]] == [1, 2, 3]
    assert not (tmp_path / "out" / fs.STATE_FILE).exists()  # finished: nothing left to resume
    with pytest.raises(UserError, match="does not exist \\(a finished run keeps no state\\)"):
        fs.main(tiny_args(tmp_path, data_file, "--epochs", "4", "--resume"))


def test_a_loss_that_is_not_finite_stops_the_run_and_saves_nothing_broken(tmp_path, data_file, monkeypatch):
    real, calls = fs.batch_logits, []
    def poisoned(*args, **kwargs):
        calls.append(1)
        logits = real(*args, **kwargs)
        return logits * float("nan") if len(calls) > 9 else logits  # epoch 1 has 7 steps (+ evaluations)
    monkeypatch.setattr(fs, "batch_logits", poisoned)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="the loss became nan at epoch"):
        fs.main(tiny_args(tmp_path, data_file))
    assert not (out / "classifier.pt").exists() and not (out / "metrics.json").exists()


def test_an_existing_classifier_is_kept_unless_force(tmp_path, data_file):
    fs.main(tiny_args(tmp_path, data_file, "--epochs", "1"))
    before = files_in(tmp_path / "out")
    assert set(before) == {"classifier.pt", "metrics.json", fs.LOSS_SVG}  # a finished run keeps no state.pt
    with pytest.raises(UserError, match="already holds a run"):
        fs.main(tiny_args(tmp_path, data_file, "--epochs", "1"))
    assert files_in(tmp_path / "out") == before
    fs.main(tiny_args(tmp_path, data_file, "--epochs", "1", "--force", "--seed", "5"))
    assert files_in(tmp_path / "out")["classifier.pt"] != before["classifier.pt"]


def test_an_unwritable_out_dir_is_found_before_training(tmp_path, data_file, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(training, "load_model", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(UserError, match="is not a writable folder"):
        fs.main(fs.parse_args(["--init", "random", "--preset", "tiny", "--data", str(data_file),
                               "--out-dir", str(tmp_path / "file" / "sub")]))
    with pytest.raises(UserError, match="is a file, not a folder"):
        fs.main(fs.parse_args(["--init", "random", "--preset", "tiny", "--data", str(data_file),
                               "--out-dir", str(tmp_path / "file")]))


def test_a_second_run_into_the_same_folder_stops_at_once(tmp_path, data_file):
    from common import RunLock
    (tmp_path / "out").mkdir()
    with RunLock(tmp_path / "out"):
        with pytest.raises(UserError, match="is in use by another run"):
            fs.main(tiny_args(tmp_path, data_file))


def test_ctrl_c_on_the_command_line_saves_the_best_epoch_and_exits_130(tmp_path, data_file):
    """Ctrl-C after an epoch: the best weights so far are saved, the run says how to go on, exit 130."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "finetune_spam.py"), "--init", "random", "--preset", "tiny",
                             "--data", str(data_file), "--out-dir", str(out), "--epochs", "1000", "--eval-every", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(180, proc.kill)  # a run that never reaches its first epoch fails, never hangs
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("epoch 1/1000 |"):  # the epoch's summary, not a progress line within it
                proc.send_signal(signal.SIGINT)
                break
        rest, stderr = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in stderr, "".join(lines) + rest + stderr
    assert "Ctrl-C: stopped in epoch" in rest and "continue with the same command plus --resume" in rest
    model, extra = load_checkpoint(out / "classifier.pt")
    assert model.config.num_classes == 2


def test_loss_svg_holds_loss_and_accuracy_for_each_epoch(tmp_path, data_file):
    import xml.etree.ElementTree as ET
    ns = "{http://www.w3.org/2000/svg}"
    metrics = fs.main(tiny_args(tmp_path, data_file, "--epochs", "2"))
    root = ET.parse(tmp_path / "out" / fs.LOSS_SVG).getroot()
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
        # each point's title reads "val_accuracy 0.9643 at epoch 2": one per epoch, with that epoch's value
        group = root.find(f"{ns}g[@data-key='{key}']")
        titles = [c.find(f"{ns}title").text.split() for c in group.iter(f"{ns}circle")]
        assert [(float(t[4]), float(t[1])) for t in titles] == \
            [(row["epoch"], pytest.approx(row[key], rel=1e-3)) for row in metrics["history"]] and len(titles) == 2
