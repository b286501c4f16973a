"""Every stage's command line on bad input: one line on stderr, a non-zero exit, no traceback, and the
files already in the run folder untouched.

Each case is (script, arguments); {out} is a run folder that already holds a finished run's files
(its contents are compared before and after), {tmp} a scratch folder, {file} a regular file, {empty}
a zero-byte file, {junk} a file of random bytes, {st} a safetensors file, {odd} a token folder whose
train.bin has an odd size, {short} one whose train.bin is shorter than its meta.json says, {badmeta}
one whose meta.json is not JSON, {badinstruct} instruction data with an entry that has no output.
Cases the project cannot reach on this machine (a download) are not here: they are tested where the
download code is.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_in_process

pytestmark = pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe")

CASES = [
    # pretrain.py: values that mean nothing, files that are not what they claim, folders in use
    ("pretrain.py", "--lr nan"), ("pretrain.py", "--lr -1"), ("pretrain.py", "--grad-clip -1"),
    ("pretrain.py", "--weight-decay -1"), ("pretrain.py", "--min-lr 0.1 --lr 0.01"),
    ("pretrain.py", "--max-steps 0"), ("pretrain.py", "--batch-size 0"), ("pretrain.py", "--dropout 1.5"),
    ("pretrain.py", "--preset nope"), ("pretrain.py", "--device cuda:7"), ("pretrain.py", "--out-dir {file}"),
    ("pretrain.py", "--out-dir {file}/sub"), ("pretrain.py", "--init {empty} --out-dir {tmp}/a"),
    ("pretrain.py", "--init {junk} --out-dir {tmp}/b"), ("pretrain.py", "--resume --out-dir {tmp}/none"),
    ("pretrain.py", "--data {odd} --out-dir {tmp}/c"), ("pretrain.py", "--data {short} --out-dir {tmp}/d"),
    ("pretrain.py", "--data {badmeta} --out-dir {tmp}/e"), ("pretrain.py", "--data {tmp}/missing.txt --out-dir {tmp}/f"),
    ("pretrain.py", "--preset tiny --out-dir {out}"),  # a finished run is there: needs --resume or another folder
    # generate.py
    ("generate.py", "--temperature nan --init random --preset tiny --prompt hi"),
    ("generate.py", "--temperature -1 --init random --preset tiny --prompt hi"),
    ("generate.py", "--max-new-tokens -1 --init random --preset tiny --prompt hi"),
    ("generate.py", "--max-new-tokens 0 --init random --preset tiny --prompt hi"),
    ("generate.py", "--stop '' --init random --preset tiny --prompt hi"),
    ("generate.py", "--top-p 0 --init random --preset tiny --prompt hi"),
    ("generate.py", "--top-k 0 --init random --preset tiny --prompt hi"),
    ("generate.py", "--init {empty} --prompt hi"), ("generate.py", "--init {junk} --prompt hi"),
    ("generate.py", "--init {tmp}/nowhere --prompt hi"), ("generate.py", "--init random --prompt hi"),
    ("generate.py", "--init random --preset tiny --prompt hi --max-new-tokens 500"),
    # finetune_spam.py
    ("finetune_spam.py", "--lr -1"), ("finetune_spam.py", "--lr nan"), ("finetune_spam.py", "--epochs 0"),
    ("finetune_spam.py", "--weight-decay -1"), ("finetune_spam.py", "--lora-rank 0"),
    ("finetune_spam.py", "--init random --preset tiny --out-dir {file}"),
    ("finetune_spam.py", "--init random --preset tiny --out-dir {out}"),  # holds a classifier: needs --force
    ("finetune_spam.py", "--init random --preset tiny --resume --out-dir {tmp}/nothing"),
    ("finetune_spam.py", "--checkpoint {empty} --predict hi"), ("finetune_spam.py", "--checkpoint {junk} --predict hi"),
    ("finetune_spam.py", "--checkpoint {st} --predict hi"), ("finetune_spam.py", "--checkpoint {tmp}/none.pt --predict hi"),
    ("finetune_spam.py", "--data {junk} --init random --preset tiny --out-dir {tmp}/g"),
    ("finetune_spam.py", "--init gpt2 --preset tiny"),
    # load_gpt2.py
    ("load_gpt2.py", "--init {empty}"), ("load_gpt2.py", "--init {junk}"), ("load_gpt2.py", "--init {tmp}/nowhere"),
    ("load_gpt2.py", "--init random --preset tiny --export {out}"),  # a folder that holds a model
    ("load_gpt2.py", "--init random --preset tiny --export {file}"),
    ("load_gpt2.py", "--top 0"),
    # tokenizer.py
    ("tokenizer.py", "prepare {tmp}/missing.txt --out-dir {tmp}/t1"), ("tokenizer.py", "prepare {file} --out-dir {file}"),
    ("tokenizer.py", "prepare {file} --out-dir {file}/sub"), ("tokenizer.py", "prepare {file} --val-fraction 1.5"),
    ("tokenizer.py", "prepare {file} --threads 0"), ("tokenizer.py", "train {file} --out {file}/sub/v.json"),
    ("tokenizer.py", "train {file} --vocab-size 10 --out {tmp}/v.json"), ("tokenizer.py", "train {junk} --out {tmp}/v2.json"),
    ("tokenizer.py", "encode"),
    # finetune_instruct.py
    ("finetune_instruct.py", "--lr nan"), ("finetune_instruct.py", "--epochs -1"),
    ("finetune_instruct.py", "--init random --preset tiny --data {badinstruct} --out-dir {tmp}/i1"),
    ("finetune_instruct.py", "--init random --preset tiny --data {junk} --out-dir {tmp}/i2"),
    ("finetune_instruct.py", "--init random --preset tiny --data {tmp}/none.json --out-dir {tmp}/i3"),
    ("finetune_instruct.py", "--ask hi --checkpoint {tmp}/missing.pt"),
    ("finetune_instruct.py", "--ask hi --checkpoint {junk}"),
    ("finetune_instruct.py", "--ask -"),  # stdin holds nothing
    # evaluate.py
    ("evaluate.py", "perplexity --init {empty}"), ("evaluate.py", "perplexity --init {junk}"),
    ("evaluate.py", "perplexity --init random --preset tiny --data {tmp}/missing.txt"),
    ("evaluate.py", "choice --init random --preset tiny --data {junk}"),
    ("evaluate.py", "contamination --eval {tmp}/none.json --corpus {file}"),
    ("evaluate.py", "answers {junk}"), ("evaluate.py", "answers {tmp}/none.json"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    (root / "tmp").mkdir()
    (root / "file").write_text("a small text file\n" * 50)
    (root / "empty").write_bytes(b"")
    (root / "junk").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "bad.json").write_text('[{"instruction": "a"}]')  # instruction data without an output
    from safetensors_file import write_safetensors
    write_safetensors({"w": torch.zeros(2, 2)}, root / "st.safetensors")
    # a run folder with a finished pretraining run, a spam classifier and an exported model in it
    out = root / "out"
    import model as M
    tiny = M.GPT(M.get_config("tiny"))
    M.save_checkpoint(out / "ckpt.pt", tiny, step=1, model_type="gpt2", tokenizer="gpt2")
    M.save_checkpoint(out / "classifier.pt", tiny, model_type="gpt2", tokenizer="gpt2")
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"x")
    # token folders that lie
    for name, tokens, claim in (("odd", 101, 101), ("short", 100, 120), ("badmeta", 100, None)):
        folder = root / name
        folder.mkdir()
        data = np.arange(tokens, dtype=np.uint16).tobytes()
        (folder / "train.bin").write_bytes(data + (b"\0" if name == "odd" else b""))
        (folder / "val.bin").write_bytes(np.arange(50, dtype=np.uint16).tobytes())
        meta = {"vocab_size": 50257, "eot_token": 50256, "train_tokens": claim, "val_tokens": 50, "sources": []}
        (folder / "meta.json").write_text("{not json" if claim is None else json.dumps(meta))
    names = {"tmp": root / "tmp", "file": root / "file", "empty": root / "empty", "junk": root / "junk",
             "st": root / "st.safetensors", "out": out, "odd": root / "odd", "short": root / "short",
             "badmeta": root / "badmeta", "badinstruct": root / "bad.json"}
    return {key: str(path) for key, path in names.items()}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("script, arguments", CASES, ids=[f"{s} {a}" for s, a in CASES])
def test_bad_input_is_one_sentence(places, script, arguments, capsys, monkeypatch):
    import shlex
    argv = [part.format(**places) for part in shlex.split(arguments)]
    out = Path(places["out"])
    before = snapshot(out)
    monkeypatch.chdir(places["tmp"])
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    code, _, stderr = run_in_process(script, argv, capsys)
    assert code not in (0, 130), f"exit {code}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert snapshot(out) == before, "the run folder changed"


@pytest.mark.parametrize("script, arguments", [("pretrain.py", "--lr nan"), ("generate.py", "--init {empty}"),
                                               ("finetune_spam.py", "--checkpoint {junk} --predict hi"),
                                               ("load_gpt2.py", "--init {junk}"), ("tokenizer.py", "encode"),
                                               ("finetune_instruct.py", "--ask -"),
                                               ("evaluate.py", "answers {junk}")])
def test_bad_input_on_the_real_command_line(places, script, arguments):
    """A few of the cases above as a user meets them: a fresh Python process, a real exit code."""
    import shlex
    argv = [part.format(**places) for part in shlex.split(arguments)]
    result = subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True,
                            cwd=places["tmp"], timeout=180, stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


@pytest.mark.parametrize("script, arguments", [("generate.py", "--init random --preset tiny --prompt hi"),
                                               ("pretrain.py", "--init random --preset tiny --out-dir {tmp}/no-compiler")])
def test_compile_without_a_cpp_compiler_is_one_sentence(places, script, arguments, capsys, monkeypatch):
    """On a CPU, torch.compile builds C++ kernels; without a compiler the run stops before any work."""
    argv = [part.format(**places) for part in arguments.split()] + ["--device", "cpu", "--compile"]
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(places["tmp"]))  # shutil.which finds neither g++ nor clang++ there
    code, _, stderr = run_in_process(script, argv, capsys)
    assert code == 1 and stderr.strip() == "error: --compile on a CPU needs a C++ compiler (g++, clang++, or the one " \
        "$CXX names) and none was found; install one, or leave out --compile", stderr
    assert not (Path(places["tmp"]) / "no-compiler").exists()
