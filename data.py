"""Data input for finetuning on instructions: the book's {"instruction", "input", "output"} entries
(read, checked and split 85/10/5 as the book splits them), each entry turned into token ids through a
prompt template, and the padded batches a training step takes.

    from data import default_data, load_entries, split_entries
    splits = split_entries(load_entries(default_data()))  # 935 train, 110 test, 55 validation
"""
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from common import UserError
from download import DownloadError, fetch
from model import IGNORE
from templates import Template, encode_template_text, prompt_ids


DATA_RELPATH = "instruct/instruction-data.json"  # the book's 1,100 entries, one of tokenizer.KNOWN_FILES
SPLIT = (0.85, 0.10)  # train, test fractions; validation gets the rest: 935 / 110 / 55 of the default data


def read_records(text: str, source: str, objects_only: bool = True) -> list[tuple[int, dict]]:
    """The objects of a JSON list or of JSONL (one object per line), each with the line it starts on, so
    that a message can name it. Anything else is a UserError naming the source and the line.
    objects_only=False: any JSON value is a record (rag.py indexes strings as well as objects)."""
    text = text.removeprefix("\ufeff")  # a byte-order mark, as some editors write
    records = []
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source} line {e.lineno} is not valid JSON ({e.msg})") from None
        # json.loads gives no positions; decoding the list one element at a time does.
        decoder, space = json.JSONDecoder(), re.compile(r"[ \t\n\r,]*")
        pos, line, counted = text.index("[") + 1, 1, 0
        while True:
            pos = space.match(text, pos).end()
            if text[pos] == "]":
                break
            line += text.count("\n", counted, pos)
            counted = pos
            value, pos = decoder.raw_decode(text, pos)
            records.append((line, value))
    else:
        for number, row in enumerate(text.split("\n"), 1):
            if row.strip():
                try:
                    records.append((number, json.loads(row)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{source} line {number} is not valid JSON ({e.msg}); write one object per "
                                    f"line (JSONL) or one JSON list") from None
    for line, record in records:
        if objects_only and not isinstance(record, dict):
            raise UserError(f"{source} line {line} holds a JSON {type(record).__name__}, not an object with fields")
    return records


def parse_entries(text: str, source: str) -> list[dict]:
    """The entries of a JSON list or of JSONL, each checked: instruction and output are non-empty
    strings, input a string (empty, or missing, when there is none). Other fields stay."""
    entries = []
    for i, (line, entry) in enumerate(read_records(text, source)):
        name = f"{source} entry {i} (line {line})"
        if entry.get("input") is None:
            entry["input"] = ""
        for field in ("instruction", "input", "output"):
            if field not in entry:
                raise UserError(f"{name} has no {field!r}")
            if not isinstance(entry[field], str):
                raise UserError(f"{name} has a {type(entry[field]).__name__} as its {field!r}, not a string")
            if field != "input" and not entry[field].strip():
                raise UserError(f"{name} has an empty {field!r}")
        entries.append(entry)
    return entries


def load_entries(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"--data {path} does not exist" if not path.exists() else f"--data {path} is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (bad byte at offset {e.start})") from None
    entries = parse_entries(text, str(path))
    if len(entries) < 10:
        raise UserError(f"{path} holds {len(entries)} entries; splitting into train, test and validation "
                        f"needs at least 10")
    return entries


def default_data() -> Path:
    """The book's instruction-data.json, downloaded once into the cache."""
    try:
        return fetch(DATA_RELPATH)
    except DownloadError as e:
        raise DownloadError(f"{e}; or pass --data with a local copy of instruction-data.json") from None


def split_entries(entries: list[dict]) -> dict[str, list[dict]]:
    """The book's split, unshuffled: the first 85 % train, the next 10 % test, the rest validation."""
    n_train, n_test = int(len(entries) * SPLIT[0]), int(len(entries) * SPLIT[1])
    return {"train": entries[:n_train], "test": entries[n_train:n_train + n_test],
            "val": entries[n_train + n_test:]}


@dataclasses.dataclass
class Example:
    ids: list[int]  # prompt + response + end token, cut to --max-length + 1 (inputs and targets of max_length)
    prompt_len: int  # tokens of the prompt (BOS included)


def make_example(tokenizer, template: Template, entry: dict, max_length: int) -> tuple[Example, bool]:
    """An entry as the model learns it, and whether it was cut to max_length.

    The prompt and the response are encoded separately (as Mistral's own tokenizer does), so the
    prompt's tokens are exactly those the model answers from later."""
    prompt = prompt_ids(tokenizer, template, entry["instruction"], entry["input"])
    response = tokenizer.encode_ordinary(entry["output"])
    if template.response_end:
        response += encode_template_text(tokenizer, template.response_end, template)
    ids = prompt + response + [tokenizer.eos_id]
    return Example(ids[:max_length + 1], len(prompt)), len(ids) - 1 > max_length


def collate(examples: Sequence[Example], pad_id: int, mask_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T), padded on the right to this batch's longest example.

    Targets are the inputs shifted by one: an example's last target is its end token, and every
    padding position is IGNORE, so padding never counts in the loss (and, on the right under causal
    attention, it is never seen by a real token either). mask_prompt also sets IGNORE where the next
    token is still the prompt's, so only the response (and the end token) is learned."""
    T = max(len(e.ids) - 1 for e in examples)
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids)
        inputs[row, :len(ids) - 1] = ids[:-1]
        targets[row, :len(ids) - 1] = ids[1:]
        if mask_prompt:
            targets[row, :e.prompt_len - 1] = IGNORE  # position i predicts token i + 1
    return inputs, targets


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                           pool_batches: int = 32) -> list[list[int]]:
    """One epoch's batches of example indices, examples of similar length together.

    A fresh random order is cut into pools of pool_batches * batch_size examples; each pool is sorted
    by length and cut into batches; then the batches are shuffled. Every example is seen once per
    epoch in a random batch of its pool, and a batch holds little padding (on the default data, 1.4 %
    of its tokens against 23 % for random batches)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), pool_batches * batch_size):
        pool = sorted(order[start:start + pool_batches * batch_size], key=lambda i: lengths[i])
        batches += [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def random_batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def degenerate_answers(responses: Sequence[str]) -> dict[str, int]:
    """How many answers are empty (or only white space) and how many repeat one word over and over (at
    least three times, or one character run such as '!!!!'): what an untrained model writes, and what
    makes a score of 0 mean "no answers" rather than "wrong answers"."""
    empty = repeating = 0
    for response in responses:
        words = response.split()
        if not words:
            empty += 1
        elif (len(words) >= 3 and len(set(words)) == 1) or (len(words) == 1 and len(set(words[0])) == 1
                                                             and len(words[0]) >= 3):
            repeating += 1
    return {"empty": empty, "repeating": repeating}


def degenerate_note(counts: dict[str, int], n: int, advice: str) -> str | None:
    """One sentence saying how many of n answers are empty or repeat one word, with advice; None if none."""
    if not counts["empty"] and not counts["repeating"]:
        return None
    parts = [f"{counts['empty']} of {n} answers are empty"] if counts["empty"] else []
    parts += [f"{counts['repeating']} of {n} repeat one word"] if counts["repeating"] else []
    return f"note: {' and '.join(parts)}; {advice}"

