"""The README's quick-start lines run as written, in order, from a fresh folder, the way a new user
types them; each gets flags appended that only make it small (fewer steps, a smaller model, shorter
answers). Lines marked "download:" fetch model weights from the Hub, which a test cannot do here:
they are skipped with that reason unless LLM_TEST_DOWNLOADS=1."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

import download


pytestmark = pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe", "text/tinyshakespeare.txt",
                                     "text/the-verdict.txt", "sms_spam/SMSSpamCollection",
                                     "instruct/instruction-data.json",
                                     "hf/mistralai/Mistral-7B-v0.1/tokenizer.model")


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
    return folder


def test_the_quick_start_has_lines_for_every_stage():
    scripts = {re.search(r"python (\w+\.py)", line).group(1) for line in LINES}
    assert scripts == {"tokenizer.py", "pretrain.py", "generate.py", "load_gpt2.py", "finetune_spam.py",
                       "finetune_instruct.py", "evaluate.py"}


@pytest.mark.parametrize("line", LINES, ids=range(len(LINES)))
def test_quick_start_line_runs_as_written(workdir, line):
    if "download:" in line and os.environ.get("LLM_TEST_DOWNLOADS") != "1":
        pytest.skip("downloads model weights from the Hugging Face Hub (set LLM_TEST_DOWNLOADS=1 to run it)")
    command = small(line).replace("python ", f"{sys.executable} ")
    result = subprocess.run(["bash", "-c", command], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr
