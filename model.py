"""The GPT-2 transformer, shared by every stage: config presets, the model, a KV cache, checkpoints.

Exactly OpenAI's GPT-2 architecture, with GPT-2's own module names so the Hub's weights map one to
one (see load_gpt2.py). Imports only torch. Read top to bottom: config, attention, MLP, block, model,
then the helpers the stage scripts share (optimizer, checkpoints, device and dtype).

    python -c "import model; m = model.GPT(model.get_config('tiny')); print(m.num_params())"
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 byte tokens + <|endoftext|>
    block_size: int = 1024  # longest sequence the position embedding covers
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    # None: a language model whose head is tied to the token embedding. An int: a classifier whose
    # head is an untied Linear(n_embd, num_classes) with bias (finetune_spam.py).
    num_classes: int | None = None


PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Small ones for laptops and tests. They keep GPT-2's vocabulary, so GPT-2's tokenizer works.
    "mini": GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=256),  # 16M, mostly embeddings
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64),  # 3.3M, for tests
}


def get_config(name: str, **overrides) -> GPTConfig:
    """The preset called exactly `name`, with any field replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


class KVCache:
    """Keys and values of every layer, kept between decoding steps so each step only runs the new token.

    Preallocated once at (batch_size, max_length) so shapes never change (torch.compile friendly).
    The caller owns it: make one per generation, or reset() it, and tell the model which cache slots
    the new tokens go to (`cache_positions`). Slot i of every row holds the i-th token fed to that
    row, padding included; `valid` records which slots hold real tokens, so padding is never attended.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_length: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        head_dim = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, max_length, head_dim)
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_embd {config.n_embd} must divide by n_head {config.n_head}"
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache_positions: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            cached_keys, cached_values = cache  # (B, nh, S, hs) each, S = cache length
            cached_keys.index_copy_(2, cache_positions, k.to(cached_keys.dtype))
            cached_values.index_copy_(2, cache_positions, v.to(cached_values.dtype))
            k, v = cached_keys.to(q.dtype), cached_values.to(q.dtype)  # (B, nh, S, hs)
        # With no mask and no cache this is plain causal attention, which lets PyTorch pick its
        # flash kernel; otherwise attn_mask (True = may attend) carries causality and padding.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # GPT-2 used the tanh approximation of GELU; the exact (erf) one drifts from its logits by ~1e-3.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache_positions: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, cache, cache_positions)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embedding
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        if config.num_classes is None:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token plus position embeddings: (B, T) ids -> (B, T, C). Positions default to 0..T-1."""
        if positions is None:
            positions = torch.arange(idx.size(1), device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))

    def hidden(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, kv_cache: KVCache | None = None,
               cache_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states after ln_f, (B, T, C). See forward() for the arguments."""
        B, T = idx.shape
        assert T <= self.config.block_size, f"sequence of {T} tokens is longer than block_size {self.config.block_size}"
        attn_mask = None
        if kv_cache is not None:
            if cache_positions is None:
                raise ValueError("a KV cache needs cache_positions: the cache slots the new tokens go to")
            real = torch.ones(B, T, dtype=torch.bool, device=idx.device) if attention_mask is None \
                else attention_mask.bool()
            kv_cache.valid[:, cache_positions] = real
            # A token's position is the number of real tokens before it in its row, so a left-padded
            # prompt gets the same positions as the unpadded one.
            if positions is None:
                positions = (kv_cache.valid.cumsum(1) - 1).clamp(min=0)[:, cache_positions]  # (B, T)
            slots = torch.arange(kv_cache.max_length, device=idx.device)
            causal = slots[None, :] <= cache_positions[:, None]  # (T, S): slot j is at or before query i
            attn_mask = causal[None, None] & kv_cache.valid[:, None, None, :]  # (B, 1, T, S)
            # Every query sees itself, so a padding query has a finite (unused) output instead of NaN.
            attn_mask = attn_mask | (slots[None, :] == cache_positions[:, None])[None, None]
        elif attention_mask is not None:
            real = attention_mask.bool()
            if positions is None:
                positions = (real.cumsum(1) - 1).clamp(min=0)  # (B, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=idx.device)
            attn_mask = (causal & real[:, None, None, :]) | eye  # (B, 1, T, T)
        x = self.embed(idx, positions)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            cache = (kv_cache.keys[i], kv_cache.values[i]) if kv_cache is not None else None
            x = block(x, attn_mask, cache, cache_positions)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, cache_positions: torch.Tensor | None = None,
                last_only: bool = False, head_t: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for token ids idx (B, T), and the mean cross-entropy loss when targets are given.

        attention_mask (B, T): 1 for real tokens, 0 for padding; positions then count real tokens only.
        kv_cache + cache_positions (T,): incremental decoding; the new tokens' keys and values go to
        those cache slots and attention covers every valid slot up to each query's own.
        last_only: compute the head for the last position only, (B, 1, V): generation needs no more,
        and the (B, T, 50257) head is the most expensive matmul of a small model.
        head_t (C, V): the LM head's weight transposed and contiguous, used instead of lm_head (same
        numbers); see generate.py for why decoding on a CPU passes one. Targets of -100 are ignored.
        """
        x = self.hidden(idx, attention_mask=attention_mask, positions=positions,
                        kv_cache=kv_cache, cache_positions=cache_positions)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        logits = self.lm_head(x) if head_t is None else x @ head_t  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; a tied matrix counts once. non_embedding leaves out wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward): 6N + 12*L*E*T, as in the PaLM paper.

        N counts the weights that take part in matmuls: every parameter but the position embedding
        (the tied token embedding is the LM head's matrix). 12*L*E*T is attention's q@k and att@v."""
        cfg = self.config
        n = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def configure_optimizer(self, lr: float, weight_decay: float = 0.1,
                            betas: tuple[float, float] = (0.9, 0.95),
                            device_type: str = "cpu") -> torch.optim.AdamW:
        """AdamW with weight decay on matrices only (not on biases, LayerNorms), fused where possible.

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
    tmp = path.with_name(path.name + ".tmp")
    checkpoint = {"config": dataclasses.asdict(gpt.config), "model": gpt.state_dict(), **extra}
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """Rebuild the model saved by save_checkpoint; returns it and the checkpoint's other entries.

    Raises ValueError with a one-sentence reason for a file that is missing, corrupt or not ours."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, a foreign pickle, ...: all mean "not a usable checkpoint"
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "model" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint of this project (no 'config' and 'model' entries)")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(checkpoint["config"]) - known
    if unknown:
        raise ValueError(f"{path} has config fields this model.py does not know: {sorted(unknown)}")
    model = GPT(GPTConfig(**checkpoint["config"]))
    try:
        model.load_state_dict(checkpoint.pop("model"))
    except RuntimeError as e:
        raise ValueError(f"{path} does not match its own config: {str(e).splitlines()[0][:300]}") from None
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
