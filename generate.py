"""Text generation: sampling from logits, KV-cached decoding that streams tokens, and a command line.

    python generate.py --init gpt2 --prompt "Every effort moves you"

`generate()` runs the prompt through the model once (prefill), then feeds one new token at a time
through a KV cache, so each step costs one token's worth of compute instead of the whole sequence's.
It yields tokens as they are sampled and stops at an end-of-text token or a stop string. Prompts of
different lengths share a batch by left padding plus an attention mask; each row then gets exactly
the tokens it would get alone. Other stages import `sample_next`, `generate` and `left_pad`.
"""
import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from load_gpt2 import load_model
from model import DTYPES, GPT, KVCache, device_and_dtype
from tokenizer import UserError, get_tokenizer, run_stage


# ---------------------------------------------------------------------------------------------------
# Sampling: logits (B, V) -> one token id per row

def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError, naming the setting, for sampling settings that mean nothing."""
    if temperature < 0:
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
    before it and `stopped` turns True."""

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()):
        self.decode = decode
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
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
        text = self.decode(self.ids)
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
    """The dtype keys and values come out in: autocast's if it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


@torch.inference_mode()
def generate(model: GPT, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             stop_strings: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
             generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) int64 on ids' device, up to max_new_tokens times.

    ids (B, T): the prompts; for prompts of different lengths, left-pad them and pass attention_mask
    (B, T) with 1 for real tokens (see left_pad). model may be a torch.compile'd GPT.
    A row finishes when it samples eos_id (which it yields) or when its generated text contains one
    of stop_strings (which needs decode, ids -> text; the row yields the token that completed it).
    Finished rows yield -1 until all rows are done, and then the generator ends. The other arguments
    are sample_next's."""
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
    # One token at a time, the LM head is the largest matrix read per token (154 MB for GPT-2 124M in
    # fp32), and CPU matmul kernels stream it much faster as (C, V) than in nn.Linear's (V, C) layout
    # (MKL here: 8 ms against 14 ms per token). So on a CPU we decode with a transposed copy of it;
    # GPUs read both layouts at full speed and keep their memory.
    head_t = None
    if device.type == "cpu" and model.config.num_classes is None:
        head_t = model.lm_head.weight.t().contiguous()  # (C, V)
    logits, _ = model(ids, attention_mask=attention_mask, kv_cache=cache,
                      cache_positions=torch.arange(T, device=device), last_only=True, head_t=head_t)  # (B, 1, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    streams = [TextStream(decode, stop_strings) for _ in range(B)] if stop_strings else []
    for step in range(max_new_tokens):
        next_ids = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
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
        logits, _ = model(next_ids[:, None], kv_cache=cache,
                          cache_positions=torch.tensor([T + step], device=device), last_only=True, head_t=head_t)


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


def generate_text(model: GPT, tokenizer, prompt: str, args: argparse.Namespace,
                  generator: torch.Generator, device: torch.device) -> dict:
    """Stream one sample for prompt to stdout (prompt, then continuation); report counts on stderr."""
    # GPT-2's unconditional samples start from <|endoftext|>; a prompt may contain it too.
    prompt_ids = tokenizer.encode(prompt, allowed_special={"<|endoftext|>"}) or [tokenizer.eot_token]
    max_new_tokens = args.max_new_tokens
    if len(prompt_ids) + max_new_tokens > model.config.block_size:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens, and with --max-new-tokens "
                        f"{max_new_tokens} that exceeds the model's context of {model.config.block_size}")
    if max(prompt_ids) >= model.config.vocab_size:
        raise UserError(f"the prompt has a token id of {max(prompt_ids)}, beyond this model's vocabulary "
                        f"of {model.config.vocab_size}")
    text = TextStream(tokenizer.decode, args.stop)
    print(prompt, end="", flush=True)
    start = time.perf_counter()
    first = None  # when the first token arrived: prefill (and with --compile, compiling) is done
    n_new = 0
    ids = torch.tensor([prompt_ids], device=device)
    for token in generate(model, ids, max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, eos_id=tokenizer.eot_token, stop_strings=args.stop,
                          decode=tokenizer.decode, generator=generator):
        token = int(token)  # (1,) -> int; waits for the device, which streaming needs anyway
        first = first or time.perf_counter()
        n_new += 1
        if token == tokenizer.eot_token:
            break
        print(text.push(token), end="", flush=True)
    print(text.flush(), flush=True)
    end = time.perf_counter()
    # The rate after the first token: what decoding sustains, without prefill or compile time.
    rate = f", then {(n_new - 1) / (end - first):.1f} tokens/s" if n_new > 1 else ""
    print(f"[prompt {len(prompt_ids)} tokens; generated {n_new} tokens, the first after {first - start:.2f} s"
          f"{rate}]", file=sys.stderr, flush=True)
    return {"text": prompt + text.text, "prompt_tokens": len(prompt_ids), "new_tokens": n_new,
            "decode_seconds": end - first}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", default="gpt2",
                   help="GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a checkpoint of our stages, "
                        "a Hugging Face folder or model.safetensors, or 'random' (with --preset)")
    p.add_argument("--preset", default=None, help="model size for --init random, e.g. tiny, mini, gpt2")
    p.add_argument("--prompt", default=None, help="text to continue; without it, one prompt per line of stdin")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; higher is more random")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens whose probability adds up to p only")
    p.add_argument("--stop", action="append", default=[],
                   help="stop a sample when its text contains this string (not printed); repeatable; "
                        "in bash, --stop $'\\n' stops at the end of a line")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt, one after another")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights and compute; auto is bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model: the first tokens wait for compiling, the rest come faster "
                        "(on CPU with frozen weights, which takes more memory)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UserError(f"--{e}") from None
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise UserError("--max-new-tokens and --num-samples must be at least 1")
    device, dtype = device_and_dtype(args.device, args.dtype)
    tokenizer = get_tokenizer()  # first: a missing tokenizer file should not wait for a model load
    torch.manual_seed(args.seed)  # makes --init random reproducible too
    model, _ = load_model(args.init, preset=args.preset, device=device, dtype=dtype)
    if model.config.num_classes is not None:
        raise UserError(f"{args.init} is a classifier with {model.config.num_classes} classes; it cannot generate text")
    model.eval()
    if args.compile:
        if device.type == "cpu":
            # Freezing makes the weights constants of the compiled graph, so inductor can pre-pack
            # them for MKL's matmuls: GPT-2 124M decodes ~1.3x faster than eager on a 2-core CPU
            # (plain compiling: ~1x), for ~2.5x the weights' memory. Safe here: nothing trains.
            torch._inductor.config.freezing = True
        model = torch.compile(model)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompts = [args.prompt] if args.prompt is not None else read_prompts(sys.stdin)
    samples = []
    for prompt in prompts:
        for _ in range(args.num_samples):
            samples.append(generate_text(model, tokenizer, prompt, args, generator, device))
    decoded = sum(s["new_tokens"] - 1 for s in samples)  # tokens after each sample's first
    seconds = sum(s["decode_seconds"] for s in samples)
    return {"samples": [s["text"] for s in samples], "new_tokens": sum(s["new_tokens"] for s in samples),
            "tokens_per_second": decoded / seconds if decoded else 0.0}


if __name__ == "__main__":
    run_stage(main, parse_args)
