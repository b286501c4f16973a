"""Data input: next-token windows, text reading, corpus preparation into token files, window sampling."""
import json
import random

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from tokenizer import (GPTDataset, UserError, create_dataloader, get_tokenizer, load_tokens, prepare_corpus,
                       read_text, sample_windows)


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer("tiktoken")


# -- sliding windows ---------------------------------------------------------------------------

def test_windows_are_shifted_by_one_and_strided():
    ds = GPTDataset(list(range(20)), max_length=4, stride=2)
    assert len(ds) == 8  # starts 0, 2, ..., 14: each needs 4 inputs + 1 more target
    x, y = ds[3]
    assert x.tolist() == [6, 7, 8, 9] and y.tolist() == [7, 8, 9, 10]
    assert x.dtype == torch.int64


def test_window_count_without_overlap():
    ds = GPTDataset(np.arange(20), max_length=4, stride=4)
    assert [ds[i][0][0].item() for i in range(len(ds))] == [0, 4, 8, 12]
    assert ds[len(ds) - 1][1].tolist() == [13, 14, 15, 16]
    assert len(GPTDataset(range(5), max_length=4, stride=1)) == 1


def test_text_shorter_than_one_window_is_a_user_error():
    with pytest.raises(UserError, match="too few for one window"):
        GPTDataset(range(4), max_length=4, stride=1)


def test_dataloader_batches_gpt2_tokens(enc):
    text = read_text(SHARED_DATA / "text" / "the-verdict.txt")
    loader = create_dataloader(text, batch_size=2, max_length=8, stride=8, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (2, 8)
    assert x[0].tolist() == enc.encode(text)[:8]
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_dataloader_errors():
    with pytest.raises(UserError, match="empty"):
        create_dataloader("")
    with pytest.raises(UserError, match="fewer than one batch"):
        create_dataloader("one two three four five six", batch_size=4, max_length=2, stride=2)


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

def tokens_of(out_dir) -> list[int]:
    return np.concatenate([np.fromfile(out_dir / name, dtype=np.uint16) for name in ("train.bin", "val.bin")]).tolist()


def test_prepare_matches_encoding_the_whole_file(tmp_path, enc):
    source = SHARED_DATA / "text" / "tinyshakespeare.txt"
    result = prepare_corpus(source, tmp_path, val_fraction=0.1, num_threads=2, block_bytes=1 << 16)
    expected = enc.encode_ordinary(read_text(source)) + [enc.eot_token]
    assert tokens_of(tmp_path) == expected
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta == {"vocab_size": 50257, "eot_token": 50256, "train_tokens": len(expected) - len(expected) // 10,
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
        prepare_corpus(tmp_path / "mixed.txt", out, val_fraction=0.0, block_bytes=block_bytes)
        assert tokens_of(out) == enc.encode_ordinary(text) + [enc.eot_token], block_bytes


def test_prepare_folder_and_glob_make_one_document_per_file(tmp_path, enc):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("First document.")
    (corpus / "sub" / "b.txt").write_text("Second one\n")
    (corpus / ".hidden").write_text("skipped")
    expected = [*enc.encode("First document."), enc.eot_token, *enc.encode("Second one\n"), enc.eot_token]
    result = prepare_corpus(corpus, tmp_path / "folder", val_fraction=0.0)
    assert tokens_of(tmp_path / "folder") == expected
    assert result["sources"] == [str(corpus / "a.txt"), str(corpus / "sub" / "b.txt")]
    prepare_corpus(str(corpus / "**" / "*.txt"), tmp_path / "glob", val_fraction=0.0)
    assert tokens_of(tmp_path / "glob") == expected


def test_prepare_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="holds no text"):
        prepare_corpus(tmp_path / "empty.txt", tmp_path / "out")
    with pytest.raises(UserError, match="holds no files"):
        prepare_corpus(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(UserError, match="no files match"):
        prepare_corpus(str(tmp_path / "*.md"), tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        prepare_corpus(tmp_path / "missing.txt", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # nothing half-written


def test_prepare_names_the_bad_byte_in_a_later_block(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"a" * 10_000 + b"\xff tail")
    with pytest.raises(UserError, match=r"bad\.txt .*offset 10000"):
        prepare_corpus(path, tmp_path / "out", block_bytes=4096)
    assert list((tmp_path / "out").iterdir()) == []
    result = prepare_corpus(path, tmp_path / "out", errors="replace", block_bytes=4096)
    assert result["train_tokens"] + result["val_tokens"] > 1


def test_sample_windows(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
    tokens = load_tokens(tmp_path / "t.bin")
    x, y = sample_windows(tokens, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # the tokens count up, so the next token is always x + 1
    again, _ = sample_windows(tokens, 4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    assert sample_windows(tokens, 64, 99, torch.Generator())[1].max().item() == 99  # the last token is reachable


def test_token_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokens(tmp_path / "missing.bin")
    np.arange(8, dtype=np.uint16).tofile(tmp_path / "short.bin")
    with pytest.raises(UserError, match="too few for one window"):
        sample_windows(load_tokens(tmp_path / "short.bin"), 1, 8, torch.Generator())
