"""The flags every stage shares, checked in one place: the same name and the same meaning everywhere.

A learner who has used `--out-dir`, `--seed`, `--force` or `--device` in one script should find them,
spelled the same and meaning the same, in every script where they make sense; and `--help` should say
each default once (never "(default: None)").
"""
import importlib
import re

import pytest

from common import SEED

# Each command: (script, subcommand or None, the arguments that make its parse_args succeed).
COMMANDS = [
    ("tokenizer", "prepare", ["prepare", "corpus.txt"]), ("tokenizer", "train", ["train", "corpus.txt"]),
    ("generate", None, []), ("pretrain", None, []), ("finetune_spam", None, []), ("finetune_instruct", None, []),
    ("finetune_preference", None, []), ("evaluate", "perplexity", ["perplexity"]),
    ("evaluate", "choice", ["choice", "--data", "x.jsonl"]),
    ("evaluate", "contamination", ["contamination", "--eval", "x.jsonl", "--corpus", "c.txt"]),
    ("evaluate", "memorization", ["memorization", "--data", "x.txt"]),
    ("evaluate", "answers", ["answers", "answers.json"]), ("serve", None, []), ("rag", "index", ["index"]),
    ("rag", "search", ["search", "a query"]), ("rag", "ask", ["ask", "a question"]), ("rag", "compare", ["compare"]),
]
IDS = [f"{script} {sub}" if sub else script for script, sub, _ in COMMANDS]

# Which commands must accept which shared flags.
LOADS_A_MODEL = {"generate", "pretrain", "finetune_spam", "finetune_instruct", "finetune_preference",
                 "evaluate perplexity", "evaluate choice", "evaluate memorization", "serve", "rag ask", "rag compare"}
RUN_FOLDER = {"pretrain", "finetune_spam", "finetune_instruct", "finetune_preference"}  # a run to resume or redo
SEEDED = LOADS_A_MODEL | {"evaluate answers"}  # everything that draws random numbers or builds random weights
WRITES_FILES = RUN_FOLDER | {"tokenizer prepare", "tokenizer train", "evaluate perplexity", "evaluate choice",
                             "evaluate contamination", "evaluate memorization", "evaluate answers", "rag index",
                             "rag search", "rag compare"}

MODEL_FLAGS = ["--init", "--preset", "--device", "--dtype", "--seed"]
RUN_FOLDER_FLAGS = ["--out-dir", "--force", "--resume", "--seed"]


def help_text(script: str, sub: str | None, capsys) -> str:
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit:
        module.parse_args([sub, "--help"] if sub else ["--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


def flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


def option_blocks(text: str) -> list[str]:
    """The help of each option: from a line that starts with '  -' to the next such line."""
    options = text[text.index("options:"):]
    return [block for block in re.split(r"\n(?=  -)", options) if block.strip().startswith("-")]


@pytest.mark.parametrize("script, sub, argv", COMMANDS, ids=IDS)
def test_shared_flags_are_accepted_where_they_make_sense(script, sub, argv, capsys):
    name = f"{script} {sub}" if sub else script
    accepted = flags(help_text(script, sub, capsys))
    wanted = set()
    if name in LOADS_A_MODEL:
        wanted |= set(MODEL_FLAGS)
    if name in RUN_FOLDER:
        wanted |= set(RUN_FOLDER_FLAGS)
    if name in SEEDED:
        wanted.add("--seed")
    if name in WRITES_FILES:
        wanted.add("--force")  # nothing already written is replaced without it
    assert wanted <= accepted, f"{name} lacks {sorted(wanted - accepted)}"
    # one name per idea: the output folder is --out-dir wherever a stage writes a run folder
    if name in RUN_FOLDER or name == "tokenizer prepare":
        assert "--out-dir" in accepted and "--out" not in accepted


@pytest.mark.parametrize("script, sub, argv", COMMANDS, ids=IDS)
def test_shared_flags_mean_the_same_everywhere(script, sub, argv, capsys):
    name = f"{script} {sub}" if sub else script
    args = importlib.import_module(script).parse_args(argv)
    if name in SEEDED:
        assert args.seed == SEED, f"{name}'s --seed defaults to {args.seed}, not the project's {SEED}"
    if hasattr(args, "device"):
        assert args.device == "auto" and args.dtype == "auto"
    if hasattr(args, "force"):
        assert args.force is False
    if hasattr(args, "resume"):
        assert args.resume is False


@pytest.mark.parametrize("script, sub, argv", COMMANDS, ids=IDS)
def test_help_says_each_default_once(script, sub, argv, capsys):
    text = help_text(script, sub, capsys)
    assert "(default: None)" not in text
    for block in option_blocks(text):
        said = len(re.findall(r"default", " ".join(block.split()), flags=re.IGNORECASE))
        assert said <= 1, f"a default said {said} times: {' '.join(block.split())}"
