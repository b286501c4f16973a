"""Prompt templates: the text around an instruction, as each model family was taught to read it
(the book's Alpaca format, Mistral's [INST] turns, Phi-3's chat markers), and the token ids that end
an answer.

    from templates import TEMPLATES, prompt_ids
    ids = prompt_ids(tokenizer, TEMPLATES["alpaca"], "Name three primary colors.")
"""
import dataclasses
from collections.abc import Callable

from tokenizer_base import bos


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    prompt: Callable[[str, str], str]  # (instruction, input) -> the text the response follows
    response_end: str  # written after the response, before the end token ('' for most)
    stops: tuple[str, ...]  # headers that begin another turn: an answer ends before any of them
    special: bool  # the markers are the tokenizer's special tokens (written as their text, e.g. <|end|>)


def alpaca_prompt(instruction: str, input: str) -> str:
    """The book's format_input, plus the response header its training text adds."""
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            f"the request.\n\n### Instruction:\n{instruction}")
    return text + (f"\n\n### Input:\n{input}" if input else "") + "\n\n### Response:\n"


def user_message(instruction: str, input: str) -> str:
    """One chat turn holding both fields; chat formats have no slot of their own for an input."""
    return f"{instruction}\n\n{input}" if input else instruction


def mistral_prompt(instruction: str, input: str) -> str:
    # Mistral's v1 format (7B v0.1/v0.2): BOS + encode("[INST] message [/INST]") + encode(answer) + EOS.
    return f"[INST] {user_message(instruction, input)} [/INST]"


def phi3_prompt(instruction: str, input: str) -> str:
    # Phi-3's chat template: '<|user|>\n' + message + '<|end|>\n', then '<|assistant|>\n' + answer + '<|end|>\n'.
    return f"<|user|>\n{user_message(instruction, input)}<|end|>\n<|assistant|>\n"


TEMPLATES = {
    "alpaca": Template("alpaca", alpaca_prompt, "", ("### Instruction:", "### Input:", "### Response:"), False),
    "mistral": Template("mistral", mistral_prompt, "", ("[INST]", "[/INST]"), False),
    "phi3": Template("phi3", phi3_prompt, "<|end|>\n", ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>",
                                                         "<|endoftext|>"), True),
}


FAMILY_TEMPLATES = {"mistral": "mistral", "phi3": "phi3"}  # model_type -> its own; any other: alpaca


def default_template(card: dict) -> str:
    """The template a model was finetuned with (our checkpoints record it), else its family's own."""
    return card.get("template") or FAMILY_TEMPLATES.get(card["model_type"], "alpaca")


def encode_template_text(tokenizer, text: str, template: Template) -> list[int]:
    """Text that contains the template's markers: special markers become their special ids."""
    return tokenizer.encode(text, allowed_special="all") if template.special else tokenizer.encode_ordinary(text)


def prompt_ids(tokenizer, template: Template, instruction: str, input: str = "") -> list[int]:
    return bos(tokenizer) + encode_template_text(tokenizer, template.prompt(instruction, input), template)


def stop_ids(tokenizer, template: Template) -> set[int]:
    """The end token, and each stop header that the tokenizer holds as one special token."""
    ids = {tokenizer.eos_id}
    for header in template.stops:
        special = encode_template_text(tokenizer, header, template)
        if len(special) == 1 and special != tokenizer.encode_ordinary(header):
            ids.add(special[0])
    return ids
