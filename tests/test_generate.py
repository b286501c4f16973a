"""generate.py: sampling rules, cached decoding against recomputation for every family, batching, stops,
the tokenizer of each family, the CLI and its refusals of bad input."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as G
import model as M

from common import UserError, run_stage
from tokenizer_base import bos



REPO = Path(__file__).resolve().parent.parent
GPT2_FILES = ("gpt2/encoder.json", "gpt2/vocab.bpe")
MISTRAL_TOKENIZER = "hf/mistralai/Mistral-7B-v0.1/tokenizer.model"
FAMILY_PRESETS = ("mistral-tiny", "llama-tiny", "phi-2-tiny", "phi-3-tiny")
# the files each tiny preset's tokenizer is made from (see load_gpt2.PRESET_CARDS)
PRESET_FILES = {"tiny": GPT2_FILES, "phi-2-tiny": GPT2_FILES, "mistral-tiny": (MISTRAL_TOKENIZER,),
                "llama-tiny": (MISTRAL_TOKENIZER,), "phi-3-tiny": (MISTRAL_TOKENIZER,)}


@pytest.fixture(scope="module")
def tiny() -> M.GPT:
    torch.manual_seed(0)
    return M.GPT(M.get_config("tiny")).eval()


def byte_decode(ids: list[int]) -> str:
    """A tokenizer whose tokens are single bytes: multi-byte characters always span tokens."""
    return bytes(ids).decode("utf-8", errors="replace")


# ---- sampling ------------------------------------------------------------------------------------

def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 100)
    assert torch.equal(G.sample_next(logits, temperature=0), logits.argmax(-1))


def test_top_k_only_picks_the_k_most_likely():
    logits = torch.randn(2, 100)
    allowed = logits.topk(5, dim=-1).indices  # (2, 5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        picked = G.sample_next(logits, temperature=2.0, top_k=5, generator=gen)
        assert (allowed == picked[:, None]).any(-1).all()


def test_top_p_only_picks_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 <= 0.8)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    gen = torch.Generator().manual_seed(0)
    picks = {G.sample_next(logits, top_p=0.7, generator=gen).item() for _ in range(300)}
    assert picks == {0, 1}
    # a top_p below the most likely token's probability still keeps that one token
    assert {G.sample_next(logits, top_p=0.1, generator=gen).item() for _ in range(50)} == {0}


def test_a_fixed_seed_reproduces_the_samples():
    logits = torch.randn(3, 1000)
    draw = lambda seed: [G.sample_next(logits, 1.0, 50, 0.9, torch.Generator().manual_seed(seed)) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(draw(1), draw(1)))
    assert not all(torch.equal(a, b) for a, b in zip(draw(1), draw(2)))


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": 0}, {"top_p": 0}, {"top_p": 1.5}])
def test_meaningless_sampling_settings_are_refused(kwargs):
    settings = {"temperature": 1.0, "top_k": None, "top_p": None, **kwargs}
    with pytest.raises(ValueError):
        G.check_sampling(**settings)


# ---- cached decoding -----------------------------------------------------------------------------

def greedy_by_recomputing(model: M.GPT, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The reference: run the whole sequence again for every new token, no cache. -> (B, n)"""
    for _ in range(n):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, -n:]


def run(model, ids, n, **kwargs) -> torch.Tensor:
    return torch.stack(list(G.generate(model, ids, n, **kwargs)), dim=1)  # (B, steps)


@pytest.mark.parametrize("batch, prompt_len", [(1, 1), (1, 7), (2, 3), (4, 20)])
def test_cached_greedy_equals_recomputing(tiny, batch, prompt_len):
    torch.manual_seed(batch * 100 + prompt_len)
    ids = torch.randint(0, 50257, (batch, prompt_len))
    assert torch.equal(run(tiny, ids, 16, temperature=0), greedy_by_recomputing(tiny, ids, 16))


def test_batched_prompts_of_different_lengths_match_each_alone(tiny):
    torch.manual_seed(1)
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (11, 2, 6)]
    ids, mask = G.left_pad(prompts)
    batched = run(tiny, ids, 16, temperature=0, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = run(tiny, torch.tensor([prompt]), 16, temperature=0)
        assert torch.equal(batched[row], alone[0])


@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def family(request) -> M.GPT:
    """A random model of each family's tiny preset: rotary positions, RMSNorm, SwiGLU, grouped-query
    attention, a sliding window shorter than the context, a parallel block, an untied head with a bias."""
    torch.manual_seed(0)
    return M.GPT(M.get_config(request.param)).eval()


def test_every_family_cached_greedy_equals_recomputing(family):
    window = family.config.sliding_window or 0
    ids = torch.randint(0, family.config.vocab_size, (2, window + 5), generator=torch.Generator().manual_seed(4))
    assert torch.equal(run(family, ids, 12, temperature=0), greedy_by_recomputing(family, ids, 12))


def test_every_family_left_padded_batch_equals_each_row_alone(family):
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, family.config.vocab_size, (n,), generator=gen).tolist() for n in (70, 3, 17)]
    ids, mask = G.left_pad(prompts)
    batched = run(family, ids, 12, temperature=0, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        assert torch.equal(batched[row], run(family, torch.tensor([prompt]), 12, temperature=0)[0])


def test_sampling_stays_inside_the_tokenizers_vocabulary(tiny):
    """A tokenizer may have fewer tokens than the model has rows (Phi-2: 50,295 of 51,200)."""
    ids = torch.randint(0, 50257, (3, 4), generator=torch.Generator().manual_seed(6))
    tokens = run(tiny, ids, 30, temperature=5.0, n_vocab=1000, generator=torch.Generator().manual_seed(0))
    assert tokens.max() < 1000
    assert run(tiny, ids, 30, temperature=5.0, generator=torch.Generator().manual_seed(0)).max() >= 1000


def test_left_pad_lines_prompts_up_on_the_right():
    ids, mask = G.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def seeded(seed: int = 0) -> dict:
    """Sampling settings that draw the same tokens every run (a random model's samples rarely repeat,
    unlike its greedy tokens)."""
    return {"temperature": 1.0, "generator": torch.Generator().manual_seed(seed)}


def test_eos_ends_a_row_and_finished_rows_yield_minus_one(tiny):
    ids = torch.randint(0, 50257, (2, 4), generator=torch.Generator().manual_seed(2))
    row0, row1 = run(tiny, ids, 10, **seeded()).tolist()
    assert len(set(row0 + row1)) == 20  # all different, so row0[3] first appears at step 3 of row 0
    stopped = run(tiny, ids, 10, eos_id=row0[3], **seeded())
    assert stopped[0].tolist() == row0[:4] + [-1] * 6
    assert stopped[1].tolist() == row1  # the other row goes on to max_new_tokens
    alone = run(tiny, ids[:1], 10, **seeded())[0].tolist()  # a batch of 1 draws other samples
    assert len(list(G.generate(tiny, ids[:1], 10, eos_id=alone[3], **seeded()))) == 4  # ends at once


def test_a_stop_string_ends_generation(tiny):
    ids = torch.randint(0, 50257, (1, 4), generator=torch.Generator().manual_seed(3))
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # every token is visible text
    free = run(tiny, ids, 10, **seeded())[0].tolist()
    assert len(set(free)) == 10
    stop = f"{free[4]}><{free[5]}"  # spans tokens 4 and 5
    stopped = run(tiny, ids, 10, stop_strings=[stop], decode=decode, **seeded())[0].tolist()
    assert stopped == free[:6]


def test_generation_that_would_outgrow_the_context_is_refused(tiny):
    with pytest.raises(ValueError, match="context of 64"):
        next(G.generate(tiny, torch.zeros(1, 60, dtype=torch.long), 5))


# ---- streaming text ------------------------------------------------------------------------------

def test_text_stream_never_prints_half_a_character():
    text = "héllo wörld 👋 ok"
    stream = G.TextStream(byte_decode)
    pieces = [stream.push(b) for b in text.encode()] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_before_it():
    stream = G.TextStream(byte_decode, stop_strings=["STOP", "\n\n"])
    pieces = [stream.push(b) for b in b"go ST"]
    assert "".join(pieces) == "go "  # "ST" may start "STOP"
    assert stream.push(ord("a")) == "STa"  # it did not
    assert [stream.push(b) for b in b"b\nSTO"] == ["b", "", "\n", "", ""]  # "\n" waits for a 2nd "\n"
    assert stream.push(ord("P")) == "" and stream.stopped
    assert stream.flush() == "" and stream.text == "go STab\n"


def test_text_stream_flush_hands_out_an_unfinished_character():
    stream = G.TextStream(byte_decode)
    assert stream.push(0xF0) == ""  # first byte of a 4-byte character
    assert stream.flush() == "\ufffd"


def sentencepiece_like_decode(ids: list[int]) -> str:
    """Pieces 0-2 are '<s>', '▁Hello', '▁world'; like SentencePiece, '<s>' vanishes and the space that
    starts a text's first word is dropped."""
    return "".join(["", "\u2581Hello", "\u2581world"][i] for i in ids).replace("\u2581", " ").removeprefix(" ")


def test_text_stream_decodes_new_tokens_after_the_prompt():
    alone = G.TextStream(sentencepiece_like_decode)
    assert alone.push(2) + alone.flush() == "world"  # decoded alone, the first new word loses its space
    after = G.TextStream(sentencepiece_like_decode, prefix=[0, 1])
    assert after.push(2) + after.flush() == " world" and after.ids == [0, 1, 2]


# ---- command line --------------------------------------------------------------------------------

def cli(*args: str, stdin: str = "", preset: str = "tiny") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "generate.py"), "--init", "random", "--preset", preset,
                           "--device", "cpu", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, timeout=180)


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    """Exit 1, one line on stderr that starts with 'error: ', no traceback; returns the line."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.needs_files(*GPT2_FILES)
def test_cli_streams_samples_for_each_line_of_stdin_and_reports_speed():
    result = cli("--max-new-tokens", "12", stdin="Every effort moves you\nsecond line\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Every effort moves you") and lines[-1].startswith("second line")
    reports = result.stderr.splitlines()
    assert reports[0].startswith("[prompt 4 tokens; generated 12 tokens") and "tokens/s" in reports[0]
    assert reports[1].startswith("[prompt 2 tokens; generated 12 tokens") and len(reports) == 2


@pytest.mark.needs_files(*GPT2_FILES)
def test_cli_user_error_is_one_line_and_fails():
    result = cli("--prompt", "hi", "--max-new-tokens", "100")  # tiny's context is 64 tokens
    assert assert_one_line_error(result) == \
        "error: the prompt has 1 tokens, and with --max-new-tokens 100 that exceeds the model's context of 64"


@pytest.mark.needs_files(*GPT2_FILES)
def test_readme_quick_start_line_runs_as_written():
    """`python generate.py --init random --preset tiny --prompt "Hi"`: the default of 100 new tokens does
    not fit tiny's 64-token context, so it generates what fits and says so."""
    result = subprocess.run([sys.executable, "generate.py", "--init", "random", "--preset", "tiny", "--prompt", "Hi"],
                            capture_output=True, text=True, cwd=REPO, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hi")
    note, report = result.stderr.splitlines()
    assert note == "[note: the model's context of 64 tokens leaves room for 63 new tokens after the prompt's 1]"
    assert report.startswith("[prompt 1 tokens; generated 63 tokens")


def test_the_default_number_of_new_tokens_fits_the_context():
    assert G.new_tokens_for(10, 1024, None) == G.DEFAULT_NEW_TOKENS
    assert G.new_tokens_for(10, 64, None) == 54
    assert G.new_tokens_for(10, 64, 54) == 54  # asked for exactly what fits
    with pytest.raises(G.UserError, match="exceeds the model's context of 64"):
        G.new_tokens_for(10, 64, 55)
    with pytest.raises(G.UserError, match="fills the model's context"):
        G.new_tokens_for(64, 64, None)


BAD_FLAGS = [["--temperature", "nan"], ["--temperature", "-1"], ["--temperature", "inf"], ["--stop", ""],
             ["--max-new-tokens", "-1"], ["--max-new-tokens", "0"], ["--max-new-tokens", "1.5"],
             ["--num-samples", "0"], ["--top-p", "0"], ["--top-p", "1.5"], ["--top-p", "nan"], ["--top-k", "0"],
             ["--top-k", "-3"], ["--seed", "-1"], ["--seed", str(2**64)], ["--preset", "nope"],
             ["--quantize", "int4"], ["--dtype", "float64"], ["--device", "cuda:7"]]


def test_a_checkpoint_not_yet_trained_is_named_with_the_stage_that_writes_it(tmp_path):
    """generate.py --init out/pretrain/best.pt before any training: not "neither a GPT-2 name, nor ..."."""
    best = tmp_path / "out" / "pretrain" / "best.pt"
    with pytest.raises(UserError, match=f"checkpoint {best} does not exist \\(python pretrain.py writes it"):
        G.main(G.parse_args(["--init", str(best), "--prompt", "Hi", "--device", "cpu"]))


def test_preset_beside_a_model_that_brings_its_own_size_is_refused():
    with pytest.raises(UserError, match="--preset only applies to --init random; gpt2 brings its own size"):
        G.parse_args(["--init", "gpt2", "--preset", "tiny"])


@pytest.mark.parametrize("flags", BAD_FLAGS, ids=[" ".join(f) for f in BAD_FLAGS])
def test_meaningless_flags_are_refused_when_parsed(flags, capsys):
    """Refused when parsed, before any model or tokenizer is loaded: run_stage (the script's own last
    line) prints one sentence naming the flag and exits 1."""
    with pytest.raises(SystemExit) as stop:
        run_stage(G.main, lambda: G.parse_args(["--init", "random", "--preset", "tiny", "--prompt", "hi", *flags]))
    assert stop.value.code != 0 and flags[0] in str(stop.value.code) and str(stop.value.code).startswith("error: ")
    assert "\n" not in str(stop.value.code) and capsys.readouterr().out == ""


@pytest.mark.parametrize("flags", [["--temperature", "nan"], ["--stop", ""], ["--max-new-tokens", "0"]])
def test_meaningless_flags_on_the_real_command_line(flags):
    assert flags[0] in assert_one_line_error(cli("--prompt", "hi", *flags))


@pytest.mark.parametrize("content, says", [(b"", "is empty (0 bytes)"), (b"\x00junk" * 100, "neither a checkpoint")])
def test_a_broken_checkpoint_given_to_init_is_one_sentence(tmp_path, content, says):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(content)
    result = subprocess.run([sys.executable, str(REPO / "generate.py"), "--init", str(checkpoint), "--prompt", "hi"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert says in assert_one_line_error(result)
    assert checkpoint.read_bytes() == content


@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.needs_files(*PRESET_FILES[p]))
                                    for p in FAMILY_PRESETS])
def test_cli_runs_every_family_preset_with_its_own_tokenizer(preset):
    result = cli("--prompt", "The capital of France is", "--max-new-tokens", "5", preset=preset)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is")
    assert "generated 5 tokens" in result.stderr


class FakeTokenizer:
    """A family with a BOS (id 0) and an end-of-sequence id that is not its end-of-text token, whose decode
    renders the BOS as '<s>' and every other id as '<id>'."""
    bos_id, eot_token, n_vocab = 0, 1, 50257

    def __init__(self, eos_id: int):
        self.eos_id = eos_id

    def encode(self, text: str, allowed_special=frozenset()) -> list[int]:
        return [100 + ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join("<s>" if i == 0 else f"<{i}>" for i in ids)


def cli_args(**flags) -> argparse.Namespace:
    return G.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in flags.items()])


def test_prompts_start_with_the_familys_bos_and_gpt2_samples_start_from_endoftext():
    assert G.encode_prompt(FakeTokenizer(eos_id=2), "ab") == [0, 197, 198]
    assert G.encode_prompt(FakeTokenizer(eos_id=2), "") == [0]


@pytest.mark.needs_files(*GPT2_FILES)
def test_gpt2_prompts_have_no_bos_and_unconditional_samples_start_from_endoftext():
    from load_gpt2 import tokenizer_for
    gpt2 = tokenizer_for({"model_type": "gpt2", "tokenizer": "gpt2"})
    assert bos(gpt2) == [] and G.encode_prompt(gpt2, "") == [gpt2.eot_token]
    assert G.encode_prompt(gpt2, "Hi<|endoftext|>") == [17250, gpt2.eot_token]


def test_generation_stops_at_the_tokenizers_eos_and_shows_the_prompt_as_typed(tiny, capsys):
    prompt = "ab"
    ids = torch.tensor([G.encode_prompt(FakeTokenizer(2), prompt)])
    first, second = run(tiny, ids, 2, temperature=1.0, top_k=200, generator=torch.Generator().manual_seed(0))[0].tolist()
    assert first != second
    result = G.generate_text(tiny, FakeTokenizer(eos_id=second), prompt, cli_args(max_new_tokens=10, temperature=1.0),
                             torch.Generator().manual_seed(0), torch.device("cpu"))
    assert result["new_tokens"] == 2  # the EOS ends the sample (and is not printed)
    assert result["text"] == f"ab<{first}>"  # the prompt as typed, not decoded ('<s><197><198>')
    assert capsys.readouterr().out == f"ab<{first}>\n"


@pytest.mark.needs_files(*GPT2_FILES)
def test_main_returns_reproducible_samples():
    args = G.parse_args(["--init", "random", "--preset", "tiny", "--device", "cpu", "--prompt", "Hi",
                         "--max-new-tokens", "8", "--num-samples", "2", "--seed", "5"])
    first, again = G.main(args), G.main(args)
    assert first["samples"] == again["samples"] and len(first["samples"]) == 2
    assert first["samples"][0] != first["samples"][1]  # one generator runs on across samples
    assert first["new_tokens"] == 16 and first["tokens_per_second"] > 0
