"""evaluate.py: file layouts and their errors, perplexity, multiple choice, contamination, memorisation,
answers, and the command line.

Tiny random models (GPT-2's "tiny" preset, and "mistral-tiny" where only token ids are needed), data
written by the tests themselves, no network (conftest.py seeds GPT-2's BPE files)."""
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate as ev
from conftest import REPO

from benchmarks import load_records
from common import UserError, run_stage
from model import GPT, get_config, save_checkpoint
from templates import TEMPLATES, prompt_ids
from corpus import prepare_corpus
from tokenizer import get_tokenizer


pytestmark = pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe")
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def tiny_model(preset: str = "tiny", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(get_config(preset, **overrides)).eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run_cli(*argv: str) -> dict:
    """evaluate.py's own entry point, in this process: main(parse_args(argv))'s result."""
    return ev.main(ev.parse_args([str(a) for a in argv]))


# ---------------------------------------------------------------------------------------------------
# Files and layouts

def test_records_carry_the_line_they_start_on(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text('[\n  {"a": 1},\n\n  {\n    "b": "x\\ny"\n  },{"c": 3}\n]\n')
    assert [line for line, _ in load_records(listed)] == [2, 4, 6]
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert load_records(lines) == [(1, {"a": 1}), (3, {"b": 2})]


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "choices": ["a", "b"], "answer": 1}\n{"question": "q", "choices": ["a", "b"]}\n',
     "line 2 has no field 'answer'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}\n', "line 1: field 'answer' is 2, not the index of one of its 2"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}\n', "field 'answer' is true"),
    ('{"question": "q", "choices": "a b", "answer": 0}\n', "line 1: field 'choices' should be a list"),
    ('{"question": "q", "choices": ["a", ""], "answer": 0}\n', "field 'choices', choice 1"),
    ('{"question": 3, "choices": ["a", "b"], "answer": 0}\n', "field 'question' should be a string"),
    ('{"prompt": "q", "options": ["a", "b"]}\n', "line 1 has the fields prompt, options, which match no known layout"),
    ('{"ctx": "c", "endings": ["a", "b"], "label": "5"}\n', "field 'label' is 5"),
    ('{"ctx": "c", "endings": ["a", "b"]}\n', "line 1 has no field 'label'"),
    ('{"question": "q"}\n{"question": \n', "line 2 is not valid JSON"),
    ('[{"question": "q"},\n 7]\n', "line 2 holds a JSON int"),
    ('\n  \n', "is empty"),
])
def test_a_bad_item_is_one_sentence_naming_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "items.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=str(path).replace("\\", "\\\\")) as caught:
        ev.load_questions(path)
    assert message in str(caught.value)


@pytest.mark.parametrize("row, message", [
    ("q,a,b,c,D\n", "line 2 has 5 columns, not MMLU's 6"),
    ("q,a,b,c,d,E\n", "line 2: the answer (column 6) is 'E'"),
    ("q,a,,c,d,A\n", "line 2: option B (column 3) is empty"),
])
def test_mmlu_rows_are_checked(tmp_path, row, message):
    path = tmp_path / "anatomy_test.csv"
    path.write_text("What is 1+1?,1,2,3,4,B\n" + row)
    with pytest.raises(UserError, match=re.escape(f"{path} {message}" if message.startswith("line") else message)):
        ev.load_questions(path)


def test_mmlu_prompt_is_the_harness_format(tmp_path):
    path = tmp_path / "high_school_physics_test.csv"
    path.write_text('"What moves, here?\n",fast,"slow, very",up,down,C\nWhy?,a,b,c,d,A\n')
    first, second = ev.load_questions(path)
    assert (first.subject, first.answer, first.where) == ("high school physics", 2, f"{path} line 1")
    assert second.where == f"{path} line 3"  # the first record spans two lines
    assert ev.context_text(second, [first]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What moves, here?\nA. fast\nB. slow, very\nC. up\nD. down\nAnswer: C\n\n"
        "Why?\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert ev.choice_texts(second) == ["A", "B", "C", "D"]


def test_hellaswag_is_preprocessed_as_the_harness_does(tmp_path):
    record = {"activity_label": "Baking cookies", "ctx_a": "A woman [title] mixes flour.", "ctx_b": "then SHE",
              "ctx": "unused", "endings": ["adds  eggs [step] slowly.", "sings."], "label": "0"}
    (item,) = ev.load_questions(write_jsonl(tmp_path / "hs.jsonl", [record]))
    assert item.question == "Baking cookies: A woman. mixes flour. Then she"
    assert item.options == ["adds eggs slowly.", "sings."] and item.answer == 0
    plain = {"ctx": "A man sits.", "endings": ["x", "y"], "label": 1}
    (item,) = ev.load_questions(write_jsonl(tmp_path / "hs2.jsonl", [plain]))
    assert (item.question, item.answer) == ("A man sits.", 1)


def test_instruction_data_is_refused_as_questions_but_read_for_contamination(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "Add.", "input": "1 and 2", "output": "3"}]))
    assert ev.load_items(path)[0].texts == ["Add.", "1 and 2", "3"]
    with pytest.raises(UserError, match="instruction data, not a multiple-choice question"):
        ev.load_questions(path)


# ---------------------------------------------------------------------------------------------------
# Perplexity

def token_by_token_nll(model: GPT, ids: list[int], context: int, stride: int) -> float:
    """Every target t scored alone, with the context the sliding windows give it: the window that scores
    t is the first one (starts 0, stride, 2 stride, ...) that reaches t, i.e. k = ceil((t - context) / stride)."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            begin = max(0, math.ceil((t - context) / stride)) * stride
            logits, _ = model(torch.tensor([ids[begin:t]]))
            total -= logits[0, -1].log_softmax(-1)[ids[t]].item()
    return total


@pytest.mark.parametrize("preset", ["tiny", "mistral-tiny"])
@pytest.mark.parametrize("stride", [1, 3, 7, 16])
def test_sliding_windows_equal_token_by_token_scoring(preset, stride):
    model = tiny_model(preset)
    ids = torch.randint(0, model.config.vocab_size, (45,), generator=torch.Generator().manual_seed(3)).tolist()
    nll, tokens = ev.sequence_nll(model, [ids], 16, stride, 4, CPU)
    assert tokens == len(ids) - 1
    assert nll == pytest.approx(token_by_token_nll(model, ids, 16, stride), rel=1e-5)


def test_each_token_is_scored_once_with_at_least_context_minus_stride_before_it():
    for n, context, stride in [(100, 16, 5), (17, 16, 16), (3, 16, 1), (2, 8, 8), (50, 10, 10)]:
        windows = ev.sliding_windows(n, context, stride)
        scored = [t for _, first, end in windows for t in range(first, end + 1)]
        assert scored == list(range(1, n))
        for begin, first, end in windows:
            assert end - begin <= context
            assert begin == 0 or first - begin >= context - stride + 1


def test_a_text_that_fits_the_context_has_one_loss_whatever_the_stride(tiny):
    ids = torch.randint(0, 50257, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    losses = {stride: ev.sequence_nll(tiny, [ids], 64, stride, 2, CPU)[0] for stride in (1, 8, 32, 64)}
    assert len(set(losses.values())) == 1, losses
    logits, loss = tiny(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))  # one plain forward pass
    assert losses[64] / 39 == pytest.approx(loss.item(), rel=1e-6)


def test_perplexity_command_reports_bits_per_byte_of_the_text(tmp_path, tiny, tok):
    text = "Every effort moves you, and every stride counts once. " * 6
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    result = run_cli("perplexity", "--init", "random", "--preset", "tiny", "--data", tmp_path / "t.txt",
                     "--context", "32", "--stride", "8", "--seed", "0", "--json", tmp_path / "p.json")
    ids = [tok.eos_id] + tok.encode_ordinary(text)  # GPT-2 has no BOS: <|endoftext|> starts a text
    nll, tokens = ev.sequence_nll(tiny, [ids], 32, 8, 4, CPU)
    assert result["tokens"] == tokens == len(ids) - 1
    assert result["loss"] == pytest.approx(nll / tokens)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens))
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode("utf-8")))
    written = json.loads((tmp_path / "p.json").read_text())
    assert {k: written[k] for k in ("loss", "perplexity", "bits_per_byte", "tokens")} == \
        {k: result[k] for k in ("loss", "perplexity", "bits_per_byte", "tokens")}


# ---------------------------------------------------------------------------------------------------
# Multiple choice

def test_trailing_spaces_of_the_context_go_to_the_continuation(tok):
    context, continuation = ev.encode_pair(tok, "Question: 2+2? Answer: ", "4")
    assert context == tok.encode_ordinary("Question: 2+2? Answer:")
    assert continuation == tok.encode_ordinary(" 4")
    assert ev.encode_pair(tok, "", "hi")[0] == [tok.eos_id]  # an empty context: <|endoftext|>, as the harness


class CharTokenizer:
    """One token per character, with a BOS: enough to see what make_request does with token ids."""
    bos_id, eos_id, n_vocab = 1, 2, 256

    def encode_ordinary(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_a_long_context_keeps_its_bos_and_its_last_tokens():
    item = ev.Item("x", "plain", [], "abcdefghij", ["yz", "w"], answer=0)
    request = ev.make_request(CharTokenizer(), item, [], block_size=8)
    # The model reads context + " y" (the last token is only scored): 8 tokens, so 6 of context.
    assert request.context == [1] + [ord(c) for c in "fghij"] and request.truncated
    assert request.continuations == [[ord(c) for c in " yz"], [ord(c) for c in " w"]]
    assert not ev.make_request(CharTokenizer(), item, [], block_size=64).truncated
    with pytest.raises(UserError, match="a choice is 3 tokens long, more than the model's context of 2"):
        ev.make_request(CharTokenizer(), item, [], block_size=2)


@torch.inference_mode()
def loglikelihood(model: GPT, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context), summed over the continuation's tokens: the definition, with one
    forward pass of context + continuation, that the batched scores are checked against."""
    ids = torch.tensor([[*context, *continuation[:-1]]])
    logits, _ = model(ids)  # (1, T, V)
    logprobs = logits[0, len(context) - 1:].float().log_softmax(-1)  # (L, V): the rows predicting the continuation
    return logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()


def test_choice_scores_equal_log_softmax_sums_written_out(tiny):
    context, continuation = [464, 3290, 318], [257, 1049, 13]
    logits, _ = tiny(torch.tensor([context + continuation]))
    logprobs = F.log_softmax(logits[0].double(), dim=-1)
    by_hand = logprobs[2, 257] + logprobs[3, 1049] + logprobs[4, 13]  # row i predicts token i + 1
    assert loglikelihood(tiny, context, continuation) == pytest.approx(by_hand.item(), abs=1e-4)
    (scores,) = ev.score_batch(tiny, [context], [[continuation, [257]]], CPU)
    assert scores == pytest.approx([by_hand.item(), logprobs[2, 257].item()], abs=1e-4)


@pytest.mark.parametrize("preset", ["tiny", "mistral-tiny"])
def test_context_once_equals_each_choice_alone(preset):
    """The shared-context batch (left-padded contexts, KV cache copied per choice, right-padded choices)
    against one full forward pass per choice. mistral-tiny has rotary positions, grouped-query attention
    and a sliding window (64) shorter than these contexts."""
    model = tiny_model(preset)
    g = torch.Generator().manual_seed(5)
    rand = lambda n: torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
    contexts = [rand(n) for n in (3, 40, 9, 90 if preset == "mistral-tiny" else 50)]
    continuations = [[rand(1), rand(4)], [rand(2), rand(1), rand(6)], [rand(1), rand(1)], [rand(3), rand(5)]]
    batched = ev.score_batch(model, contexts, continuations, CPU)
    alone = [[loglikelihood(model, c, k) for k in ks] for c, ks in zip(contexts, continuations)]
    for got, want in zip(batched, alone):
        assert got == pytest.approx(want, abs=1e-4)


def test_batches_of_questions_fill_but_never_overflow_the_context(tiny):
    requests = [ev.Request([7] * n, [[1, 2, 3], [4]], False) for n in (60, 2, 30, 61, 5)]
    scores = ev.score_requests(tiny, requests, 3, CPU)
    for request, got in zip(requests, scores):
        assert got == pytest.approx([loglikelihood(tiny, request.context, k) for k in request.continuations], abs=1e-4)


def test_accuracy_norm_divides_by_the_characters_of_each_choice():
    item = ev.Item("x", "plain", [], "q", ["éé", "abc"], answer=1)  # 2 characters (4 bytes), 3 characters (3 bytes)
    figures = ev.choice_figures([item], [[-3.0, -4.0]])
    # -1.5 < -1.33 per character picks "abc"; per byte (-0.75 > -1.33) it would pick "éé"
    assert (figures["accuracy"], figures["accuracy_norm"]) == (0.0, 1.0)


def test_choice_matches_lm_evaluation_harness_on_its_own_fixture(tmp_path):
    """tests/fixtures/make_lm_eval_fixture.py ran the harness (its task's requests, its HFLM, its
    process_results) on hf_tiny_gpt2 with a byte-level tokenizer; the same model and tokenizer here give
    the same prompts, log-likelihoods, acc and acc_norm (which differ from a per-byte acc_norm)."""
    reference = json.loads((FIXTURES / "lm_eval_choice.json").read_text(encoding="utf-8"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model_dir / name).write_bytes((FIXTURES / "hf_tiny_gpt2" / name).read_bytes())
    (model_dir / "tokenizer.json").write_bytes((FIXTURES / "lm_eval_tokenizer.json").read_bytes())
    questions = [{k: item[k] for k in ("question", "choices", "answer")} for item in reference["items"]]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    result = run_cli("choice", "--init", model_dir, "--data", data)
    for item, ours, theirs in zip(ev.load_questions(data), result["items"], reference["items"]):
        assert [[ev.context_text(item), " " + c] for c in ev.choice_texts(item)] == theirs["requests"]
        assert ours["scores"] == pytest.approx(theirs["loglikelihoods"], abs=1e-3)
    assert result["accuracy"] == pytest.approx(reference["acc"])
    assert result["accuracy_norm"] == pytest.approx(reference["acc_norm"])
    assert reference["acc_norm"] != reference["acc_bytes"]  # the fixture tells characters from bytes


def test_shuffled_predictions_map_back_to_the_original_options():
    item = ev.Item("x", "mmlu", [], "q", ["a", "b", "c", "d"], answer=2)
    moved, order = ev.shuffled(item, random.Random(0))
    assert order != [0, 1, 2, 3] and [item.options[k] for k in order] == moved.options
    assert moved.options[moved.answer] == "c"
    scores = [0.0] * 4
    scores[moved.answer] = 1.0
    assert ev.choice_figures([moved], [scores], [order])["predictions"] == [2]


def plain_items(n: int = 6) -> list[dict]:
    return [{"question": f"Question {i}: which colour is the sky on day {i}?", "choices": ["blue", "green", "red"],
             "answer": i % 3} for i in range(n)]


def test_choice_command_scores_every_choice_as_the_definition(tmp_path, tiny, tok):
    data = write_jsonl(tmp_path / "q.jsonl", plain_items())
    shots = write_jsonl(tmp_path / "shots.jsonl", plain_items(2))
    result = run_cli("choice", "--init", "random", "--preset", "tiny", "--seed", "0", "--data", data, "--shots", "2",
                     "--shots-from", shots, "--batch-size", "4")
    items = ev.load_questions(data)
    shot_items = ev.load_questions(shots)
    for entry, item in zip(result["items"], items):
        text = ev.context_text(item, shot_items)
        assert text.startswith("Question 0: which colour is the sky on day 0? blue\n\nQuestion 1:")
        want = [loglikelihood(tiny, *ev.encode_pair(tok, text, " " + c)) for c in item.options]
        assert entry["scores"] == pytest.approx(want, abs=1e-4)
        assert entry["prediction"] == max(range(3), key=lambda k: want[k])
    assert result["accuracy"] == sum(e["prediction"] == e["answer"] for e in result["items"]) / 6


def test_exclude_scores_the_clean_items_alone(tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", plain_items())
    (tmp_path / "c.json").write_text(json.dumps({"contaminated": [1, 4], "items": 6}))
    common = ["choice", "--init", "random", "--preset", "tiny", "--seed", "0", "--data", data]
    everything = run_cli(*common)
    clean = run_cli(*common, "--exclude", tmp_path / "c.json")
    assert [e["index"] for e in clean["items"]] == [0, 2, 3, 5] and clean["excluded"] == 2
    for entry, i in zip(clean["items"], (0, 2, 3, 5)):  # other batch-mates: equal up to float rounding
        assert entry["scores"] == pytest.approx(everything["items"][i]["scores"], abs=1e-5)
    (tmp_path / "other.json").write_text(json.dumps({"contaminated": [1], "items": 9}))
    with pytest.raises(UserError, match="made for 9 items, but --data has 6"):
        run_cli(*common, "--exclude", tmp_path / "other.json")


def test_shuffled_choices_of_a_listed_layout_change_the_prompt_and_are_mapped_back(tmp_path):
    data = tmp_path / "astronomy_test.csv"
    data.write_text("".join(f"Which planet is number {i}?,Mercury,Venus,Earth,Mars,{'ABCD'[i % 4]}\n" for i in range(5)))
    result = run_cli("choice", "--shuffle-choices", "--init", "random", "--preset", "tiny", "--data", data)
    assert {"accuracy", "accuracy_shuffled", "same_prediction"} <= set(result)
    for entry in result["items"]:
        assert sorted(entry["order"]) == [0, 1, 2, 3] and entry["order"] != [0, 1, 2, 3]
        assert 0 <= entry["prediction_shuffled"] < 4
    # Plain items do not list their options in the prompt: each option keeps its score in any order.
    plain = run_cli("choice", "--shuffle-choices", "--init", "random", "--preset", "tiny",
                    "--data", write_jsonl(tmp_path / "q.jsonl", plain_items()))
    for entry in plain["items"]:
        assert [entry["scores_shuffled"][entry["order"].index(k)] for k in range(3)] == pytest.approx(entry["scores"], abs=1e-4)
    assert plain["accuracy_shuffled"] == plain["accuracy"] and plain["same_prediction"] == 1.0


# ---------------------------------------------------------------------------------------------------
# Contamination

WORDS = ("apple river stone cloud orange silver forest bridge candle market winter garden engine paper "
         "window button rocket castle mirror pencil").split()
OTHER_WORDS = ("table music doctor planet coffee summer island letter camera dragon ticket yellow monkey "
               "sugar wallet kitchen").split()


def contamination_case(tmp_path: Path) -> tuple[Path, Path]:
    """Items built from WORDS; a corpus of OTHER_WORDS in which item 2's words 3..15 (13 tokens) appear,
    and item 4's words 3..14 (12 tokens) appear followed by another word."""
    rng = np.random.default_rng(0)
    questions = [" ".join(rng.permutation(WORDS)) for _ in range(6)]
    items = [{"question": q, "choices": ["yes", "no"], "answer": 0} for q in questions]
    filler = lambda n: " ".join(rng.choice(OTHER_WORDS, n))
    lines = [filler(12) for _ in range(40)]
    lines[10] = filler(5) + " " + " ".join(questions[2].split()[3:16]) + " " + filler(4)
    lines[30] = filler(3) + " " + " ".join(questions[4].split()[3:15]) + " " + filler(6)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    return write_jsonl(tmp_path / "items.jsonl", items), corpus


def test_planted_ngrams_are_found_exactly_in_text_and_in_token_folders(tmp_path, monkeypatch, tok):
    assert all(len(tok.encode_ordinary(" " + w)) == 1 for w in WORDS + OTHER_WORDS)  # one token per word
    items, corpus = contamination_case(tmp_path)
    prepare_corpus(corpus, tmp_path / "tokens", tokenizer=get_tokenizer(), val_fraction=0.5)  # the overlaps straddle both splits' files
    for source in (corpus, tmp_path / "tokens"):
        assert run_cli("contamination", "--eval", items, "--corpus", source)["contaminated"] == [2]
        assert run_cli("contamination", "--eval", items, "--corpus", source, "--n", "12")["contaminated"] == [2, 4]
    # Chunks and text pieces far smaller than an n-gram: overlaps that cross their edges are still found.
    monkeypatch.setattr(ev, "CHUNK_TOKENS", 5)
    monkeypatch.setattr(ev, "TEXT_BLOCK_BYTES", 30)
    for source in (corpus, tmp_path / "tokens"):
        result = run_cli("contamination", "--eval", items, "--corpus", source, "--n", "12", "--threads", "3")
        assert result["contaminated"] == [2, 4] and result["fraction"] == 2 / 6 and result["n"] == 12


def test_disjoint_texts_share_no_ngram(tmp_path):
    items, _ = contamination_case(tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(" ".join(OTHER_WORDS * 50) + "\n")
    (tmp_path / "corpus" / "b.txt").write_text(" ".join(WORDS[:12]) + "\n")  # 12 words of an item in a row at most
    result = run_cli("contamination", "--eval", items, "--corpus", tmp_path / "corpus", "--n", "13")
    assert result["contaminated"] == [] and result["fraction"] == 0.0
    assert run_cli("contamination", "--eval", items, "--corpus", tmp_path, "--n", "13")["contaminated"] == \
        [0, 1, 2, 3, 4, 5]  # the folder above holds the items file itself


def test_ngram_hash_hits_are_checked_token_by_token(monkeypatch):
    corpus = np.array([5, 2, 3, 4, 9, 9, 9, 1, 2, 5])
    assert list(ev.NgramIndex([[[1, 2, 3, 4]], [[9, 9, 9]]], 3).matches(corpus)) == [(0, 1), (1, 4)]
    monkeypatch.setattr(ev, "ngram_hashes", lambda tokens, n: np.zeros(len(tokens) - n + 1, dtype=np.uint64))
    colliding = ev.NgramIndex([[[1, 2, 3, 4]], [[9, 9, 9]]], 3)  # every n-gram has the same hash
    assert list(colliding.matches(corpus)) == [(0, 1), (1, 4)]


def test_a_token_folder_is_checked_against_the_models_vocabulary(tmp_path, tok):
    items, _ = contamination_case(tmp_path)
    question = ev.load_items(items)[2].question
    ids = np.array(tok.encode_ordinary("one two " + question + " three"), dtype=np.uint16)
    folder = tmp_path / "folder"
    folder.mkdir()
    ids.tofile(folder / "train.bin")
    np.zeros(0, np.uint16).tofile(folder / "val.bin")
    meta = {"vocab_size": 50257, "dtype": "uint16", "eot_token": 50256, "train_tokens": len(ids), "val_tokens": 0}
    (folder / "meta.json").write_text(json.dumps(meta))
    assert run_cli("contamination", "--eval", items, "--corpus", folder)["contaminated"] == [2]
    (folder / "meta.json").write_text(json.dumps({**meta, "vocab_size": 32000}))
    with pytest.raises(UserError, match="vocabulary of 32000 tokens"):
        run_cli("contamination", "--eval", items, "--corpus", folder)
    (folder / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "dtype"}))
    with pytest.raises(UserError, match="names none"):  # prepared before meta.json named its dtype
        run_cli("contamination", "--eval", items, "--corpus", folder)


def test_an_empty_corpus_is_one_sentence(tmp_path):
    items, corpus = contamination_case(tmp_path)
    corpus.write_text("")
    with pytest.raises(UserError, match=f"the corpus {corpus} is empty"):
        run_cli("contamination", "--eval", items, "--corpus", corpus)


# ---------------------------------------------------------------------------------------------------
# Memorisation

MEMORY_TEXT = ("The lighthouse keeper counted ninety seven ships in the fog that winter, wrote each name in a "
               "green ledger, and never once told the harbour master why the last one had no flag.")


def overfit(model: GPT, ids: list[int], span: int, prefix: int, steps: int = 300) -> GPT:
    """Train on every window of `span` tokens of ids until greedy decoding repeats each window's tokens
    after its first `prefix` (what the memorisation test asks)."""
    windows = torch.tensor([ids[s:s + span] for s in range(len(ids) - span + 1)])
    inputs, targets = windows[:, :-1], windows[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        logits, loss = model(inputs, targets)
        if (logits[:, prefix - 1:].argmax(-1) == targets[:, prefix - 1:]).all():
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_sample_positions_are_distinct_reproducible_and_fit():
    positions = ev.sample_positions([10, 3, 25], 8, 50, seed=7)
    assert positions == ev.sample_positions([10, 3, 25], 8, 50, seed=7)
    assert len(positions) == len(set(positions)) == 3 + 18  # every place a span of 8 fits
    assert all(p + 8 <= [10, 3, 25][d] for d, p in positions)
    assert ev.sample_positions([10, 3, 25], 8, 5, seed=7) != ev.sample_positions([10, 3, 25], 8, 5, seed=8)


def test_an_overfit_model_recalls_its_text_and_a_random_one_does_not(tmp_path, tok):
    (tmp_path / "text.txt").write_text(MEMORY_TEXT)
    ids = tok.encode_ordinary(MEMORY_TEXT)
    model = overfit(tiny_model(seed=1), ids, span=16, prefix=8)
    save_checkpoint(tmp_path / "overfit.pt", model, model_type="gpt2", tokenizer="gpt2")
    flags = ["--data", tmp_path / "text.txt", "--prefix", "8", "--suffix", "8", "--samples", "12", "--seed", "3"]
    recalled = run_cli("memorization", "--init", tmp_path / "overfit.pt", *flags)
    assert (recalled["exact_fraction"], recalled["samples"]) == (1.0, 12)
    fresh = run_cli("memorization", "--init", "random", "--preset", "tiny", *flags)
    assert fresh["exact_fraction"] == 0.0 and fresh["token_fraction"] < 0.2
    assert [p["token"] for p in fresh["positions"]] == [p["token"] for p in recalled["positions"]]


# ---------------------------------------------------------------------------------------------------
# Answers

@pytest.mark.parametrize("reference, response, f1", [
    ("The cat sat on the mat.", "The cat is on the mat.", 5 / 6),  # LCS 5 of 6 and 6 tokens
    ("the the the", "the", 0.5),  # P = 1/1, R = 1/3: 2 * 1/3 / (4/3)
    ("A B C", "C B A", 1 / 3),  # LCS 1 of 3 and 3
    ("Hello, World!", "hello world", 1.0),  # case and punctuation are not tokens
    ("It's well-known", "its well known", 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)),  # it s well known vs its well known
    ("", "anything", 0.0), ("!!!", "???", 0.0),
])
def test_rouge_l_equals_hand_computed_values(reference, response, f1):
    assert ev.rouge_l(reference, response) == pytest.approx(f1, abs=1e-12)


def test_rouge_l_equals_the_rouge_score_package():
    fixture = json.loads((FIXTURES / "rouge_l_cases.json").read_text(encoding="utf-8"))
    for case in fixture["cases"]:
        assert ev.rouge_l(case["reference"], case["response"]) == pytest.approx(case["fmeasure"], abs=1e-15), case


@pytest.mark.parametrize("reply, score", [("85", 85.0), (" 92.\n", 92.0), ("Score: 40/100", 40.0), ("100", 100.0),
                                          ("0", 0.0), ("I cannot rate this.", None), ("150", None), ("-5", None), ("", None)])
def test_a_judge_reply_gives_its_number_or_nothing(reply, score):
    assert ev.parse_score(reply) == score


def answers_file(tmp_path: Path) -> Path:
    entries = [{"instruction": "Rewrite the sentence.", "input": "The car is fast.", "output": "The car is very fast.",
                "model_response": "The car is very fast."},
               {"instruction": "Name a colour.", "input": "", "output": "Blue", "model_response": "  Blue \n"},
               {"instruction": "Add.", "input": "2 and 3", "output": "5", "model_response": "It is six."}]
    path = tmp_path / "test-responses.json"
    path.write_text(json.dumps(entries, indent=4))
    return path


def test_answers_give_rouge_l_and_exact_match(tmp_path):
    result = run_cli("answers", answers_file(tmp_path), "--json", tmp_path / "a.json")
    assert [i["rouge_l"] for i in result["items"]] == [1.0, 1.0, 0.0]
    assert [i["exact_match"] for i in result["items"]] == [True, True, False]
    assert result["rouge_l"] == pytest.approx(2 / 3) and result["exact_match"] == pytest.approx(2 / 3)
    assert result["judge_mean"] is None and result["judge_unparsed"] is None
    assert json.loads((tmp_path / "a.json").read_text())["rouge_l"] == result["rouge_l"]


def test_answers_say_how_many_are_empty_or_repeat_one_word(tmp_path, capsys):
    entries = [{"instruction": "i", "output": "Blue", "model_response": r} for r in ("", " \n", "the the the", "!!!!",
                                                                                   "Blue")]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(entries))
    result = run_cli("answers", path)
    assert (result["empty_answers"], result["repeating_answers"]) == (2, 2)
    assert "note: 2 of 5 answers are empty and 2 of 5 repeat one word; they score 0" in capsys.readouterr().out
    assert "note:" not in (run_cli("answers", answers_file(tmp_path)) and capsys.readouterr().out)


def test_the_judge_prompt_is_the_books(tmp_path):
    entry = {"instruction": "Name a colour.", "input": "", "output": "Blue", "model_response": "Red"}
    assert ev.judge_prompt(entry) == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.` and correct output `Blue`, score the model "
        "response `Red` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only.")
    with_input = ev.judge_prompt({**entry, "input": "sky"})
    assert "### Instruction:\nName a colour.\n\n### Input:\nsky` and correct output" in with_input


def test_a_judge_taught_to_say_85_gives_85(tmp_path, tok):
    """A tiny model trained to answer every scoring prompt with '85' and the end token: the whole judge
    path (the book's prompt in the judge's template, greedy answers, parsing) must report exactly 85."""
    path = answers_file(tmp_path)
    entries = json.loads(path.read_text())
    template = TEMPLATES["alpaca"]
    model = tiny_model(seed=2, block_size=256)
    sequences = [prompt_ids(tok, template, ev.judge_prompt(e)) + tok.encode_ordinary("85") + [tok.eos_id]
                 for e in entries]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(100):  # until each sequence's last two tokens ('85', the end) are its greedy choices
        outputs = [model(torch.tensor([s[:-1]]), torch.tensor([[-100] * (len(s) - 3) + s[-2:]])) for s in sequences]
        if all(logits[0, -2:].argmax(-1).tolist() == s[-2:] for (logits, _), s in zip(outputs, sequences)):
            break
        optimizer.zero_grad()
        sum(loss for _, loss in outputs).backward()
        optimizer.step()
    save_checkpoint(tmp_path / "judge.pt", model.eval(), model_type="gpt2", tokenizer="gpt2", template="alpaca")
    result = run_cli("answers", path, "--judge", tmp_path / "judge.pt")
    assert [i["judge_reply"] for i in result["items"]] == ["85"] * 3
    assert (result["judge_mean"], result["judge_unparsed"]) == (85.0, 0)


def test_replies_without_a_number_are_counted_never_guessed(tmp_path, monkeypatch):
    """The judge's replies as given (the model path itself is the 85-judge test's): a number on the scale
    is a score, a reply without one or off the scale is counted as unparsed and left out of the mean."""
    replies = ["Score: 70 out of 100", "I cannot say.", "250"]
    monkeypatch.setattr(ev, "answer", lambda judge, prompts, *args, **kwargs: replies[:len(prompts)])
    result = run_cli("answers", answers_file(tmp_path), "--judge", "random", "--preset", "tiny")
    assert [i["judge_reply"] for i in result["items"]] == replies
    assert [i["judge"] for i in result["items"]] == [70.0, None, None]
    assert (result["judge_mean"], result["judge_unparsed"]) == (70.0, 2)


def test_an_answers_file_missing_a_field_names_it(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('[\n {"output": "a", "model_response": "a"},\n {"output": "b"}\n]')
    with pytest.raises(UserError, match=f"{path} line 3 has no field 'model_response'"):
        run_cli("answers", path)
    with pytest.raises(UserError, match="line 2 has no field 'instruction'"):
        run_cli("answers", path, "--judge", "random", "--preset", "tiny")


# ---------------------------------------------------------------------------------------------------
# The command line

def error_of(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        run_stage(ev.main, lambda: ev.parse_args([str(a) for a in argv]))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["perplexity", "--init", "random", "--preset", "tiny", "--stride", "0"],
    ["perplexity", "--init", "random", "--preset", "tiny", "--context", "100"],
    ["perplexity", "--init", "random", "--preset", "tiny", "--context", "16", "--stride", "17"],
    ["perplexity", "--init", "random", "--preset", "tiny", "--data", "{tmp}/missing.txt"],
    ["perplexity", "--init", "random", "--preset", "tiny", "--data", "{tmp}/empty.txt"],
    ["perplexity", "--init", "gpt2", "--preset", "tiny"],
    ["perplexity", "--init", "{tmp}/empty.txt"],
    ["choice", "--init", "random", "--preset", "tiny"],
    ["choice", "--init", "random", "--preset", "tiny", "--data", "{tmp}/q.jsonl", "--shots", "2"],
    ["choice", "--init", "random", "--preset", "tiny", "--data", "{tmp}/q.jsonl", "--shots", "9",
     "--shots-from", "{tmp}/q.jsonl"],
    ["choice", "--init", "random", "--preset", "tiny", "--data", "{tmp}/q.jsonl", "--exclude", "{tmp}/q.jsonl"],
    ["choice", "--init", "random", "--preset", "tiny", "--data", "{tmp}/q.jsonl", "--json", "{tmp}/exists.json"],
    ["choice", "--init", "random", "--preset", "tiny", "--data", "{tmp}/q.jsonl", "--json", "{tmp}/empty.txt/x.json"],
    ["choice", "--init", "random", "--preset", "tiny", "--data", "{tmp}/q.jsonl", "--json", "{tmp}"],
    ["choice", "--init", "random", "--preset", "tiny", "--data", "{tmp}/q.jsonl", "--batch-size", "0"],
    ["contamination", "--eval", "{tmp}/q.jsonl", "--corpus", "{tmp}/nothing*.txt"],
    ["contamination", "--eval", "{tmp}/q.jsonl", "--corpus", "{tmp}/empty.txt"],
    ["contamination", "--eval", "{tmp}/q.jsonl", "--corpus", "{tmp}/q.jsonl", "--n", "0"],
    ["memorization", "--init", "random", "--preset", "tiny", "--data", "{tmp}/q.jsonl", "--prefix", "40",
     "--suffix", "40"],
    ["memorization", "--init", "random", "--preset", "tiny", "--data", "{tmp}/q.jsonl", "--layout", "plain"],
    ["answers", "{tmp}/q.jsonl"],
    ["answers", "{tmp}/missing.json"],
    ["nonsense"],
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv):
    write_jsonl(tmp_path / "q.jsonl", plain_items(3))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "exists.json").write_text("{}")
    code, stderr = error_of([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert (tmp_path / "exists.json").read_text() == "{}"


def test_the_script_runs_on_its_own(tmp_path):
    """A real process, as a user runs it: a table on stdout, the JSON file, exit 0."""
    data = write_jsonl(tmp_path / "q.jsonl", plain_items(4))
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "choice", "--init", "random", "--preset",
                             "tiny", "--data", str(data), "--json", str(tmp_path / "c.json")],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "accuracy_norm" in result.stdout
    written = json.loads((tmp_path / "c.json").read_text())
    assert {"accuracy", "accuracy_norm", "items"} <= set(written) and len(written["items"]) == 4
    assert all({"scores", "prediction"} <= set(item) for item in written["items"])


@pytest.mark.needs_files("hf/mistralai/Mistral-7B-v0.1/tokenizer.model")
def test_a_mistral_family_model_with_its_own_tokenizer(tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", plain_items(3))
    (tmp_path / "t.txt").write_text(MEMORY_TEXT * 3)
    common = ["--init", "random", "--preset", "mistral-tiny"]
    assert run_cli("perplexity", *common, "--data", tmp_path / "t.txt", "--stride", "50")["tokens"] > 0
    assert len(run_cli("choice", *common, "--data", data)["items"]) == 3
    assert run_cli("memorization", *common, "--data", tmp_path / "t.txt", "--prefix", "4", "--suffix", "4",
                   "--samples", "5")["samples"] == 5


@pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe", "text/the-verdict.txt")
def test_evaluate_with_no_subcommand_measures_perplexity_on_the_verdict(offline_cache, tok):
    """`python evaluate.py` alone: GPT-2's perplexity on "The Verdict" (the model swapped for a tiny random
    one here, as the real run downloads GPT-2's weights)."""
    args = ev.parse_args([])
    assert (args.command, args.init, args.data) == ("perplexity", "gpt2", None)
    args.init, args.preset = "random", "tiny"
    result = ev.main(args)
    verdict = (offline_cache / "text" / "the-verdict.txt").read_text(encoding="utf-8")
    assert result["tokens"] == len(tok.encode_ordinary(verdict)) and math.isfinite(result["perplexity"])
