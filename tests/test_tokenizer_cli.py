"""Smoke tests of `python tokenizer.py` in a subprocess, as a user runs it (offline cache from conftest)."""
import json
import subprocess
import sys

from conftest import REPO, SHARED_DATA

from tokenizer import BPETokenizer

VERDICT = SHARED_DATA / "text" / "the-verdict.txt"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tokenizer.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_no_arguments_shows_both_backends_agreeing():
    result = run()
    assert result.returncode == 0, result.stderr
    assert "tiktoken ids" in result.stdout and "scratch ids" in result.stdout
    assert "backends agree: yes" in result.stdout


def test_encode_command():
    result = run("encode", "I'M here  <|endoftext|> 🤖", "--no-special")
    assert result.returncode == 0, result.stderr
    assert "backends agree: yes" in result.stdout and "50256" not in result.stdout


def test_train_and_prepare_commands(tmp_path):
    result = run("train", str(VERDICT), "--vocab-size", "300", "--out", str(tmp_path / "tok.json"))
    assert result.returncode == 0, result.stderr
    assert BPETokenizer.load(tmp_path / "tok.json").n_vocab == 300
    result = run("prepare", str(VERDICT), "--out", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["train_tokens"] > 4000


def test_user_error_is_one_line_and_nonzero_exit(tmp_path):
    result = run("prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "data"))
    assert result.returncode != 0
    assert result.stderr == f"error: {tmp_path / 'missing.txt'} does not exist\n"
