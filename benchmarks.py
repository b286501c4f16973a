"""Evaluation items, read and checked: multiple-choice questions in three layouts (plain JSONL, MMLU's
CSV, HellaSwag's JSONL) and instruction data, from a file, a folder or a glob. Anything wrong is one
sentence naming the file, the line and the field.

    from benchmarks import load_questions
    items = load_questions("astronomy_test.csv")  # Item(question, options, answer, subject ...) each
"""
import csv
import dataclasses
import io
import json
import re
from pathlib import Path

from common import UserError
from data import read_records
from tokenizer import corpus_files, read_text


def load_records(path: Path) -> list[tuple[int, dict]]:
    """The objects of a JSON list or a JSONL file, each with the line it starts on (for messages)."""
    text = read_text(path)
    if not text.strip():
        raise UserError(f"{path} is empty")
    records = read_records(text, str(path))
    if not records:
        raise UserError(f"{path} holds no records")
    return records


LAYOUTS = ("plain", "mmlu", "hellaswag", "instruction")
MMLU_LETTERS = "ABCD"


@dataclasses.dataclass
class Item:
    """One evaluation item: its text fields (what contamination looks for) and, for a multiple-choice
    item, the question, its options and the index of the right one."""
    where: str  # "FILE line N", for messages
    layout: str  # one of LAYOUTS
    texts: list[str]  # every text field as written in the file
    question: str = ""  # as the model reads it (HellaSwag: the harness's cleaned-up query)
    options: list[str] = dataclasses.field(default_factory=list)
    answer: int = -1
    subject: str = ""  # MMLU: from the file name


def field(record: dict, name: str, kind: type, where: str):
    """record[name], which must exist and be of `kind`; else one sentence naming where and the field."""
    if name not in record:
        raise UserError(f"{where} has no field {name!r} (its fields: {', '.join(record) or 'none'})")
    value = record[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        wanted = {str: "a string", list: "a list", int: "a whole number"}[kind]
        raise UserError(f"{where}: field {name!r} should be {wanted}, not {json.dumps(value)[:60]}")
    return value


def option_list(record: dict, name: str, where: str) -> list[str]:
    options = field(record, name, list, where)
    if len(options) < 2:
        raise UserError(f"{where}: field {name!r} has {len(options)} choice(s); a question needs at least 2")
    for i, option in enumerate(options):
        if not isinstance(option, str) or not option.strip():
            raise UserError(f"{where}: field {name!r}, choice {i}, is {json.dumps(option)[:60]}, not a non-empty string")
    return options


def answer_index(value, n_options: int, name: str, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():  # HellaSwag writes its label as a string
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_options:
        raise UserError(f"{where}: field {name!r} is {json.dumps(value)[:40]}, not the index of one of its "
                        f"{n_options} choices (0 to {n_options - 1})")
    return value


def hellaswag_clean(text: str) -> str:
    """The harness's preprocessing of HellaSwag text: WikiHow's bracketed markers ('[title]', '[step]')
    removed, double spaces closed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def record_item(record: dict, layout: str, where: str) -> Item:
    if layout == "plain":
        question, options = field(record, "question", str, where), option_list(record, "choices", where)
        if "answer" not in record:
            raise UserError(f"{where} has no field 'answer' (its fields: {', '.join(record)})")
        return Item(where, layout, [question, *options], question, options,
                    answer_index(record["answer"], len(options), "answer", where))
    if layout == "hellaswag":
        endings = option_list(record, "endings", where)
        if "ctx_a" in record and "ctx_b" in record:  # the dataset's own files: the harness's query
            raw = [field(record, "ctx_a", str, where), field(record, "ctx_b", str, where)]
            context = raw[0] + " " + raw[1].capitalize()
        else:
            raw = [field(record, "ctx", str, where)]
            context = raw[0]
        if isinstance(record.get("activity_label"), str):
            context = record["activity_label"] + ": " + context
        if "label" not in record:
            raise UserError(f"{where} has no field 'label' (HellaSwag's test split has no answers; use its "
                            f"validation split)")
        return Item(where, layout, [*raw, *endings], hellaswag_clean(context), [hellaswag_clean(e) for e in endings],
                    answer_index(record["label"], len(endings), "label", where))
    texts = [field(record, "instruction", str, where), field(record, "output", str, where)]
    if "input" in record:
        texts.insert(1, field(record, "input", str, where))
    return Item(where, layout, texts)


def detect_layout(path: Path, first: dict, line: int) -> str:
    if "endings" in first:
        return "hellaswag"
    if "choices" in first:
        return "plain"
    if "instruction" in first:
        return "instruction"
    raise UserError(f"{path} line {line} has the fields {', '.join(first) or 'none'}, which match no known layout "
                    f"(plain: question, choices, answer; HellaSwag: ctx, endings, label; instruction data: "
                    f"instruction, input, output); fix the file or name its layout with --layout")


def mmlu_subject(path: Path) -> str:
    """'high_school_physics_test.csv' -> 'high school physics', as the harness names MMLU's subjects."""
    stem = path.stem
    for split in ("_test", "_dev", "_val"):
        stem = stem.removesuffix(split)
    return stem.replace("_", " ")


def read_mmlu(path: Path) -> list[Item]:
    """MMLU's CSV files: no header; question, the four options A-D, and the answer's letter."""
    subject, items, line = mmlu_subject(path), [], 0
    reader = csv.reader(io.StringIO(read_text(path).removeprefix("\ufeff"), newline=""))
    try:
        for row in reader:
            where, line = f"{path} line {line + 1}", reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != 6:
                raise UserError(f"{where} has {len(row)} columns, not MMLU's 6 (question, options A-D, answer letter)")
            letter = row[5].strip()
            if letter not in tuple(MMLU_LETTERS):
                raise UserError(f"{where}: the answer (column 6) is {letter!r}, not one of A, B, C, D")
            for column, option in enumerate(row[1:5], 2):
                if not option.strip():
                    raise UserError(f"{where}: option {MMLU_LETTERS[column - 2]} (column {column}) is empty")
            items.append(Item(where, "mmlu", row[:5], row[0], row[1:5], MMLU_LETTERS.index(letter), subject))
    except csv.Error as e:
        raise UserError(f"{path} line {reader.line_num} is not valid CSV ({e})") from None
    return items


def load_items(source: str | Path, layout: str | None = None) -> list[Item]:
    """Every item of a file, folder or glob (files in sorted order), in file order: the order that
    contamination's indices and --exclude refer to. layout None: MMLU for .csv, else from the fields."""
    items = []
    for path in corpus_files(source):
        if layout == "mmlu" or (layout is None and path.suffix.lower() == ".csv"):
            found = read_mmlu(path)
        else:
            records = load_records(path)
            file_layout = layout or detect_layout(path, records[0][1], records[0][0])
            found = [record_item(record, file_layout, f"{path} line {line}") for line, record in records]
        if not found:
            raise UserError(f"{path} holds no items")
        items += found
    return items


def load_questions(source: str | Path, layout: str | None = None) -> list[Item]:
    items = load_items(source, layout)
    for item in items:
        if item.layout == "instruction":
            raise UserError(f"{item.where} is instruction data, not a multiple-choice question; choice and "
                            f"memorization read plain, MMLU or HellaSwag items")
    return items
