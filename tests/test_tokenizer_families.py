"""The tokenizers of other model families: SentencePiece's tokenizer.model and Hugging Face's
tokenizer.json, against the ids and texts that `sentencepiece` and `tokenizers` gave for the same files
(tests/fixtures/tokenizers, made by make_tokenizer_fixtures.py there), and the errors a bad file gives."""
import copy
import hashlib
import json
import lzma
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import hf_tokenizer
import sentencepiece_tokenizer as sp
import tokenizer as T
import tokenizer_base

from common import UserError
from download import fetch
from hf_tokenizer import HFTokenizer
from sentencepiece_tokenizer import SentencePieceTokenizer
from tokenizer import load_tokenizer


FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
TEXTS = EXPECTED["texts"]
MISTRAL = "hf/mistralai/Mistral-7B-v0.1/tokenizer.model"
needs_mistral = pytest.mark.needs_files(MISTRAL)

SP_FIXTURES = ["sp_nmt_nfkc.model", "sp_identity.model", "sp_nfkc_cf_suffix.model", "sp_unused_denorm.model"]
JSON_FILES = ["gpt2_converted", "mistral_converted", "llama3_style"]
ALL = [*SP_FIXTURES, "mistral", *JSON_FILES, *EXPECTED["variants"]]


def with_mistral(names):
    return [pytest.param(name, marks=needs_mistral) if name == "mistral" else name for name in names]


@pytest.fixture(scope="session")
def json_folders(tmp_path_factory) -> dict[str, Path]:
    """Every tokenizer.json fixture and variant as a model folder: tokenizer.json + tokenizer_config.json."""
    root = tmp_path_factory.mktemp("tokenizer_json")
    folders, specs = {}, {}
    for name in JSON_FILES:
        folder = folders[name] = root / name
        folder.mkdir()
        packed = FIXTURES / name / "tokenizer.json.xz"
        data = lzma.decompress(packed.read_bytes()) if packed.exists() else (FIXTURES / name / "tokenizer.json").read_bytes()
        (folder / "tokenizer.json").write_bytes(data)
        shutil.copyfile(FIXTURES / name / "tokenizer_config.json", folder / "tokenizer_config.json")
        specs[name] = json.loads(data)
    for name, variant in EXPECTED["variants"].items():  # as make_tokenizer_fixtures.apply_variant
        spec = copy.deepcopy(specs[variant["base"]])
        spec.update(variant["replace"])
        spec["model"].update(variant.get("model", {}))
        folder = folders[name] = root / name
        folder.mkdir()
        (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
        shutil.copyfile(folders[variant["base"]] / "tokenizer_config.json", folder / "tokenizer_config.json")
    return folders


@pytest.fixture(scope="session")
def loaded(json_folders):
    def load(name: str):
        if name == "mistral":
            return load_tokenizer(fetch(MISTRAL))
        return load_tokenizer(FIXTURES / name if name in SP_FIXTURES else json_folders[name])
    return load


def digest(ids) -> str:
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()


def unchunked(tok):
    """A copy of tok that merges each piece of text whole (no vocabulary chunks, an empty cache)."""
    whole = copy.copy(tok)
    whole._chunks, whole._cache = re.compile(r"(?s).+"), {}
    return whole


# -- exact parity with the reference libraries ---------------------------------------------------------

@pytest.mark.parametrize("name", with_mistral(ALL))
def test_encode_matches_the_reference_on_edge_cases(loaded, name):
    tok, expected = loaded(name), EXPECTED["tokenizers"][name]
    mismatched = [text for text, ids in zip(TEXTS, expected["encode"]) if tok.encode(text) != ids]
    assert mismatched == []


@pytest.mark.parametrize("name", with_mistral(ALL))
def test_encode_ordinary_encodes_special_text_as_text(loaded, name):
    tok, expected = loaded(name), EXPECTED["tokenizers"][name]
    ordinary = expected.get("ordinary", expected["encode"])  # sentencepiece: always plain text
    assert [text for text, ids in zip(TEXTS, ordinary) if tok.encode_ordinary(text) != ids] == []


@pytest.mark.parametrize("name", with_mistral(ALL))
def test_decode_matches_the_reference(loaded, name):
    tok, expected = loaded(name), EXPECTED["tokenizers"][name]
    assert [tok.decode(ids) for ids in expected["encode"]] == expected["decode"]
    cases = expected["decode_cases"]  # prefixes cut mid-character, specials, random ids
    assert [[ids, tok.decode(ids)] for ids, _ in cases] == cases


@pytest.mark.parametrize("name", with_mistral(ALL))
def test_pieces_and_special_ids_match_the_reference(loaded, name):
    tok, expected = loaded(name), EXPECTED["tokenizers"][name]
    # the vocabulary's own spelling of each token ('▁Hello', 'Ġworld')
    spelled = tok.pieces if isinstance(tok, SentencePieceTokenizer) else list(map(tok.id_to_piece, range(tok.n_vocab)))
    assert [[spelled[i] for i in ids] for ids in expected["encode"]] == expected["pieces"]
    assert tok.n_vocab == expected["n_vocab"]
    assert tok.bos_id == (None if expected["bos_id"] in (None, -1) else expected["bos_id"])
    if "eos_id" in expected:
        assert tok.eos_id == (None if expected["eos_id"] == -1 else expected["eos_id"])
    if tok.eos_id is not None:
        assert tok.eot_token == tok.eos_id
    assert tokenizer_base.bos(tok) == ([] if tok.bos_id is None else [tok.bos_id])


# Which shared texts each tokenizer is checked on: all of them where it matters most, the smaller
# ones elsewhere, to keep the suite fast.
SHARED = EXPECTED["shared_texts"]
SHARED_CASES = [(name, path) for name in ALL for path in SHARED
                if name in ("mistral", *JSON_FILES, "mistral_legacy") or path in SHARED[::3]]


@pytest.mark.parametrize("name, relpath", [pytest.param(n, p, marks=pytest.mark.needs_files(p, *(
    [MISTRAL] if n == "mistral" else []))) for n, p in SHARED_CASES], ids=[f"{n}-{p}" for n, p in SHARED_CASES])
def test_shared_texts_match_the_reference(loaded, offline_cache, name, relpath):
    tok, expected = loaded(name), EXPECTED["tokenizers"][name]["shared"][relpath]
    text = (offline_cache / relpath).read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert (len(ids), ids[:40]) == (expected["n"], expected["head"])
    assert digest(ids) == expected["ids_sha256"]
    assert hashlib.sha256(tok.decode(ids).encode("utf-8")).hexdigest() == expected["decoded_sha256"]


# -- the converted files against the originals ------------------------------------------------------------

@pytest.mark.needs_files("text/tinyshakespeare.txt")
def test_gpt2_tokenizer_json_gives_tiktokens_ids(loaded, offline_cache):
    converted, original = loaded("gpt2_converted"), T.get_tokenizer("tiktoken")
    texts = [*TEXTS, (offline_cache / "text/tinyshakespeare.txt").read_text(encoding="utf-8")]
    assert [converted.encode_ordinary(t) for t in texts] == [original.encode_ordinary(t) for t in texts]
    assert [converted.encode(t) for t in texts] == [original.encode(t, allowed_special="all") for t in texts]
    assert converted.bos_id is None and converted.eos_id == original.eot_token == 50256


@needs_mistral
@pytest.mark.needs_files("text/the-verdict.txt")
def test_mistral_tokenizer_json_gives_the_models_ids_on_ordinary_text(loaded, offline_cache):
    """transformers' conversion agrees with sentencepiece except on runs of spaces, a space at the
    start, and '▁' typed in the text (tokenizers merges by rank, sentencepiece by score; both
    references are matched exactly by their readers above)."""
    original = loaded("mistral")
    texts = [t for t in TEXTS if "  " not in t and not t.startswith(" ") and "\u2581" not in t and "<" not in t]
    texts.append((offline_cache / "text/the-verdict.txt").read_text(encoding="utf-8"))
    assert len(texts) > 30
    for name in ("mistral_converted", "mistral_legacy"):
        converted = loaded(name)
        assert [converted.encode_ordinary(t) for t in texts] == [original.encode(t) for t in texts], name
        assert [converted.decode(original.encode(t)) for t in texts] == [original.decode(original.encode(t))
                                                                          for t in texts], name
        assert (converted.bos_id, converted.eos_id) == (original.bos_id, original.eos_id) == (1, 2)


# -- the fast paths change nothing ----------------------------------------------------------------------

@pytest.mark.parametrize("name", with_mistral(["sp_identity.model", "mistral", "gpt2_converted", "llama3_style",
                                                 "mistral_converted"]))
def test_the_bytes_of_each_piece_spell_the_text(loaded, name):
    # What `python tokenizer.py encode` shows: each token's own bytes (a byte piece's byte, '▁' as a
    # space, GPT-2's printable spelling undone); joined, they spell the text (after a dummy prefix).
    tok, text = loaded(name), "Hello world, it's 2024 🤖 naïve"
    spelled = b"".join(tok.decode_single_token_bytes(i) for i in tok.encode_ordinary(text)).decode("utf-8")
    assert spelled in (text, " " + text)


@pytest.mark.parametrize("name", with_mistral([*SP_FIXTURES, "mistral", "mistral_legacy", "gpt2_converted"]))
def test_chunked_encoding_equals_merging_the_whole_text(loaded, offline_cache, name):
    tok = loaded(name)
    verdict = (offline_cache / "text/the-verdict.txt").read_text(encoding="utf-8")
    whole = unchunked(tok)
    for text in [*TEXTS, verdict[:8000]]:
        assert whole.encode_ordinary(text) == tok.encode_ordinary(text), repr(text[:40])


@needs_mistral
def test_mistral_is_cut_into_words(loaded):
    """Mistral's vocabulary has no piece with '▁' after another character and none with a newline,
    so its text is cut before each space and around newlines, as GPT-2's regex cuts it."""
    tok = loaded("mistral")
    normalized = tok.normalizer.normalize("First Citizen:\nBefore we proceed any further,  hear me speak.")
    assert tok._chunks.findall(normalized) == ["▁First", "▁Citizen:", "\n", "Before", "▁we", "▁proceed", "▁any",
                                               "▁further,", "▁▁hear", "▁me", "▁speak."]


@pytest.mark.parametrize("name", with_mistral([*SP_FIXTURES, "mistral", *JSON_FILES]))
def test_chunks_put_together_give_back_the_text(loaded, name):
    tok = loaded(name)
    assert tok._chunks is not None  # every vocabulary here has chunks; a test that skips checks nothing
    for text in TEXTS:
        unit = tok.normalizer.normalize(text) if isinstance(tok, SentencePieceTokenizer) else text
        assert "".join(tok._chunks.findall(unit)) == unit


@pytest.mark.parametrize("name", with_mistral(["sp_nmt_nfkc.model", "sp_unused_denorm.model", "mistral"]))
def test_heap_merge_equals_scan_merge_for_sentencepiece(loaded, name):
    tok = loaded(name)
    rng = random.Random(0)
    alphabet = sorted({c for p in list(tok._normal)[:400] for c in p})  # characters of the first merges
    for _ in range(300):
        chunk = "".join(rng.choice(alphabet) for _ in range(rng.randrange(2, 40)))
        symbols = tok._user_split.findall(chunk) if tok._user_split else list(chunk)
        frozen = [s in tok._user for s in symbols] if tok._user_split else None
        parts_short, parts_long = {}, {}
        short = tok._merge_short(list(symbols), frozen and list(frozen), parts_short)
        assert tok._merge_long(list(symbols), frozen and list(frozen), parts_long) == short
        assert parts_long == parts_short


@pytest.mark.parametrize("name", ["gpt2_converted", "llama3_style", "mistral_converted"])
def test_heap_merge_equals_scan_merge_for_tokenizer_json(loaded, name):
    tok = loaded(name)
    rng = random.Random(0)
    alphabet = [t for t in tok.vocab if len(t) == 1]
    for _ in range(300):
        symbols = tok._symbols("".join(rng.choice(alphabet) for _ in range(rng.randrange(2, 40))))
        assert tok._merge_long(list(symbols)) == tok._merge(list(symbols))


@pytest.mark.parametrize("name", with_mistral(["mistral", "sp_nmt_nfkc.model", "sp_nfkc_cf_suffix.model",
                                               "gpt2_converted", "mistral_legacy", "llama3_style",
                                               "llama3_normalized"]))
@pytest.mark.parametrize("block_chars", [300, 4000])
def test_encoding_a_document_in_blocks_equals_encoding_it_whole(loaded, offline_cache, name, block_chars):
    tok = loaded(name)
    text = (offline_cache / "text/tinyshakespeare.txt").read_text(encoding="utf-8")[:30_000] + "\n  \u00a0end  \n"
    blocks = [text[i:i + block_chars] for i in range(0, len(text), block_chars)]
    parts = list(tok.encode_blocks(blocks))
    assert [i for ids in parts for i in ids] == tok.encode_ordinary(text)
    assert len(parts) > 3, "the document should have been cut"


def test_a_document_whose_parts_never_agree_is_encoded_whole():
    calls = []

    def units(text, first, last):  # one unit for all of it: a cut can never agree with the whole
        calls.append(len(text))
        return [text]
    text = "line of text\n" * 2000
    blocks = [text[i:i + 100] for i in range(0, len(text), 100)]
    parts = list(tokenizer_base.stream_encode(blocks, units, lambda us: [len(u) for u in us], max_failures=3))
    assert parts == [[len(text)]] and len(calls) < 20  # three tries at two places each, then held to the end


def test_gpt2_scratch_encodes_blocks_too():
    tok = T.get_tokenizer("scratch")
    text = "First line\nsecond  line\n\n third\n" * 300
    blocks = [text[i:i + 500] for i in range(0, len(text), 500)]
    assert [i for ids in tok.encode_blocks(blocks) for i in ids] == T.get_tokenizer().encode_ordinary(text)


# -- special tokens -------------------------------------------------------------------------------------

@needs_mistral
def test_sentencepiece_special_text_only_when_allowed(loaded):
    tok = loaded("mistral")
    text = "<s>[INST] Hi [/INST] Hello</s>"
    assert 1 not in tok.encode(text) and 2 not in tok.encode(text)  # as sentencepiece: plain text
    assert tok.encode(text, allowed_special="all") == [1, *tok.encode_ordinary("[INST] Hi [/INST] Hello"), 2]
    assert tok.encode(text, allowed_special={"</s>"}) == [*tok.encode_ordinary("<s>[INST] Hi [/INST] Hello"), 2]
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}


def test_tokenizer_json_special_tokens(loaded):
    tok = loaded("llama3_style")
    begin, end = tok.special_tokens["<|begin_of_text|>"], tok.special_tokens["<|eot_id|>"]
    text = "<|begin_of_text|>Hi<|eot_id|>"
    assert tok.encode(text) == [begin, *tok.encode("Hi"), end] == tok.encode(text, allowed_special="all")
    assert tok.encode(text, allowed_special=set()) == tok.encode_ordinary(text)
    assert tok.encode(text, allowed_special={"<|eot_id|>"}) == [*tok.encode_ordinary("<|begin_of_text|>Hi"), end]
    assert tok.decode(tok.encode(text)) == "Hi"  # special tokens are skipped, as tokenizers' decode does
    assert (tok.bos_id, tok.eos_id) == (begin, tok.special_tokens["<|end_of_text|>"])


def test_splitting_behaviours_match_tokenizers():
    """tokenizers' Split pre-tokenizer on "the-final--countdown" (outputs taken from tokenizers)."""
    dash, text = re.compile("-"), "the-final--countdown"
    expected = {"Removed": (["the", "final", "countdown"], ["-", "-", "-"]),
                "Isolated": (["the", "-", "final", "-", "-", "countdown"],) * 2,
                "MergedWithPrevious": (["the-", "final-", "-", "countdown"], ["the", "-final", "-", "-countdown"]),
                "MergedWithNext": (["the", "-final", "-", "-countdown"], ["the-", "final-", "-", "countdown"]),
                "Contiguous": (["the", "-", "final", "--", "countdown"],) * 2}
    for behavior, (plain, inverted) in expected.items():
        assert hf_tokenizer._splitter(dash, behavior)(text)[0] == plain, behavior
        assert hf_tokenizer._splitter(dash, behavior, invert=True)(text)[0] == inverted, behavior
    digits = hf_tokenizer._hf_pre_tokenizer({"type": "Digits", "individual_digits": False})
    assert [w for w, _, _ in digits([("ab12c3 4", True, True)])] == ["ab", "12", "c", "3", " ", "4"]
    words = hf_tokenizer._hf_pre_tokenizer({"type": "Whitespace"})
    assert [w for w, _, _ in words([("Hey, you!! ok", True, True)])] == ["Hey", ",", "you", "!!", "ok"]


# -- the protobuf reader and the normalisation rules --------------------------------------------------------

def encode_fields(fields: list[tuple[int, int | bytes]]) -> bytes:
    """protobuf_fields backwards: varints for ints, length-delimited for bytes."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    return b"".join(varint(field << 3) + varint(value) if isinstance(value, int)
                    else varint(field << 3 | 2) + varint(len(value)) + value for field, value in fields)


def test_protobuf_fields_round_trip():
    fields = [(1, b"piece"), (2, 300), (3, 0), (35, 1), (1, b""), (536870911, 2**63)]
    assert list(sp.protobuf_fields(encode_fields(fields))) == fields
    assert list(sp.protobuf_fields(b"\x15\x00\x00\x80\x3f")) == [(2, b"\x00\x00\x80\x3f")]  # a float: 4 bytes


def test_charsmap_rules():
    model = sp.read_sentencepiece_model((FIXTURES / "sp_nmt_nfkc.model").read_bytes())
    rules = sp.read_charsmap(model["normalizer"][2])
    assert len(rules) > 200_000
    assert rules["Ａ"] == "A" and rules["ﬁ"] == "fi" and rules["e\u0301"] == "é" and rules["\t"] == " "
    assert "a" not in rules


# -- bad files: one sentence, naming the file ----------------------------------------------------------------

def error_of(path) -> str:
    with pytest.raises(UserError) as info:
        load_tokenizer(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_file_of_neither_format(tmp_path):
    (tmp_path / "junk").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "text.txt").write_text("just some text\n")
    for name in ("junk", "text.txt"):
        assert "neither a SentencePiece model" in error_of(tmp_path / name)


def test_truncated_sentencepiece_model(tmp_path):
    data = (FIXTURES / "sp_identity.model").read_bytes()
    for cut in (len(data) // 3, len(data) - 7, 200):
        (tmp_path / "cut.model").write_bytes(data[:cut])
        assert "incomplete SentencePiece model" in error_of(tmp_path / "cut.model")


def test_sentencepiece_model_of_another_type(tmp_path):
    data = (FIXTURES / "sp_identity.model").read_bytes()
    fields = [(f, encode_fields([(3, 1), *((k, v) for k, v in sp.protobuf_fields(value) if k != 3)]) if f == 2 else value)
              for f, value in sp.protobuf_fields(data)]  # trainer_spec.model_type = UNIGRAM
    (tmp_path / "unigram.model").write_bytes(encode_fields(fields))
    assert "SentencePiece Unigram model; only BPE" in error_of(tmp_path / "unigram.model")


def test_corrupt_normalisation_rules(tmp_path):
    data = (FIXTURES / "sp_nmt_nfkc.model").read_bytes()
    fields = [(f, encode_fields([(k, b"\xff" * 4 + v[4:] if k == 2 else v) for k, v in sp.protobuf_fields(value)])
               if f == 3 else value) for f, value in sp.protobuf_fields(data)]  # the rules' trie size: garbage
    (tmp_path / "bad.model").write_bytes(encode_fields(fields))
    assert "corrupt SentencePiece model" in error_of(tmp_path / "bad.model")


def test_bad_tokenizer_json_files(tmp_path, json_folders):
    spec = json.loads((json_folders["llama3_style"] / "tokenizer.json").read_text(encoding="utf-8"))
    cases = {
        "wordpiece.json": ({**spec, "model": {"type": "WordPiece", "vocab": {}}}, "WordPiece tokenizer model; only BPE"),
        "unigram.json": ({**spec, "model": {"type": "Unigram", "vocab": []}}, "Unigram tokenizer model; only BPE"),
        "no_model.json": ({"version": "1.0"}, "not a Hugging Face tokenizer.json"),
        "bert.json": ({**spec, "normalizer": {"type": "BertNormalizer"}}, "normalizer 'BertNormalizer' is not supported"),
        "bad_merge.json": ({**spec, "model": {**spec["model"], "merges": [["nope", "x"]]}}, "cannot read"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(content), encoding="utf-8")
        assert message in error_of(tmp_path / name), name
    (tmp_path / "cut.json").write_text(json.dumps(spec)[:5000], encoding="utf-8")
    assert "not valid JSON" in error_of(tmp_path / "cut.json")


def test_paths_that_hold_no_tokenizer(tmp_path):
    assert "does not exist" in error_of(tmp_path / "missing.model")
    assert "holds no tokenizer" in error_of(tmp_path)


def test_a_model_folder_and_our_own_bpe_file(tmp_path):
    shutil.copyfile(FIXTURES / "sp_identity.model", tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
    T.BPETokenizer().train("hello world, hello there", 260).save(tmp_path / "ours.json")
    assert isinstance(load_tokenizer(tmp_path / "ours.json"), T.BPETokenizer)


def test_end_of_text_from_the_config_or_the_known_names(tmp_path, json_folders):
    spec = json.loads((json_folders["llama3_style"] / "tokenizer.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tok = load_tokenizer(tmp_path)  # no tokenizer_config.json: the first known name among its specials
    assert tok.eos_id == tok.special_tokens["<|end_of_text|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot_id|>"}}))
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec) + " ", encoding="utf-8")  # a changed file is read again
    assert load_tokenizer(tmp_path).eos_id == tok.special_tokens["<|eot_id|>"]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["special"]]
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    bare = load_tokenizer(tmp_path)
    assert bare.eos_id is None
    with pytest.raises(UserError, match="names no token that ends a text"):
        bare.eot_token


def test_loaded_tokenizers_are_kept(loaded):
    tok = loaded("sp_identity.model")
    assert load_tokenizer(FIXTURES / "sp_identity.model") is tok
    assert isinstance(loaded("gpt2_converted"), HFTokenizer)
