"""`python tokenizer.py` as a user runs it: a few subprocess smoke tests (offline cache from conftest),
and its main/parse_args in-process for the many ways a command can go wrong."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_in_process

import corpus
import tokenizer
from common import UserError
from tokenizer import BPETokenizer



FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
pytestmark = pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe", "text/the-verdict.txt")


@pytest.fixture(scope="module")
def verdict(offline_cache) -> Path:
    return offline_cache / "text" / "the-verdict.txt"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tokenizer.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def one_error_line(code: int, err: str) -> str:
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_no_arguments_shows_both_backends_agreeing():
    result = run()
    assert result.returncode == 0, result.stderr
    assert "tiktoken ids" in result.stdout and "scratch ids" in result.stdout
    assert "backends agree: yes" in result.stdout


def test_encode_command():
    result = run("encode", "I'M here  <|endoftext|> 🤖", "--no-special")
    assert result.returncode == 0, result.stderr
    assert "backends agree: yes" in result.stdout and "50256" not in result.stdout


def test_encode_with_a_tokenizer_file():
    result = run("encode", "--tokenizer", str(FIXTURES / "sp_identity.model"), "Hello world<s>")
    assert result.returncode == 0, result.stderr
    tok = tokenizer.load_tokenizer(FIXTURES / "sp_identity.model")
    ids = tok.encode("Hello world<s>", allowed_special="all")
    assert f"ids    ({len(ids)}): {ids}" in result.stdout and ids[-1] == tok.bos_id
    assert "pieces: 'H' | " in result.stdout and "' w'" in result.stdout and "'<s>'" in result.stdout
    assert "\u2581" not in result.stdout  # '▁' is shown as the space it stands for


def test_pieces_are_shown_the_same_way_for_every_tokenizer(tmp_path, capsys):
    # A part of a character shows as its raw bytes (GPT-2's emoji, SentencePiece's byte pieces), never as
    # U+FFFD; a trained vocabulary's pieces show as text (' was'), as GPT-2's do, not as its file spells them.
    code, gpt2, _ = run_in_process("tokenizer.py", [], capsys)
    assert code == 0 and "\ufffd" not in gpt2 and "b' \\xf0\\x9f'" in gpt2 and "' world'" in gpt2
    code, out, _ = run_in_process("tokenizer.py", ["encode", "--tokenizer", str(FIXTURES / "sp_identity.model"),
                                                   "a 🤖"], capsys)
    assert code == 0 and "\ufffd" not in out and "b'\\xf0'" in out
    text = tmp_path / "t.txt"
    text.write_text("the cat was here and it was a cat that was\n" * 5)
    assert run_in_process("tokenizer.py", ["train", str(text), "--vocab-size", "270", "--out",
                                           str(tmp_path / "bpe.json")], capsys)[0] == 0
    code, out, _ = run_in_process("tokenizer.py", ["encode", "--tokenizer", str(tmp_path / "bpe.json"), " it was"],
                                  capsys)
    assert code == 0 and "' was'" in out and "\u0120" not in out  # not 'Ġwas'


def test_encode_shows_a_tokenizer_json_without_specials(capsys):
    code, out, _ = run_in_process("tokenizer.py", ["encode", "--tokenizer", str(FIXTURES / "llama3_style"),
                                                   "--no-special", "<|begin_of_text|>Hi"], capsys)
    ids_line = out.splitlines()[0]
    assert code == 0 and "1200" not in ids_line and "'<'" in out and "decoded: '<|begin_of_text|>Hi'" in out


def test_encode_with_a_file_that_is_no_tokenizer(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    code, _, err = run_in_process("tokenizer.py", ["encode", "--tokenizer", str(tmp_path / "notes.txt"), "x"], capsys)
    assert "neither a SentencePiece model" in one_error_line(code, err)


def test_train_and_prepare_commands(tmp_path, verdict):
    result = run("train", str(verdict), "--vocab-size", "300", "--out", str(tmp_path / "tok.json"))
    assert result.returncode == 0, result.stderr
    assert BPETokenizer.load(tmp_path / "tok.json").n_vocab == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.json"]  # nothing else left behind
    result = run("prepare", str(verdict), "--out-dir", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["train_tokens"] > 4000 and meta["tokenizer_name"] == "gpt2"


def test_prepare_with_a_tokenizer(tmp_path, verdict, capsys):
    code, out, err = run_in_process("tokenizer.py", ["prepare", str(verdict), "--out-dir", str(tmp_path / "data"),
                                                     "--tokenizer", str(FIXTURES / "sp_nmt_nfkc.model")], capsys)
    assert code == 0, err
    train, val, meta = corpus.load_token_folder(tmp_path / "data")
    tok = tokenizer.load_tokenizer(FIXTURES / "sp_nmt_nfkc.model")
    assert [*train, *val] == [tok.bos_id, *tok.encode_ordinary(verdict.read_text(encoding="utf-8")), tok.eos_id]
    assert meta["tokenizer_name"] == str(FIXTURES / "sp_nmt_nfkc.model") and "(uint16)" in out


def test_user_error_is_one_line_and_nonzero_exit(tmp_path):
    result = run("prepare", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "data"))
    assert result.returncode != 0
    assert result.stderr == f"error: {tmp_path / 'missing.txt'} does not exist\n"
    assert not (tmp_path / "data").exists()


# -- issue 14: bad values are refused when parsed, bad places before any work ------------------------------

@pytest.mark.parametrize("argv, message", [
    (["prepare", "in.txt", "--val-fraction", "1.5"], "--val-fraction"),
    (["prepare", "in.txt", "--val-fraction", "nan"], "--val-fraction"),
    (["prepare", "in.txt", "--val-fraction", "-0.1"], "--val-fraction"),
    (["prepare", "in.txt", "--threads", "0"], "--threads"),
    (["prepare", "in.txt", "--threads", "two"], "--threads"),
    (["train", "in.txt", "--vocab-size", "10"], "--vocab-size"),
    (["train", "in.txt", "--vocab-size", "inf"], "--vocab-size"),
    (["encode"], "text"),
])
def test_bad_flag_values_are_refused_when_parsed(argv, message):
    with pytest.raises(UserError, match=message):
        tokenizer.parse_args(argv)


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_out_that_is_a_file_or_unwritable(tmp_path, verdict, capsys, command):
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    # As root, permission bits do not stop writes; a path under a regular file cannot be written by anyone.
    for out in (regular, regular / "sub" / ("data" if command == "prepare" else "v.json")):
        extra = ["--vocab-size", "300"] if command == "train" else []
        code, _, err = run_in_process("tokenizer.py", [command, str(verdict), "--out-dir" if command == "prepare" else "--out", str(out), *extra], capsys)
        assert str(out) in one_error_line(code, err)
    assert regular.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regular"]  # nothing left behind


def test_train_into_a_folder_is_refused(tmp_path, verdict, capsys):
    argv = ["train", str(verdict), "--out", str(tmp_path), "--vocab-size", "300"]
    code, _, err = run_in_process("tokenizer.py", argv, capsys)
    assert "is a folder; name a file" in one_error_line(code, err)


def test_earlier_results_are_kept_unless_forced(tmp_path, verdict, capsys):
    for argv in (["prepare", str(verdict), "--out-dir", str(tmp_path / "data")],
                 ["train", str(verdict), "--out", str(tmp_path / "v.json"), "--vocab-size", "260"]):
        assert run_in_process("tokenizer.py", argv, capsys)[0] == 0
        before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
        code, _, err = run_in_process("tokenizer.py", argv, capsys)
        assert "--force" in one_error_line(code, err)
        assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before
        assert run_in_process("tokenizer.py", [*argv, "--force"], capsys)[0] == 0


@pytest.mark.parametrize("command", ["encode", "prepare", "train"])
def test_help_says_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        tokenizer.parse_args([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in help_text
    for flag_help in help_text.split(" --")[1:]:
        assert flag_help.count("(default:") <= 1, flag_help


def test_prepare_writes_into_out_dir(tmp_path, verdict, capsys):
    out = tmp_path / "tokens"
    code, _, _ = run_in_process("tokenizer.py", ["prepare", str(verdict), "--out-dir", str(out)], capsys)
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]

