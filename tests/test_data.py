"""Corpora (corpus.py): text reading, corpus preparation into token files for any tokenizer, the
checks on a prepared folder, window sampling."""
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from common import UserError
from corpus import load_token_folder, prepare_corpus, read_text, sample_windows
from tokenizer import get_tokenizer, load_tokenizer
from tokenizer_base import bos



FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer("tiktoken")


# -- reading text ------------------------------------------------------------------------------

def test_bad_utf8_names_the_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"hello \xff world")
    with pytest.raises(UserError, match=r"latin1\.txt .*offset 6"):
        read_text(path)
    assert read_text(path, errors="replace") == "hello \ufffd world"


def test_unreadable_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="is a folder"):
        read_text(tmp_path)


# -- token files -------------------------------------------------------------------------------

def tokens_of(out_dir, dtype=np.uint16) -> list[int]:
    return np.concatenate([np.fromfile(out_dir / name, dtype=dtype) for name in ("train.bin", "val.bin")]).tolist()


@pytest.mark.needs_files("text/tinyshakespeare.txt")
def test_prepare_matches_encoding_the_whole_file(tmp_path, enc, offline_cache):
    source = offline_cache / "text" / "tinyshakespeare.txt"
    result = prepare_corpus(source, tmp_path, tokenizer=enc, val_fraction=0.1, num_threads=2, block_bytes=1 << 16)
    expected = enc.encode_ordinary(read_text(source)) + [enc.eot_token]
    assert tokens_of(tmp_path) == expected
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta == {"vocab_size": 50257, "dtype": "uint16", "eot_token": 50256, "bos_id": None, "eos_id": 50256,
                    "tokenizer_name": "gpt2", "train_tokens": len(expected) - len(expected) // 10,
                    "val_tokens": len(expected) // 10, "sources": [str(source)]}
    assert result["bytes"] == source.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_block_splits_do_not_change_the_tokens(tmp_path, enc):
    # Blocks of a few bytes cut through multi-byte characters, whitespace runs and lines.
    fragments = ["word", " ", "  ", "\n", "\n\n", " \n", "\t", "\r\n", "é", "🤖", "日本語", "'s", "123", "!!",
                 "e\u0301", "\u00a0", "\u3000", "\x85", "\x1c", "\u2028"]
    rng = random.Random(0)
    text = "".join(rng.choice(fragments) for _ in range(3000))
    (tmp_path / "mixed.txt").write_text(text, encoding="utf-8")
    for block_bytes in (1, 7, 64):
        out = tmp_path / f"out{block_bytes}"
        prepare_corpus(tmp_path / "mixed.txt", out, val_fraction=0.0, block_bytes=block_bytes, tokenizer=enc)
        assert tokens_of(out) == enc.encode_ordinary(text) + [enc.eot_token], block_bytes


def test_prepare_folder_and_glob_make_one_document_per_file(tmp_path, enc):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("First document.")
    (corpus / "sub" / "b.txt").write_text("Second one\n")
    (corpus / ".hidden").write_text("skipped")
    expected = [*enc.encode("First document."), enc.eot_token, *enc.encode("Second one\n"), enc.eot_token]
    result = prepare_corpus(corpus, tmp_path / "folder", val_fraction=0.0, tokenizer=enc)
    assert tokens_of(tmp_path / "folder") == expected
    assert result["sources"] == [str(corpus / "a.txt"), str(corpus / "sub" / "b.txt")]
    prepare_corpus(str(corpus / "**" / "*.txt"), tmp_path / "glob", val_fraction=0.0, tokenizer=enc)
    assert tokens_of(tmp_path / "glob") == expected


def test_prepare_progress_counts_every_file(tmp_path, enc, capsys):
    # The progress line's last total is every token written, the last file's included.
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("Tokens to count, file by file.\n" * 50)
    result = prepare_corpus(str(tmp_path / "*.txt"), tmp_path / "out", tokenizer=enc)
    shown = re.findall(r"([\d,]+) tokens", capsys.readouterr().err)[-1]
    assert int(shown.replace(",", "")) == result["train_tokens"] + result["val_tokens"] > 100


def test_prepare_errors(tmp_path, enc):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="holds no text"):
        prepare_corpus(tmp_path / "empty.txt", tmp_path / "out", tokenizer=enc)
    with pytest.raises(UserError, match="holds no files"):
        prepare_corpus(tmp_path / "nothing", tmp_path / "out", tokenizer=enc)
    with pytest.raises(UserError, match="no files match"):
        prepare_corpus(str(tmp_path / "*.md"), tmp_path / "out", tokenizer=enc)
    with pytest.raises(UserError, match="does not exist"):
        prepare_corpus(tmp_path / "missing.txt", tmp_path / "out", tokenizer=enc)
    assert list((tmp_path / "out").iterdir()) == []  # nothing half-written


def test_prepare_names_the_bad_byte_in_a_later_block(tmp_path, enc):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"a" * 10_000 + b"\xff tail")
    with pytest.raises(UserError, match=r"bad\.txt .*offset 10000"):
        prepare_corpus(path, tmp_path / "out", block_bytes=4096, tokenizer=enc)
    assert list((tmp_path / "out").iterdir()) == []
    result = prepare_corpus(path, tmp_path / "out", errors="replace", block_bytes=4096, tokenizer=enc)
    assert result["train_tokens"] + result["val_tokens"] > 1


def test_sample_windows():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = sample_windows(tokens, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # the tokens count up, so the next token is always x + 1
    again, _ = sample_windows(tokens, 4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    assert sample_windows(tokens, 64, 99, torch.Generator())[1].max().item() == 99  # the last token is reachable


def test_too_few_tokens_for_a_window():
    with pytest.raises(UserError, match="too few for one window"):
        sample_windows(np.arange(8, dtype=np.uint16), 1, 8, torch.Generator())


# -- other tokenizers, wider ids, and checked folders ----------------------------------------------------

MIXED_FRAGMENTS = ["word", " ", "  ", "\n", "\n\n", " \n", "\t", "\r\n", "é", "🤖", "日本語", "'s", "123", "!!",
                   "e\u0301", "\u00a0", "\u3000", "\x85", "\u2028", "<s>", "</s>", "\u2581", "Ａ", "ﬁ"]


def mixed_text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(MIXED_FRAGMENTS) for _ in range(n))


@pytest.mark.parametrize("name", ["sp_nmt_nfkc.model", "sp_identity.model", "sp_nfkc_cf_suffix.model", "llama3_style"])
def test_prepare_with_another_tokenizer_gives_bos_ids_eos_per_document(tmp_path, name):
    tok = load_tokenizer(FIXTURES / name)
    docs = [mixed_text(0, 3000), "  Second   document.\nWith lines.\n\n", mixed_text(1, 500)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(docs):
        (corpus / f"{i}.txt").write_text(doc, encoding="utf-8")
    expected = [i for doc in docs for i in [*bos(tok), *tok.encode_ordinary(doc), tok.eos_id]]
    for block_bytes in (16, 700, 1 << 20):  # blocks cut through characters, lines and the dummy prefix
        out = tmp_path / f"out{block_bytes}"
        result = prepare_corpus(corpus, out, tokenizer=tok, tokenizer_name=name, val_fraction=0.0,
                                block_bytes=block_bytes)
        assert tokens_of(out) == expected, block_bytes
    assert {key: result[key] for key in ("vocab_size", "dtype", "bos_id", "eos_id", "eot_token", "tokenizer_name")} == {
        "vocab_size": tok.n_vocab, "dtype": "uint16", "bos_id": tok.bos_id, "eos_id": tok.eos_id,
        "eot_token": tok.eos_id, "tokenizer_name": name}


@pytest.mark.needs_files("hf/mistralai/Mistral-7B-v0.1/tokenizer.model", "text/tinyshakespeare.txt")
def test_prepare_with_mistrals_tokenizer_in_small_blocks(tmp_path, offline_cache):
    from download import fetch
    tok = load_tokenizer(fetch("hf/mistralai/Mistral-7B-v0.1/tokenizer.model"))
    text = read_text(offline_cache / "text" / "tinyshakespeare.txt")[:200_000]
    (tmp_path / "s.txt").write_text(text, encoding="utf-8")
    prepare_corpus(tmp_path / "s.txt", tmp_path / "out", tokenizer=tok, tokenizer_name="mistral", block_bytes=4096)
    train, val, meta = load_token_folder(tmp_path / "out")
    assert np.concatenate([train, val]).tolist() == [1, *tok.encode_ordinary(text), 2]
    assert (meta["bos_id"], meta["eos_id"], train.dtype) == (1, 2, np.uint16)


@pytest.fixture
def wide_tokenizer(tmp_path):
    """llama3_style with one more added token whose id needs 32 bits, as Llama 3's 128,256 tokens do."""
    spec = json.loads((FIXTURES / "llama3_style" / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"].append({"id": 70_000, "content": "<|wide|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    folder = tmp_path / "wide"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|wide|>"}))
    return load_tokenizer(folder)


def test_prepare_stores_uint32_when_ids_do_not_fit_uint16(tmp_path, wide_tokenizer):
    (tmp_path / "t.txt").write_text("A small text for a wide vocabulary.\n" * 40)
    prepare_corpus(tmp_path / "t.txt", tmp_path / "out", tokenizer=wide_tokenizer, val_fraction=0.25)
    train, val, meta = load_token_folder(tmp_path / "out")
    assert meta["dtype"] == "uint32" and train.dtype == val.dtype == np.uint32
    ids = np.concatenate([train, val]).tolist()
    assert ids == [1200, *wide_tokenizer.encode_ordinary("A small text for a wide vocabulary.\n" * 40), 70_000]
    x, y = sample_windows(train, 2, 8, torch.Generator().manual_seed(0))
    assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    assert np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint32).tolist() == train.tolist()


def test_a_tokenizer_without_end_of_text_cannot_prepare(tmp_path):
    spec = json.loads((FIXTURES / "llama3_style" / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = []
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (tmp_path / "t.txt").write_text("text")
    with pytest.raises(UserError, match="no end-of-text token"):
        prepare_corpus(tmp_path / "t.txt", tmp_path / "out", tokenizer=load_tokenizer(tmp_path / "tokenizer.json"))


@pytest.fixture
def prepared(tmp_path, enc):
    (tmp_path / "t.txt").write_text("Some text to prepare. " * 200)
    prepare_corpus(tmp_path / "t.txt", tmp_path / "tokens", val_fraction=0.1, tokenizer=enc)
    return tmp_path / "tokens"


def test_load_token_folder(prepared):
    train, val, meta = load_token_folder(prepared)
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"]) and train.dtype == np.uint16
    meta.pop("dtype")  # a folder written before meta.json named its dtype is prepared again
    (prepared / "meta.json").write_text(json.dumps(meta))
    assert "names none" in folder_error(prepared)


def folder_error(folder) -> str:
    with pytest.raises(UserError) as info:
        load_token_folder(folder)
    message = str(info.value)
    assert "\n" not in message and "tokenizer.py prepare" in message
    return message


def test_a_token_folder_that_lies_is_refused(prepared, tmp_path):
    train = (prepared / "train.bin").read_bytes()
    (prepared / "train.bin").write_bytes(train + b"\0")  # odd-sized: half a token
    assert "train.bin has" in folder_error(prepared) and "not a whole number of uint16 tokens" in folder_error(prepared)
    (prepared / "train.bin").write_bytes(train[:-20])  # cut short by whole tokens
    assert "train.bin holds" in folder_error(prepared) and "meta.json says" in folder_error(prepared)
    (prepared / "train.bin").write_bytes(train)
    meta = (prepared / "meta.json").read_text()
    (prepared / "meta.json").write_text(meta[:-10])  # corrupt
    assert "meta.json is not valid JSON" in folder_error(prepared)
    (prepared / "meta.json").write_text(json.dumps({**json.loads(meta), "val_tokens": "many"}))
    assert "whole numbers" in folder_error(prepared)
    (prepared / "meta.json").write_text(json.dumps({**json.loads(meta), "dtype": "float32"}))
    assert "float32" in folder_error(prepared)
    (prepared / "meta.json").unlink()
    assert "meta.json is missing" in folder_error(prepared)
    assert "does not exist" in folder_error(tmp_path / "nowhere")
