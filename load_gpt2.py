"""Pretrained weights in, our models out: the Hugging Face Hub's safetensors layouts of GPT-2, Mistral,
Phi-2, Phi-3 and Llama, read and written with our own code (the file format is safetensors_file.py's).

A Hub checkpoint is a config.json plus model.safetensors (or shards listed by model.safetensors.index.json)
in its family's own tensor names. For each family (config.json's model_type) one table says where each
of the Hub's tensors goes in model.py's GPT: copied, transposed, or into a slice of one of our fused
matrices (q, k and v share attn.c_attn; SwiGLU's gate and up share mlp.c_fc). One streaming loader walks
that table (load_pretrained, on the meta device, never holding two copies of a weight), and export_hf
walks it backwards. load_model() is what every stage calls for its --init: "random" with a preset, a
GPT-2 name, a Hub repo id (downloaded once into the cache), a Hub-layout folder or file, or one of our
checkpoints; with the model it returns its card (family and tokenizer), and tokenizer_for(card) gives
the tokenizer that belongs to it.

    python load_gpt2.py --init gpt2 --prompt "Hello, I'm a language model,"
    python load_gpt2.py --init mistralai/Mistral-7B-v0.1 --dtype bfloat16      # gated: set HF_TOKEN
    python load_gpt2.py --export out/hf --init out/ckpt.pt
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from common import ArgumentParser, UserError, atomic_write, positive_int, run_stage
from download import (DownloadError, GPT2_ENCODER_SHA256, GPT2_VOCAB_SHA256, HUB_PINNED, HUB_URL, KNOWN_FILES,
                      MISTRAL_REPO, cache_dir, download_set, fetch, fetch_hub_files, hub_file_info, hub_listing)
from model import (GPT, GPTConfig, PRESETS, add_device_args, checkpoint_kind, device_and_dtype, get_config,
                   load_checkpoint, unwrap)
from safetensors_file import SafetensorsFile, write_safetensors
from tokenizer import TOKENIZER_FILES, get_tokenizer, load_tokenizer
from tokenizer_base import bos


# ---------------------------------------------------------------------------------------------------
# Each family's Hub layout: Hub tensor name -> (our tensor, placement)

COPY, TRANSPOSE = "copy", "transpose"
# The row blocks of our fused matrices (and of their biases) that one Hub tensor fills; see fused_rows.
Q, K, V, GATE, UP = "q", "k", "v", "gate", "up"
H = "transformer.h.{i}."  # our block i; "{i}" in a name stands for every layer

# HF's GPT-2 uses Conv1D for these four layers: a linear layer whose weight is stored (in, out), the
# transpose of nn.Linear's (out, in) (OpenAI's TensorFlow code multiplied x @ W). Same numbers, other
# orientation, so they are transposed on the way in and on the way out.
GPT2_TABLE = {
    "transformer.wte.weight": ("transformer.wte.weight", COPY),
    "transformer.wpe.weight": ("transformer.wpe.weight", COPY),
    "transformer.h.{i}.ln_1.weight": (H + "ln_1.weight", COPY),
    "transformer.h.{i}.ln_1.bias": (H + "ln_1.bias", COPY),
    "transformer.h.{i}.attn.c_attn.weight": (H + "attn.c_attn.weight", TRANSPOSE),
    "transformer.h.{i}.attn.c_attn.bias": (H + "attn.c_attn.bias", COPY),
    "transformer.h.{i}.attn.c_proj.weight": (H + "attn.c_proj.weight", TRANSPOSE),
    "transformer.h.{i}.attn.c_proj.bias": (H + "attn.c_proj.bias", COPY),
    "transformer.h.{i}.ln_2.weight": (H + "ln_2.weight", COPY),
    "transformer.h.{i}.ln_2.bias": (H + "ln_2.bias", COPY),
    "transformer.h.{i}.mlp.c_fc.weight": (H + "mlp.c_fc.weight", TRANSPOSE),
    "transformer.h.{i}.mlp.c_fc.bias": (H + "mlp.c_fc.bias", COPY),
    "transformer.h.{i}.mlp.c_proj.weight": (H + "mlp.c_proj.weight", TRANSPOSE),
    "transformer.h.{i}.mlp.c_proj.bias": (H + "mlp.c_proj.bias", COPY),
    "transformer.ln_f.weight": ("transformer.ln_f.weight", COPY),
    "transformer.ln_f.bias": ("transformer.ln_f.bias", COPY),
    "lm_head.weight": ("lm_head.weight", COPY),
}
# Mistral and Llama: separate q/k/v and gate/up projections, filled into our fused matrices' slices.
# Llama's optional biases (attention_bias, mlp_bias) are listed too; a table entry whose tensor the
# model lacks (no biases) is simply not expected.
LLAMA_TABLE = {
    "model.embed_tokens.weight": ("transformer.wte.weight", COPY),
    "model.layers.{i}.input_layernorm.weight": (H + "ln_1.weight", COPY),
    **{f"model.layers.{{i}}.self_attn.{part}_proj.{kind}": (H + f"attn.c_attn.{kind}", part)
       for part in (Q, K, V) for kind in ("weight", "bias")},
    "model.layers.{i}.self_attn.o_proj.weight": (H + "attn.c_proj.weight", COPY),
    "model.layers.{i}.self_attn.o_proj.bias": (H + "attn.c_proj.bias", COPY),
    "model.layers.{i}.post_attention_layernorm.weight": (H + "ln_2.weight", COPY),
    **{f"model.layers.{{i}}.mlp.{part}_proj.{kind}": (H + f"mlp.c_fc.{kind}", part)
       for part in (GATE, UP) for kind in ("weight", "bias")},
    "model.layers.{i}.mlp.down_proj.weight": (H + "mlp.c_proj.weight", COPY),
    "model.layers.{i}.mlp.down_proj.bias": (H + "mlp.c_proj.bias", COPY),
    "model.norm.weight": ("transformer.ln_f.weight", COPY),
    "lm_head.weight": ("lm_head.weight", COPY),
}
# Phi-3 stores q/k/v and gate/up fused already, in our order: plain copies.
PHI3_TABLE = {
    "model.embed_tokens.weight": ("transformer.wte.weight", COPY),
    "model.layers.{i}.input_layernorm.weight": (H + "ln_1.weight", COPY),
    "model.layers.{i}.self_attn.qkv_proj.weight": (H + "attn.c_attn.weight", COPY),
    "model.layers.{i}.self_attn.o_proj.weight": (H + "attn.c_proj.weight", COPY),
    "model.layers.{i}.post_attention_layernorm.weight": (H + "ln_2.weight", COPY),
    "model.layers.{i}.mlp.gate_up_proj.weight": (H + "mlp.c_fc.weight", COPY),
    "model.layers.{i}.mlp.down_proj.weight": (H + "mlp.c_proj.weight", COPY),
    "model.norm.weight": ("transformer.ln_f.weight", COPY),
    "lm_head.weight": ("lm_head.weight", COPY),
}
# Phi-2: biases everywhere, one LayerNorm per block (the parallel block has no ln_2), a final LayerNorm.
PHI_TABLE = {
    "model.embed_tokens.weight": ("transformer.wte.weight", COPY),
    "model.layers.{i}.input_layernorm.weight": (H + "ln_1.weight", COPY),
    "model.layers.{i}.input_layernorm.bias": (H + "ln_1.bias", COPY),
    **{f"model.layers.{{i}}.self_attn.{part}_proj.{kind}": (H + f"attn.c_attn.{kind}", part)
       for part in (Q, K, V) for kind in ("weight", "bias")},
    "model.layers.{i}.self_attn.dense.weight": (H + "attn.c_proj.weight", COPY),
    "model.layers.{i}.self_attn.dense.bias": (H + "attn.c_proj.bias", COPY),
    "model.layers.{i}.mlp.fc1.weight": (H + "mlp.c_fc.weight", COPY),
    "model.layers.{i}.mlp.fc1.bias": (H + "mlp.c_fc.bias", COPY),
    "model.layers.{i}.mlp.fc2.weight": (H + "mlp.c_proj.weight", COPY),
    "model.layers.{i}.mlp.fc2.bias": (H + "mlp.c_proj.bias", COPY),
    "model.final_layernorm.weight": ("transformer.ln_f.weight", COPY),
    "model.final_layernorm.bias": ("transformer.ln_f.bias", COPY),
    "lm_head.weight": ("lm_head.weight", COPY),
    "lm_head.bias": ("lm_head.bias", COPY),
}
WEIGHT_TABLES = {"gpt2": GPT2_TABLE, "mistral": LLAMA_TABLE, "llama": LLAMA_TABLE, "phi3": PHI3_TABLE, "phi": PHI_TABLE}
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM",
                 "phi3": "Phi3ForCausalLM", "phi": "PhiForCausalLM"}
# Tensors some files carry that are not weights: GPT-2's causal-mask buffers (older transformers saved
# them; our attention builds its mask) and rotary frequency buffers (we compute them from the config).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def canonical_name(model_type: str, name: str) -> str | None:
    """A tensor name as a file has it -> the table's spelling; None for buffers that are not weights.

    The Hub's original GPT-2 files were saved from GPT2Model (no 'transformer.' prefix); save_pretrained
    of a GPT2LMHeadModel writes the prefix. Other families' names are the table's as they are."""
    if name.endswith(IGNORED_SUFFIXES if model_type == "gpt2" else IGNORED_SUFFIXES[2:]):
        return None
    if model_type == "gpt2" and name != "lm_head.weight":
        return "transformer." + name.removeprefix("transformer.")
    return name


def fused_rows(config: GPTConfig, part: str) -> tuple[int, int]:
    """Rows [begin, end) of a fused matrix that `part` fills: c_attn is [q | k | v] (n_head, then
    n_kv_head, then n_kv_head heads of head_size rows), SwiGLU's c_fc is [gate | up]."""
    q, kv, mlp = config.n_head * config.head_size, config.kv_heads * config.head_size, config.mlp_size
    return {Q: (0, q), K: (q, q + kv), V: (q + kv, q + 2 * kv), GATE: (0, mlp), UP: (mlp, 2 * mlp)}[part]


def hub_tensors(model_type: str, model: GPT) -> dict[str, tuple[str, str, tuple[int, ...], tuple[int, int] | None]]:
    """The family's table, for this model: {Hub name: (our name, placement, Hub shape, rows or None)}.

    Entries whose tensor the model lacks (biases of a bias-free model, ln_2 of a parallel block) are
    left out, and so is a tied lm_head.weight (the Hub's files store the token embedding only)."""
    ours = model.state_dict()
    entries = {}
    for hub_template, (our_template, placement) in WEIGHT_TABLES[model_type].items():
        layers = range(model.config.n_layer) if "{i}" in hub_template else [None]
        for i in layers:
            hub_name, our_name = hub_template.format(i=i), our_template.format(i=i)
            if our_name not in ours or (our_name == "lm_head.weight" and model.tied):
                continue
            shape = tuple(ours[our_name].shape)
            rows = None
            if placement == TRANSPOSE:
                shape = shape[::-1]
            elif placement != COPY:
                rows = fused_rows(model.config, placement)
                shape = (rows[1] - rows[0], *shape[1:])
            entries[hub_name] = (our_name, placement, shape, rows)
    return entries


# ---------------------------------------------------------------------------------------------------
# config.json <-> GPTConfig

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation ("gelu" is the exact one)


def read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the {what} {path} ({str(e)[:100]})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a {what} (its JSON is not an object)")
    return value


def _positive_int(hf: dict, key: str, path: Path, default: int | None = None) -> int:
    value = hf.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{path} has no positive integer {key} (found {value!r})")
    return value


def _number(hf: dict, key: str, path: Path, default: float) -> float:
    value = hf.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{path} has an unusable {key} ({value!r})")
    return float(value)


def _gpt2_config(hf: dict, path: Path) -> tuple[dict, list[str]]:
    """GPT-2 as OpenAI made it: the sizes vary, nothing else does."""
    fields = {ours: _positive_int(hf, theirs, path) for ours, theirs in (
        ("vocab_size", "vocab_size"), ("block_size", "n_positions"), ("n_layer", "n_layer"), ("n_head", "n_head"),
        ("n_embd", "n_embd"))}
    problems = []
    if hf.get("activation_function", "gelu_new") not in TANH_GELUS:
        problems.append(f"activation_function {hf['activation_function']!r}")
    if hf.get("n_inner") not in (None, 4 * fields["n_embd"]):
        problems.append(f"n_inner {hf['n_inner']!r}")
    epsilon = hf.get("layer_norm_epsilon", 1e-5)
    if not isinstance(epsilon, (int, float)) or not math.isclose(epsilon, 1e-5):
        problems.append(f"layer_norm_epsilon {epsilon!r}")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        problems.append("a non-standard attention scale")
    if hf.get("tie_word_embeddings") is False:
        problems.append("an untied LM head")
    return fields, problems


def _rope_config(hf: dict, model_type: str, path: Path, problems: list[str]) -> dict:
    """Rotary settings from either config.json layout: the Hub's older files keep rope_theta and
    partial_rotary_factor at the top level and scaling in rope_scaling; transformers 5 writes them all
    into rope_parameters."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise UserError(f"{path} has an unusable rope_parameters ({rope!r})")
    merged = {**{k: hf[k] for k in ("rope_theta", "partial_rotary_factor") if hf.get(k) is not None}, **rope}
    fraction_default = 0.5 if model_type == "phi" else 1.0  # PhiConfig's default
    fields = {"positions": "rotary", "rope_theta": _number(merged, "rope_theta", path, 10000.0),
              "rotary_fraction": _number(merged, "partial_rotary_factor", path, fraction_default)}
    if fields["rotary_fraction"] != 1.0 and model_type in ("mistral", "llama"):
        problems.append(f"partial_rotary_factor {fields['rotary_fraction']}")
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "llama3" and model_type == "llama":
        original = merged.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        fields.update(rope_scaling_factor=_number(merged, "factor", path, 8.0),
                      rope_low_freq_factor=_number(merged, "low_freq_factor", path, 1.0),
                      rope_high_freq_factor=_number(merged, "high_freq_factor", path, 4.0),
                      rope_original_context=_positive_int({"original_max_position_embeddings": original},
                                                          "original_max_position_embeddings", path))
    elif rope_type != "default":
        problems.append(f"rope scaling of type {rope_type!r}")
    return fields


def _rotary_family_config(hf: dict, model_type: str, path: Path) -> tuple[dict, list[str]]:
    """Mistral, Llama, Phi-3 and Phi-2: the same config.json fields, each family's own defaults."""
    problems = []
    n_head = _positive_int(hf, "num_attention_heads", path)
    n_embd = _positive_int(hf, "hidden_size", path)
    n_kv_head = hf.get("num_key_value_heads") or (8 if model_type == "mistral" and "num_key_value_heads" not in hf
                                                  else n_head)
    fields = {
        "vocab_size": _positive_int(hf, "vocab_size", path),
        "block_size": _positive_int(hf, "max_position_embeddings", path,
                                    {"mistral": 131072, "llama": 2048, "phi3": 4096, "phi": 2048}[model_type]),
        "n_layer": _positive_int(hf, "num_hidden_layers", path), "n_head": n_head, "n_embd": n_embd,
        "n_kv_head": _positive_int({"num_key_value_heads": n_kv_head}, "num_key_value_heads", path),
        "intermediate_size": _positive_int(hf, "intermediate_size", path),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        **_rope_config(hf, model_type, path, problems),
    }
    if hf.get("head_dim") not in (None, n_embd // n_head):
        problems.append(f"head_dim {hf['head_dim']!r} (model.py uses hidden_size / num_attention_heads)")
    activation = hf.get("hidden_act", "gelu_new" if model_type == "phi" else "silu")
    if model_type == "phi":
        fields.update(norm="layernorm", norm_eps=_number(hf, "layer_norm_eps", path, 1e-5), parallel_block=True,
                      bias=True, lm_head_bias=True)
        if activation in TANH_GELUS or activation == "gelu":
            fields["mlp"] = "gelu_tanh" if activation in TANH_GELUS else "gelu"
        else:
            problems.append(f"hidden_act {activation!r}")
        if hf.get("qk_layernorm"):
            problems.append("qk_layernorm")
    else:
        eps_default = 1e-5 if model_type == "phi3" else 1e-6  # the transformers classes' defaults
        fields.update(norm="rmsnorm", norm_eps=_number(hf, "rms_norm_eps", path, eps_default), mlp="swiglu", bias=False)
        if activation not in ("silu", "swish"):
            problems.append(f"hidden_act {activation!r}")
    if model_type == "llama":
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            problems.append("biases in attention but not in the MLP (or the reverse)")
        fields["bias"] = bool(hf.get("attention_bias", False))
    if model_type in ("mistral", "phi3") and hf.get("sliding_window") is not None:
        fields["sliding_window"] = _positive_int(hf, "sliding_window", path)
    return fields, problems


def config_from_hf(path: Path) -> tuple[str, GPTConfig]:
    """(model_type, our GPTConfig) from a Hub config.json; UserError for a model model.py cannot reproduce."""
    hf = read_json(path, "model config")
    model_type = hf.get("model_type", "gpt2")
    if model_type not in WEIGHT_TABLES:
        raise UserError(f"{path} describes a model of type {model_type!r}, which model.py does not implement "
                        f"(it implements {', '.join(WEIGHT_TABLES)})")
    fields, problems = _gpt2_config(hf, path) if model_type == "gpt2" else _rotary_family_config(hf, model_type, path)
    if fields["n_embd"] % fields["n_head"]:
        problems.append(f"a hidden size {fields['n_embd']} not divisible by {fields['n_head']} heads")
    if not problems:
        try:
            return model_type, GPTConfig(**fields)
        except ValueError as e:
            problems.append(str(e).removeprefix("invalid model config: "))
    raise UserError(f"{path} describes a {model_type} variant model.py does not implement: {', '.join(problems)}")


def export_problems(config: GPTConfig, model_type: str) -> list[str]:
    """What in config the family's transformers class cannot express (empty: it can)."""
    needs = {  # field: the value the family's transformers class hard-wires
        "gpt2": dict(norm="layernorm", positions="learned", mlp="gelu_tanh", parallel_block=False, bias=True,
                     lm_head_bias=False, tie_embeddings=True, n_kv_head=None, sliding_window=None),
        "mistral": dict(norm="rmsnorm", positions="rotary", mlp="swiglu", parallel_block=False, bias=False,
                        lm_head_bias=False, rotary_fraction=1.0, rope_scaling_factor=None),
        "llama": dict(norm="rmsnorm", positions="rotary", mlp="swiglu", parallel_block=False, lm_head_bias=False,
                      rotary_fraction=1.0, sliding_window=None),
        "phi3": dict(norm="rmsnorm", positions="rotary", mlp="swiglu", parallel_block=False, bias=False,
                     lm_head_bias=False, rope_scaling_factor=None),
        "phi": dict(norm="layernorm", positions="rotary", parallel_block=True, bias=True, lm_head_bias=True,
                    sliding_window=None, rope_scaling_factor=None),
    }[model_type]
    problems = [f"{field}={getattr(config, field)!r}" for field, value in needs.items()
                if getattr(config, field) != value]
    if model_type == "phi" and config.mlp == "swiglu":
        problems.append("mlp='swiglu'")
    return problems


def hf_config(config: GPTConfig, model_type: str, dtype: torch.dtype,
              token_ids: tuple[int | None, int | None] = (None, None)) -> dict:
    """The family's config.json for our config, in the layout of the Hub's files (rope_theta,
    partial_rotary_factor and rope_scaling at the top level, torch_dtype), which transformers 4 and 5
    both read. token_ids: (bos, eos), written where known."""
    bos_id, eos_id = token_ids
    common = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": config.vocab_size,
              "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True, "initializer_range": 0.02,
              "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None}
    if model_type == "gpt2":
        if bos_id is None and config.vocab_size > 50256:  # GPT-2's <|endoftext|>, not transformers' default
            common["bos_token_id"] = common["eos_token_id"] = 50256
        return {**common, "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
                "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
                "layer_norm_epsilon": config.norm_eps, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
                "attn_pdrop": config.dropout, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "tie_word_embeddings": True}
    hf = {**common, "hidden_size": config.n_embd, "intermediate_size": config.mlp_size,
          "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
          "num_key_value_heads": config.kv_heads, "max_position_embeddings": config.block_size,
          "rope_theta": config.rope_theta, "tie_word_embeddings": config.tie_embeddings,
          "attention_dropout": config.dropout}
    if model_type == "phi":
        return {**hf, "hidden_act": "gelu_new" if config.mlp == "gelu_tanh" else "gelu",
                "layer_norm_eps": config.norm_eps, "partial_rotary_factor": config.rotary_fraction,
                "qk_layernorm": False, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout}
    hf.update(hidden_act="silu", rms_norm_eps=config.norm_eps, head_dim=config.head_size)
    if model_type == "mistral":
        return {**hf, "sliding_window": config.sliding_window}
    if model_type == "phi3":
        return {**hf, "sliding_window": config.sliding_window, "partial_rotary_factor": config.rotary_fraction,
                "original_max_position_embeddings": config.block_size, "rope_scaling": None,
                "resid_pdrop": config.dropout, "embd_pdrop": config.dropout}
    scaling = None
    if config.rope_scaling_factor is not None:
        scaling = {"rope_type": "llama3", "factor": config.rope_scaling_factor,
                   "low_freq_factor": config.rope_low_freq_factor, "high_freq_factor": config.rope_high_freq_factor,
                   "original_max_position_embeddings": config.rope_original_context}
    return {**hf, "rope_scaling": scaling, "attention_bias": config.bias, "mlp_bias": config.bias}


# ---------------------------------------------------------------------------------------------------
# The streaming loader: the table walked forwards

COPY_CHUNK_BYTES = 16 << 20  # the file bytes loaded at a time: bounds the memory a load needs beyond the model

def meta_model(config: GPTConfig) -> GPT:
    """A GPT with the shapes of config and no memory behind its weights (the meta device).

    GPT skips its random init there: the weights are replaced before use anyway."""
    with torch.device("meta"):
        return GPT(config)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hub-layout folder: the shards its model.safetensors.index.json
    lists, in order, or its model.safetensors."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json(index_path, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) and re.fullmatch(r"[\w.-]+\.safetensors", v) for v in weight_map.values()):
            raise UserError(f"{index_path} has no weight_map of tensor names to shard files in the same folder")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise UserError(f"{folder} lacks the shard {missing[0]} that its model.safetensors.index.json lists")
        return shards
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    other = " (it holds pytorch_model.bin, a pickle file; this project reads safetensors only)" \
        if (folder / "pytorch_model.bin").is_file() else ""
    config = "" if (folder / "config.json").is_file() else ", and no config.json"  # name the whole set at once
    raise UserError(f"folder {folder} has no model.safetensors (nor model.safetensors.index.json with its "
                    f"shards){other}{config}; put the model's files there")


def _copy_rows(file: SafetensorsFile, name: str, target: torch.Tensor, placement: str,
               rows: tuple[int, int] | None) -> None:
    """Copy tensor `name` of file into target (its rows `rows`, or transposed), a few MB at a time:
    dtype conversion, transpose and device transfer in one pass, releasing the file's pages as it goes,
    so no tensor ever sits in memory twice."""
    source = file.tensor(name)
    n = source.shape[0] if source.dim() else 1
    begin = rows[0] if rows else 0
    step = max(1, COPY_CHUNK_BYTES // max(1, source[:1].numel() * source.element_size())) if source.dim() else 1
    for first in range(0, n, step):
        chunk = source[first:first + step]
        if placement == TRANSPOSE:  # Conv1D (in, out) -> nn.Linear (out, in); see GPT2_TABLE
            target[:, first:first + step].copy_(chunk.t())
        else:
            target[begin + first:begin + first + chunk.shape[0]].copy_(chunk)
        file.release(name, first, min(first + step, n))


LAYER_INDEX = re.compile(r"\.(?:h|layers)\.(\d+)\.")  # block i's tensors: transformer.h.{i}. or model.layers.{i}.


def check_sizes(files: list[SafetensorsFile], model_type: str, config: GPTConfig, where: Path) -> None:
    """Refuse a config whose sizes disagree with the weight files' headers, before anything is built:
    a config.json claiming 100,000 layers of width 8,192 would otherwise spend minutes and gigabytes
    building (meta) modules, only to find that the files hold two. The layers and the token embedding
    are checked here; every other tensor is checked by name and shape as it loads."""
    shapes = {canonical_name(model_type, name): file.shape(name) for file in files for name in file.names()}
    layers = 1 + max((int(m.group(1)) for name in shapes if name and (m := LAYER_INDEX.search(name))), default=-1)
    embedding = next(hub for hub, (ours, _) in WEIGHT_TABLES[model_type].items() if ours == "transformer.wte.weight")
    problems = []
    if layers < config.n_layer:  # more layers than files hold: the tensors a config lacks are named later
        problems.append(f"n_layer is {config.n_layer}, but the weights hold {layers} layers")
    if embedding in shapes and shapes[embedding] != (config.vocab_size, config.n_embd):
        problems.append(f"vocab_size x n_embd is {config.vocab_size} x {config.n_embd}, but {embedding} is "
                        f"{' x '.join(map(str, shapes[embedding]))}")
    if problems:
        raise UserError(f"the config.json of {where} does not fit its weights ({'; '.join(problems)}); put the "
                        "config.json that came with these weights beside them")


def load_weights(paths: list[Path], model_type: str, config: GPTConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, loaded: Callable | None = None) -> GPT:
    """Load Hub-layout safetensors files of family model_type into a GPT(config), tensor by tensor.

    The model is built on the meta device (shapes, no memory, no random init); each of our tensors is
    allocated in the asked dtype on the asked device when the first Hub tensor placed in it arrives,
    and filled straight from the memory-mapped files: peak memory is the model plus COPY_CHUNK_BYTES.
    BF16, F16 and F32 files all load into any of the three dtypes.

    loaded(name, tensor, module) -> tensor, when given, sees each of our tensors as soon as it is
    complete, with the module that owns it, and returns what the model keeps in its place: a stage
    that stores weights otherwise (generate.py's int8) keeps its own form and returns a meta tensor,
    so the whole model never exists in the loading dtype."""
    where = paths[0].parent if len(paths) > 1 else paths[0]
    files = [SafetensorsFile(path) for path in paths]
    check_sizes(files, model_type, config, where)
    model = meta_model(config)
    tied = model.tied
    table = hub_tensors(model_type, model)
    our_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    pieces = Counter(our_name for our_name, *_ in table.values())  # Hub tensors placed in each of ours
    loaded = loaded or (lambda name, tensor, module: tensor)
    state: dict[str, torch.Tensor] = {}
    seen, unexpected, tied_head = set(), [], None
    for file in files:
        for file_name in file.names():  # file order, so the pages are read and released front to back
            name = canonical_name(model_type, file_name)
            if name is None:
                continue
            if name == "lm_head.weight" and tied:
                tied_head = (file, file_name)  # must equal the token embedding; checked once that is loaded
                continue
            if name not in table:
                unexpected.append(file_name)
                continue
            if name in seen:
                raise UserError(f"{where} holds tensor {file_name} twice (again in {file.path.name})")
            our_name, placement, shape, rows = table[name]
            if file.shape(file_name) != shape:
                raise UserError(f"{file_name} in {file.path} has shape {list(file.shape(file_name))}, but the "
                                f"{model_type} model its config describes (n_layer={config.n_layer}, n_embd="
                                f"{config.n_embd}, vocab_size={config.vocab_size}) needs {list(shape)}")
            if our_name not in state:
                state[our_name] = torch.empty(our_shapes[our_name], dtype=dtype, device=device)
            _copy_rows(file, file_name, state[our_name], placement, rows)
            seen.add(name)
            pieces[our_name] -= 1
            if pieces[our_name] == 0 and not (tied and our_name == "transformer.wte.weight"):
                # complete: hand it to `loaded` (a tied embedding waits for the check against a stored head)
                state[our_name] = loaded(our_name, state[our_name], model.get_submodule(our_name.rpartition(".")[0]))
    missing = [name for name in table if name not in seen]
    if missing or unexpected:
        problems = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                    for names, what in ((missing, "missing"), (unexpected, "unexpected")) if names]
        raise UserError(f"{where} does not hold the tensors of the {model_type} model its config describes "
                        f"(n_layer={config.n_layer}): {' and '.join(problems)}")
    if tied:
        if tied_head is not None:  # some exporters store the tied head too; it must then be the embedding
            _check_tied_head(*tied_head, state["transformer.wte.weight"], where)
        wte = loaded("transformer.wte.weight", state["transformer.wte.weight"], model.transformer.wte)
        state["transformer.wte.weight"] = state["lm_head.weight"] = wte
    model.load_state_dict(state, assign=True)  # assign: keep our tensors instead of copying into meta ones
    if tied:
        model.tie_weights()  # assign gave lm_head its own Parameter object; share wte's again
    return model


def _check_tied_head(file: SafetensorsFile, name: str, wte: torch.Tensor, where: Path) -> None:
    """A stored lm_head.weight of a model whose config ties it must equal the loaded embedding wte."""
    head = file.tensor(name)
    step = max(1, COPY_CHUNK_BYTES // max(1, wte[:1].numel() * 4))  # compared a few MB at a time
    if head.shape != wte.shape or not all(torch.equal(head[i:i + step].to(device=wte.device, dtype=wte.dtype),
                                                      wte[i:i + step]) for i in range(0, len(wte), step)):
        raise UserError(f"{where} has an lm_head.weight that differs from the token embedding, but its "
                        "config ties the two")
    file.release(name)


def config_from_shapes(file: SafetensorsFile) -> GPTConfig:
    """The GPT-2 preset whose every weight shape matches a file that came without its config.json.

    n_head cannot be read from shapes, so only the four GPT-2 sizes are recognised."""
    shapes = {canonical_name("gpt2", name): shape for name, (_, shape, _, _) in file.entries.items()}
    for name in GPT2_REPOS:
        expected = {hub: shape for hub, (_, _, shape, _) in hub_tensors("gpt2", meta_model(PRESETS[name])).items()}
        if all(shapes.get(hub) == shape for hub, shape in expected.items()):
            return PRESETS[name]
    raise UserError(f"{file.path} has no config.json beside it and its shapes are not one of "
                    f"{', '.join(GPT2_REPOS)}; put the model's config.json next to it")


TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")


def folder_tokenizer(folder: Path, model_type: str) -> str:
    """The card's "tokenizer" for a Hub-layout folder: the folder itself when it holds its tokenizer
    (tokenizer.json or tokenizer.model), "gpt2" when its BPE files are GPT-2's own (or a GPT-2 folder
    has none), else the folder (tokenizer_for then says what is missing)."""
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return str(folder.resolve())
    if _is_gpt2_bpe(folder) or model_type == "gpt2":
        return "gpt2"
    return str(folder.resolve())


def _is_gpt2_bpe(folder: Path) -> bool:
    """Whether folder's vocab.json and merges.txt are exactly GPT-2's encoder.json and vocab.bpe."""
    pairs = ((folder / "vocab.json", GPT2_ENCODER_SHA256), (folder / "merges.txt", GPT2_VOCAB_SHA256))
    return all(path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha for path, sha in pairs)


# The checkpoint files each stage writes into its --out-dir: a missing one usually means a stage not yet run.
WRITTEN_BY = {"best.pt": "pretrain.py", "ckpt.pt": "pretrain.py", "classifier.pt": "finetune_spam.py",
              "model.pt": "finetune_instruct.py"}


def load_pretrained(name_or_path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, loaded: Callable | None = None) -> tuple[GPT, dict]:
    """Hub-layout weights as our GPT, with its card {"model_type", "tokenizer"} (see load_model;
    `loaded` as in load_weights).

    name_or_path: a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hub repo id, downloaded
    once into the cache; a local folder (config.json + model.safetensors or shards); or a local
    safetensors file (its config.json is read from beside it; a GPT-2 file without one is recognised
    by its shapes)."""
    name = str(name_or_path)
    path = Path(name_or_path)
    if name in GPT2_REPOS:
        folder = fetch_gpt2(name)
        files, config_path = [folder / "model.safetensors"], folder / "config.json"
    elif path.is_dir():
        files, config_path = weight_files(path), path / "config.json"
    elif path.is_file():
        files, config_path = [path], path.parent / "config.json"
    elif is_hub_repo(name):
        folder = fetch_hub_model(name)
        files, config_path = weight_files(folder), folder / "config.json"
    elif path.suffix == ".pt":
        stage = WRITTEN_BY.get(path.name)
        writer = f"python {stage} writes it: run that first" if stage else \
            f"the stages write theirs as {', '.join(f'{name} ({stage})' for name, stage in WRITTEN_BY.items())}"
        raise UserError(f"checkpoint {path} does not exist ({writer}), or pass --init an existing one")
    else:
        raise UserError(f"{name!r} is neither a GPT-2 name ({', '.join(GPT2_REPOS)}), nor a Hugging Face repo id "
                        "(owner/name), nor an existing model.safetensors file or folder")
    if config_path.is_file():
        model_type, config = config_from_hf(config_path)
    else:
        model_type, config = "gpt2", config_from_shapes(SafetensorsFile(files[0]))
    model = load_weights(files, model_type, config, device, dtype, loaded)
    if name in GPT2_REPOS:
        tokenizer = "gpt2"
    elif not path.exists():
        tokenizer = f"hf/{name}"  # the repo's own tokenizer files, fetched with the weights
    else:
        tokenizer = folder_tokenizer(config_path.parent, model_type)
    return model, {"model_type": model_type, "tokenizer": tokenizer}


# ---------------------------------------------------------------------------------------------------
# Models on the Hub: a repo's config, weights and tokenizer, fetched once into the cache (download.py)

GPT2_REPOS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_repo(name: str) -> bool:
    """Whether name reads as a Hub repo id (owner/name) rather than a local path that is missing:
    one slash, no file suffix of ours, and no local folder called like its owner."""
    return bool(HUB_REPO_ID.fullmatch(name)) and not name.endswith((".pt", ".safetensors", ".json")) \
        and not Path(name.split("/")[0]).exists()


def fetch_gpt2(name: str) -> Path:
    """The cache folder holding config.json and model.safetensors of GPT-2 `name`, downloaded once
    (offline, one message names both files that are missing and where each goes)."""
    repo = GPT2_REPOS[name]
    files = []
    for filename in ("config.json", "model.safetensors"):
        relpath = f"hf/{repo}/{filename}"
        size, sha256 = HUB_PINNED.get((repo, filename), (None, None))
        if (cache_dir() / relpath).is_file():
            # Verified by its hash on the way in; checking the size now saves hashing gigabytes per load.
            sha256 = None
        elif size is None:
            size, sha256 = hub_file_info(repo, filename)
        files.append((HUB_URL.format(repo=repo, filename=filename), relpath, {"sha256": sha256, "size": size}))
    return download_set(f"{name}'s config and weights", files)[0].parent


def _cached_model_complete(folder: Path) -> bool:
    """Whether a repo's cache folder holds its config and every weight file already (its tokenizer
    files came in the same fetch; tokenizer_for fetches them again if they were removed)."""
    if not (folder / "config.json").is_file():
        return False
    try:
        weight_files(folder)
    except UserError:
        return False
    return True


def fetch_hub_model(repo: str) -> Path:
    """The cache folder of a Hub repo's model (hf/<repo>/): config.json first (so an unsupported family
    stops before gigabytes move), then the tokenizer files, the shard index and the safetensors weights.
    Offline once complete: a folder already holding everything is used without asking the Hub."""
    folder = cache_dir() / "hf" / repo
    if _cached_model_complete(folder):
        return folder
    listing = hub_listing(repo)
    if "config.json" not in listing:
        raise DownloadError(f"the Hugging Face Hub repo {repo} has no config.json; it is not a model repo")
    fetch_hub_files(repo, ["config.json"], listing)
    config_from_hf(folder / "config.json")  # UserError for a family model.py does not implement
    fetch_hub_files(repo, [*TOKENIZER_FILES, *TOKENIZER_EXTRAS], listing)
    if "model.safetensors.index.json" in listing:
        fetch_hub_files(repo, ["model.safetensors.index.json"], listing)
        index = read_json(folder / "model.safetensors.index.json", "shard index").get("weight_map")
        shards = sorted(set(index.values())) if isinstance(index, dict) else []
        if not shards or any(shard not in listing for shard in shards):
            raise DownloadError(f"{repo}'s model.safetensors.index.json names shards the repo does not have")
        fetch_hub_files(repo, shards, listing)
    elif "model.safetensors" in listing:
        fetch_hub_files(repo, ["model.safetensors"], listing)
    else:
        raise DownloadError(f"the Hugging Face Hub repo {repo} has no safetensors weights (this project does not "
                            "read pickle files such as pytorch_model.bin)")
    return folder


def hub_tokenizer_path(card_tokenizer: str) -> Path:
    """A card's "hf/<repo>[/<file>]" tokenizer as a local path, downloading the files once if needed."""
    parts = card_tokenizer.split("/")
    if card_tokenizer in KNOWN_FILES:
        return fetch(card_tokenizer)
    if len(parts) != 3:
        raise UserError(f"the model's card names the tokenizer {card_tokenizer!r}, which is neither a Hub repo's "
                        "tokenizer (hf/owner/name) nor a known tokenizer file")
    repo = "/".join(parts[1:])
    folder = cache_dir() / card_tokenizer
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        listing = hub_listing(repo)
        folder = fetch_hub_files(repo, [*TOKENIZER_FILES, *TOKENIZER_EXTRAS], listing)
    return folder


# ---------------------------------------------------------------------------------------------------
# What every stage calls: load_model, the model card, the model's tokenizer, the --init flags

MISTRAL_TOKENIZER = f"hf/{MISTRAL_REPO}/tokenizer.model"  # SentencePiece, 32,000 tokens; a known cached file
# preset -> (the Hub's family name, the tokenizer its model card names). The real presets read their
# Hub repo's tokenizer; the small random ones use tokenizers that work offline once cached.
PRESET_CARDS = {
    **{name: ("gpt2", "gpt2") for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "mini", "tiny")},
    "mistral-7b": ("mistral", "hf/mistralai/Mistral-7B-v0.1"),
    "phi-2": ("phi", "hf/microsoft/phi-2"),
    "phi-3-mini": ("phi3", "hf/microsoft/Phi-3-mini-4k-instruct"),
    "llama-3.2-1b": ("llama", "hf/meta-llama/Llama-3.2-1B"),
    "mistral-tiny": ("mistral", MISTRAL_TOKENIZER),
    "llama-tiny": ("llama", MISTRAL_TOKENIZER),
    "phi-3-tiny": ("phi3", MISTRAL_TOKENIZER),
    "phi-2-tiny": ("phi", "gpt2"),  # Phi-2's vocabulary is GPT-2's BPE (plus padding rows)
}


def load_model(init: str, *, preset: str | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, loaded: Callable | None = None) -> tuple[GPT, dict]:
    """The model a stage starts from, and what else is known about it.

    init: "random" (a fresh GPT of `preset`, which is then required), a GPT-2 name, a Hugging Face
    repo id (mistralai/Mistral-7B-v0.1, microsoft/phi-2, microsoft/Phi-3-mini-4k-instruct,
    meta-llama/Llama-3.2-1B, ...), a Hub-layout folder or safetensors file, or one of our checkpoints
    (save_checkpoint's .pt). Everything but "random" brings its own architecture, so `preset` is only
    read for "random".

    The card holds a checkpoint's other entries, and always (see model_card):
    "model_type", the Hub's name of its family, and "tokenizer", where its tokenizer comes from
    ("gpt2"; "hf/<repo>" or "hf/<repo>/<file>" in the download cache; or a local folder or file).

    loaded: see load_weights; only Hub-layout weights are loaded tensor by tensor and call it."""
    if init == "random":
        if preset is None:
            raise UserError(f"a random model needs a preset: one of {', '.join(PRESETS)}")
        try:
            config = get_config(preset)
        except ValueError as e:
            raise UserError(str(e)) from None
        with torch.device(device):  # initialise where the model will live
            model = GPT(config)
        model_type, tokenizer = PRESET_CARDS[preset]
        return model.to(dtype), {"model_type": model_type, "tokenizer": tokenizer}
    path = Path(init)
    if init not in GPT2_REPOS and path.is_file() and checkpoint_kind(path) != "safetensors":
        try:
            model, card = load_checkpoint(path, device)  # ours, or a one-sentence reason why not
        except ValueError as e:
            raise UserError(str(e)) from None
        if "model_type" not in card or "tokenizer" not in card:
            raise UserError(f"{path} has no model card (model_type and tokenizer), so no stage can tell which "
                            "tokenizer it needs; save it again with save_checkpoint(..., **model_card(card)), or "
                            "train it again with this version")
        return model.to(dtype), card
    return load_pretrained(init, device, dtype, loaded)


def model_card(card: dict) -> dict:
    """What a stage saves with a checkpoint so that its users find the model's family and tokenizer
    again: save_checkpoint(path, model, **model_card(card), ...) with the card from load_model."""
    return {"model_type": card["model_type"], "tokenizer": card["tokenizer"]}


def tokenizer_path(card_tokenizer: str) -> Path:
    """Where the files of a card's tokenizer are (a folder or a file), downloading Hub files once."""
    path = hub_tokenizer_path(card_tokenizer) if card_tokenizer.startswith("hf/") else Path(card_tokenizer)
    if not path.exists():
        raise UserError(f"the model's tokenizer {path} does not exist; put the model's tokenizer.json or "
                        "tokenizer.model there")
    return path  # a folder without tokenizer files: load_tokenizer says which files it needs


def tokenizer_for(card: dict):
    """The tokenizer of the model load_model returned with `card`: an object with encode,
    encode_ordinary, decode, n_vocab, eot_token, bos_id and eos_id (see tokenizer.py)."""
    name = card.get("tokenizer", "gpt2")
    if name == "gpt2":
        return get_tokenizer()
    return load_tokenizer(tokenizer_path(name))


def add_init_args(parser: argparse.ArgumentParser, default: str, what: str = "starting weights") -> None:
    """--init and --preset, defined once for every stage that loads a model."""
    parser.add_argument("--init", default=default,
                        help=f"{what}: a GPT-2 name ({', '.join(GPT2_REPOS)}), a Hugging Face repo id (e.g. "
                             "mistralai/Mistral-7B-v0.1, microsoft/phi-2, microsoft/Phi-3-mini-4k-instruct, "
                             "meta-llama/Llama-3.2-1B; gated ones need HF_TOKEN), a Hub-layout folder or "
                             "safetensors file, one of our checkpoints (.pt), or 'random' (a new model of --preset)")
    parser.add_argument("--preset", default=None, choices=list(PRESETS), help="model size for --init random")


def check_preset(parser: argparse.ArgumentParser, init: str, preset: str | None, flag: str = "--init") -> None:
    """Refuse (parser.error) a --preset beside an init that brings its own size: it would be ignored."""
    if preset is not None and init != "random":
        parser.error(f"--preset only applies to {flag} random; {init} brings its own size")


# ---------------------------------------------------------------------------------------------------
# Export: the table walked backwards

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB"), as the Hub's checkpoints are cut
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def _copy_tokenizer_files(card_tokenizer: str, out_dir: Path) -> list[str]:
    """Put the model's tokenizer beside the export, from files already on this machine (no download):
    its folder's or cached repo's tokenizer files, or GPT-2's BPE as vocab.json and merges.txt
    (GPT-2's encoder.json and vocab.bpe are exactly those files of the Hub's GPT-2 repos)."""
    if card_tokenizer == "gpt2":
        pairs = [(cache_dir() / "gpt2/encoder.json", "vocab.json"), (cache_dir() / "gpt2/vocab.bpe", "merges.txt")]
    else:
        source = cache_dir() / card_tokenizer if card_tokenizer.startswith("hf/") else Path(card_tokenizer)
        if source.is_file():
            pairs = [(source, source.name)]
        else:
            pairs = [(source / name, name) for name in (*TOKENIZER_FILES, *TOKENIZER_EXTRAS)]
    pairs = [(source, name) for source, name in pairs if source.is_file()]
    if card_tokenizer == "gpt2" and len(pairs) != 2:
        return []
    for source, name in pairs:
        if source.resolve() != (out_dir / name).resolve():
            atomic_write(out_dir / name, source.read_bytes())
    return [name for _, name in pairs]


def refuse_existing_model(out_dir: Path) -> None:
    """UserError when out_dir already holds a model (config.json or weights), which only --force replaces."""
    existing = [name for name in MODEL_FILES if (out_dir / name).exists()] + \
        sorted(p.name for p in out_dir.glob("model-*.safetensors"))
    if existing:
        raise UserError(f"{out_dir} already holds a model ({existing[0]}); pass --force to replace it, or choose "
                        "another folder")


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> tuple[list[str], list[list[str]]]:
    """How the Hub cuts weights into files: tensors (name -> bytes) in order, a new shard whenever the
    next one would pass max_shard_bytes. Returns the file names (model.safetensors when one is enough,
    else model-00001-of-0000N.safetensors, ...) and the tensor names of each."""
    shards, size = [[]], 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    return names, shards


def export_hf(model: torch.nn.Module, out_dir: str | Path, card: dict | None = None, *, force: bool = False,
              max_shard_bytes: int = MAX_SHARD_BYTES, tokenizer=None) -> Path:
    """Write the model in its family's Hub layout (as save_pretrained does): config.json with
    architectures and model_type, and model.safetensors, or above max_shard_bytes shards
    model-0000i-of-0000n.safetensors with model.safetensors.index.json. Returns out_dir.

    card: load_model's card, for the family (model_type; default gpt2) and the tokenizer, whose files
    are copied beside the weights when they are on this machine. tokenizer: the loaded tokenizer, for
    the bos and eos ids in config.json. Tensors keep the model's dtype and are written one at a time;
    a tied lm_head is left out, as in the Hub's files. A folder that already holds a model is refused
    unless force, which replaces it (and removes its shards that the new export does not have)."""
    gpt = unwrap(model)
    card = card or {"model_type": "gpt2", "tokenizer": "gpt2"}
    model_type = card["model_type"]
    if gpt.config.num_classes is not None:
        raise UserError(f"this model is a {gpt.config.num_classes}-class classifier; only language models export "
                        f"to the Hub's {ARCHITECTURES.get(model_type, model_type)} layout")
    if model_type not in WEIGHT_TABLES:
        raise UserError(f"cannot export a model of type {model_type!r}; model.py's families are "
                        f"{', '.join(WEIGHT_TABLES)}")
    problems = export_problems(gpt.config, model_type)
    if gpt.config.tie_embeddings != gpt.tied:
        problems.append("an LM head whose tying differs from the config's")
    if problems:
        raise UserError(f"this model does not fit the {ARCHITECTURES[model_type]} layout: {', '.join(problems)}")
    out_dir = Path(out_dir)
    if not force:
        refuse_existing_model(out_dir)
    state = gpt.state_dict()
    tensors = {}  # Hub name -> a view of our tensor (a transpose is made when written, one tensor at a time)
    for hub_name, (our_name, placement, _, rows) in hub_tensors(model_type, gpt).items():
        t = state[our_name].detach()
        tensors[hub_name] = t.t() if placement == TRANSPOSE else t[rows[0]:rows[1]] if rows else t
    names, shards = plan_shards({name: t.numel() * t.element_size() for name, t in tensors.items()},
                                max_shard_bytes)
    token_ids = (getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for file_name, shard in zip(names, shards):
            write_safetensors({name: tensors[name] for name in shard}, out_dir / file_name, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {name: file_name for file_name, shard in zip(names, shards) for name in shard}}
            atomic_write(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        config = hf_config(gpt.config, model_type, gpt.transformer.wte.weight.dtype, token_ids)
        atomic_write(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
        _copy_tokenizer_files(card["tokenizer"], out_dir)
        for stale in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
            if stale.name not in names and not (stale.name.endswith(".json") and len(shards) > 1):
                stale.unlink(missing_ok=True)  # a previous export's weights, replaced under force
    except OSError as e:
        raise UserError(f"cannot write the export to {out_dir}: {e.strerror or e}") from None
    return out_dir


# ---------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_init_args(parser, "gpt2", "the model to load")
    parser.add_argument("--prompt", default="Hello, I'm a language model,",
                        help="text whose most likely next tokens are shown, a check that the weights work")
    parser.add_argument("--top", type=positive_int, default=5, help="how many next tokens to show")
    parser.add_argument("--export", type=Path, default=None,
                        help="write the model to this folder in its family's Hub layout instead")
    parser.add_argument("--force", action="store_true", help="let --export replace a model already in its folder")
    add_device_args(parser)
    args = parser.parse_args(argv)
    check_preset(parser, args.init, args.preset)
    return args


def main(args: argparse.Namespace) -> dict:
    device, dtype = device_and_dtype(args.device, args.dtype)
    if args.export is not None and not args.force:
        refuse_existing_model(args.export)  # before loading: the export would refuse only after it
    start = time.perf_counter()
    model, card = load_model(args.init, preset=args.preset, device=device, dtype=dtype)
    load_seconds = time.perf_counter() - start
    result = {"model": str(args.init), "model_type": card["model_type"], "params": model.num_params(),
              "load_seconds": load_seconds}
    print(f"{args.init}: {card['model_type']}, {result['params']:,} parameters, {dtype}, {device}, "
          f"loaded in {load_seconds:.2f} s")
    if args.export is not None:
        try:
            tokenizer = tokenizer_for(card)
        except UserError as e:  # the weights export without it; only config.json's bos/eos ids need it
            print(f"note: {e}; config.json gets no bos/eos token ids", file=sys.stderr)
            tokenizer = None
        export_hf(model, args.export, card, force=args.force, tokenizer=tokenizer)
        files = sorted(p.name for p in args.export.iterdir() if not p.name.endswith(".tmp"))
        print(f"exported to {args.export} ({', '.join(files)})")
        return {**result, "export": str(args.export)}
    if model.config.num_classes is not None:
        return result
    tokenizer = tokenizer_for(card)
    ids = (bos(tokenizer) + tokenizer.encode_ordinary(args.prompt))[-model.config.block_size:]
    if not ids or max(ids) >= model.config.vocab_size:
        raise UserError(f"the prompt must encode to 1 or more of the model's {model.config.vocab_size} token ids")
    with torch.no_grad():
        logits, _ = model.eval()(torch.tensor([ids], device=device), last_only=True)  # (1, 1, V)
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(min(args.top, probs.numel()))
    nexts = [(tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]
    print(f"after {args.prompt!r} the model expects: " + ", ".join(f"{t!r} {p:.1%}" for t, p in nexts)
          + "\n(python generate.py --init ... --prompt ... writes whole continuations)")
    return {**result, "next_tokens": nexts}


if __name__ == "__main__":
    run_stage(main, parse_args)
