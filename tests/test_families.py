"""Mistral, Phi-2, Phi-3 and Llama in model.py and load_gpt2.py, against transformers.

The references are tests/fixtures/hf_tiny_<family>: random models saved by transformers with their
float32 logits on inputs longer than the sliding window and their KV-cached greedy continuations
(made by tests/fixtures/make_hf_families.py, which says what each fixture exercises). The *-tiny
presets are checked against themselves: the cache, padding, the window, the split forward pass.
"""
import copy
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune_spam as fs
import model as M
from fixtures.hub_config import hub_layout

import load_gpt2
from common import UserError
from generate import PackedLinear, cpu_head, generate, left_pad, next_logits, pack_for_cpu
from load_gpt2 import export_hf, load_model, load_pretrained
from safetensors_file import SafetensorsFile, write_safetensors


REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
FAMILIES = ("mistral", "phi", "phi3", "llama")
TINY_PRESETS = ("mistral-tiny", "llama-tiny", "phi-2-tiny", "phi-3-tiny")


def load_weights_of(path: Path, dtype: torch.dtype = torch.float32) -> M.GPT:
    return load_pretrained(path, dtype=dtype)[0]


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = SafetensorsFile(path)
    return {name: file.tensor(name) for name in file.names()}


def fixture(family: str) -> Path:
    return FIXTURES / f"hf_tiny_{family}"


def reference(family: str):
    return np.load(fixture(family) / "reference.npz")


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    """(family, our model of its fixture in float32, card)."""
    model, card = load_model(str(fixture(request.param)))
    return request.param, model.eval(), card


@pytest.fixture(scope="module", params=TINY_PRESETS)
def tiny(request):
    torch.manual_seed(0)
    return M.GPT(M.get_config(request.param)).eval()


@torch.no_grad()
def logits_of(model, ids) -> np.ndarray:
    return model(torch.as_tensor(ids))[0].float().numpy()


def header_of(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


# --- against transformers -----------------------------------------------------------------------------

def test_logits_match_transformers(loaded):
    family, model, card = loaded
    ref = reference(family)
    assert ref["input_ids"].shape[1] > (model.config.sliding_window or 0)  # the window is exercised
    diff = np.abs(logits_of(model, ref["input_ids"]) - ref["logits"]).max()
    assert diff <= 1e-4, f"{family}: max abs logit difference {diff:.2e}"
    assert card["model_type"] == family


def test_each_fixture_exercises_its_family(loaded):
    family, model, _ = loaded
    c = model.config
    expected = {"mistral": c.kv_heads < c.n_head and c.sliding_window == 8 and not c.tie_embeddings,
                "phi": c.parallel_block and c.rotary_dim < c.head_size and c.lm_head_bias and c.norm == "layernorm",
                "phi3": c.kv_heads < c.n_head and c.sliding_window == 8 and c.mlp == "swiglu",
                "llama": c.rope_scaling_factor == 4.0 and c.rope_original_context == 16 and model.tied}
    assert expected[family]


def greedy_recomputed(model, prompt: torch.Tensor, n: int) -> list[int]:
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.size(1):].tolist()


def test_cached_greedy_tokens_equal_recomputed_and_transformers(loaded):
    family, model, _ = loaded
    ref = reference(family)
    prompt_length = int(ref["prompt_length"])
    theirs = ref["greedy"][0, prompt_length:].tolist()
    prompt = torch.from_numpy(ref["greedy"][:, :prompt_length])
    cached = [int(t) for t in generate(model, prompt, len(theirs), temperature=0)]
    assert cached == greedy_recomputed(model, prompt, len(theirs)) == theirs
    assert prompt_length + len(theirs) > (model.config.sliding_window or 0)  # decoding crosses the window


def test_left_padded_batch_equals_each_row_alone(loaded):
    """Rows longer and shorter than the window, prefilled together and then decoded with the cache."""
    family, model, _ = loaded
    ids = reference(family)["input_ids"][0].tolist()
    rows = [ids[:30], ids[3:14], ids[5:7]]
    batch, mask = left_pad(rows)
    with torch.no_grad():
        full = model(batch, attention_mask=mask)[0]  # (B, T, V)
        cache = M.KVCache(model.config, 3, batch.size(1))
        split = 20
        pieces = [model(batch[:, :split], attention_mask=mask[:, :split], kv_cache=cache,
                        cache_positions=torch.arange(split))[0]]
        for t in range(split, batch.size(1)):
            pieces.append(model(batch[:, t:t + 1], attention_mask=mask[:, t:t + 1], kv_cache=cache,
                                cache_positions=torch.tensor([t]))[0])
        decoded = torch.cat(pieces, dim=1)
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row]))[0][0]
            torch.testing.assert_close(full[i, -len(row):], alone, rtol=0, atol=1e-4)
            torch.testing.assert_close(decoded[i, -len(row):], alone, rtol=0, atol=1e-4)
        assert torch.isfinite(full).all() and torch.isfinite(decoded).all()


def test_batched_generation_equals_each_row_alone(loaded):
    family, model, _ = loaded
    ids = reference(family)["input_ids"][1].tolist()
    rows = [ids[:12], ids[4:7]]
    batch, mask = left_pad(rows)
    together = torch.stack([t for t in generate(model, batch, 10, temperature=0, attention_mask=mask)], dim=1)
    for i, row in enumerate(rows):
        assert together[i].tolist() == greedy_recomputed(model, torch.tensor([row]), 10)


def test_decoding_with_the_packed_cpu_head_adds_the_lm_head_bias(loaded):
    """generate.py's CPU head (a packed copy of the head, PackedLinear) equals the model's own head,
    bias included (Phi-2's head has one); so does a whole model packed by pack_for_cpu."""
    family, model, _ = loaded
    ids = torch.from_numpy(reference(family)["input_ids"][:, :9])
    head = cpu_head(model)
    assert isinstance(head, PackedLinear) and (head.bias is None) == (model.lm_head.bias is None)
    with torch.no_grad():
        plain = model(ids, last_only=True)[0][:, -1]
        packed_head = next_logits(model, ids, head)
        whole = pack_for_cpu(copy.deepcopy(model))
        packed_model = next_logits(whole, ids, cpu_head(whole))
    assert cpu_head(whole) is None and not any(type(m) is torch.nn.Linear for m in whole.modules())
    torch.testing.assert_close(packed_head, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_model, plain, rtol=0, atol=1e-4)


# --- loading: layouts, dtypes, shards ------------------------------------------------------------------


def transformers5_layout(config: dict) -> dict:
    """The Hub's older config.json layout -> transformers 5's rope_parameters."""
    config = dict(config)
    rope = {"rope_type": "default", **(config.pop("rope_scaling", None) or {}), "rope_theta": config.pop("rope_theta")}
    if "partial_rotary_factor" in config:
        rope["partial_rotary_factor"] = config.pop("partial_rotary_factor")
    config["rope_parameters"] = rope
    config["dtype"] = config.pop("torch_dtype", "float32")
    return config


@pytest.mark.parametrize("family", FAMILIES)
def test_both_config_layouts_give_the_same_model(tmp_path, family):
    original = json.loads((fixture(family) / "config.json").read_text())
    other = transformers5_layout(original) if "rope_theta" in original else hub_layout(original)
    assert ("rope_parameters" in other) != ("rope_parameters" in original)
    shutil.copytree(fixture(family), tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps(other))
    assert load_gpt2.config_from_hf(tmp_path / "other" / "config.json") == \
        load_gpt2.config_from_hf(fixture(family) / "config.json")


def test_sharded_fixture_fills_fused_matrices_across_shards():
    index = json.loads((fixture("mistral") / "model.safetensors.index.json").read_text())["weight_map"]
    # gate_proj and up_proj of one layer live in different shards and fill one c_fc matrix
    assert index["model.layers.0.mlp.gate_proj.weight"] != index["model.layers.0.mlp.up_proj.weight"]
    model = load_weights_of(fixture("mistral"))
    gate = read_tensors(fixture("mistral") / index["model.layers.0.mlp.gate_proj.weight"])
    up = read_tensors(fixture("mistral") / index["model.layers.0.mlp.up_proj.weight"])
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    assert torch.equal(c_fc, torch.cat([gate["model.layers.0.mlp.gate_proj.weight"],
                                        up["model.layers.0.mlp.up_proj.weight"]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bfloat16_fixture_loads_in_every_dtype(dtype):
    tensors = read_tensors(fixture("llama") / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    model = load_weights_of(fixture("llama"), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    embedding = tensors["model.embed_tokens.weight"]
    assert torch.equal(model.transformer.wte.weight, embedding.to(dtype))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_phi3_fused_tensors_are_copied_exactly():
    tensors = read_tensors(fixture("phi3") / "model.safetensors")
    model = load_weights_of(fixture("phi3"))
    assert torch.equal(model.transformer.h[1].attn.c_attn.weight, tensors["model.layers.1.self_attn.qkv_proj.weight"])
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, tensors["model.layers.1.mlp.gate_up_proj.weight"])


def test_missing_tensor_is_named_in_one_sentence(tmp_path):
    shutil.copytree(fixture("phi"), tmp_path / "phi")
    tensors = read_tensors(tmp_path / "phi" / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    write_safetensors(tensors, tmp_path / "phi" / "model.safetensors")
    with pytest.raises(UserError, match=r"1 missing \(model.layers.1.self_attn.k_proj.bias\)") as error:
        load_model(str(tmp_path / "phi"))
    assert "\n" not in str(error.value)


def test_missing_shard_is_named(tmp_path):
    shutil.copytree(fixture("mistral"), tmp_path / "m")
    (tmp_path / "m" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(UserError, match="lacks the shard model-00002-of-00003.safetensors"):
        load_model(str(tmp_path / "m"))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma"}, "type 'gemma', which model.py does not implement"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling of type 'yarn'"),
    ({"qk_layernorm": True}, "qk_layernorm"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"num_attention_heads": 3}, "not divisible"),
])
def test_unsupported_configs_are_one_sentence(tmp_path, change, message):
    shutil.copytree(fixture("phi"), tmp_path / "phi")
    config = json.loads((tmp_path / "phi" / "config.json").read_text())
    (tmp_path / "phi" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message) as error:
        load_model(str(tmp_path / "phi"))
    assert "\n" not in str(error.value)


# --- export ------------------------------------------------------------------------------------------

def test_export_round_trip_keeps_layout_and_logits(loaded, tmp_path):
    family, model, card = loaded
    export_hf(model, tmp_path / "out", card)
    original = fixture(family)
    theirs = {}
    for shard in original.glob("*.safetensors"):
        theirs.update(header_of(shard))
    ours = header_of(tmp_path / "out" / "model.safetensors")
    assert {k: v["shape"] for k, v in ours.items()} == {k: v["shape"] for k, v in theirs.items()}
    assert {v["dtype"] for v in ours.values()} == {"F32"}  # the model's dtype (the llama fixture is BF16)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    reference_config = json.loads((original / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == reference_config["architectures"]
    again, again_card = load_pretrained(tmp_path / "out")
    assert again_card["model_type"] == family and again.config == model.config
    ids = reference(family)["input_ids"]
    assert np.array_equal(logits_of(again, ids), logits_of(model, ids))


def test_export_shards_above_the_limit_like_the_hub(tmp_path):
    model, card = load_model(str(fixture("phi3")))
    export_hf(model, tmp_path, card, max_shard_bytes=50_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(
        np.prod(v["shape"]) * 4 for shard in shards for v in header_of(tmp_path / shard).values())
    assert not (tmp_path / "model.safetensors").exists()
    again = load_weights_of(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_export_refuses_a_folder_holding_a_model_unless_forced(tmp_path):
    model, card = load_model(str(fixture("phi3")))
    export_hf(model, tmp_path, card, max_shard_bytes=50_000)  # a sharded export first
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match="already holds a model"):
        export_hf(model, tmp_path, card)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched
    export_hf(model, tmp_path, card, force=True)  # one file now: the old shards and index go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert load_weights_of(tmp_path).config == model.config


def test_export_refuses_a_family_that_cannot_express_the_model(tmp_path):
    model = M.GPT(M.get_config("mistral-tiny"))
    with pytest.raises(UserError, match="does not fit the LlamaForCausalLM layout: sliding_window=64"):
        export_hf(model, tmp_path, {"model_type": "llama", "tokenizer": "gpt2"})
    with pytest.raises(UserError, match="GPT2LMHeadModel layout"):
        export_hf(model, tmp_path)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_presets_export_and_reload_with_their_card(tmp_path, preset):
    torch.manual_seed(0)
    model, card = load_model("random", preset=preset)
    export_hf(model, tmp_path, card)
    again, again_card = load_model(str(tmp_path))
    assert again_card["model_type"] == card["model_type"] and again.config.vocab_size == model.config.vocab_size
    ids = torch.randint(0, model.config.vocab_size, (1, 80))
    assert np.array_equal(logits_of(again, ids), logits_of(model.eval(), ids))
    # the tokenizer travels with the export: Mistral's tokenizer.model, or GPT-2's BPE files for phi-2-tiny
    assert again_card["tokenizer"] == ("gpt2" if card["tokenizer"] == "gpt2" else str(tmp_path.resolve()))


# --- the small presets: cache, padding, window, split forward ------------------------------------------

def test_tiny_presets_are_small_and_their_family(tiny):
    assert tiny.num_params() < 7_000_000
    assert tiny.config.block_size > (tiny.config.sliding_window or 0)
    assert "wpe" not in tiny.transformer  # rotary positions: no position table


def test_kv_cache_holds_the_key_value_heads_only(tiny):
    cache = M.KVCache(tiny.config, 2, 10)
    assert cache.keys[0].shape == (2, tiny.config.kv_heads, 10, tiny.config.head_size)


def test_kv_cache_gives_the_full_forward_logits_past_the_window(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 100))
    with torch.no_grad():
        cache = M.KVCache(tiny.config, 2, 100)
        pieces = [tiny(ids[:, :40], kv_cache=cache, cache_positions=torch.arange(40))[0]]
        pieces += [tiny(ids[:, t:t + 1], kv_cache=cache, cache_positions=torch.tensor([t]))[0] for t in range(40, 100)]
        torch.testing.assert_close(torch.cat(pieces, 1), tiny(ids)[0], rtol=0, atol=1e-4)


def test_the_sliding_window_bounds_what_a_token_sees():
    torch.manual_seed(0)
    model = M.GPT(M.get_config("mistral-tiny", sliding_window=4)).eval()
    ids = torch.randint(0, 32000, (1, 20))
    changed = ids.clone()
    changed[0, 0] += 1
    with torch.no_grad():
        before, after = model(ids)[0][0], model(changed)[0][0]
    # each of the 2 layers reaches 3 tokens further back: position 6 still sees token 0, position 7 not
    assert not torch.allclose(before[6], after[6])
    torch.testing.assert_close(before[7:], after[7:], rtol=0, atol=0)


def test_window_mask_counts_the_query_itself():
    mask = M.build_attention_mask(torch.arange(6), torch.arange(6), window=3)[0, 0]
    assert mask[5].tolist() == [False, False, False, True, True, True]  # keys 3, 4, 5: kv > q - window


def test_llama3_rope_scaling_keeps_short_and_slows_long_wavelengths():
    config = M.get_config("llama-tiny")
    plain = M.rope_frequencies(M.get_config("llama-tiny", rope_scaling_factor=None))
    scaled = M.rope_frequencies(config)
    wavelength = 2 * torch.pi / plain
    short = wavelength < config.rope_original_context / config.rope_high_freq_factor
    long = wavelength > config.rope_original_context / config.rope_low_freq_factor
    assert short.any() and long.any() and (~short & ~long).any()  # every band is present in llama-tiny
    assert torch.equal(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long], plain[long] / config.rope_scaling_factor)


def test_run_block_at_equals_the_full_block(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (3, 90))
    last = tiny.config.n_layer - 1
    at = torch.tensor([[89, 3], [70, 0], [10, 80]])
    mask = torch.ones(3, 90, dtype=torch.long)
    mask[1, :30] = 0  # a left-padded row too
    with torch.no_grad():
        for attention_mask in (None, mask):
            x = tiny.run_blocks(tiny.embed(ids, M.token_positions(90, "cpu", attention_mask)), 0, last,
                                attention_mask=attention_mask)
            whole = tiny.run_blocks(x, last, attention_mask=attention_mask)
            part = tiny.run_block_at(last, x, at, attention_mask=attention_mask)
            torch.testing.assert_close(part, M.take(whole, at), rtol=0, atol=1e-5)


@pytest.mark.parametrize("start", [0, 1, 2])
def test_classifier_forward_split_equals_the_full_forward(tiny, start):
    """finetune_spam's bottom and top, split at any block, read each message's last token exactly as the
    whole model does, for every family (right padding needs no mask)."""
    lengths = torch.tensor([70, 5, 33])
    ids = torch.randint(0, tiny.config.vocab_size, (3, 70))
    with torch.no_grad():
        split = fs.top(tiny, fs.bottom(tiny, ids, start), lengths, start)  # (B, V): the LM head here
        full = tiny(ids)[0][torch.arange(3), lengths - 1]
    torch.testing.assert_close(split, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_presets_learn(preset):
    """A few AdamW steps on one batch lower the loss: gradients flow through every family's pieces."""
    torch.manual_seed(0)
    model = M.GPT(M.get_config(preset))
    ids = torch.randint(0, 1000, (4, 33))
    optimizer = model.configure_optimizer(lr=3e-3)
    losses = []
    for _ in range(15):
        _, loss = model(ids[:, :-1], targets=ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_compiled_windowed_gqa_model_decodes_like_eager():
    torch.manual_seed(0)
    model = M.GPT(M.get_config("mistral-tiny", sliding_window=4)).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 32000, (2, 10))
    with torch.no_grad():
        cache = M.KVCache(model.config, 2, 10)
        pieces = [compiled(ids[:, :3], kv_cache=cache, cache_positions=torch.arange(3))[0]]
        pieces += [compiled(ids[:, t:t + 1], kv_cache=cache, cache_positions=torch.tensor([t]))[0]
                   for t in range(3, 10)]
        torch.testing.assert_close(torch.cat(pieces, 1), model(ids)[0], rtol=1e-4, atol=1e-4)


def test_parameter_counts_of_the_real_presets():
    with torch.device("meta"):
        counts = {name: M.GPT(M.get_config(name)).num_params()
                  for name in ("mistral-7b", "phi-2", "phi-3-mini", "llama-3.2-1b")}
    # the counts of the Hub's checkpoints
    assert counts == {"mistral-7b": 7_241_732_096, "phi-2": 2_779_683_840, "phi-3-mini": 3_821_079_552,
                      "llama-3.2-1b": 1_235_814_400}


def test_config_is_validated_when_made():
    with pytest.raises(ValueError, match="n_kv_head 3 must divide n_head 4"):
        M.get_config("mistral-tiny", n_kv_head=3)
    with pytest.raises(ValueError, match="norm must be one of"):
        M.get_config("tiny", norm="batchnorm")
    with pytest.raises(ValueError, match="rotating dimensions"):
        M.get_config("phi-2-tiny", rotary_fraction=0.01)
    assert M.get_config("mistral-tiny", n_embd=128).mlp_size == 192  # derived sizes follow overrides
    assert M.get_config("tiny", n_embd=128).mlp_size == 512


def test_checkpoint_of_a_family_round_trips_with_its_card(tmp_path):
    torch.manual_seed(0)
    model, card = load_model("random", preset="phi-2-tiny")
    M.save_checkpoint(tmp_path / "c.pt", model, **load_gpt2.model_card(card), step=3)
    again, extra = load_model(str(tmp_path / "c.pt"))
    assert extra == {"model_type": "phi", "tokenizer": "gpt2", "step": 3}
    ids = torch.randint(0, 50257, (1, 20))
    assert np.array_equal(logits_of(again, ids), logits_of(model.eval(), ids))
