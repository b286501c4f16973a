"""model.py: shapes, causality, the KV cache, padding, GPT-2's parameter counts, checkpoints."""
import numpy as np
import pytest
import torch

import model as M

from generate import left_pad



@pytest.fixture(scope="module")
def tiny() -> M.GPT:
    torch.manual_seed(0)
    return M.GPT(M.get_config("tiny")).eval()


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError, match="gpt2-medium.*tiny"):
        M.get_config("gpt3")


def test_get_config_overrides_a_field():
    assert M.get_config("tiny", dropout=0.1).dropout == 0.1
    assert M.PRESETS["tiny"].dropout == 0.0  # the preset itself is untouched


def test_forward_shapes_and_loss(tiny):
    idx = torch.randint(0, 50257, (3, 10))
    logits, loss = tiny(idx)
    assert logits.shape == (3, 10, 50257) and loss is None
    logits, loss = tiny(idx, targets=idx)
    assert loss.shape == () and 9 < loss.item() < 12  # about ln(50257) = 10.8 at initialisation
    assert tiny(idx, last_only=True)[0].shape == (3, 1, 50257)


def test_ignored_targets_do_not_count(tiny):
    idx = torch.randint(0, 50257, (2, 8))
    targets = idx.clone()
    targets[:, 4:] = -100
    logits, loss = tiny(idx, targets=targets)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 50257), idx[:, :4].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_classifier_head_replaces_the_tied_lm_head():
    torch.manual_seed(0)
    model = M.GPT(M.get_config("tiny", num_classes=2))
    assert model.lm_head.weight.shape == (2, 64) and model.lm_head.bias is not None
    assert model(torch.zeros(4, 7, dtype=torch.long))[0].shape == (4, 7, 2)


def test_changing_a_later_token_never_changes_earlier_logits(tiny):
    idx = torch.randint(0, 50257, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50257
    before, after = tiny(idx)[0], tiny(changed)[0]
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=0)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_gpt2_module_names_and_tied_head(tiny):
    keys = set(tiny.state_dict())
    for key in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.ln_1.bias",
                "transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_proj.bias",
                "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
                "transformer.h.1.ln_2.weight", "transformer.ln_f.bias", "lm_head.weight"]:
        assert key in keys
    assert tiny.lm_head.weight is tiny.transformer.wte.weight


def test_gpt2_parameter_counts_and_flops():
    with torch.device("meta"):  # full-size models without allocating their weights
        sizes = {name: M.GPT(M.get_config(name)) for name in ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]}
    # The counts of OpenAI's checkpoints (tied head counted once).
    assert {n: m.num_params() for n, m in sizes.items()} == {
        "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    gpt2 = sizes["gpt2"]
    assert gpt2.num_params(non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768
    assert gpt2.flops_per_token(1024) == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    model = M.GPT(M.get_config("mini"))  # 4 layers: residual projections get 0.02 / sqrt(8)
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / 8 ** 0.5, rel=0.05)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(0.02 / 8 ** 0.5, rel=0.05)
    assert block.attn.c_attn.bias.abs().max().item() == 0
    assert block.ln_1.weight.min().item() == 1


def test_optimizer_decays_matrices_only_and_is_fused(tiny):
    optimizer = tiny.configure_optimizer(lr=1e-3, weight_decay=0.1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(tiny.parameters()))
    assert optimizer.defaults["fused"]


def _prefill_then_decode(model, idx, split, attention_mask=None):
    """Logits of idx (B, T) computed as a prefill of idx[:, :split] plus one cached step per token."""
    B, T = idx.shape
    cache = M.KVCache(model.config, B, T)
    pieces = []
    for start, end in [(0, split), *((t, t + 1) for t in range(split, T))]:
        mask = attention_mask[:, start:end] if attention_mask is not None else None
        pieces.append(model(idx[:, start:end], attention_mask=mask, kv_cache=cache,
                            cache_positions=torch.arange(start, end))[0])
    return torch.cat(pieces, dim=1)  # (B, T, V)


@pytest.mark.parametrize("batch, split", [(1, 1), (1, 5), (3, 9)])
def test_kv_cache_gives_the_full_forward_logits(tiny, batch, split):
    idx = torch.randint(0, 50257, (batch, 12))
    torch.testing.assert_close(_prefill_then_decode(tiny, idx, split), tiny(idx)[0], rtol=1e-4, atol=1e-4)


def test_cache_reset_forgets_the_previous_sequence(tiny):
    cache = M.KVCache(tiny.config, 1, 8)
    tiny(torch.randint(0, 50257, (1, 8)), kv_cache=cache, cache_positions=torch.arange(8))
    cache.reset()
    idx = torch.randint(0, 50257, (1, 5))
    logits = tiny(idx, kv_cache=cache, cache_positions=torch.arange(5))[0]
    torch.testing.assert_close(logits, tiny(idx)[0], rtol=1e-4, atol=1e-4)


def test_left_padding_with_mask_gives_the_unpadded_logits(tiny):
    rows = [torch.randint(0, 50257, (n,)) for n in (9, 4, 1)]
    idx, mask = left_pad([r.tolist() for r in rows])
    with_cache = _prefill_then_decode(tiny, idx, 6, attention_mask=mask)
    for logits in (tiny(idx, attention_mask=mask)[0], with_cache):
        for i, r in enumerate(rows):
            alone = tiny(r[None])[0][0]  # (n, V)
            torch.testing.assert_close(logits[i, -len(r):], alone, rtol=1e-4, atol=1e-4)
            assert torch.isfinite(logits[i]).all()  # padding positions too: no NaN from empty attention


def test_right_padding_needs_no_mask(tiny):
    row = torch.randint(0, 50257, (5,))
    padded = torch.cat([row, torch.zeros(3, dtype=torch.long)])[None]
    torch.testing.assert_close(tiny(padded)[0][0, :5], tiny(row[None])[0][0], rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_keeps_weights_config_and_extras(tiny, tmp_path):
    path = tmp_path / "ckpt.pt"
    M.save_checkpoint(path, tiny, step=7, note="hello")
    loaded, extra = M.load_checkpoint(path)
    assert extra == {"step": 7, "note": "hello"}
    assert loaded.config == tiny.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied after loading
    idx = torch.randint(0, 50257, (1, 6))
    torch.testing.assert_close(loaded.eval()(idx)[0], tiny(idx)[0], rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_of_a_compiled_model_has_plain_keys(tiny, tmp_path):
    compiled = torch.compile(tiny)  # compiles lazily: saving never runs it
    M.save_checkpoint(tmp_path / "c.pt", compiled)
    state = torch.load(tmp_path / "c.pt", weights_only=True)["model"]
    assert set(state) == set(tiny.state_dict())
    loaded, _ = M.load_checkpoint(tmp_path / "c.pt")
    idx = torch.randint(0, 50257, (1, 6))
    torch.testing.assert_close(loaded.eval()(idx)[0], tiny(idx)[0], rtol=0, atol=0)


def test_a_bad_checkpoint_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        M.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="neither a checkpoint of this project"):
        M.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        M.load_checkpoint(tmp_path / "other.pt")


def test_compiled_model_decodes_like_eager(tiny):
    """The cached decoding step traces as one graph (fullgraph) and gives the eager logits."""
    compiled = torch.compile(tiny, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 50257, (2, 6))
    torch.testing.assert_close(_prefill_then_decode(compiled, idx, 3), tiny(idx)[0], rtol=1e-4, atol=1e-4)


def test_device_and_dtype_names():
    assert M.resolve_device("cpu") == torch.device("cpu")
    assert M.resolve_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        M.resolve_device("tpu7")
    assert M.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert M.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        M.resolve_dtype("float8", torch.device("cpu"))


def test_files_that_are_not_checkpoints_get_one_clear_sentence(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "weights.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0" + b'{"__metadata__":{}}')
    torch.save({"config": {}, "model": ValueError("an object")}, tmp_path / "objects.pt")
    for name, expected in (("empty.pt", r"is empty \(0 bytes\)"), ("weights.safetensors", "is a safetensors file"),
                           ("objects.pt", "Python objects other than tensors")):
        with pytest.raises(ValueError, match=expected) as error:
            M.load_checkpoint(tmp_path / name)
        message = str(error.value)
        assert "\n" not in message and "weights_only" not in message and "pip install" not in message, message


def test_random_bytes_are_never_taken_for_a_safetensors_file(tmp_path):
    # A '{' at byte 8 is one random file in 256; the header length must also fit inside the file.
    rng = np.random.default_rng(0)
    for _ in range(64):
        junk = bytearray(rng.bytes(2048))
        junk[8] = ord("{")
        (tmp_path / "junk.pt").write_bytes(bytes(junk))
        assert M.checkpoint_kind(tmp_path / "junk.pt") == "other"
        with pytest.raises(ValueError, match="neither a checkpoint"):
            M.load_checkpoint(tmp_path / "junk.pt")
    header = b'{"__metadata__":{}}'
    (tmp_path / "w.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert M.checkpoint_kind(tmp_path / "w.safetensors") == "safetensors"


def test_checkpoint_with_an_invalid_config_is_a_value_error(tmp_path):
    torch.save({"config": {"n_embd": 65, "n_head": 2}, "model": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unusable config.*n_embd 65 must divide by n_head 2"):
        M.load_checkpoint(tmp_path / "bad.pt")
