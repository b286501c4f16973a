"""The README's quick-start lines run as written, in order, from a fresh folder, the way a new user
types them; each gets flags appended that only make it small (fewer steps, a smaller model, shorter
answers). Lines marked "download:" fetch model weights from the Hub, which a test cannot do here:
they are skipped with that reason unless LLM_TEST_DOWNLOADS=1. A line that reads what an earlier line
writes (out/pretrain, out/hf, the spam classifier, out/instruct-mini) runs that line first if it has not
run, so each line's test stands alone; and each line's test checks what the line is for, not only its
exit code. Only the Mistral lines need Mistral's tokenizer."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

import download


FILES = ("gpt2/encoder.json", "gpt2/vocab.bpe", "text/tinyshakespeare.txt", "text/the-verdict.txt",
         "sms_spam/SMSSpamCollection", "instruct/instruction-data.json")
MISTRAL = "hf/mistralai/Mistral-7B-v0.1/tokenizer.model"  # only the lines that name Mistral need it
pytestmark = pytest.mark.needs_files(*FILES)


def quick_start_lines() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Quick start"):]
    block = section[section.index("```bash\n") + len("```bash\n"):section.index("```\n", section.index("```bash\n") + 8)]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def small(line: str) -> str:
    """The flags that make a line's run small, by script; appended, so they win over the line's own."""
    command = line.split("#")[0].rstrip()
    extra = {
        "pretrain.py": "--max-steps {steps} --warmup-steps 1 --eval-every 1 --eval-batches 1 --sample-tokens 8",
        "finetune_spam.py": "--epochs 1",
        "finetune_instruct.py": "--epochs 1 --max-length 24 --batch-size 32 --max-new-tokens 8 --eval-every 10",
        "generate.py": "--max-new-tokens 8",
        # the test's instruct-mini is the tiny preset (64 tokens of context): pairs short enough for it
        "finetune_preference.py": "--data short-pairs.json --batch-size 4 --eval-every 2 --max-new-tokens 4",
    }
    script = re.search(r"python (\w+\.py)", command).group(1)
    flags = extra.get(script, "")
    if "--preset mini" in command:  # the laptop-sized model, smaller still for a test
        flags += " --preset tiny"
    if "--plan" in command:
        flags = ""
    return f"{command} {flags.format(steps=4 if '--resume' in command else 2)}".rstrip()


LINES = quick_start_lines()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A fresh folder as a new user's: the repository's scripts, and the corpus files the lines name."""
    folder = tmp_path_factory.mktemp("quickstart")
    for script in REPO.glob("*.py"):
        shutil.copy(script, folder)
    verdict = download.fetch("text/the-verdict.txt")
    (folder / "corpus").mkdir()
    shutil.copy(verdict, folder / "corpus" / "verdict.txt")
    (folder / "corpus" / "short.txt").write_text("A short second document.\n" * 40)
    shutil.copy(verdict, folder / "corpus.txt")
    pairs = [{"instruction": f"Greet person {i}.", "input": "", "output": "Hello!", "chosen": "Hello, nice to meet you!",
              "rejected": "Go away."} for i in range(40)]
    (folder / "short-pairs.json").write_text(json.dumps(pairs))
    return folder


def test_the_quick_start_has_lines_for_every_stage():
    scripts = {re.search(r"python (\w+\.py)", line).group(1) for line in LINES}
    assert scripts == {"tokenizer.py", "pretrain.py", "generate.py", "load_gpt2.py", "finetune_spam.py",
                       "finetune_instruct.py", "finetune_preference.py", "evaluate.py", "rag.py"}


def prerequisites(line: str) -> list[str]:
    """The earlier lines whose files this line reads."""
    def first(*words: str) -> str:
        return next(earlier for earlier in LINES if all(w in earlier for w in words))
    needed = []
    if "pretrain.py --resume" in line or "--init out/pretrain/" in line:
        needed.append(first("python pretrain.py "))
    if "--init out/hf" in line:
        needed.append(first("--export out/hf"))
    if "finetune_spam.py --predict" in line:
        needed.append(first("finetune_spam.py --init random"))
    if "out/instruct-mini/" in line:
        needed.append(first("finetune_instruct.py", "--out-dir out/instruct-mini"))
    if "--tokenizer out/bpe.json" in line:
        needed.append(first("tokenizer.py train"))
    if "--index out/index" in line:
        needed.append(first("rag.py index"))
    return needed


def check_output(line: str, result: subprocess.CompletedProcess, workdir: Path) -> None:
    """What the line is for, beyond its exit code."""
    out = result.stdout
    if "tokenizer.py prepare" in line:
        assert list((workdir / "out" / "tokens").rglob("*.bin")), "no token files"
    elif "tokenizer.py train" in line:
        assert (workdir / "out" / "bpe.json").is_file()
    elif "tokenizer.py" in line:
        assert "It's" in out or "ids" in out, out[-500:]
    elif "--plan" in line:
        assert "FLOP" in out or "flop" in out.lower(), out[-500:]
    elif "pretrain.py" in line:
        folder = workdir / (re.search(r"--out-dir (\S+)", line).group(1) if "--out-dir" in line else "out/pretrain")
        records = (folder / "metrics.jsonl").read_text().splitlines()
        assert (folder / "best.pt").is_file() and records, folder
    elif "--export" in line:
        assert (workdir / "out" / "hf" / "config.json").is_file()
    elif "generate.py" in line:
        prompt = re.search(r'--prompt "([^"]*)"', line).group(1)
        assert out.startswith(prompt) and len(out.strip()) > len(prompt), out[-500:]
    elif "finetune_spam.py --predict" in line:
        labels = [row.split()[0] for row in out.splitlines() if row.strip()]
        assert labels and set(labels) <= {"spam", "ham"}, out[-500:]
    elif "finetune_spam.py" in line:
        assert list(workdir.glob("out/**/classifier.pt")), "no classifier saved"
    elif "finetune_instruct.py --checkpoint" in line:
        assert out.strip(), "no answer"
    elif "finetune_instruct.py" in line:
        assert (workdir / "out" / "instruct-mini" / "test-responses.json").is_file()
    elif "finetune_preference.py" in line:
        folder = workdir / "out" / "preference-mini"
        records = [json.loads(row) for row in (folder / "metrics.jsonl").read_text().splitlines()]
        assert records[0]["step"] == 0 and abs(records[0]["train_loss"] - 0.6931) < 1e-3, records[0]
        assert (folder / "model.pt").is_file() and (folder / "test-responses.json").is_file()
    elif "rag.py index" in line:
        assert (workdir / "out" / "index" / "meta.json").is_file()
    elif "rag.py search" in line:
        assert "verdict" in out.lower(), out[-500:]
    elif "evaluate.py" in line:
        subcommand = line.split()[2]
        expected = {"answers": "ROUGE-L", "perplexity": "perplexity", "contamination": "contaminat"}[subcommand]
        assert expected.lower() in out.lower(), out[-500:]


RAN: dict[str, bool] = {}  # line -> whether it ran and passed, this session


def run_line(workdir: Path, line: str) -> None:
    for earlier in prerequisites(line):
        if earlier not in RAN:
            run_line(workdir, earlier)
        assert RAN[earlier], f"this line needs the earlier line `{earlier}`, which failed"
    command = small(line).replace("python ", f"{sys.executable} ")
    RAN[line] = False
    result = subprocess.run(["bash", "-c", command], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr
    check_output(line, result, workdir)
    RAN[line] = True


@pytest.mark.parametrize("line", [pytest.param(line, marks=pytest.mark.needs_files(*FILES, MISTRAL)) if "mistral" in line.lower()
                                  else line for line in LINES], ids=range(len(LINES)))
def test_quick_start_line_runs_as_written(workdir, line):
    if "download:" in line and os.environ.get("LLM_TEST_DOWNLOADS") != "1":
        pytest.skip("downloads model weights from the Hugging Face Hub (set LLM_TEST_DOWNLOADS=1 to run it)")
    if line not in RAN:  # a later line may have run it already as its prerequisite
        run_line(workdir, line)
    assert RAN[line], "this line failed when a later line's test ran it first, as that line's prerequisite"
