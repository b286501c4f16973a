"""Text generation: sampling from logits, KV-cached decoding that streams tokens, int8 weights, and a command line.

    python generate.py --init gpt2 --prompt "Every effort moves you"
    python generate.py --init mistralai/Mistral-7B-v0.1 --quantize int8 --prompt "A laptop can"  # ~8 GB

`generate()` runs the prompt through the model once (prefill), then feeds one new token at a time
through a KV cache, so each step costs one token's worth of compute instead of the whole sequence's.
It yields tokens as they are sampled and stops at an end-of-text token or a stop string. Prompts of
different lengths share a batch by left padding plus an attention mask; each row then gets exactly
the tokens it would get alone. Decoding one token at a time reads every weight once per token, so
its speed is set by the bytes of the weights: `--dtype bfloat16` halves them, and `--quantize int8`
(`Int8Linear`, `quantize_int8`) quarters them; on a CPU, `--quantize int8 --compile` is the fastest
decoder (`compile_for_generation`). `answer()` is the batched decoding of instruction models that
finetune_instruct.py and evaluate.py share. Other stages import `sample_next`, `generate`,
`left_pad`, `TextStream` and the int8 pieces.
"""
import argparse
import functools
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (ArgumentParser, SEED, UserError, non_negative_float, non_negative_int, positive_float, positive_int,
                    run_stage)
from load_gpt2 import add_init_args, check_preset, load_model, tokenizer_for
from model import GPT, KVCache, add_device_args, autocast, device_and_dtype, missing_compiler
from templates import Template, stop_ids
from tokenizer_base import bos



DEFAULT_NEW_TOKENS = 100  # without --max-new-tokens: this many, or what the context leaves after the prompt


# ---------------------------------------------------------------------------------------------------
# Sampling: logits (B, V) -> one token id per row

def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError, naming the setting, for sampling settings that mean nothing."""
    if not temperature >= 0:  # also refuses nan
        raise ValueError(f"temperature must be 0 (greedy) or positive, not {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top-k must be at least 1, not {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top-p must be in (0, 1], not {top_p}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (B, V) -> (B,).

    temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature, cut to the
    top_k most likely tokens and then to the smallest set whose probability reaches top_p (nucleus
    sampling), and one token is drawn; pass a seeded generator to make the draw reproducible."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, V)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V) each
        # Drop a token when the more likely tokens before it already reach top_p: the most likely
        # token always stays, so the set is never empty.
        sorted_probs[sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)  # back to vocabulary order
    # multinomial draws in proportion to the weights, so the cut probabilities need no renormalising.
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------
# Turning tokens into printable text

class TextStream:
    """The text of a growing list of token ids, handed out piece by piece as it becomes final.

    A token may end inside a UTF-8 character (an emoji often spans 2-3 tokens), and decoding then ends
    in U+FFFD: that tail is held back until a later token completes the character. A tail that could
    be the start of a stop string is held back too; once a stop string appears, the text is cut just
    before it and `stopped` turns True.

    prefix: the ids before the new ones (the prompt). They are decoded together with the new ones but
    their own text is not handed out: SentencePiece tokenizers drop the space a text's first piece
    starts with, so decoding the new tokens alone would glue the first new word to the prompt."""

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = (),
                 prefix: Sequence[int] = ()):
        self.decode = decode
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = list(prefix)
        self.start = len(decode(self.ids)) if self.ids else 0  # where the new tokens' text begins
        self.text = ""  # the text handed out so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that became final (often '', never past a stop string)."""
        self.ids.append(token)
        return self._take(final=False)

    def flush(self) -> str:
        """The rest of the text at the end of generation, incomplete characters included."""
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        if self.stopped:
            return ""
        # Decoding everything again is simple and cheap next to a forward pass (tiktoken decodes
        # millions of tokens a second), and it keeps characters that span tokens right.
        text = self.decode(self.ids)[self.start:]
        # A stop string cannot start in text already handed out: that text was held back.
        hits = [i for i in (text.find(s, len(self.text)) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        elif final:
            end = len(text)
        else:
            end = len(text.rstrip("\ufffd"))
            end -= max((self._stop_prefix(text, end, s) for s in self.stop_strings), default=0)
        piece = text[len(self.text):end]
        self.text += piece
        return piece

    @staticmethod
    def _stop_prefix(text: str, end: int, stop: str) -> int:
        """Length of the longest tail of text[:end] that stop begins with (0 if none)."""
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:n], 0, end):
                return n
        return 0


# ---------------------------------------------------------------------------------------------------
# int8 weights: a quarter of float32's bytes, so a 7B model decodes in about 8 GB
#
# Weight-only quantisation: each matrix is stored as int8 with one scale per output channel (row),
# and multiplied by activations that stay in floating point. Decoding a token reads every weight
# once and does two flops with it, so fewer bytes per weight is fewer milliseconds per token.

def quantize_rows(weight: torch.Tensor, chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """A float matrix (N, K) -> its int8 values (N, K) and one scale per row (N,), in weight's dtype,
    with weight ~= int8 * scale[:, None].

    Symmetric and per row: a row's largest magnitude becomes 127, so rows of small weights keep their
    own resolution, and rounding moves a weight by at most half a step, max|row| / 254. The scale
    is rounded to weight's dtype before dividing, so the int8 values fit the scale that is kept.
    Done chunk_rows rows at a time, so the float32 temporaries stay small next to the matrix."""
    N = weight.size(0)
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(N, dtype=weight.dtype, device=weight.device)
    for first in range(0, N, chunk_rows):
        rows = weight[first:first + chunk_rows].float()  # (n, K)
        scale = (rows.abs().amax(dim=1) / 127).to(weight.dtype)  # (n,)
        scale = torch.where(scale == 0, 1, scale)  # an all-zero row: any scale gives back zeros
        q[first:first + chunk_rows] = (rows / scale.float()[:, None]).round_().clamp_(-127, 127)
        scales[first:first + chunk_rows] = scale
    return q, scales


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, contiguous and starting on a 64-byte boundary (a copy if needed): the CPU int8 kernel reads
    rows with aligned vector loads and crashes on a tensor that starts mid-vector."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight (out, in) and one scale per output channel: y = (x @ w.T) * scale + bias.

    Decoding (a few rows of x) on a CPU uses PyTorch's int8 kernel, aten._weight_int8pack_mm: it converts
    and scales the int8 values in registers, so no float copy of the matrix is ever written. Its
    vectorised path takes bfloat16 activations and returns bfloat16, so float32 activations are rounded
    to bfloat16 for the product (a relative error of 2^-9, below int8's own) and the result cast back;
    it needs `in` to be a multiple of 16. Its work grows with every row of x, so for a prompt (many rows)
    a block of the matrix at a time is dequantised into the activations' dtype and multiplied by the
    BLAS kernel instead; GPUs and MPS always take this path.

    The eager kernel streams int8 weights from memory more slowly than MKL streams float32 ones, so a
    quarter of the bytes makes eager decoding only a little faster than float32, not 4x; compiled
    (compile_for_generation), inductor swaps in its own GEMM over pre-packed int8 weights (the README's
    Results give the figures, from tests/bench.py generate). Nothing in forward() may break the
    compiled graph, hence no alignment check while compiling."""

    KERNEL_MAX_ROWS = 32  # rows of x (tokens) up to which the CPU int8 kernel beats dequantising
    DEQUANTISE_ELEMENTS = 1 << 24  # the weights dequantised at a time: 64 MB of float32

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: nn.Parameter | None = None):
        super().__init__()
        assert weight.dtype == torch.int8 and weight.dim() == 2 and scales.shape == weight.shape[:1], \
            f"need an int8 (out, in) weight and (out,) scales, got {weight.dtype} {tuple(weight.shape)}, {tuple(scales.shape)}"
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", _aligned(weight))  # (out, in) int8; a buffer: nothing here trains
        self.register_buffer("scales", scales)  # (out,), the model's float dtype
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.device.type == "cpu" and self.in_features % 16 == 0 and rows <= self.KERNEL_MAX_ROWS:
            a = x.reshape(rows, self.in_features).to(torch.bfloat16)  # (M, in): the kernel takes 2-D
            if not torch.compiler.is_compiling():  # compiled code allocates aligned; data_ptr would break the graph
                a = _aligned(a)
            y = torch.ops.aten._weight_int8pack_mm(a, self.weight, self.scales.to(torch.bfloat16))  # (M, out)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            y = torch.empty(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
            step = max(1, self.DEQUANTISE_ELEMENTS // self.in_features)
            for first in range(0, self.out_features, step):
                block = slice(first, first + step)
                y[..., block] = F.linear(x, self.weight[block].to(x.dtype)) * self.scales[block].to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """nn.Embedding over an int8 table (V, C) with one scale per row: each looked-up row is dequantised
    alone. A model whose head is tied to its embedding passes the head's int8 matrix and scales,
    so one int8 table serves both, as one float matrix did."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # (V, C) int8
        self.register_buffer("scales", scales)  # (V,), the model's float dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight[idx].to(self.scales.dtype) * self.scales[idx].unsqueeze(-1)  # (..., C)


@torch.no_grad()
def quantize_int8(model: GPT, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> GPT:
    """Store every matrix of a model in int8, in place: each nn.Linear (the blocks' and the LM head)
    becomes an Int8Linear, and the token embedding an Int8Embedding (the head's own table when tied).

    quantized: {weight name: (int8, scales)} already made while loading (see load_for_generation);
    those weights are taken as they are (the model holds meta tensors in their place), the others
    are quantised here. The norms, the biases and a learned position table stay in floating point:
    GPT-2 124M keeps 0.9 M of its 124 M weights so. Each float matrix is dropped as soon as its int8
    form exists, so memory peaks at the float model plus one int8 matrix. Quantise the model where it
    will run: moving it afterwards would copy a tied table twice."""
    quantized = dict(quantized or {})
    tied = model.tied
    if tied and "transformer.wte.weight" in quantized:
        quantized["lm_head.weight"] = quantized["transformer.wte.weight"]  # one table, as one float matrix
    # The names of the Linears' parents, not the Linears themselves: a list holding those would keep
    # every float matrix alive until the end.
    parents = [name for name, m in model.named_modules() if any(type(c) is nn.Linear for c in m.children())]
    for parent_name in parents:
        module = model.get_submodule(parent_name)
        for name in [name for name, child in module.named_children() if type(child) is nn.Linear]:
            # exactly nn.Linear: a LoRALinear would lose its adapters
            linear, key = getattr(module, name), f"{parent_name}.{name}.weight".removeprefix(".")
            int8 = quantized.get(key) or quantize_rows(linear.weight.detach())
            setattr(module, name, Int8Linear(*int8, linear.bias))
    if tied:
        head = model.lm_head
        model.transformer.wte = Int8Embedding(head.weight, head.scales)
    else:
        wte = quantized.get("transformer.wte.weight") or quantize_rows(model.transformer.wte.weight.detach())
        model.transformer.wte = Int8Embedding(*wte)
    return model


def load_for_generation(init: str, *, preset: str | None = None, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, quantize: str | None = None) -> tuple[GPT, dict]:
    """load_model, in int8 when quantize == "int8": the model to generate with, and its card.

    For int8, Hub-layout weights are quantised one matrix at a time as they arrive from the file
    (load_model's `loaded` hook), so the whole model never exists in floating point: a 7B model loads
    in about its int8 size (7.5 GB) rather than its bfloat16 size (14.5 GB). They are read in
    bfloat16, the Hub's dtype for every family but GPT-2, whose float32 weights move by at most 2^-9
    of themselves, well inside an int8 step. Our checkpoints and random models are quantised whole
    after loading. What stays in floating point takes `dtype`."""
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantisation {quantize!r}; the one offered is int8")
    if quantize is None:
        return load_model(init, preset=preset, device=device, dtype=dtype)
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    model, card = load_model(init, preset=preset, device=device, dtype=torch.bfloat16,
                             loaded=functools.partial(_quantize_loaded, quantized))
    quantize_int8(model, quantized).to(dtype)
    return model, card


def _quantize_loaded(quantized: dict, name: str, tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """load_model's `loaded` hook for int8: a matrix that quantize_int8 would quantise is quantised
    into `quantized` as soon as it leaves the file, and the model keeps a meta tensor in its place."""
    if type(module) is nn.Linear and name.endswith(".weight") or name == "transformer.wte.weight":
        quantized[name] = quantize_rows(tensor)
        return torch.empty_like(tensor, device="meta")  # the float matrix is freed here
    return tensor


# ---------------------------------------------------------------------------------------------------
# Decoding with a KV cache

def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists of different lengths -> ids (B, T) padded on the left, attention_mask (B, T).

    Left padding lines every prompt's last token up in the last column, where the next token is
    predicted. The mask (1 = real token) keeps padding out of attention and out of the positions, so
    pad_id's value never matters."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[row, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def _compute_dtype(model: GPT, device: torch.device) -> torch.dtype:
    """The dtype keys and values come out in: autocast's if it is on, else the float weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def packs_for_cpu(weight: torch.Tensor) -> bool:
    """Whether PackedLinear applies to this weight: float32 on an x86 CPU that oneDNN serves."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.cpu.get_cpu_capability().startswith("AVX"))


class PackedLinear(nn.Module):
    """nn.Linear for decoding on an x86 CPU in float32: the weight reordered once into oneDNN's
    blocked layout, then multiplied by oneDNN's linear kernel.

    A decoding step multiplies a few rows of activations (one per sequence) by every matrix of the
    model, so its time is the time to stream the weights from memory. The default BLAS kernel does
    that well for one row but poorly for a handful (a server's batch), and it reads nn.Linear's
    (out, in) layout slower than a blocked one; a weight packed ahead of time for `rows` rows streams
    fast for one row and for several. Prompts (many rows) run at the default kernel's speed. The
    packed weight is an opaque tensor that only this kernel reads: a decoding-only model."""

    def __init__(self, linear: nn.Linear, rows: int = 8):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # (out, in) in oneDNN's blocked layout; a buffer, so the model's bytes count it, but not saved
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows),
                             persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def pack_for_cpu(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a float32 model on an x86 CPU by a PackedLinear, in place (what
    generate.py and serve.py do before decoding; not with --compile, whose inductor packs for its
    own kernels). Each float matrix is freed once its packed copy exists; a tied head gets its own
    packed copy, and the embedding keeps the table. Other models are returned as they are."""
    linears = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and packs_for_cpu(child.weight)]  # exactly nn.Linear: not a LoRALinear
    for parent, name in linears:
        setattr(parent, name, PackedLinear(getattr(parent, name)))
    return model


def cpu_head(model: nn.Module) -> PackedLinear | None:
    """A packed copy of a plain GPT's float32 LM head on an x86 CPU, for decoding with next_logits;
    else None. One token at a time, the head is the largest matrix read per token (154 MB for GPT-2
    124M in float32), and the packed copy streams faster than nn.Linear's own (see PackedLinear).
    For models used for more than decoding (finetune_instruct's answers), which pack_for_cpu may
    not change. None for a model already packed, for an int8 head (Int8Linear) and for a compiled
    model, whose frozen head inductor packs for its own kernel."""
    if not isinstance(model, GPT) or model.config.num_classes is not None or type(model.lm_head) is not nn.Linear:
        return None
    return PackedLinear(model.lm_head) if packs_for_cpu(model.lm_head.weight) else None


def next_logits(model: nn.Module, ids: torch.Tensor, head: nn.Module | None, **kwargs) -> torch.Tensor:
    """The logits after the last position of ids (B, T) -> (B, V): model's own head, or `head` (see
    cpu_head) applied to model.hidden's last hidden states. kwargs are GPT.forward's
    (attention_mask, kv_cache, cache_positions)."""
    if head is None:
        return model(ids, last_only=True, **kwargs)[0][:, -1]
    return head(model.hidden(ids, **kwargs)[:, -1])  # (B, C) -> (B, V)


@torch.inference_mode()
def generate(model: GPT, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             stop_strings: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
             generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
             n_vocab: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) int64 on ids' device, up to max_new_tokens times.

    ids (B, T): the prompts; for prompts of different lengths, left-pad them and pass attention_mask
    (B, T) with 1 for real tokens (see left_pad). model may be a torch.compile'd GPT.
    A row finishes when it samples eos_id (which it yields) or when its generated text contains one
    of stop_strings (which needs decode, ids -> text; the row yields the token that completed it).
    Finished rows yield -1 until all rows are done, and then the generator ends. n_vocab: sample only
    ids below it, when the tokenizer has fewer tokens than the model has rows (Phi-2 pads its 50,295
    to 51,200). The other arguments are sample_next's."""
    check_sampling(temperature, top_k, top_p)
    if stop_strings and decode is None:
        raise ValueError("stop_strings need decode, a function from token ids to text")
    B, T = ids.shape
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(f"a prompt of {T} tokens plus {max_new_tokens} new tokens is longer than the "
                         f"model's context of {model.config.block_size} tokens")
    if max_new_tokens <= 0:
        return
    device = ids.device
    # One slot per token this call will feed the model: the prompt, then every new token but the last.
    cache = KVCache(model.config, B, T + max_new_tokens - 1, device, _compute_dtype(model, device))
    head = cpu_head(model)
    logits = next_logits(model, ids, head, attention_mask=attention_mask, kv_cache=cache,
                         cache_positions=torch.arange(T, device=device))  # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    streams = [TextStream(decode, stop_strings) for _ in range(B)] if stop_strings else []
    for step in range(max_new_tokens):
        next_ids = sample_next(logits[:, :n_vocab], temperature, top_k, top_p, generator)  # (B,)
        yield torch.where(done, -1, next_ids)
        if eos_id is not None:
            done |= next_ids == eos_id
        for row, stream in enumerate(streams):
            if not done[row]:
                stream.push(int(next_ids[row]))
                done[row] = stream.stopped
        if step == max_new_tokens - 1 or ((eos_id is not None or streams) and bool(done.all())):
            return
        # Finished rows keep decoding their own (ignored) tokens: simpler than shrinking the batch.
        logits = next_logits(model, next_ids[:, None], head, kv_cache=cache,
                             cache_positions=torch.tensor([T + step], device=device))


def compile_for_generation(model: GPT, device: torch.device) -> nn.Module:
    """torch.compile, set up for decoding on `device` (what generate.py --compile does).

    On a CPU, freezing makes the weights constants of the compiled graph, so inductor can pre-pack
    them for MKL's matmuls (plain compiling gains little), for more memory. Safe here: nothing
    trains. An int8 model there compiles with mode="max-autotune", the one mode in which inductor
    replaces the int8 kernel by its own C++ GEMM over a pre-packed copy of the int8 weights, which
    streams them from memory faster (tests/bench.py generate); autotuning adds some seconds to the
    first tokens."""
    if device.type != "cpu":
        return torch.compile(model)
    # Inductor reads freezing from its global config while it traces and compiles, which happens at the
    # first call and at each recompile, not here; passed as options={"freezing": True} (torch 2.13)
    # the int8 scales were left unfolded and the int8 GEMM failed to lower. So it is switched on for
    # the compiled model's calls only: left on, it would freeze every later compile, training too.
    int8 = any(isinstance(m, Int8Linear) for m in model.modules())
    compiled = torch.compile(model, mode="max-autotune" if int8 else None)
    compiled.register_forward_pre_hook(_freezing_on)
    compiled.register_forward_hook(_freezing_off, always_call=True)
    return compiled


def _freezing_on(module: nn.Module, args: tuple) -> None:
    torch._inductor.config.freezing = True


def _freezing_off(module: nn.Module, args: tuple, output) -> None:
    torch._inductor.config.freezing = False  # inductor's default



# ---------------------------------------------------------------------------------------------------
# Answering instructions: many prompts in batches, each answer ending where the model's turn ends

@torch.no_grad()
def answer(model: GPT, prompts: Sequence[Sequence[int]], tokenizer, template: Template, *,
           max_new_tokens: int, batch_size: int, device: torch.device, dtype: torch.dtype,
           temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
           on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """The model's answer to each prompt (token ids, BOS included), in the prompts' order.

    Prompts are answered in batches of similar length, left-padded (generate gives each row exactly
    the tokens it would get alone). An answer ends at the end token, at a header of the template
    (another turn beginning), or after max_new_tokens (fewer when the context runs out; a prompt
    longer than the context keeps its last tokens). on_text(i, piece) receives the text of prompt i
    as it becomes final (for streaming)."""
    model.eval()
    block_size = model.config.block_size
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        ids, mask = left_pad([list(prompts[i])[-(block_size - 1):] for i in index], tokenizer.eos_id, device)
        streams = [TextStream(tokenizer.decode, template.stops) for _ in index]
        with autocast(device, dtype):
            _decode_answers(model, ids, mask, streams, stop_ids(tokenizer, template),
                            min(max_new_tokens, block_size - ids.size(1)),
                            dict(temperature=temperature, top_k=top_k, generator=generator),
                            on_text and [functools.partial(on_text, i) for i in index])
        for stream, i in zip(streams, index):
            piece = stream.flush()  # '' after a stop string
            if on_text and piece:
                on_text(i, piece)
            answers[i] = stream.text.strip()
    return answers


def _decode_answers(model: GPT, ids: torch.Tensor, mask: torch.Tensor, streams: list[TextStream], stops: set[int],
                    max_new_tokens: int, sampling: dict, on_text: list[Callable[[str], None]] | None) -> None:
    """Decode one left-padded batch, ids and mask (B, T), pushing each row's tokens into its stream until
    the row samples a stop id or its stream meets a stop string; on_text[row](piece) gets the text as it
    becomes final. Decoding ends when every row has ended."""
    done = [False] * len(streams)
    for tokens in generate(model, ids, max_new_tokens, attention_mask=mask, **sampling):
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if token in stops:
                done[row] = True
                continue
            piece = streams[row].push(token)
            done[row] = streams[row].stopped
            if on_text and piece:
                on_text[row](piece)
        if all(done):
            return  # the rows that are left have all ended: stop decoding


# ---------------------------------------------------------------------------------------------------
# Command line

def read_prompts(stream) -> Iterator[str]:
    """The prompts typed or piped into stream, one per line until EOF; on a terminal, a '> ' cue first."""
    interactive = stream.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            return
        yield line.rstrip("\r\n")


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The ids a prompt's text is fed to the model as: the family's BOS (if it has one), then the text,
    where special-token text such as <|endoftext|> or </s> becomes its id. An empty prompt is an
    unconditional sample: it starts from the BOS, or for GPT-2, which has none, from <|endoftext|>."""
    ids = bos(tokenizer) + tokenizer.encode(prompt, allowed_special="all")
    return ids or [tokenizer.eot_token]


def new_tokens_for(prompt_length: int, block_size: int, asked: int | None) -> int:
    """How many tokens to generate after a prompt: --max-new-tokens if given (UserError if the context
    cannot hold them), else DEFAULT_NEW_TOKENS or the room the context leaves, whichever is fewer."""
    room = block_size - prompt_length
    if room < 1:
        raise UserError(f"the prompt has {prompt_length} tokens, which fills the model's context of {block_size} "
                        "tokens; shorten it")
    if asked is None:
        return min(DEFAULT_NEW_TOKENS, room)
    if asked > room:
        raise UserError(f"the prompt has {prompt_length} tokens, and with --max-new-tokens {asked} that exceeds "
                        f"the model's context of {block_size}")
    return asked


def generate_text(model: GPT, tokenizer, prompt: str, args: argparse.Namespace,
                  generator: torch.Generator, device: torch.device) -> dict:
    """Stream one sample for prompt to stdout (the prompt as typed, then the continuation); report counts
    on stderr."""
    ids = encode_prompt(tokenizer, prompt)
    block_size = model.config.block_size
    max_new_tokens = new_tokens_for(len(ids), block_size, args.max_new_tokens)
    if max(ids) >= model.config.vocab_size:
        raise UserError(f"the prompt has a token id of {max(ids)}, beyond this model's vocabulary "
                        f"of {model.config.vocab_size}")
    if args.max_new_tokens is None and max_new_tokens < DEFAULT_NEW_TOKENS:
        print(f"[note: the model's context of {block_size} tokens leaves room for {max_new_tokens} new tokens "
              f"after the prompt's {len(ids)}]", file=sys.stderr, flush=True)
    # The text is decoded after the prompt's ids, so that the first new word joins the prompt as the
    # tokenizer would join it; the stream, not generate(), watches for stop strings.
    text = TextStream(tokenizer.decode, args.stop, prefix=ids)
    eos_id = tokenizer.eos_id
    print(prompt, end="", flush=True)
    start = time.perf_counter()
    # When the first token arrived (prefill, and with --compile its compiling, done) and the second
    # (the first one-token step, which with --compile compiles a graph of its own).
    first = second = None
    n_new = 0
    for token in generate(model, torch.tensor([ids], device=device), max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=eos_id,
                          generator=generator, n_vocab=tokenizer.n_vocab):
        token = int(token)  # (1,) -> int; waits for the device, which streaming needs anyway
        n_new += 1
        if n_new == 1:
            first = time.perf_counter()
        elif n_new == 2:
            second = time.perf_counter()
        if token == eos_id:
            break
        print(text.push(token), end="", flush=True)
        if text.stopped:
            break
    print(text.flush(), flush=True)
    end = time.perf_counter()
    # The rate after the second token: what decoding sustains, without prefill or compile time.
    decode_tokens, decode_seconds = max(n_new - 2, 0), (end - second if second else 0.0)
    rate = f", then {decode_tokens / decode_seconds:.1f} tokens/s" if decode_tokens else ""
    print(f"[prompt {len(ids)} tokens; generated {n_new} tokens, the first after {first - start:.2f} s"
          f"{rate}]", file=sys.stderr, flush=True)
    return {"text": prompt + text.text, "prompt_tokens": len(ids), "new_tokens": n_new,
            "decode_tokens": decode_tokens, "decode_seconds": decode_seconds}


def probability(text: str) -> float:
    """An argparse type for --top-p: a number in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability in (0, 1]")
    return value


def stop_string(text: str) -> str:
    """An argparse type for --stop: any text but the empty string, which would stop every sample at once."""
    if not text:
        raise argparse.ArgumentTypeError("an empty stop string would end every sample before it starts; give "
                                         "some text")
    return text


def seed(text: str) -> int:
    """An argparse type for --seed: a whole number that torch's generators accept, 0 to 2^63 - 1."""
    value = non_negative_int(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed below 2^63")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_init_args(p, "gpt2", what="the model to sample from")
    p.add_argument("--prompt", default=None,
                   help="text to continue ('' for an unconditional sample); without it, one prompt per line of stdin")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help=f"tokens to generate per sample; by default {DEFAULT_NEW_TOKENS}, or fewer when the model's "
                        "context leaves less room after the prompt (a note then says how many)")
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 is greedy; higher is more random")
    p.add_argument("--top-k", type=positive_int, default=200, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=probability, default=None,
                   help="sample among the most likely tokens whose probability adds up to p only")
    p.add_argument("--stop", type=stop_string, action="append", default=[],
                   help="stop a sample when its text contains this string (not printed); repeatable; "
                        "in bash, --stop $'\\n' stops at the end of a line")
    p.add_argument("--seed", type=seed, default=SEED)
    p.add_argument("--num-samples", type=positive_int, default=1, help="samples per prompt, one after another")
    add_device_args(p, dtype_help="weights and compute (bfloat16 halves the weights' memory, on a CPU too)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: every matrix stored as int8 with one scale per output channel, a quarter of "
                        "float32's memory (a 7B model in about 8 GB); --dtype sets the rest. Default: none")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model: the first tokens wait for compiling, the rest come faster on a "
                        "GPU, and on a CPU with --quantize int8 (frozen, autotuned weights: about twice int8's "
                        "memory); on a CPU in float32 the uncompiled packed weights are as fast or faster")
    args = p.parse_args(argv)
    check_preset(p, args.init, args.preset)
    return args


def main(args: argparse.Namespace) -> dict:
    device, dtype = device_and_dtype(args.device, args.dtype)
    if args.compile and (why := missing_compiler(device)):
        raise UserError(why)
    torch.manual_seed(args.seed)  # makes --init random reproducible too
    model, card = load_for_generation(args.init, preset=args.preset, device=device, dtype=dtype,
                                       quantize=args.quantize)
    if model.config.num_classes is not None:
        raise UserError(f"{args.init} is a classifier with {model.config.num_classes} classes; it cannot generate text")
    tokenizer = tokenizer_for(card)
    model.eval()
    model = compile_for_generation(model, device) if args.compile else pack_for_cpu(model)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompts = [args.prompt] if args.prompt is not None else read_prompts(sys.stdin)
    samples = []
    for prompt in prompts:
        for _ in range(args.num_samples):
            samples.append(generate_text(model, tokenizer, prompt, args, generator, device))
    decoded = sum(s["decode_tokens"] for s in samples)  # tokens after each sample's second
    seconds = sum(s["decode_seconds"] for s in samples)
    return {"samples": [s["text"] for s in samples], "new_tokens": sum(s["new_tokens"] for s in samples),
            "tokens_per_second": decoded / seconds if decoded else 0.0}


if __name__ == "__main__":
    run_stage(main, parse_args)
