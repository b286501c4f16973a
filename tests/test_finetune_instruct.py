"""finetune_instruct.py: data checks, templates, batches, training, answers, --ask, and runs that go wrong.

Everything runs offline on tiny random models (GPT-2's "tiny" preset; the families' tiny presets
where load_model gives them their own tokenizer) and on small datasets written into tmp_path;
conftest.py seeds the download cache with the GPT-2 BPE files and the book's instruction data."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune_instruct as fi

import data
import generate
import templates
import training
from common import RunLock, SEED, UserError, run_stage
from download import DownloadError, cache_dir
from load_gpt2 import load_model, model_card, tokenizer_for
from model import load_checkpoint, save_checkpoint
from tokenizer import get_tokenizer


REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe")

FACTS = [  # four short, distinct entries: a tiny model can learn them by heart
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "input": "", "output": "Hello there!"},
    {"instruction": "Give an antonym.", "input": "hot", "output": "cold"},
]


@pytest.fixture
def data_file(tmp_path) -> Path:
    """20 entries, the four FACTS in turn: train 0-16, test 17-18, validation 19, all seen in training."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps([FACTS[i % 4] for i in range(20)]), encoding="utf-8")
    return path


def tiny_args(tmp_path, data_file, *extra: str):
    return fi.parse_args(["--init", "random", "--preset", "tiny", "--data", str(data_file),
                          "--out-dir", str(tmp_path / "out"), "--epochs", "2", "--eval-every", "2", *extra])


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    model, _ = load_model("random", preset="tiny")
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Data

@pytest.mark.needs_files("instruct/instruction-data.json")
def test_default_data_splits_as_the_book_935_110_55():
    splits = data.split_entries(data.load_entries(data.default_data()))
    assert [len(splits[k]) for k in ("train", "test", "val")] == [935, 110, 55]
    entries = json.loads(data.default_data().read_text())
    assert splits["train"][0] == entries[0] and splits["test"][0] == entries[935] and splits["val"][0] == entries[1045]


def test_jsonl_reads_like_json_and_a_missing_input_is_empty(tmp_path):
    entries = [dict(FACTS[i % 4]) for i in range(12)]
    del entries[0]["input"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n\n")
    (tmp_path / "a.json").write_text(json.dumps(entries))
    assert data.load_entries(tmp_path / "a.jsonl") == data.load_entries(tmp_path / "a.json")
    assert data.load_entries(tmp_path / "a.json")[0]["input"] == ""


BAD_DATA = [  # (file content, what the one sentence must say)
    ('[{"instruction": "a", "input": "", "output": "b"},', "is not valid JSON"),
    ('{"instruction": "a", "input": "", "output": "b"}\nnot json\n', "line 2 is not valid JSON"),
    ('[["a", "", "b"]]', "line 1 holds a JSON list, not an object"),
    ('[{"instruction": "a", "input": ""}]', r"entry 0 \(line 1\) has no 'output'"),
    ('[{"instruction": 7, "input": "", "output": "b"}]', r"entry 0 \(line 1\) has a int as its 'instruction'"),
    ('[{"instruction": "a", "input": "", "output": " "}]', r"entry 0 \(line 1\) has an empty 'output'"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "input": 3, "output": "b"}',
     r"entry 1 \(line 2\) has a int as its 'input'"),
    ('[' + ", ".join(['{"instruction": "a", "input": "", "output": "b"}'] * 9) + ']', "holds 9 entries"),
]


@pytest.mark.parametrize("content, message", BAD_DATA)
def test_a_bad_data_file_is_one_sentence_naming_the_entry(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        data.load_entries(path)


def test_missing_and_non_utf8_data_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_entries(tmp_path / "nothing.json")
    (tmp_path / "latin1.json").write_bytes(b'[{"instruction": "caf\xe9"}]')
    with pytest.raises(UserError, match="not valid UTF-8"):
        data.load_entries(tmp_path / "latin1.json")


# ---------------------------------------------------------------------------------------------------
# Templates and examples

def test_alpaca_prompt_is_the_books_format_plus_the_response_header():
    book = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3")
    assert templates.alpaca_prompt("Add the numbers.", "2 and 3") == book + "\n\n### Response:\n"
    assert "### Input" not in templates.alpaca_prompt("Name a color.", "")


def test_chat_templates_follow_the_models_own_formats():
    assert templates.mistral_prompt("Add the numbers.", "2 and 3") == "[INST] Add the numbers.\n\n2 and 3 [/INST]"
    assert templates.phi3_prompt("Say hello.", "") == "<|user|>\nSay hello.<|end|>\n<|assistant|>\n"
    assert templates.default_template({"model_type": "mistral", "tokenizer": "x"}) == "mistral"
    assert templates.default_template({"model_type": "phi3", "tokenizer": "x"}) == "phi3"
    assert templates.default_template({"model_type": "gpt2", "tokenizer": "gpt2"}) == "alpaca"
    assert templates.default_template({"model_type": "mistral", "tokenizer": "x", "template": "alpaca"}) == "alpaca"


def test_an_example_is_prompt_response_and_the_end_token():
    tok, template = get_tokenizer(), templates.TEMPLATES["alpaca"]
    example, cut = data.make_example(tok, template, FACTS[1], max_length=1024)
    prompt = tok.encode_ordinary(templates.alpaca_prompt(FACTS[1]["instruction"], FACTS[1]["input"]))
    assert example.ids == prompt + tok.encode_ordinary("5") + [50256] and example.prompt_len == len(prompt)
    assert not cut
    short, cut = data.make_example(tok, template, FACTS[1], max_length=10)
    assert cut and short.ids == example.ids[:11]  # 10 inputs and 10 targets


def test_collate_matches_a_hand_written_reference():
    # prompt [1, 2, 3] + response [4, 5] + end 9; prompt [6, 7] + response [8] + end 9; padding id 0
    batch = [data.Example([1, 2, 3, 4, 5, 9], 3), data.Example([6, 7, 8, 9], 2)]
    inputs, targets = data.collate(batch, pad_id=0)
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    assert targets.tolist() == [[2, 3, 4, 5, 9], [7, 8, 9, -100, -100]]  # the end token counts, padding never
    _, masked = data.collate(batch, pad_id=0, mask_prompt=True)
    assert masked.tolist() == [[-100, -100, 4, 5, 9], [-100, 8, 9, -100, -100]]  # only response and end token
    inputs, targets = data.collate([data.Example([1, 2, 3, 4], 3)], pad_id=0)  # cut by make_example: no end token
    assert inputs.tolist() == [[1, 2, 3]] and targets.tolist() == [[2, 3, 4]]


def test_length_grouped_batches_cover_each_example_once_with_little_padding():
    lengths = torch.randint(20, 200, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    g = torch.Generator().manual_seed(1)
    grouped, plain = data.length_grouped_batches(lengths, 8, g), data.random_batches(len(lengths), 8, g)
    assert sorted(i for b in grouped for i in b) == list(range(500)) and len(grouped) == len(plain) == 63
    padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded(grouped) < 1.05 * sum(lengths) < 1.3 * sum(lengths) < padded(plain)
    assert grouped != data.length_grouped_batches(lengths, 8, g)  # a new order every epoch


def test_target_loss_equals_the_models_own_loss(tiny_model):
    inputs, targets = data.collate([data.Example([1, 2, 3, 4, 5, 9], 3), data.Example([6, 7, 8, 9], 2)], 0, True)
    loss, n = fi.target_loss(tiny_model, inputs, targets)
    _, reference = tiny_model(inputs, targets)
    assert n == 5
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Answers

def greedy_without_cache(model, prompt: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """The plain reference: the whole sequence through the model for every new token."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids]))
        token = int(logits[0, -1].argmax())
        if token in stop:
            break
        ids.append(token)
    return ids[len(prompt):]


def test_batched_left_padded_answers_equal_answering_each_prompt_alone(tiny_model):
    tok, template = get_tokenizer(), templates.TEMPLATES["alpaca"]
    prompts = [tok.encode_ordinary(text) for text in ("Hi", "Tell me a story about a cat", "Why is the sky", "x " * 20)]
    kwargs = dict(max_new_tokens=12, device=torch.device("cpu"), dtype=torch.float32)
    batched = generate.answer(tiny_model, prompts, tok, template, batch_size=4, **kwargs)
    alone = [generate.answer(tiny_model, [p], tok, template, batch_size=1, **kwargs)[0] for p in prompts]
    assert batched == alone
    stops = templates.stop_ids(tok, template)
    reference = [tok.decode(greedy_without_cache(tiny_model, p, 12, stops)).strip() for p in prompts]
    assert batched == reference and sum(map(len, reference)) > 100  # (a row may write only spaces)


def test_an_answer_stops_at_the_templates_next_header(tiny_model, monkeypatch):
    tok = get_tokenizer()
    script = tok.encode_ordinary("Paris.\n\n### Instruction:\nNext") + [50256]  # what the "model" writes
    def scripted_generate(model, ids, max_new_tokens, **kwargs):
        for token in script[:max_new_tokens]:
            yield torch.full((ids.size(0),), token)
    monkeypatch.setattr(generate, "generate", scripted_generate)
    kwargs = dict(max_new_tokens=40, batch_size=2, device=torch.device("cpu"), dtype=torch.float32)
    assert generate.answer(tiny_model, [[1, 2], [3]], tok, templates.TEMPLATES["alpaca"], **kwargs) == ["Paris.", "Paris."]
    # mistral's header is another: its answer runs on to the end token
    assert generate.answer(tiny_model, [[1]], tok, templates.TEMPLATES["mistral"], **kwargs) == ["Paris.\n\n### Instruction:\nNext"]


# ---------------------------------------------------------------------------------------------------
# Training runs

def test_a_tiny_model_learns_the_examples_until_its_answers_reproduce_them(tmp_path, data_file):
    # full-batch steps (17 training entries), only the responses in the loss: 80 steps learn them by heart
    args = tiny_args(tmp_path, data_file, "--epochs", "80", "--batch-size", "17", "--lr", "1e-2",
                     "--weight-decay", "0", "--mask-prompt", "--eval-every", "20", "--seed", "123")
    metrics = fi.main(args)
    responses = json.loads((tmp_path / "out" / fi.RESPONSES_FILE).read_text())
    assert [r["model_response"] for r in responses] == [r["output"] for r in responses] == ["5", "Hello there!"]
    assert {"instruction", "input", "output", "model_response"} == set(responses[0])
    saved = json.loads((tmp_path / "out" / fi.METRICS_FILE).read_text())
    assert saved["train_seconds"] > 0 and saved["answers_seconds"] > 0 and saved["settings"]["lr"] == 1e-2
    assert metrics["best_val_loss"] == min(r["val_loss"] for r in metrics["val_losses"][1:]) < 0.1
    assert len(metrics["train_losses"]) == 80 and not metrics["interrupted"]
    assert (metrics["empty_answers"], metrics["repeating_answers"]) == (0, 0)
    model, extra = load_checkpoint(tmp_path / "out" / fi.MODEL_FILE)
    assert extra["template"] == "alpaca" and extra["model_type"] == "gpt2" and extra["step"] == metrics["best_step"]


def test_the_checkpoint_loads_in_generate_and_answers_ask_in_a_subprocess(tmp_path, data_file):
    fi.main(tiny_args(tmp_path, data_file))
    checkpoint = str(tmp_path / "out" / fi.MODEL_FILE)
    out = generate.main(generate.parse_args(["--init", checkpoint, "--prompt", "Hi", "--max-new-tokens", "5"]))
    assert out["samples"][0].startswith("Hi")
    result = subprocess.run([sys.executable, str(REPO / "finetune_instruct.py"), "--checkpoint", checkpoint,
                             "--ask", "Name a color.", "--ask", "-", "--max-new-tokens", "4"],
                            input="Say hello.\n\n", capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("> ")] == ["> Name a color.",
                                                                                     "> Say hello."]


def test_a_lora_run_saves_a_merged_model_whose_logits_equal_the_unmerged_ones(tmp_path, data_file, monkeypatch):
    probe = torch.tensor([[50256, 464, 3290, 318, 257]])
    seen = {}
    real_merge = fi.merge_lora
    def merge_and_compare(model):
        with torch.no_grad():
            seen["unmerged"] = model.eval()(probe)[0]
            real_merge(model)
            seen["merged"] = model(probe)[0]
    monkeypatch.setattr(fi, "merge_lora", merge_and_compare)
    torch.manual_seed(SEED)  # the run's default --seed
    start, _ = load_model("random", preset="tiny")  # the run's initial weights: same seed, same init
    metrics = fi.main(tiny_args(tmp_path, data_file, "--trainable", "lora", "--lora-rank", "4", "--lr", "1e-2"))
    assert 0 < metrics["model"]["trainable_params"] < 0.01 * metrics["model"]["params"]  # the adapters only
    model, _ = load_checkpoint(tmp_path / "out" / fi.MODEL_FILE)  # only GPT's own keys: a plain GPT
    with torch.no_grad():
        saved = model.eval()(probe)[0]
        initial = start.eval()(probe)[0]
    torch.testing.assert_close(saved, seen["unmerged"], rtol=0, atol=1e-5)
    torch.testing.assert_close(seen["merged"], seen["unmerged"], rtol=0, atol=1e-5)
    assert (saved - initial).abs().max() > 1e-3  # LoRA did change the model


def test_max_length_cuts_and_reports_and_mask_prompt_leaves_out_examples_with_no_response(tmp_path, data_file):
    metrics = fi.main(tiny_args(tmp_path, data_file, "--max-length", "36", "--epochs", "1"))
    # the 44-token entries (FACTS 1 and 3): 8 of the training entries and the validation one
    assert metrics["data"]["truncated"] == 9 and metrics["data"]["max_tokens"] == 36
    with pytest.raises(UserError, match="no training example keeps a response token"):
        fi.main(tiny_args(tmp_path / "b", data_file, "--max-length", "20", "--mask-prompt"))
    with pytest.raises(UserError, match="longer than the model's context of 64"):
        fi.main(tiny_args(tmp_path / "c", data_file, "--max-length", "65"))


def test_epochs_0_answers_with_the_starting_model_and_saves_no_model(tmp_path, data_file):
    metrics = fi.main(tiny_args(tmp_path, data_file, "--epochs", "0", "--max-new-tokens", "3"))
    assert metrics["checkpoint"] is None and metrics["train_seconds"] == 0.0
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == \
        [fi.METRICS_FILE, fi.RESPONSES_FILE]


def test_empty_answers_are_counted_and_said_with_settings_that_work(tmp_path, data_file, monkeypatch, capsys):
    monkeypatch.setattr(fi, "answer", lambda model, prompts, *a, **k: [""] * (len(prompts) - 1) + ["ok"])
    metrics = fi.main(tiny_args(tmp_path, data_file, "--epochs", "0"))
    assert (metrics["empty_answers"], metrics["repeating_answers"]) == (1, 0)
    assert json.loads((tmp_path / "out" / fi.METRICS_FILE).read_text())["empty_answers"] == 1
    assert "note: 1 of 2 answers are empty; the model has not learned to answer yet" in capsys.readouterr().err
    assert data.degenerate_answers(["", "a a a", "aaaa", "a b a", "ab", "a a"]) == {"empty": 1, "repeating": 2}


def test_ask_says_when_an_answer_is_empty(tmp_path, monkeypatch, capsys):
    model, card = load_model("random", preset="tiny")
    save_checkpoint(tmp_path / "model.pt", model, **model_card(card))
    monkeypatch.setattr(fi, "answer", lambda *a, **k: [""])
    result = fi.main(fi.parse_args(["--checkpoint", str(tmp_path / "model.pt"), "--ask", "Name a colour."]))
    assert result["answers"][0]["model_response"] == ""
    out, err = capsys.readouterr()
    assert "(an empty answer)" in out and "note: 1 of 1 answers are empty; the model has not learned" in err


# ---------------------------------------------------------------------------------------------------
# Runs that are interrupted, go wrong, or meet an earlier run

def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def test_ctrl_c_saves_the_best_weights_so_far_and_exits_130(tmp_path, data_file, monkeypatch):
    real, calls = fi.evaluate_loss, []
    def interrupt_after_the_second_validation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # before finetuning, after step 2, then Ctrl-C during the one after step 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(fi, "evaluate_loss", interrupt_after_the_second_validation)
    args = tiny_args(tmp_path, data_file, "--epochs", "3", "--batch-size", "4")
    with pytest.raises(SystemExit) as exit:
        run_stage(fi.main, lambda: args)
    assert exit.value.code == 130
    out = tmp_path / "out"
    metrics = json.loads((out / fi.METRICS_FILE).read_text())
    assert metrics["interrupted"] and metrics["best_step"] == 2 and not (out / fi.RESPONSES_FILE).exists()
    _, extra = load_checkpoint(out / fi.MODEL_FILE)
    assert extra["step"] == 2


def test_resume_after_ctrl_c_finishes_like_an_uninterrupted_run(tmp_path, data_file, monkeypatch):
    whole = fi.main(tiny_args(tmp_path / "whole", data_file, "--max-new-tokens", "2"))
    assert not (tmp_path / "whole" / "out" / fi.STATE_FILE).exists()  # finished: no state kept
    real, calls = fi.evaluate_loss, []
    def interrupt_in_epoch_2(*args, **kwargs):
        calls.append(1)  # 3 steps an epoch: before finetuning, steps 2, 4, then Ctrl-C in the one of step 6
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(fi, "evaluate_loss", interrupt_in_epoch_2)
    stopped = fi.main(tiny_args(tmp_path / "run", data_file, "--max-new-tokens", "2"))
    monkeypatch.setattr(fi, "evaluate_loss", real)
    assert stopped["interrupted"] and stopped["epochs_done"] == 1
    with pytest.raises(UserError, match="holds an unfinished run"):
        fi.main(tiny_args(tmp_path / "run", data_file, "--max-new-tokens", "2"))
    with pytest.raises(UserError, match=r"--lr 5e-05 \(now 0.002\)"):
        fi.main(tiny_args(tmp_path / "run", data_file, "--max-new-tokens", "2", "--resume", "--lr", "2e-3"))
    resumed = fi.main(tiny_args(tmp_path / "run", data_file, "--max-new-tokens", "2", "--resume"))
    assert resumed["train_losses"] == pytest.approx(whole["train_losses"], rel=1e-5)
    assert resumed["best_step"] == whole["best_step"] and not resumed["interrupted"]
    assert not (tmp_path / "run" / "out" / fi.STATE_FILE).exists()
    assert (tmp_path / "run" / "out" / fi.RESPONSES_FILE).read_text() == \
        (tmp_path / "whole" / "out" / fi.RESPONSES_FILE).read_text()


def test_ctrl_c_while_answering_keeps_the_model_and_writes_no_answers(tmp_path, data_file, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(fi, "answer", interrupt)
    metrics = fi.main(tiny_args(tmp_path, data_file))
    assert metrics["interrupted"] and set(files_in(tmp_path / "out")) == {fi.MODEL_FILE, fi.METRICS_FILE, fi.LOSS_SVG}
    assert json.loads((tmp_path / "out" / fi.METRICS_FILE).read_text())["interrupted"]


def test_ctrl_c_before_the_first_validation_saves_nothing(tmp_path, data_file, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(fi, "target_loss", interrupt)
    metrics = fi.main(tiny_args(tmp_path, data_file))
    assert metrics["interrupted"] and files_in(tmp_path / "out") == {}


def test_a_loss_that_is_not_finite_stops_the_run_and_saves_nothing(tmp_path, data_file, monkeypatch):
    real, calls = fi.target_loss, []
    def poisoned(*args, **kwargs):
        calls.append(1)
        loss, n = real(*args, **kwargs)
        return (loss * float("nan"), n) if len(calls) > 4 else (loss, n)
    monkeypatch.setattr(fi, "target_loss", poisoned)
    with pytest.raises(UserError, match="the loss became nan at step"):
        fi.main(tiny_args(tmp_path, data_file, "--epochs", "3"))
    # no model, answers or metrics: only the curve up to the last evaluation, which shows the loss before it broke
    assert set(files_in(tmp_path / "out")) == {fi.LOSS_SVG}


def test_an_existing_run_is_kept_unless_force(tmp_path, data_file):
    fi.main(tiny_args(tmp_path, data_file, "--epochs", "1", "--max-new-tokens", "2"))
    before = files_in(tmp_path / "out")
    assert set(before) == {fi.MODEL_FILE, fi.METRICS_FILE, fi.RESPONSES_FILE, fi.LOSS_SVG}
    with pytest.raises(UserError, match="already holds a run"):
        fi.main(tiny_args(tmp_path, data_file, "--epochs", "1"))
    assert files_in(tmp_path / "out") == before
    fi.main(tiny_args(tmp_path, data_file, "--epochs", "1", "--max-new-tokens", "2", "--force", "--seed", "5"))
    assert files_in(tmp_path / "out")[fi.MODEL_FILE] != before[fi.MODEL_FILE]


def test_an_unwritable_or_locked_out_dir_stops_before_any_work(tmp_path, data_file, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(training, "load_model", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(UserError, match="is not a writable folder"):
        fi.main(fi.parse_args(["--init", "random", "--preset", "tiny", "--data", str(data_file),
                               "--out-dir", str(tmp_path / "file" / "sub")]))
    (tmp_path / "out").mkdir()
    with RunLock(tmp_path / "out"):
        with pytest.raises(UserError, match="is in use by another run"):
            fi.main(tiny_args(tmp_path, data_file))


def test_a_failed_run_leaves_no_empty_output_folder(tmp_path, data_file):
    out = tmp_path / "new" / "run"
    with pytest.raises(UserError, match="does not exist"):
        fi.main(fi.parse_args(["--init", "random", "--preset", "tiny", "--data", str(tmp_path / "none.json"),
                               "--out-dir", str(out)]))
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a folder that holds something is left as it is
    with pytest.raises(UserError, match="does not exist"):
        fi.main(fi.parse_args(["--init", "random", "--preset", "tiny", "--data", str(tmp_path / "none.json"),
                               "--out-dir", str(out)]))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_no_network_ends_with_a_sentence_offering_a_random_model(tmp_path, data_file, monkeypatch):
    def offline(*args, **kwargs):
        raise DownloadError("could not download https://huggingface.co/... (no connection to the server)")
    monkeypatch.setattr(training, "load_model", offline)
    with pytest.raises(UserError, match="--init random --preset mini --lr 3e-4") as caught:
        fi.main(fi.parse_args(["--data", str(data_file), "--out-dir", str(tmp_path)]))
    folder = cache_dir() / "hf" / "openai-community" / "gpt2-medium"  # the default --init's place in the cache
    assert f"config.json and model.safetensors in {folder}" in str(caught.value)


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--epochs", "-1"], "--epochs"),
    (["--lora-rank", "0"], "--lora-rank"), (["--max-length", "0"], "--max-length"),
    (["--template", "chatml"], "--template"), (["--temperature", "inf"], "--temperature"),
    (["--init", "gpt2", "--preset", "tiny"], "--preset only applies"), (["--init", "random"], "needs --preset"),
])
def test_bad_flags_are_refused_when_parsed(flags, message):
    with pytest.raises(UserError, match=message):
        fi.parse_args(flags)


# ---------------------------------------------------------------------------------------------------
# The script as a user runs it

def run_script(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "finetune_instruct.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_a_whole_run_in_a_subprocess(tmp_path, data_file):
    result = run_script("--init", "random", "--preset", "tiny", "--data", str(data_file), "--out-dir",
                        str(tmp_path / "out"), "--epochs", "1", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    command = f"python evaluate.py answers {tmp_path / 'out' / fi.RESPONSES_FILE}"
    assert result.stdout.rstrip().endswith(command)
    assert "reference:" in result.stdout and "model:" in result.stdout  # the examples, side by side


# Mistakes on the command line (bad flags, data and checkpoints, empty stdin): tests/test_cli_errors.py


# ---------------------------------------------------------------------------------------------------
# Other model families

class ByteTokenizer:
    """A stand-in for a family's tokenizer, with the project's tokenizer interface: bytes are ids 3..258,
    BOS 1, EOS 2, and Phi-3's chat markers special ids that only encode(..., allowed_special="all") makes."""
    bos_id, eos_id = 1, 2
    eot_token = eos_id
    special = {"<|user|>": 259, "<|end|>": 260, "<|assistant|>": 261}
    n_vocab = 262

    def encode_ordinary(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def encode(self, text: str, allowed_special=()) -> list[int]:
        if allowed_special != "all":
            return self.encode_ordinary(text)
        ids, rest = [], text
        while rest:
            at = min(((rest.find(m), m) for m in self.special if m in rest), default=(len(rest), None))
            ids += self.encode_ordinary(rest[:at[0]]) + ([self.special[at[1]]] if at[1] else [])
            rest = rest[at[0] + len(at[1] or ""):]
        return ids

    def decode(self, ids: list[int]) -> str:
        names = {i: m for m, i in self.special.items()}
        out, run = "", bytearray()
        for i in ids:
            if 3 <= i < 259:
                run.append(i - 3)
                continue
            out, run = out + run.decode("utf-8", errors="replace") + names.get(i, ""), bytearray()
        return out + run.decode("utf-8", errors="replace")


def test_phi3_markers_become_special_ids_and_stop_answers():
    tok, phi3 = ByteTokenizer(), templates.TEMPLATES["phi3"]
    ids = templates.prompt_ids(tok, phi3, "Hi")
    assert ids == [1, 259, 10 + 3, *tok.encode_ordinary("Hi"), 260, 10 + 3, 261, 10 + 3]
    example, _ = data.make_example(tok, phi3, {"instruction": "Hi", "input": "", "output": "Yo"}, 100)
    assert example.ids == ids + tok.encode_ordinary("Yo") + [260, 10 + 3, 2]  # '<|end|>\n', then EOS
    assert templates.stop_ids(tok, phi3) == {2, 259, 260, 261}
    assert templates.stop_ids(get_tokenizer(), phi3) == {50256}  # for GPT-2 the markers are plain text: stop strings


@pytest.mark.parametrize("preset, template", [("mistral-tiny", "mistral"), ("phi-3-tiny", "phi3")])
def test_a_family_model_trains_and_answers_with_its_template(tmp_path, data_file, monkeypatch, preset, template):
    """Rotary positions, grouped-query attention, RMSNorm, a BOS: nothing in the stage assumes GPT-2."""
    monkeypatch.setattr(fi, "tokenizer_for", lambda extra: ByteTokenizer())
    args = fi.parse_args(["--init", "random", "--preset", preset, "--data", str(data_file), "--out-dir",
                          str(tmp_path / "out"), "--epochs", "1", "--max-new-tokens", "6", "--answer-batch-size", "1"])
    metrics = fi.main(args)
    assert metrics["template"] == template and metrics["model"]["model_type"] != "gpt2"
    assert len(json.loads((tmp_path / "out" / fi.RESPONSES_FILE).read_text())) == 2
    model, saved = load_checkpoint(tmp_path / "out" / fi.MODEL_FILE)
    assert saved["template"] == template and saved["model_type"] == metrics["model"]["model_type"]
    prompts = [templates.prompt_ids(ByteTokenizer(), templates.TEMPLATES[template], f["instruction"], f["input"]) for f in FACTS]
    kwargs = dict(max_new_tokens=8, device=torch.device("cpu"), dtype=torch.float32)
    assert generate.answer(model, prompts, ByteTokenizer(), templates.TEMPLATES[template], batch_size=4, **kwargs) == \
        [generate.answer(model, [p], ByteTokenizer(), templates.TEMPLATES[template], batch_size=1, **kwargs)[0] for p in prompts]


@pytest.mark.parametrize("preset, template", [("mistral-tiny", "mistral"), ("phi-3-tiny", "phi3")])
@pytest.mark.needs_files("hf/mistralai/Mistral-7B-v0.1/tokenizer.model")
def test_a_family_model_trains_with_its_own_template_and_tokenizer(tmp_path, data_file, preset, template):
    model, extra = load_model("random", preset=preset)
    tok = tokenizer_for(extra)
    assert extra["model_type"] == {"mistral-tiny": "mistral", "phi-3-tiny": "phi3"}[preset]
    assert tok.n_vocab <= model.config.vocab_size
    metrics = fi.main(fi.parse_args(["--init", "random", "--preset", preset, "--data", str(data_file),
                                     "--out-dir", str(tmp_path / "out"), "--epochs", "1", "--max-new-tokens", "4"]))
    assert metrics["template"] == template and metrics["data"]["truncated"] == 0
    example, _ = data.make_example(tok, templates.TEMPLATES[template], FACTS[0], 256)
    assert tok.bos_id == 1 and example.ids[0] == tok.bos_id  # both families start with <s>
    assert example.ids[-1] == tok.eos_id
    _, saved = load_checkpoint(tmp_path / "out" / fi.MODEL_FILE)
    assert saved["template"] == template and saved["model_type"] == extra["model_type"]


def svg_points(path: Path) -> dict[str, list[tuple[float, float]]]:
    """loss.svg's marked points by series, (x, y) read back from each point's title ("val_loss 2.5 at step 4")."""
    import xml.etree.ElementTree as ET
    ns = "{http://www.w3.org/2000/svg}"
    points = {}
    for group in ET.parse(path).getroot().iter(f"{ns}g"):
        titles = [circle.find(f"{ns}title").text.split() for circle in group.iter(f"{ns}circle")]
        points[group.get("data-key")] = [(float(t[4]), float(t[1])) for t in titles]
    return points


def test_loss_svg_holds_one_point_per_evaluation_with_tokens_seen(tmp_path, data_file):
    metrics = fi.main(tiny_args(tmp_path, data_file, "--max-new-tokens", "3"))  # 6 steps, evaluated at 0, 2, 4, 6
    records = metrics["val_losses"]
    points = svg_points(tmp_path / "out" / fi.LOSS_SVG)
    assert [r["step"] for r in records] == [0, 2, 4, 6] and records[-1]["tokens_seen"] == metrics["tokens"]
    assert points["val_loss"] == [(r["step"], pytest.approx(r["val_loss"], rel=1e-3)) for r in records]
    losses = metrics["train_losses"]  # the training loss point: the mean of the steps since the last evaluation
    assert points["train_loss"] == [(s, pytest.approx(sum(losses[s - 2:s]) / 2, rel=1e-3)) for s in (2, 4, 6)]
    assert "tokens seen" in (tmp_path / "out" / fi.LOSS_SVG).read_text()
