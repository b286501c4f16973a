"""The one transformer, shared by every stage: config presets, the model, a KV cache, checkpoints.

GPT-2, and the families that came after it, Mistral, Phi and Llama, as one model: each difference
from GPT-2 is a config field that names the maths (the norm, how positions enter, the MLP, grouped and
windowed attention, the block's wiring, biases, the tied head) and a few named lines switched by it.
GPT-2's values are the defaults, and GPT-2's own module names are kept (transformer.wte/wpe/h/ln_f,
attn.c_attn/c_proj, mlp.c_fc/c_proj, ln_1/ln_2), so the Hub's weights of every family map onto them
(see load_gpt2.py). Imports only torch. Read top to bottom: config and presets, the KV cache, the
pieces (norms, rotary positions, the attention mask, attention, MLP, block), the model, then the
helpers the stage scripts share (LoRA, checkpoints, device and dtype).

    python -c "import model; m = model.GPT(model.get_config('mistral-tiny')); print(m.num_params())"
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary")
MLPS = ("gelu_tanh", "gelu", "swiglu")
IGNORE = -100  # a target that cross_entropy skips: padding, a prompt not learned, a position not scored


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 byte tokens + <|endoftext|>
    block_size: int = 1024  # the longest sequence: the learned position table's length, or the context trained for
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    # None: a language model (lm_head over the vocabulary). An int: a classifier whose head is an
    # untied Linear(n_embd, num_classes) with bias (finetune_spam.py).
    num_classes: int | None = None
    # --- Where the later families differ from GPT-2. GPT-2's values are the defaults.
    # "layernorm" (GPT-2, Phi-2): subtract the mean, divide by the standard deviation, scale and shift.
    # "rmsnorm" (Mistral, Llama, Phi-3): divide by the root mean square and scale; no mean, no shift.
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    # "learned" (GPT-2): a table of block_size position vectors added to the token embeddings.
    # "rotary" (RoPE; the others): queries and keys are rotated by angles proportional to their position,
    # so attention scores depend on the distance between tokens; there is no position table.
    positions: str = "learned"
    rope_theta: float = 10000.0  # the longest rotary wavelength is about 2 pi theta tokens
    rotary_fraction: float = 1.0  # the share of each head's dimensions that rotate (Phi-2: 0.4; the rest pass)
    # Llama 3.1+'s rope scaling (None: plain RoPE): rotations slower than rope_original_context / low_freq_factor
    # tokens per turn are slowed down rope_scaling_factor times, faster ones than .../high_freq_factor are
    # kept, and those between are blended, so a model trained on the original context reads a longer one.
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    # Grouped-query attention: n_kv_head key/value heads, each shared by n_head / n_kv_head query heads
    # (Mistral 7B and Llama 3.2: 8 for 32), which shrinks the KV cache as much. None: one per query head.
    n_kv_head: int | None = None
    # Sliding-window attention (Mistral, Phi-3): a token attends to the last sliding_window tokens,
    # itself included, and to nothing further back. None: to every earlier token.
    sliding_window: int | None = None
    # "gelu_tanh" (GPT-2, Phi-2): c_proj(gelu(c_fc(x))) with GELU's tanh approximation; "gelu": the same with
    # the exact (erf) GELU; "swiglu" (Mistral, Llama, Phi-3): c_proj(silu(gate(x)) * up(x)).
    mlp: str = "gelu_tanh"
    intermediate_size: int | None = None  # the MLP's hidden width; None: 4 * n_embd (GPT-2)
    # False (GPT-2 & co.): x + attn(ln_1(x)), then x + mlp(ln_2(x)). True (Phi-2): one norm feeds both,
    # and both add to the residual at once: x + attn(ln_1(x)) + mlp(ln_1(x)).
    parallel_block: bool = False
    bias: bool = True  # biases in every Linear of the blocks and in LayerNorms (GPT-2, Phi-2); none elsewhere
    lm_head_bias: bool = False  # Phi-2's LM head has one
    tie_embeddings: bool = True  # the LM head shares the token embedding's matrix (GPT-2, Llama 3.2)

    def __post_init__(self):
        """Validate once, when the config is made, so that a bad combination never reaches a layer."""
        problems = []
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, not {getattr(self, name)}")
        for name, choices in (("norm", NORMS), ("positions", POSITIONS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                problems.append(f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")
        if self.n_head >= 1 and self.n_embd % self.n_head:
            problems.append(f"n_embd {self.n_embd} must divide by n_head {self.n_head}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            problems.append(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if self.positions == "rotary" and not problems:
            if not 0 < self.rotary_fraction <= 1 or self.rotary_dim < 2 or self.rotary_dim % 2:
                problems.append(f"rotary_fraction {self.rotary_fraction} of a head of {self.head_size} gives "
                                f"{self.rotary_dim} rotating dimensions; it must be a positive even number")
            if self.rope_theta <= 1:
                problems.append(f"rope_theta must be above 1, not {self.rope_theta}")
            if self.rope_scaling_factor is not None and not (
                    self.rope_scaling_factor > 0 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                    and self.rope_original_context > 0):
                problems.append("rope scaling needs a positive factor, 0 < low_freq_factor < high_freq_factor "
                                "and a positive original context")
        if self.sliding_window is not None and self.sliding_window < 1:
            problems.append(f"sliding_window must be at least 1, not {self.sliding_window}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            problems.append(f"intermediate_size must be positive, not {self.intermediate_size}")
        if not self.norm_eps > 0:
            problems.append(f"norm_eps must be positive, not {self.norm_eps}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    # Derived sizes, in one place.
    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    @property
    def rotary_dim(self) -> int:
        """How many of a head's dimensions rotate (the first ones), as transformers rounds it."""
        return int(self.head_size * self.rotary_fraction)


# Every family's settings in one place: GPT-2 is the defaults; the others name what they change.
# Phi-3 does Mistral's maths (it differs in how its files store q/k/v and gate/up: fused, see load_gpt2.py).
MISTRAL = dict(norm="rmsnorm", positions="rotary", mlp="swiglu", bias=False, tie_embeddings=False)
PHI2 = dict(positions="rotary", parallel_block=True, lm_head_bias=True, tie_embeddings=False)
LLAMA3 = dict(norm="rmsnorm", positions="rotary", mlp="swiglu", bias=False, rope_theta=500000.0,
              rope_scaling_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
              rope_original_context=8192)

PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "mistral-7b": GPTConfig(**MISTRAL, vocab_size=32000, block_size=32768, n_layer=32, n_head=32, n_kv_head=8,
                            n_embd=4096, intermediate_size=14336, sliding_window=4096),  # v0.1, 7.24B
    "phi-2": GPTConfig(**PHI2, vocab_size=51200, block_size=2048, n_layer=32, n_head=32, n_embd=2560,
                       rotary_fraction=0.4),  # 2.78B
    "phi-3-mini": GPTConfig(**MISTRAL, vocab_size=32064, block_size=4096, n_layer=32, n_head=32, n_embd=3072,
                            intermediate_size=8192, sliding_window=2047),  # 4k context, 3.82B
    "llama-3.2-1b": GPTConfig(**{**LLAMA3, "tie_embeddings": True}, vocab_size=128256, block_size=131072,
                              n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192),  # 1.24B
    # Small ones for laptops and tests. mini and tiny keep GPT-2's vocabulary, so GPT-2's tokenizer works;
    # the *-tiny ones are their family's maths at a few million parameters, mostly embeddings: Mistral's
    # 32,000-token SentencePiece vocabulary, or for phi-2-tiny GPT-2's BPE, Phi-2's base vocabulary (not
    # padded to Phi-2's 51,200 rows: a model trained from scratch would sample ids no tokenizer has).
    # Their windows are shorter than their context, so the window matters in tests.
    "mini": GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=256),  # 16M, mostly embeddings
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64),  # 3.3M, for tests
    "mistral-tiny": GPTConfig(**MISTRAL, vocab_size=32000, block_size=256, n_layer=2, n_head=4, n_kv_head=2,
                              n_embd=64, intermediate_size=192, sliding_window=64),  # 4.2M
    "llama-tiny": GPTConfig(**{**LLAMA3, "tie_embeddings": True, "rope_original_context": 64},
                            vocab_size=32000, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                            intermediate_size=192),  # 2.1M
    "phi-2-tiny": GPTConfig(**PHI2, vocab_size=50257, block_size=256, n_layer=2, n_head=4, n_embd=64,
                            rotary_fraction=0.5),  # 6.5M
    "phi-3-tiny": GPTConfig(**MISTRAL, vocab_size=32000, block_size=256, n_layer=2, n_head=4, n_embd=64,
                            intermediate_size=192, sliding_window=64),  # 4.2M
}


def get_config(name: str, **overrides) -> GPTConfig:
    """The preset called exactly `name`, with any field replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


class KVCache:
    """Keys and values of every layer, kept between decoding steps so each step only runs the new token.

    Preallocated once at (batch_size, max_length) so shapes never change (torch.compile friendly).
    It holds the n_kv_head key/value heads, not n_head: grouped-query attention shares them, and this
    is where its memory saving lies. Keys are stored already rotated (RoPE), at their own position.
    The caller owns it: make one per generation, or reset() it, and tell the model which cache slots
    the new tokens go to (`cache_positions`). Slot i of every row holds the i-th token fed to that
    row, padding included; `valid` records which slots hold real tokens, so padding is never attended.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_length: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (batch_size, config.kv_heads, max_length, config.head_size)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.max_length = max_length
        if self.valid.is_cuda:
            # The model updates these tensors in place and they never move: telling torch.compile
            # so lets mode="reduce-overhead" replay a CUDA graph per step instead of skipping graphs.
            for t in (*self.keys, *self.values, self.valid):
                torch._dynamo.mark_static_address(t)

    def reset(self) -> None:
        # Stale keys and values are harmless: slots that are not valid are masked out.
        self.valid.zero_()

    def part(self, rows: slice, length: int) -> "KVCache":
        """A view of rows `rows` and slots 0..length-1 that shares this cache's memory: the model writes
        through it. A server keeps one cache for all its slots and runs each step on the part in use,
        so attention reads the slots filled so far, not the whole context."""
        view = object.__new__(KVCache)
        view.keys = [k[rows, :, :length] for k in self.keys]
        view.values = [v[rows, :, :length] for v in self.values]
        view.valid, view.max_length = self.valid[rows, :length], length
        return view


# ---------------------------------------------------------------------------------------------------
# The pieces, in the order a token meets them

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean and the shift (Zhang & Sennrich, 2019).

    The mean of squares is taken in float32 whatever the activations' dtype (in bfloat16 it loses
    the small values), and the result is cast back before the scale, as Mistral, Llama and Phi-3 do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)  # x / sqrt(mean(x^2) + eps), PyTorch's own
        return self.weight * normed.to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_frequencies(config: GPTConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """The rotation speed of each pair of rotating dimensions, radians per position: (rotary_dim / 2,) float32.

    Pair i turns at theta^(-2i / rotary_dim): the first pairs quickly, the last ones over ~2 pi theta
    tokens. Computed in float32 every time it is needed (a few dozen numbers) rather than kept as a
    buffer, which model.to(bfloat16) would round."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim))
    if config.rope_scaling_factor is None:
        return inv_freq
    # Llama 3.1's scaling, by wavelength (tokens per turn): long ones (beyond what the original context
    # showed the model) are slowed down `factor` times, short ones kept, the ones between blended.
    factor, low, high = config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    context = config.rope_original_context
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)  # 0 at the long end, 1 at the short end
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(between, blended, scaled)


def rotary_angles(config: GPTConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, float32: positions (B, T) -> (B, T, 1, rotary_dim)
    each; the 1 broadcasts over the heads. Built once per forward for all blocks.

    The angles are laid out twice, [a_0 .. a_(d/2-1), a_0 .. a_(d/2-1)]: dimension j rotates with
    dimension j + d/2 ("rotate half", the layout of the Hub's weights; no permutation is needed). The
    sines come signed, [-sin a_0 .. -sin a_(d/2-1), +sin a_0 ..], which is all the minus that
    apply_rotary needs."""
    freqs = positions[..., None].float() * rope_frequencies(config, positions.device)  # (B, T, d/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1)[:, :, None], torch.cat((-sin, sin), dim=-1)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each head's first rotary_dim dimensions: x (B, T, heads, hs), cos and sin from rotary_angles.

    Pairs (a, b) = (x_j, x_(j + d/2)) turn as 2-D vectors: (a, b) -> (a cos - b sin, b cos + a sin).
    Rolling the d dimensions by d/2 puts each b where its a is and each a where its b is, so one roll,
    two products and a sum rotate every pair (the signed sines supply the minus). The dimensions
    beyond rotary_dim (Phi-2: 48 of 80) pass unchanged."""
    d = cos.size(-1)
    rot = x[..., :d]
    rotated = rot * cos.to(x.dtype) + rot.roll(d // 2, dims=-1) * sin.to(x.dtype)
    return rotated if d == x.size(-1) else torch.cat((rotated, x[..., d:]), dim=-1)


def build_attention_mask(query_slots: torch.Tensor, key_slots: torch.Tensor, key_valid: torch.Tensor | None = None,
                         window: int | None = None) -> torch.Tensor:
    """Which keys each query may attend to (True = may): (B or 1, 1, Tq, S). Built once per forward.

    query_slots (Tq,) or (B, Tq) and key_slots (S,) are the tokens' indices in their row (cache slots
    when decoding). A query sees the keys at or before its own slot (causal); with a window, only the
    last `window` of them, itself included (kv > q - window, as Mistral and Phi-3 count); and only
    valid keys (key_valid (B, S): False for padding). Every query sees at least itself, so a padding
    query gets a finite (unused) output instead of NaN."""
    query = query_slots[..., :, None]  # (..., Tq, 1)
    allowed = key_slots <= query  # (..., Tq, S)
    if window is not None:
        allowed = allowed & (key_slots > query - window)
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, :]) | (key_slots == query)  # (B, Tq, S)
    return allowed.reshape(-1, 1, *allowed.shape[-2:])


def token_positions(T: int, device: torch.device, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's position: 0..T-1, (1, T); with attention_mask (B, T), the number of real tokens
    before it in its row, (B, T), so a left-padded row gets the positions it would have alone."""
    if attention_mask is None:
        return torch.arange(T, device=device)[None]
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def take(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The rows of x (B or 1, T, ...) at positions at (B, Q): (B, Q, ...)."""
    x = x.expand(at.size(0), *x.shape[1:])
    return x[torch.arange(at.size(0), device=at.device)[:, None], at]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        self.dropout = config.dropout
        # q for every head, then k and v for each key/value head, in one matmul (the Hub's separate
        # q_proj, k_proj and v_proj are loaded into its row slices; Phi-3 stores it fused like this)
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.kv_heads) * config.head_size,
                                bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache_positions: torch.Tensor | None = None, at: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); with `at` (B, Q), the outputs at those positions only, (B, Q, C):
        keys and values come from every position, queries from those alone."""
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        qkv = self.c_attn(x).view(B, T, nh + 2 * nkv, hs)  # (B, T, heads, hs): q's heads, then k's, then v's
        if rope is not None and at is None:  # q and k side by side: one rotation turns all their heads
            qk = apply_rotary(qkv[:, :, :nh + nkv], *rope)  # rope: cos and sin, (B or 1, T, 1, rotary_dim) each
            q, k, v = qk[:, :, :nh], qk[:, :, nh:], qkv[:, :, nh + nkv:]
        else:
            q, k, v = qkv.split([nh, nkv, nkv], dim=2)
            if at is not None:
                q = take(q, at)  # (B, Q, nh, hs)
            if rope is not None:
                cos, sin = rope
                q, k = apply_rotary(q, take(cos, at), take(sin, at)), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hs)
        if cache is not None:
            cached_keys, cached_values = cache  # (B, nkv, S, hs) each, S = cache length
            if cache_positions.dim() == 1:  # the same slots in every row
                cached_keys.index_copy_(2, cache_positions, k.to(cached_keys.dtype))
                cached_values.index_copy_(2, cache_positions, v.to(cached_values.dtype))
            else:  # (B, T): each row's own slots; the indexed view is (B, T, nkv, hs), k's layout before transpose
                rows = torch.arange(B, device=x.device)[:, None]
                cached_keys[rows, :, cache_positions] = k.transpose(1, 2).to(cached_keys.dtype)
                cached_values[rows, :, cache_positions] = v.transpose(1, 2).to(cached_values.dtype)
            k, v = cached_keys.to(q.dtype), cached_values.to(q.dtype)  # (B, nkv, S, hs)
        # With no mask and no cache this is plain causal attention, which lets PyTorch pick its
        # flash kernel; otherwise attn_mask (True = may attend) carries causality, padding and the
        # window. enable_gqa lets each group of n_head / n_kv_head query heads read one key/value
        # head without copying it n_head / n_kv_head times.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=nkv != nh)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, q.size(2), nh * hs)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        # SwiGLU's gate and up projections are one matrix, gate rows first (Phi-3 stores it so; the
        # Hub's separate gate_proj and up_proj of Mistral and Llama are loaded into its two halves).
        self.c_fc = nn.Linear(config.n_embd, (2 if self.gated else 1) * config.mlp_size, bias=config.bias)
        # GPT-2 and Phi-2 use the tanh approximation of GELU ("gelu_new"); the exact (erf) one drifts
        # from their logits by ~1e-3.
        self.act = {"gelu_tanh": nn.GELU(approximate="tanh"), "gelu": nn.GELU(), "swiglu": nn.SiLU()}[config.mlp]
        self.c_proj = nn.Linear(config.mlp_size, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, mlp_size), or (B, T, 2 * mlp_size) gated
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.dropout(self.c_proj(self.act(gate) * up))  # SwiGLU: the gate decides how much of up passes
        return self.dropout(self.c_proj(self.act(h)))


class Block(nn.Module):
    """Pre-norm transformer block. Sequential (GPT-2, Mistral, Llama, Phi-3): x + attn(ln_1(x)), then
    x + mlp(ln_2(x)). Parallel (Phi-2): x + attn(ln_1(x)) + mlp(ln_1(x)), one norm and no ln_2."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.parallel = config.parallel_block
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        if not self.parallel:
            self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache_positions: torch.Tensor | None = None, at: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), or with `at` (B, Q) the block's output at those positions, (B, Q, C)."""
        h = self.ln_1(x)
        attn = self.attn(h, attn_mask, rope, cache, cache_positions, at)
        if at is not None:  # from here on every position works alone: keep the chosen ones only
            x, h = take(x, at), take(h, at)
        if self.parallel:
            return x + attn + self.mlp(h)
        x = x + attn
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            # a learned position embedding only where positions are learned; RoPE has no table
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.positions == "learned" else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.num_classes is None:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
            if config.tie_embeddings:
                self.tie_weights()
        else:
            self.lm_head = nn.Linear(config.n_embd, config.num_classes)
        if self.transformer.wte.weight.is_meta:
            return  # built on the meta device to receive loaded weights (load_gpt2.py): nothing to init
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer) (two per block), so the stream's variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def tie_weights(self) -> None:
        """Share one matrix between the token embedding and the LM head, as GPT-2 does.

        Call it again after replacing wte's parameter (load_state_dict(assign=True) does that)."""
        self.lm_head.weight = self.transformer.wte.weight

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.transformer.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # --- The forward pass in pieces: embed, run blocks, final norm, head. Stages that need a piece
    # (the classifier: the frozen bottom once, the top block at one position) call these.

    def embed(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings, plus learned position embeddings where positions are learned: (B, T) ids ->
        (B, T, C). Positions (B, T) or (T,) default to 0..T-1; rotary models use them inside attention."""
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            if positions is None:
                positions = torch.arange(idx.size(1), device=idx.device)
            x = x + self.transformer.wpe(positions)
        return self.transformer.drop(x)

    def _attention_inputs(self, T: int, device: torch.device, attention_mask: torch.Tensor | None,
                          positions: torch.Tensor, kv_cache: KVCache | None = None,
                          cache_positions: torch.Tensor | None = None, at: torch.Tensor | None = None):
        """What every block's attention needs, built once per forward: the mask (None: plain causal)
        and the rotary cos and sin at `positions` (None: learned positions)."""
        window = self.config.sliding_window
        if attention_mask is not None and attention_mask.dim() == 3:  # (B, T, T): the caller's own pattern
            assert kv_cache is None and at is None and window is None, "a (B, T, T) mask is used as it is"
            mask = attention_mask.bool()[:, None]  # (B, 1, T, T)
        elif kv_cache is not None:
            mask = build_attention_mask(cache_positions, torch.arange(kv_cache.max_length, device=device),
                                        kv_cache.valid, window)
        elif attention_mask is None and window is None and at is None:
            mask = None
        else:
            slots = torch.arange(T, device=device)
            mask = build_attention_mask(slots if at is None else at, slots,
                                        None if attention_mask is None else attention_mask.bool(), window)
        rope = rotary_angles(self.config, positions) if self.config.positions == "rotary" else None
        return mask, rope

    def run_blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None, *,
                   attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states entering block `start`, (B, T, C) -> those leaving block end - 1 (end=None: the last).

        run_blocks(embed(idx), 0, k) is the model up to block k. attention_mask and positions mean
        what they mean in forward()."""
        if positions is None:
            positions = token_positions(x.size(1), x.device, attention_mask)
        mask, rope = self._attention_inputs(x.size(1), x.device, attention_mask, positions)
        for block in self.transformer.h[start:end]:
            x = block(x, mask, rope)
        return x

    def run_block_at(self, index: int, x: torch.Tensor, at: torch.Tensor, *,
                     attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Block `index` for chosen query positions only: x (B, T, C) entering it -> its output at the
        positions at (B, Q), (B, Q, C), equal to run_blocks(x, index, index + 1) there. Keys and values
        come from every position, but the query, attention output, MLP and residual run at `at` alone
        (a classifier reading one token does a quarter of the block's work)."""
        if positions is None:
            positions = token_positions(x.size(1), x.device, attention_mask)
        mask, rope = self._attention_inputs(x.size(1), x.device, attention_mask, positions, at=at)
        return self.transformer.h[index](x, mask, rope, at=at)

    def hidden(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, kv_cache: KVCache | None = None,
               cache_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states after ln_f, (B, T, C). See forward() for the arguments."""
        B, T = idx.shape
        assert T <= self.config.block_size, f"sequence of {T} tokens is longer than block_size {self.config.block_size}"
        if kv_cache is not None:
            if cache_positions is None:
                raise ValueError("a KV cache needs cache_positions: the cache slots the new tokens go to")
            real = torch.ones(B, T, dtype=torch.bool, device=idx.device) if attention_mask is None \
                else attention_mask.bool()
            rows = torch.arange(B, device=idx.device)[:, None] if cache_positions.dim() == 2 else slice(None)
            kv_cache.valid[rows, cache_positions] = real
            if positions is None:  # the number of real tokens before each new one in its row
                positions = (kv_cache.valid.cumsum(1) - 1).clamp(min=0)[rows, cache_positions]  # (B, T)
        if positions is None:
            assert attention_mask is None or attention_mask.dim() == 2, "a (B, T, T) mask needs positions"
            positions = token_positions(T, idx.device, attention_mask)
        x = self.embed(idx, positions)  # (B, T, C)
        mask, rope = self._attention_inputs(T, idx.device, attention_mask, positions, kv_cache, cache_positions)
        for i, block in enumerate(self.transformer.h):
            cache = (kv_cache.keys[i], kv_cache.values[i]) if kv_cache is not None else None
            x = block(x, mask, rope, cache, cache_positions)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, cache_positions: torch.Tensor | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for token ids idx (B, T), and the mean cross-entropy loss when targets are given.

        attention_mask (B, T): 1 for real tokens, 0 for padding; positions then count real tokens only,
        so a left-padded row gets the positions (learned or rotary) it would have alone. Or (B, T, T):
        which keys each query may attend to (True = may), used as it is (causality included), with
        positions given: several sequences packed in one row (finetune_preference.py shares a prompt
        between two responses that way); not with a KV cache or a sliding window.
        positions (B, T) or (T,): each token's position, when the caller knows better.
        kv_cache + cache_positions (T,), or (B, T) for slots of each row's own: incremental decoding;
        the new tokens' keys and values go to those cache slots and attention covers every valid slot up to each query's own (and within
        the sliding window, if the model has one).
        last_only: compute the head for the last position only, (B, 1, V): generation needs no more,
        and the (B, T, V) head is the most expensive matmul of a small model.
        Targets of IGNORE are skipped.
        """
        x = self.hidden(idx, attention_mask=attention_mask, positions=positions,
                        kv_cache=kv_cache, cache_positions=cache_positions)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; a tied matrix counts once. non_embedding leaves out wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for name, m in self.transformer.items() if name in ("wte", "wpe"))
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward): 6N + 12*L*H*hs*T, as in the PaLM paper.

        N counts the weights that take part in matmuls: every parameter but the position table and an
        untied token embedding (both are lookups; a tied one is the LM head's matrix). 12*L*H*hs*T is
        attention's q@k and att@v over the T keys a query sees (at most the sliding window)."""
        cfg = self.config
        lookups = [name for name in ("wpe", "wte") if name in self.transformer and not (name == "wte" and self.tied)]
        n = self.num_params() - sum(self.transformer[name].weight.numel() for name in lookups)
        keys = min(seq_len, cfg.sliding_window or seq_len)
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * keys

    def configure_optimizer(self, lr: float, weight_decay: float = 0.1,
                            betas: tuple[float, float] = (0.9, 0.95),
                            device_type: str = "cpu") -> torch.optim.AdamW:
        """AdamW with weight decay on matrices only (not on biases, norms), fused where possible.

        Only parameters with requires_grad are optimised. The fused kernel updates all tensors in one
        call: on CPU the default per-tensor loop is several times slower."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


# ---------------------------------------------------------------------------------------------------
# LoRA: low-rank adapters on the block matrices, shared by both finetuning stages

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: W x + b + (alpha / rank) * B A x (Hu et al., 2021).

    A (rank, in) starts like nn.Linear's own weights and B (out, rank) at zero, so training starts
    from exactly the pretrained function and only rank * (in + out) numbers train per matrix."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.scale  # via the (..., rank) bottleneck

    def merged(self) -> nn.Linear:
        """The base Linear with the update folded into its weight: same outputs, no extra matmuls."""
        with torch.no_grad():
            self.base.weight += self.scale * (self.B.to(self.base.weight.dtype) @ self.A.to(self.base.weight.dtype))
        return self.base


def add_lora(model: GPT, rank: int, alpha: float) -> None:
    """Wrap every matrix of every block (attention's fused q/k/v and output projections, both MLP
    matrices) in a LoRALinear: those matrices freeze and their adapters train. What else trains (the
    norms, the head) is the caller's choice."""
    for block in model.transformer.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                             (block.mlp, "c_proj")):
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))


def merge_lora(model: GPT) -> None:
    """Replace each LoRALinear by its merged Linear, so the model is a plain GPT again (its state_dict
    has GPT's own keys and load_checkpoint reads it)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())


# ---------------------------------------------------------------------------------------------------
# Checkpoints: (config, state_dict) of the unwrapped model, loaded with weights_only=True.

def unwrap(model: nn.Module) -> nn.Module:
    """The GPT inside torch.compile's and DistributedDataParallel's wrappers, in any order."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_checkpoint(path: str | Path, model: nn.Module, **extra) -> None:
    """Write {"config", "model", **extra} to path atomically: a crash mid-write leaves the old file.

    The state_dict comes from the unwrapped model, so keys never carry `_orig_mod.` or `module.`.
    extra may hold tensors, numbers, strings, lists and dicts (what weights_only loading accepts)."""
    gpt = unwrap(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not common.atomic_write, which takes the bytes whole: torch.save streams into the file, and a copy
    # of a large model in memory first would double what saving needs (and model.py imports only torch).
    tmp = path.with_name(path.name + ".tmp")
    checkpoint = {"config": dataclasses.asdict(gpt.config), "model": gpt.state_dict(), **extra}
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_kind(path: Path) -> str:
    """What a file holds, judged by its first bytes: "torch" (the zip archive torch.save writes, as
    save_checkpoint does), "safetensors" (an 8-byte little-endian header length that fits in the file,
    then the JSON header's '{'), "empty", or "other"."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "torch"
    # The length check matters: a '{' at byte 8 alone would claim one random file in 256.
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return "safetensors"
    return "other"


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """Rebuild the model saved by save_checkpoint; returns it and the checkpoint's other entries.

    Raises ValueError with a one-sentence reason for a file that is missing, corrupt or not ours."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    kind = checkpoint_kind(path)
    if kind == "empty":
        raise ValueError(f"checkpoint {path} is empty (0 bytes): it was never written completely")
    if kind == "safetensors":
        raise ValueError(f"{path} is a safetensors file (weights in the Hugging Face layout), not a checkpoint "
                         "saved by this project; pass it where a Hub-layout model is accepted (--init)")
    if kind == "other":
        raise ValueError(f"{path} is neither a checkpoint of this project (the zip archive torch.save writes) "
                         "nor a safetensors file")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # torch's message here advises unsafe loading: not ours to repeat
        raise ValueError(f"{path} is not a readable checkpoint (it holds Python objects other than tensors and "
                         "plain data, which this project never unpickles)") from None
    except Exception as e:  # a truncated zip, a missing record, ...: all mean "not a usable checkpoint"
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}"
                         f"{': ' + first_line if first_line else ''})") from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "model" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint of this project (no 'config' and 'model' entries)")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(checkpoint["config"]) - known
    if unknown:
        raise ValueError(f"{path} has config fields this model.py does not know: {sorted(unknown)}")
    try:
        config = GPTConfig(**checkpoint["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} has an unusable config ({e})") from None
    model = GPT(config)
    try:
        model.load_state_dict(checkpoint.pop("model"))
    except RuntimeError as e:
        raise ValueError(f"{path} does not match its own config: {(str(e).splitlines() or [''])[0][:300]}") from None
    model.to(device)
    checkpoint.pop("config")
    return model, checkpoint


# ---------------------------------------------------------------------------------------------------
# Device and precision, in one place for every stage.

def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; any other name is used as given.

    Raises ValueError with a one-sentence reason for a name torch does not know or a device this
    machine lacks, instead of a RuntimeError deep inside the first .to(device)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if device.type in available and not available[device.type]():
        raise ValueError(f"device {name!r} is not available on this machine")
    return device


def missing_compiler(device: torch.device) -> str | None:
    """Why torch.compile cannot work on device, in one sentence, or None. On a CPU, inductor writes
    C++ kernels and builds them with $CXX, else g++ or clang++; without one, the first forward would
    end in a long traceback."""
    if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        return ("--compile on a CPU needs a C++ compiler (g++, clang++, or the one $CXX names) and none was "
                "found; install one, or leave out --compile")
    return None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU that supports it, float32 elsewhere (CPU autocast is slower)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def device_and_dtype(device_name: str, dtype_name: str) -> tuple[torch.device, torch.dtype]:
    """The --device and --dtype flags as torch objects; ValueError for a bad name or a missing device."""
    device = resolve_device(device_name)
    return device, resolve_dtype(dtype_name, device)


def device_flag(name: str) -> str:
    """An argparse type for --device: checked when the command line is parsed, so that a machine
    without the device says so before any work starts. The name itself is kept (under torchrun,
    pretrain.py turns 'cuda' into each process's own GPU)."""
    try:
        resolve_device(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def add_device_args(parser: argparse.ArgumentParser, dtypes: tuple[str, ...] = ("auto", *DTYPES),
                    dtype_help: str = "weights and compute") -> None:
    """--device and --dtype, defined once for every stage."""
    parser.add_argument("--device", type=device_flag, default="auto",
                        help="auto picks cuda, then mps, then cpu; or a torch device: cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=dtypes,
                        help=f"{dtype_help}; auto is bfloat16 on a GPU that supports it, float32 elsewhere")


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass: autocast to dtype, or nothing at all for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
