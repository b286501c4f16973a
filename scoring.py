"""Scoring an instruction model's answers against the reference: ROUGE-L F1 (as Google's rouge-score
computes it), exact match, and the book's judge prompt with the parsing of the judge's reply.

    from scoring import rouge_l, exact_match
    rouge_l("The sky is blue.", "the sky is blue")  # 1.0

evaluate.py (answers) and rag.py (compare) score with these, so their figures mean the same thing.
"""
import re
from collections.abc import Sequence

from templates import alpaca_prompt


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer without stemming: lower case, and every run of characters other
    than a-z and 0-9 separates tokens (so accented letters and non-Latin text separate too)."""
    return [token for token in re.split(r"[^a-z0-9]+", text.lower()) if token]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming one row at a time."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(reference: str, response: str) -> float:
    """ROUGE-L F1 as rouge-score computes it: precision = LCS / response tokens, recall = LCS / reference
    tokens, their harmonic mean; 0 when either text has no tokens."""
    ref, hyp = rouge_tokens(reference), rouge_tokens(response)
    if not ref or not hyp:
        return 0.0
    lcs = lcs_length(ref, hyp)
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def exact_match(reference: str, response: str) -> bool:
    """The response is the reference, but for whitespace at either end."""
    return response.strip() == reference.strip()


RESPONSE_HEADER = "\n\n### Response:\n"


def judge_prompt(entry: dict) -> str:
    """The scoring prompt of "LLMs from scratch", ch. 7: the entry in the Alpaca format (the book's
    format_input), the reference output and the model's response, and a request for an integer 0-100."""
    entry_text = alpaca_prompt(entry["instruction"], entry.get("input", ""))
    assert entry_text.endswith(RESPONSE_HEADER), "the Alpaca prompt ends with its response header"
    return (f"Given the input `{entry_text.removesuffix(RESPONSE_HEADER)}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{entry['model_response']}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def parse_score(reply: str) -> float | None:
    """The first number in the judge's reply, if it is on the 0-100 scale; None otherwise (no guessing)."""
    found = re.search(r"-?\d+(?:\.\d+)?", reply)
    if found is None:
        return None
    value = float(found.group())
    return value if 0 <= value <= 100 else None
