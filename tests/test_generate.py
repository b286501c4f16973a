"""generate.py: sampling rules, cached decoding against recomputation, batching, stops, the CLI."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as G
import model as M

REPO = Path(__file__).resolve().parent.parent


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


# ---- command line --------------------------------------------------------------------------------

def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "generate.py"), "--init", "random", "--preset", "tiny",
                           "--device", "cpu", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_streams_samples_for_each_line_of_stdin_and_reports_speed():
    result = cli("--max-new-tokens", "12", stdin="Every effort moves you\nsecond line\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Every effort moves you") and lines[-1].startswith("second line")
    reports = result.stderr.splitlines()
    assert reports[0].startswith("[prompt 4 tokens; generated 12 tokens") and "tokens/s" in reports[0]
    assert reports[1].startswith("[prompt 2 tokens; generated 12 tokens") and len(reports) == 2


def test_cli_user_error_is_one_line_and_fails():
    result = cli("--prompt", "hi", "--max-new-tokens", "100")  # tiny's context is 64 tokens
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: the prompt has 1 tokens, and with --max-new-tokens 100 that exceeds the model's context of 64"]


def test_main_returns_reproducible_samples():
    args = G.parse_args(["--init", "random", "--preset", "tiny", "--device", "cpu", "--prompt", "Hi",
                         "--max-new-tokens", "8", "--num-samples", "2", "--seed", "5"])
    first, again = G.main(args), G.main(args)
    assert first["samples"] == again["samples"] and len(first["samples"]) == 2
    assert first["samples"][0] != first["samples"][1]  # one generator runs on across samples
    assert first["new_tokens"] == 16 and first["tokens_per_second"] > 0
