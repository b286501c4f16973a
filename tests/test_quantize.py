"""Decoding in little memory (issue 13, the laptop part): int8 weights (generate.Int8Linear,
quantize_int8) and bfloat16 weights on a CPU, for GPT-2 and every family preset.

Tolerances. Per-row int8 moves each weight by at most half a step, max|row| / 254; for weights
spread like a Gaussian that is a random error of about 0.7 % of a row's typical weight, which adds up
across layers to about 1 % of the logits' spread on these random two-layer models (measured: 0.7-0.9 %
mean, 5-6.6 % max on every tiny preset, either way Int8Linear multiplies; GPT-2 124M's twelve layers:
2 % and 14 %). The whole-model tests allow 2 % mean and 12 % max. Random weights give nearly uniform next-token distributions whose top two logits are often
closer than that, so greedy tokens are compared position by position (teacher-forced), and most,
not all, must agree; a trained model's top tokens are separated by far more.
"""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import generate as G
import model as M
from conftest import REPO

import load_gpt2
from load_gpt2 import export_hf


FAMILY_PRESETS = ("tiny", "mistral-tiny", "llama-tiny", "phi-2-tiny", "phi-3-tiny")
# what each preset's tokenizer needs in the download cache (for the command-line runs)
PRESET_FILES = {"tiny": ("gpt2/encoder.json", "gpt2/vocab.bpe"), "phi-2-tiny": ("gpt2/encoder.json", "gpt2/vocab.bpe"),
                **{p: ("hf/mistralai/Mistral-7B-v0.1/tokenizer.model",) for p in ("mistral-tiny", "llama-tiny", "phi-3-tiny")}}


def random_model(preset: str) -> M.GPT:
    torch.manual_seed(0)
    return M.GPT(M.get_config(preset)).eval()


@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def pair(request) -> tuple[str, M.GPT, M.GPT]:
    """(preset, the float32 model, its int8 copy)."""
    fp32 = random_model(request.param)
    return request.param, fp32, G.quantize_int8(copy.deepcopy(fp32))


@pytest.fixture(params=["cpu kernel", "dequantised"])
def product(request, monkeypatch) -> str:
    """Each way Int8Linear multiplies, for every number of rows: the CPU int8 kernel (bfloat16
    activations), or the matrix dequantised into the activations' float32."""
    monkeypatch.setattr(G.Int8Linear, "KERNEL_MAX_ROWS", 10**9 if request.param == "cpu kernel" else 0)
    return request.param


def sample_ids(model: M.GPT, batch: int = 2, length: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: M.GPT, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)[0].float()


# ---- the pieces ----------------------------------------------------------------------------------

def test_quantize_rows_is_within_half_a_step_per_row():
    w = torch.randn(50, 64) * torch.logspace(-3, 1, 50)[:, None]  # rows of very different sizes
    w[7] = 0
    q, scales = G.quantize_rows(w, chunk_rows=16)  # several chunks
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (50,)
    assert q.abs().max() == 127 and (q[7] == 0).all()
    half_step = w.abs().amax(dim=1, keepdim=True) / 254
    assert ((q.float() * scales[:, None] - w).abs() <= half_step * (1 + 1e-5) + 1e-12).all()


def int8_linear(linear: nn.Linear) -> G.Int8Linear:
    return G.Int8Linear(*G.quantize_rows(linear.weight.detach()), linear.bias)


def tensor_bytes(model: nn.Module) -> int:
    """The bytes of a model's parameters and buffers, a shared (tied) tensor once; works on meta."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@pytest.mark.parametrize("n_in, shape", [(64, (3, 5)), (64, (2, 40)), (24, (3, 5))],
                         ids=["cpu kernel", "prompt: dequantised blocks", "in not a multiple of 16"])
def test_int8_linear_computes_the_dequantised_product(n_in, shape, monkeypatch):
    """The CPU kernel (up to 32 rows, in a multiple of 16) and the dequantising path (many rows, or any
    other in; here in blocks of 7 output rows) both compute x @ (int8 * scale).T + bias; the kernel
    rounds x and its result to bfloat16 (relative 2^-8 each)."""
    monkeypatch.setattr(G.Int8Linear, "DEQUANTISE_ELEMENTS", 7 * n_in)
    linear = nn.Linear(n_in, 40)
    layer = int8_linear(linear)
    x = torch.randn(*shape, n_in)
    dequantised = layer.weight.float() * layer.scales[:, None]
    want = F.linear(x, dequantised, linear.bias)
    bound = (x.abs() @ dequantised.abs().t()) * 2**-7  # both bfloat16 roundings, with room to spare
    assert ((layer(x) - want).abs() <= bound + 1e-6).all()
    assert layer(x).shape == (*shape, 40) and layer(x).dtype == torch.float32
    if n_in % 16 or shape[0] * shape[1] > 32:  # no bfloat16 on the dequantising path
        torch.testing.assert_close(layer(x), want)
    # and the dequantised product is the float one within the int8 rounding of each weight
    half_steps = linear.weight.abs().amax(dim=1) / 254  # (out,)
    assert ((want - linear(x)).abs() <= x.abs().sum(-1, keepdim=True) * half_steps + 1e-5).all()


def test_int8_kernel_takes_inputs_that_start_anywhere():
    """The CPU kernel reads rows with aligned vector loads: a bfloat16 view that starts 16 bytes into its
    storage crashed the process before Int8Linear copied such inputs."""
    layer = int8_linear(nn.Linear(64, 32).to(torch.bfloat16))
    storage = torch.randn(1, 200, dtype=torch.bfloat16)
    x = storage[:, 8:72]  # contiguous, 16 bytes past an aligned start
    assert x.is_contiguous() and x.data_ptr() % 64 != 0
    torch.testing.assert_close(layer(x), layer(x.clone()), rtol=0, atol=0)


def test_int8_linear_keeps_the_activations_dtype():
    layer = int8_linear(nn.Linear(32, 16).to(torch.bfloat16))
    assert layer.scales.dtype == torch.bfloat16
    assert layer(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.skipif(M.missing_compiler(torch.device("cpu")) is not None, reason="no C++ compiler for torch.compile")
def test_compiled_int8_linear_matches_eager():
    """generate.py --compile on a CPU: frozen weights and autotuning, in which inductor lowers the int8
    product to its own GEMM (a lowering that failed when the scales were not folded into constants)."""
    torch.manual_seed(0)
    layer = nn.Sequential(int8_linear(nn.Linear(64, 128))).eval()
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        compiled = G.compile_for_generation(layer, torch.device("cpu"))(x)
        eager = layer(x)
    torch.testing.assert_close(compiled, eager, rtol=0.02, atol=0.02 * eager.abs().max().item())
    assert torch._inductor.config.freezing is False  # on only while the compiled model runs, never left on
    torch._dynamo.reset()


# ---- whole models: GPT-2 and every family --------------------------------------------------------

def test_int8_weights_take_about_a_quarter_of_float32(pair):
    preset, fp32, int8 = pair
    ratio = tensor_bytes(int8) / tensor_bytes(fp32)
    assert 0.25 <= ratio < 0.28, f"{preset}: {ratio:.3f}"  # int8 matrices, plus scales, norms, biases
    linears = [m for m in int8.modules() if type(m) is nn.Linear]
    assert not linears and isinstance(int8.lm_head, G.Int8Linear)  # the LM head is included
    assert isinstance(int8.transformer.wte, G.Int8Embedding)


def test_a_tied_embedding_and_head_share_one_int8_table():
    fp32 = random_model("tiny")
    int8 = G.quantize_int8(copy.deepcopy(fp32))
    assert int8.tied and int8.transformer.wte.scales is int8.lm_head.scales
    ids = sample_ids(fp32)
    with torch.no_grad():  # the looked-up rows are the dequantised table's rows
        table = int8.lm_head.weight.float() * int8.lm_head.scales[:, None]
        torch.testing.assert_close(int8.transformer.wte(ids), table[ids])


def test_int8_logits_are_close_to_float32(pair, product):
    preset, fp32, int8 = pair
    ids = sample_ids(fp32)
    want, got = logits(fp32, ids), logits(int8, ids)
    spread = want.std()
    error = (got - want).abs()
    assert error.mean() <= 0.02 * spread, f"{preset}, {product}: mean error {error.mean():.4f}, logits' std {spread:.4f}"
    assert error.max() <= 0.12 * spread, f"{preset}, {product}: max error {error.max():.4f}, logits' std {spread:.4f}"


def test_int8_greedy_tokens_mostly_agree_with_float32(pair, product):
    preset, fp32, int8 = pair
    ids = sample_ids(fp32, batch=4, length=50, seed=2)
    agree = (logits(fp32, ids).argmax(-1) == logits(int8, ids).argmax(-1)).float().mean()
    assert agree >= 0.9, f"{preset}, {product}: {agree:.1%} of 200 positions"


def test_an_int8_decoding_step_compiles_as_one_graph(pair):
    """A graph break inside Int8Linear (once: the alignment check reads data_ptr) leaves its products
    to eager kernels between compiled pieces, and --compile then gains nothing."""
    preset, _, int8 = pair
    step = torch.compile(int8, fullgraph=True, backend="eager")  # fullgraph: a graph break is an error
    outputs = []
    for model in (step, int8):
        cache = M.KVCache(int8.config, 1, 8)
        with torch.inference_mode():
            model(sample_ids(int8, 1, 4), kv_cache=cache, cache_positions=torch.arange(4), last_only=True)
            outputs.append(model(sample_ids(int8, 1, 1), kv_cache=cache, cache_positions=torch.tensor([4]),
                                 last_only=True)[0])
    torch._dynamo.reset()
    torch.testing.assert_close(outputs[0], outputs[1])


def test_int8_cached_greedy_equals_int8_recomputed(pair):
    """The int8 layers take 3-D inputs of any length: prefill, one-token steps and full passes agree."""
    preset, _, int8 = pair
    prompts = [sample_ids(int8, 1, n, seed=n)[0].tolist() for n in (9, 3)]
    ids, mask = G.left_pad(prompts)
    together = torch.stack(list(G.generate(int8, ids, 12, temperature=0, attention_mask=mask)), dim=1)
    for row, prompt in enumerate(prompts):
        sequence = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(12):
                sequence = torch.cat([sequence, int8(sequence)[0][:, -1:].argmax(-1)], dim=1)
        assert together[row].tolist() == sequence[0, len(prompt):].tolist(), preset


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_bfloat16_decoding_on_cpu_matches_float32_closely(preset):
    fp32 = random_model(preset)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids = sample_ids(fp32, batch=4, length=50, seed=3)
    want, got = logits(fp32, ids), logits(bf16, ids)
    assert (got - want).abs().mean() <= 0.02 * want.std()
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9
    tokens = torch.stack(list(G.generate(bf16, ids[:1, :10], 8, temperature=0)), dim=1)  # KV cache in bf16
    # Each cached greedy token is the top logit of a bf16 pass over the whole sequence, up to rounding,
    # and each cached step's logits are that pass's
    sequence = torch.cat([ids[:1, :10], tokens], dim=1)  # (1, 18)
    cache = M.KVCache(bf16.config, 1, 18, dtype=torch.bfloat16)
    with torch.no_grad():
        full = bf16(sequence)[0][0].float()  # (18, vocab)
        steps = [bf16(sequence[:, :10], kv_cache=cache, cache_positions=torch.arange(10))[0][0]]
        steps += [bf16(sequence[:, t:t + 1], kv_cache=cache, cache_positions=torch.tensor([t]))[0][0] for t in range(10, 18)]
    gap = full[9:-1].max(-1).values - full[9:-1].gather(-1, tokens[0][:, None])[:, 0]
    assert (gap <= 0.05 * full.std()).all(), (preset, gap)
    assert (torch.cat(steps).float() - full).abs().max() <= 0.05 * full.std(), preset


def test_a_7b_model_in_int8_needs_about_8_gb():
    """Sized on the meta device (no memory): Mistral 7B's weights in int8."""
    with torch.device("meta"):
        model = M.GPT(M.get_config("mistral-7b"))
    assert 28.5e9 < tensor_bytes(model) < 29.5e9  # float32
    G.quantize_int8(model)
    assert 7.0e9 < tensor_bytes(model) < 7.5e9  # plus the KV cache and the runtime: about 8 GB


def test_loading_for_int8_reads_bfloat16_and_quantises(tmp_path):
    fp32 = random_model("mistral-tiny")
    export_hf(fp32, tmp_path / "hf", {"model_type": "mistral", "tokenizer": str(tmp_path / "no-tokenizer")})
    int8, extra = G.load_for_generation(str(tmp_path / "hf"), quantize="int8")
    assert extra["model_type"] == "mistral" and isinstance(int8.lm_head, G.Int8Linear)
    assert all(p.dtype == torch.float32 for p in int8.parameters())  # what stays float takes --dtype
    ids = sample_ids(fp32)
    want, got = logits(fp32, ids), logits(int8, ids)
    assert (got - want).abs().mean() <= 0.02 * want.std()


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny", "phi-2-tiny"])  # a position table; a tied head; biases
def test_quantising_as_weights_arrive_equals_quantising_the_loaded_model(tmp_path, preset):
    """load_for_generation quantises each matrix as it leaves the file (the float model never exists
    whole): the same int8 weights as loading in bfloat16 and quantising afterwards."""
    model = random_model(preset)
    export_hf(model, tmp_path / "hf", {"model_type": load_gpt2.PRESET_CARDS[preset][0],
                                       "tokenizer": str(tmp_path / "no-tokenizer")})
    streamed, _ = G.load_for_generation(str(tmp_path / "hf"), quantize="int8")
    whole = G.quantize_int8(load_gpt2.load_model(str(tmp_path / "hf"), dtype=torch.bfloat16)[0]).float()
    assert not any(t.is_meta for t in (*streamed.parameters(), *streamed.buffers()))
    assert streamed.tied == whole.tied and (streamed.transformer.wte.weight is streamed.lm_head.weight) == whole.tied
    for (name, a), (_, b) in zip(streamed.state_dict().items(), whole.state_dict().items()):
        assert torch.equal(a, b), name


# ---- the command line ------------------------------------------------------------------------------

def with_files(presets) -> list:
    """The presets as pytest params, each skipped (with the reason) when its tokenizer's files cannot be had."""
    return [pytest.param(p, marks=pytest.mark.needs_files(*PRESET_FILES[p])) for p in presets]


@pytest.mark.parametrize("preset", with_files(FAMILY_PRESETS))
@pytest.mark.parametrize("flags", [["--quantize", "int8"], ["--dtype", "bfloat16"]])
def test_main_decodes_every_family_in_little_memory(preset, flags, capsys):
    args = G.parse_args(["--init", "random", "--preset", preset, "--device", "cpu", "--prompt", "Once upon a time",
                         "--max-new-tokens", "6", "--temperature", "0", *flags])
    result = G.main(args)
    assert result["new_tokens"] >= 1 and result["samples"][0].startswith("Once upon a time")
    assert capsys.readouterr().out.startswith("Once upon a time")


def models_main_generates_with(monkeypatch, *flags: str) -> tuple[list[nn.Module], dict]:
    """generate.py's main on the tiny preset, greedy, and the model objects it generated with."""
    seen, real = [], G.generate_text
    monkeypatch.setattr(G, "generate_text", lambda model, *rest: seen.append(model) or real(model, *rest))
    result = G.main(G.parse_args(["--init", "random", "--preset", "tiny", "--device", "cpu", "--prompt", "Once upon",
                                  "--max-new-tokens", "5", "--temperature", "0", *flags]))
    return seen, result


@pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe")
def test_main_quantize_int8_generates_with_int8_layers_in_a_third_of_the_bytes(monkeypatch):
    [plain], _ = models_main_generates_with(monkeypatch)
    [int8], _ = models_main_generates_with(monkeypatch, "--quantize", "int8")
    assert not any(isinstance(m, G.Int8Linear) for m in plain.modules())
    assert sum(isinstance(m, G.Int8Linear) for m in int8.modules()) == 4 * plain.config.n_layer + 1  # and the head
    assert not any(type(m) is nn.Linear for m in int8.transformer.h.modules())
    size = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    assert size(int8) < size(plain) / 3


@pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe")
def test_main_dtype_bfloat16_generates_with_bfloat16_weights(monkeypatch):
    [model], result = models_main_generates_with(monkeypatch, "--dtype", "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and result["new_tokens"] == 5


@pytest.mark.skipif(M.missing_compiler(torch.device("cpu")) is not None, reason="no C++ compiler for torch.compile")
@pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe")
def test_main_compile_decodes_the_whole_model_compiled_as_eager_does(monkeypatch):
    [eager], expected = models_main_generates_with(monkeypatch)
    [compiled], result = models_main_generates_with(monkeypatch, "--compile")
    torch._dynamo.reset()
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is not eager
    assert result["samples"] == expected["samples"] and result["new_tokens"] == 5
    assert torch._inductor.config.freezing is False  # later compiles (training) must not freeze weights


@pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe")
def test_cli_int8_with_bfloat16_activations():
    result = subprocess.run([sys.executable, str(REPO / "generate.py"), "--init", "random", "--preset", "tiny",
                             "--device", "cpu", "--prompt", "Once upon a time", "--max-new-tokens", "6",
                             "--quantize", "int8", "--dtype", "bfloat16"], capture_output=True, text=True, cwd=REPO,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time") and "generated 6 tokens" in result.stderr
