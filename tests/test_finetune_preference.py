"""finetune_preference.py: the DPO loss against a straightforward computation, the reference log-probs
computed once, training that prefers the chosen answers, resume, the run folder, and bad input.

Everything runs offline on GPT-2's "tiny" preset (random weights) and on small datasets written into
tmp_path; conftest.py seeds the download cache with the GPT-2 BPE files and the book's data."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune_preference as fp
from common import RunLock, UserError, run_stage
from load_gpt2 import load_model
from model import load_checkpoint
from templates import TEMPLATES
from tokenizer import get_tokenizer


REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe")

FACTS = [  # (instruction, input, a polite answer, a rude one): short enough for the tiny preset's 64 tokens
    ("Name a color.", "", "Blue.", "Ugh, blue, obviously."),
    ("Add the numbers.", "2 and 3", "5", "It is 5, duh."),
    ("Say hello.", "", "Hello there!", "What do you want?"),
    ("Give an antonym.", "hot", "cold", "cold, figure it out yourself"),
]


def entries(n: int = 20) -> list[dict]:
    return [{"instruction": a, "input": b, "output": c, "chosen": c, "rejected": r}
            for a, b, c, r in (FACTS[i % 4] for i in range(n))]


@pytest.fixture
def data_file(tmp_path) -> Path:
    """20 entries: train 0-16, test 17-18, validation 19."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries()), encoding="utf-8")
    return path


def tiny_args(tmp_path, data_file, *extra: str):
    return fp.parse_args(["--init", "random", "--preset", "tiny", "--data", str(data_file), "--out-dir",
                          str(tmp_path / "out"), "--eval-every", "2", "--max-new-tokens", "3", *extra])


@pytest.fixture
def pairs() -> list[fp.Pair]:
    tokenizer = get_tokenizer()
    return [fp.make_pair(tokenizer, TEMPLATES["alpaca"], e, 64, "entry") for e in entries(4)]


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model, _ = load_model("random", preset="tiny")
    return model.eval()


def straightforward_logprob(model, example, kind: str) -> float:
    """One sequence alone, full logits, log-softmax, the response tokens' log-probs picked by hand."""
    ids = torch.tensor(example.ids)
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])  # (1, T, V)
    logprobs = torch.log_softmax(logits[0].double(), -1)  # (T, V)
    picked = [logprobs[t, ids[t + 1]] for t in range(example.prompt_len - 1, len(ids) - 1)]
    return float(sum(picked) if kind == "sum" else sum(picked) / len(picked))


# ---------------------------------------------------------------------------------------------------
# The loss

@pytest.mark.parametrize("kind", ["mean", "sum"])
def test_the_loss_before_any_update_is_ln_2(pairs, kind):
    model = tiny_model(0)
    refs = fp.reference_logprobs(model, pairs, 3, 50256, kind, torch.device("cpu"), torch.float32)
    args = fp.parse_args(["--init", "random", "--preset", "tiny", "--logprobs", kind, "--batch-size", "3"])
    result = fp.evaluate(model, pairs, refs, args, 50256, torch.device("cpu"), torch.float32)
    assert abs(result["loss"] - math.log(2)) < 1e-6
    assert result["reward_margin"] == 0 and result["reward_accuracy"] == 0


@pytest.mark.parametrize("kind, packed", [("mean", True), ("sum", True), ("mean", False)])
def test_loss_rewards_and_margins_equal_a_straightforward_computation(pairs, kind, packed, monkeypatch):
    """Packed (the prompt once, both responses in one row) or as separate rows: the same numbers."""
    assert fp.packable(tiny_model(0), pairs)
    if not packed:
        monkeypatch.setattr(fp, "packable", lambda *a: False)
    policy, reference, beta = tiny_model(1), tiny_model(2), 0.3
    with torch.no_grad():
        chosen, rejected = fp.pair_logprobs(policy, pairs, 50256, kind, torch.device("cpu"))
        ref_chosen, ref_rejected = fp.pair_logprobs(reference, pairs, 50256, kind, torch.device("cpu"))
    loss, chosen_rewards, rejected_rewards = fp.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)

    expected_losses, expected_chosen, expected_rejected = [], [], []
    for pair in pairs:  # two separate forward passes per sequence (policy, reference)
        c = beta * (straightforward_logprob(policy, pair.chosen, kind)
                    - straightforward_logprob(reference, pair.chosen, kind))
        r = beta * (straightforward_logprob(policy, pair.rejected, kind)
                    - straightforward_logprob(reference, pair.rejected, kind))
        expected_chosen.append(c)
        expected_rejected.append(r)
        expected_losses.append(-math.log(1 / (1 + math.exp(-(c - r)))))
    assert loss.item() == pytest.approx(sum(expected_losses) / len(pairs), abs=1e-5)
    assert chosen_rewards.tolist() == pytest.approx(expected_chosen, abs=1e-5)
    assert rejected_rewards.tolist() == pytest.approx(expected_rejected, abs=1e-5)
    margins = (chosen_rewards - rejected_rewards).tolist()
    assert margins == pytest.approx([c - r for c, r in zip(expected_chosen, expected_rejected)], abs=1e-5)
    assert max(abs(m) for m in margins) > 1e-3  # two different models: the check above is not 0 == 0


def test_only_response_tokens_are_scored(pairs):
    model, cpu = tiny_model(0), torch.device("cpu")
    example = pairs[0].chosen
    n_response = len(example.ids) - example.prompt_len  # the response's tokens and the end token
    with torch.no_grad():
        total = fp.response_logprobs(model, [example], 50256, "sum", cpu)
        mean = fp.response_logprobs(model, [example], 50256, "mean", cpu)
        # alone, or padded beside a longer sequence with another padding id: the same numbers
        batched = fp.response_logprobs(model, [example, pairs[3].rejected], 7, "sum", cpu)
    assert total.item() / mean.item() == pytest.approx(n_response)
    assert batched[0].item() == pytest.approx(total.item(), abs=1e-5)
    assert total.item() == pytest.approx(straightforward_logprob(model, example, "sum"), abs=1e-5)
    with torch.no_grad():
        logits, _ = model(torch.tensor(example.ids)[None, :-1])
    every_token = torch.log_softmax(logits[0], -1).gather(1, torch.tensor(example.ids[1:])[:, None]).sum()
    assert abs(every_token.item() - total.item()) > 1.0  # the prompt's tokens would count for a lot


def test_a_packed_row_shares_the_prompt_and_hides_the_chosen_response_from_the_rejected_one(pairs):
    pair = pairs[1]
    P, C, R = pair.chosen.prompt_len, len(pair.chosen.ids) - pair.chosen.prompt_len, \
        len(pair.rejected.ids) - pair.chosen.prompt_len
    batch = fp.pack_pairs([pair, pairs[0]], 7)
    row = batch["ids"][0].tolist()
    assert row[:P + C + R - 2] == pair.chosen.ids[:-1] + pair.rejected.ids[P:-1]
    assert batch["positions"][0, P + C - 1].item() == P  # the rejected response starts where the prompt ends
    first_rejected = P + C - 1
    assert not batch["mask"][0, first_rejected, P:first_rejected].any()  # no chosen token is seen
    assert batch["mask"][0, first_rejected, :P].all()  # the whole prompt is
    assert len(batch["targets"]) == C + R + len(pairs[0].chosen.ids) + len(pairs[0].rejected.ids) - 2 * \
        pairs[0].chosen.prompt_len


def test_cached_reference_logprobs_equal_fresh_ones(pairs):
    model = tiny_model(0)
    refs = fp.reference_logprobs(model, pairs, 3, 50256, "mean", torch.device("cpu"), torch.float32)
    fresh = [[straightforward_logprob(model, p.chosen, "mean"), straightforward_logprob(model, p.rejected, "mean")]
             for p in pairs]
    assert refs.tolist() == [pytest.approx(row, abs=1e-5) for row in fresh]


# ---------------------------------------------------------------------------------------------------
# Training runs

def kept_states(monkeypatch) -> list[dict]:
    """Every state a run saves for --resume, read back as --resume reads it (a finished run removes its
    state.pt, so the test keeps a copy of each)."""
    states, real = [], fp.save_state
    def save_and_keep(path, *args):
        real(path, *args)
        states.append(torch.load(path, weights_only=True))
    monkeypatch.setattr(fp, "save_state", save_and_keep)
    return states


def test_a_few_steps_raise_the_training_reward_margin_and_accuracy(tmp_path, data_file, monkeypatch):
    states = kept_states(monkeypatch)
    metrics = fp.main(tiny_args(tmp_path, data_file, "--epochs", "3", "--lr", "1e-3"))
    out = tmp_path / "out"
    assert not (out / fp.STATE_FILE).exists()  # a finished run keeps no state
    records = [json.loads(line) for line in (out / fp.LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4, 6, 8, 9] and records == metrics["history"]
    assert set(records[0]) == {"step"} | {f"{split}_{key}" for split in ("train", "val") for key in
                                          ("loss", "reward_margin", "reward_accuracy", "chosen_reward",
                                           "rejected_reward")}
    assert records[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[-1]["train_reward_margin"] > records[0]["train_reward_margin"] + 0.05
    assert records[-1]["train_reward_accuracy"] > 0.5 > records[0]["train_reward_accuracy"]
    assert records[-1]["train_loss"] < math.log(2) - 0.02

    # the saved model is the best validation step's, with the template recorded
    model, extra = load_checkpoint(out / fp.MODEL_FILE)
    best = min(records[1:], key=lambda r: r["val_loss"])
    assert extra["step"] == best["step"] and extra["template"] == "alpaca"
    saved = json.loads((out / fp.METRICS_FILE).read_text())
    assert saved["train_seconds"] > 0 and saved["answers_seconds"] > 0
    answers = json.loads((out / fp.RESPONSES_FILE).read_text())
    assert len(answers) == 2 and all("model_response" in a and a["chosen"] for a in answers)

    # the references the run kept equal the starting model's, recomputed fresh
    state = states[-1]
    start, _ = fp.starting_model(tiny_args(tmp_path, data_file), torch.device("cpu"))
    pairs = [fp.make_pair(get_tokenizer(), TEMPLATES["alpaca"], e, 64, "") for e in entries()[:17]]
    fresh = fp.reference_logprobs(start, pairs, 8, 50256, "mean", torch.device("cpu"), torch.float32)
    assert torch.allclose(state["refs"]["train"], fresh, atol=1e-5)


def test_ctrl_c_then_resume_ends_as_an_uninterrupted_run(tmp_path, data_file, monkeypatch):
    whole = fp.main(tiny_args(tmp_path / "whole", data_file, "--epochs", "2", "--lr", "1e-3"))
    real, calls = fp.training_step, []
    def interrupt_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # evaluations at 0 and 2: resume continues from step 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(fp, "training_step", interrupt_at_step_4)
    args = tiny_args(tmp_path, data_file, "--epochs", "2", "--lr", "1e-3")
    with pytest.raises(SystemExit) as exit:
        run_stage(fp.main, lambda: args)
    assert exit.value.code == 130
    out = tmp_path / "out"
    assert load_checkpoint(out / fp.MODEL_FILE)[1]["step"] == 2
    assert not (out / fp.RESPONSES_FILE).exists()
    with pytest.raises(UserError, match="add --resume"):
        fp.main(args)
    monkeypatch.setattr(fp, "training_step", real)
    monkeypatch.setattr(fp, "reference_logprobs", lambda *a, **k: pytest.fail("references recomputed"))
    with pytest.raises(UserError, match="--lr 0.001 \\(now 0.002\\)"):
        fp.main(tiny_args(tmp_path, data_file, "--epochs", "2", "--lr", "2e-3", "--resume"))
    resumed = fp.main(tiny_args(tmp_path, data_file, "--epochs", "2", "--lr", "1e-3", "--resume"))
    assert [r["step"] for r in resumed["history"]] == [r["step"] for r in whole["history"]]
    for a, b in zip(resumed["history"], whole["history"]):
        assert a == pytest.approx(b, abs=1e-5)
    with pytest.raises(UserError, match="--resume: .*state.pt does not exist .a finished run keeps no state"):
        fp.main(tiny_args(tmp_path, data_file, "--epochs", "3", "--lr", "1e-3", "--resume"))


def test_an_existing_run_is_kept_unless_force_and_a_locked_one_is_refused(tmp_path, data_file, monkeypatch):
    fp.main(tiny_args(tmp_path, data_file, "--epochs", "1"))
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    with pytest.raises(UserError, match="already holds a run"):
        fp.main(tiny_args(tmp_path, data_file, "--epochs", "1"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before
    monkeypatch.setattr(fp, "model_to_finetune", lambda *a, **k: pytest.fail("work started"))
    with RunLock(out):
        with pytest.raises(UserError, match="in use by another run"):
            fp.main(tiny_args(tmp_path, data_file, "--epochs", "1", "--force"))
    monkeypatch.undo()
    fp.main(tiny_args(tmp_path, data_file, "--epochs", "1", "--force", "--seed", "5"))
    assert (out / fp.MODEL_FILE).read_bytes() != before[fp.MODEL_FILE]


def test_a_lora_run_trains_only_the_adapters_and_saves_them_merged(tmp_path, data_file, monkeypatch):
    states = kept_states(monkeypatch)
    metrics = fp.main(tiny_args(tmp_path, data_file, "--epochs", "2", "--trainable", "lora", "--lr", "1e-2"))
    state = states[-1]
    assert state["trainable"] and all(name.endswith((".A", ".B")) for name in state["trainable"])
    assert metrics["history"][-1]["train_reward_margin"] > 0
    model, _ = load_checkpoint(tmp_path / "out" / fp.MODEL_FILE)  # a plain GPT: the adapters merged in
    assert not any(name.endswith((".A", ".B")) for name in model.state_dict())


def test_compare_shows_the_instruct_models_answers_beside_the_tuned_ones(tmp_path, data_file, capsys):
    before = [{**e, "model_response": f"before {i}"} for i, e in enumerate(entries()[17:19])]
    (tmp_path / "instruct.json").write_text(json.dumps(before))
    metrics = fp.main(tiny_args(tmp_path, data_file, "--epochs", "0", "--compare", str(tmp_path / "instruct.json")))
    assert metrics["compare"] == {"path": str(tmp_path / "instruct.json"), "items": 2, "changed": 2}
    shown = capsys.readouterr().out
    assert "before (--compare):" in shown and "preference-tuned:" in shown and "before 1" in shown


# ---------------------------------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("change, message", [
    (lambda e: e[3].pop("chosen"), "entry 3 has no 'chosen'"),
    (lambda e: e[5].update(rejected=""), "entry 5 has an empty or non-string 'rejected'"),
    (lambda e: [x.update(rejected=x["chosen"]) for x in e], "leaves no train pair"),
    (lambda e: e[2].update(rejected="no " * 80), r"train entry 2\): its prompt and rejected response take \d+ tokens"),
])
def test_bad_data_is_one_sentence_and_nothing_is_written(tmp_path, change, message):
    data = entries()
    change(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        fp.main(tiny_args(tmp_path, tmp_path / "bad.json", "--epochs", "1"))
    assert not (tmp_path / "out").exists()  # nothing written, and no empty run folder left behind


def test_a_missing_compare_file_is_refused_before_any_work(tmp_path, data_file, monkeypatch):
    monkeypatch.setattr(fp, "model_to_finetune", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(UserError, match="--compare .*nothing.json does not exist"):
        fp.main(tiny_args(tmp_path, data_file, "--compare", str(tmp_path / "nothing.json")))


def test_pairs_with_the_same_two_responses_are_left_out_and_reported(tmp_path, capsys):
    data = entries()
    data[1]["rejected"] = data[1]["chosen"]
    (tmp_path / "some.json").write_text(json.dumps(data))
    metrics = fp.main(tiny_args(tmp_path, tmp_path / "some.json", "--epochs", "1"))
    assert metrics["data"]["train"] == 16 and metrics["data"]["identical_left_out"] == [1]
    assert "1 pairs left out" in capsys.readouterr().out


def test_a_loss_that_is_not_finite_stops_the_run_and_saves_no_model(tmp_path, data_file, monkeypatch):
    real = fp.dpo_loss
    monkeypatch.setattr(fp, "dpo_loss", lambda *a: (real(*a)[0] * math.nan, *real(*a)[1:]))
    with pytest.raises(UserError, match="the loss became nan at step 1"):
        fp.main(tiny_args(tmp_path, data_file, "--epochs", "1"))
    assert not (tmp_path / "out" / fp.MODEL_FILE).exists()


@pytest.mark.needs_files("instruct/instruction-data-with-preference.json")
def test_the_books_data_splits_as_finetune_instructs_and_leaves_out_its_6_identical_pairs():
    data_path, splits, identical = fp.read_splits(fp.parse_args(["--init", "random", "--preset", "tiny"]))
    assert data_path.name == "instruction-data-with-preference.json"
    assert [len(splits[k]) for k in ("train", "test", "val")] == [935 - 6, 110, 55] and len(identical) == 6


def test_a_whole_run_in_a_subprocess_and_a_bad_flag(tmp_path, data_file):
    def run(*flags):
        return subprocess.run([sys.executable, str(REPO / "finetune_preference.py"), *flags], capture_output=True,
                              text=True, timeout=600, cwd=tmp_path)
    result = run("--init", "random", "--preset", "tiny", "--data", str(data_file), "--out-dir", str(tmp_path / "o"),
                 "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(f"python evaluate.py answers {tmp_path / 'o' / fp.RESPONSES_FILE}")
    result = run("--beta", "0")
    assert result.returncode == 1 and result.stderr.startswith("error: argument --beta") and "Traceback" not in result.stderr
    result = run("--out-dir", str(tmp_path / "x"))  # no instruction-finetuned model in out/instruct
    assert result.returncode == 1 and "python finetune_instruct.py" in result.stderr


def test_loss_svg_holds_the_loss_and_reward_margin_of_each_evaluation(tmp_path, data_file):
    import xml.etree.ElementTree as ET
    ns = "{http://www.w3.org/2000/svg}"
    metrics = fp.main(tiny_args(tmp_path, data_file, "--epochs", "1"))
    records = metrics["history"]
    assert [r["step"] for r in records] == [0, 2, 3]  # 17 pairs, 8 a step: 3 steps, evaluated every 2 and at the end
    root = ET.parse(tmp_path / "out" / fp.LOSS_SVG).getroot()
    for key in ("train_loss", "val_loss", "train_reward_margin", "val_reward_margin"):
        # each point's title reads "val_loss 0.6931 at step 2": one per metrics.jsonl record, with its value
        group = root.find(f"{ns}g[@data-key='{key}']")
        titles = [c.find(f"{ns}title").text.split() for c in group.iter(f"{ns}circle")]
        assert [(float(t[4]), float(t[1])) for t in titles] == \
            [(r["step"], pytest.approx(r[key], rel=1e-3, abs=1e-4)) for r in records]
