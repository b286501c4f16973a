"""BPETokenizer: exact agreement with tiktoken's GPT-2 encoding, special tokens, training, files."""
import pytest

from bench_parts.tokenizer import naive_train

from common import UserError
from download import fetch
from corpus import read_text
from tokenizer import BPETokenizer, ENDOFTEXT, get_tokenizer
from tokenizer_base import token_text


# The shared data that is text (the folder also holds a binary tokenizer.model), by download-cache path.
TEXT_FILES = ["text/the-verdict.txt", "text/tinyshakespeare.txt", "sms_spam/SMSSpamCollection",
              "instruct/instruction-data.json"]


@pytest.fixture(scope="module")
def scratch() -> BPETokenizer:
    return get_tokenizer("scratch")


@pytest.fixture(scope="module")
def fast():
    return get_tokenizer("tiktoken")


EDGE_CASES = [
    "",
    "Hello world",
    "I'm you're he's we'll they've I'd don't",
    "I'M YOU'RE HE'S WE'LL THEY'VE I'D DON'T",
    "It'S mixed 'Ll 'lL O'Neil's ''s '",
    "a  b   c    d",
    "trailing spaces   ",
    "trailing newline\n",
    "   leading spaces",
    "tabs\tand\t\ttabs\n\nnewlines\r\n\r\nwindows\n \n",
    " \n \t ",
    "     ",
    "12345 1234567890 3.14159 1,000,000 0x1F ٣٤٥ ½",
    "!!! ??? ... --- ((())) {}[] @#$%^&* \"quoted\" 'single'",
    "Привет мир, Γειά σου Κόσμε, こんにちは世界, 你好，世界, مرحبا بالعالم, नमस्ते दुनिया, 안녕하세요",
    "emoji 🤖🚀 👩‍👩‍👧‍👦 🇩🇪 ❤️",
    "combining e\u0301 a\u0300\u0316 Z\u0351\u0313a\u0300l\u0317go",
    "\u00a0non-breaking\u2003em space\u3000ideographic \u2028line sep",
    "zero\u200bwidth\ufeffbom",
    "\x00\x01 control \x7f bytes \x1c\x1d",
    "mixed123abc   456!!!def",
    "a" * 300,
    "<|endoftext|>",
    "before<|endoftext|>after",
    "text <|endoftext|> more\n<|endoftext|><|endoftext|>  ",
    "<|endoftext| <endoftext|>",
]
LONE_SURROGATE = "lone \ud800 surrogate"

SETTINGS = {
    "default": {},
    "allowed_all": {"allowed_special": "all"},
    "allowed_set": {"allowed_special": {ENDOFTEXT}},
    "as_text": {"disallowed_special": ()},
}


def outcome(tokenizer, text: str, kwargs: dict) -> list[int] | str:
    try:
        return tokenizer.encode(text, **kwargs)
    except ValueError:
        return "ValueError"


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("text", [*EDGE_CASES, LONE_SURROGATE])
def test_edge_cases_match_tiktoken(scratch, fast, text, setting):
    assert outcome(scratch, text, SETTINGS[setting]) == outcome(fast, text, SETTINGS[setting])


def test_special_token_semantics(scratch, fast):
    text = "a<|endoftext|>b"
    for tok in (scratch, fast):
        with pytest.raises(ValueError):
            tok.encode(text)
        assert tok.encode(text, allowed_special="all") == [64, 50256, 65]
        assert tok.encode(text, allowed_special={ENDOFTEXT}) == [64, 50256, 65]
        assert 50256 not in tok.encode(text, disallowed_special=())
        assert tok.encode_ordinary(text) == tok.encode(text, disallowed_special=())


@pytest.mark.parametrize("relpath", [pytest.param(p, marks=pytest.mark.needs_files(p)) for p in TEXT_FILES],
                         ids=TEXT_FILES)
def test_shared_text_files_match_tiktoken(scratch, fast, offline_cache, relpath):
    text = read_text(offline_cache / relpath)
    assert scratch.encode_ordinary(text) == fast.encode_ordinary(text)
    assert scratch.encode(text, allowed_special="all") == fast.encode(text, allowed_special="all")


@pytest.mark.needs_files("sms_spam/SMSSpamCollection")
def test_each_sms_message_matches_tiktoken(scratch, fast, offline_cache):
    lines = read_text(offline_cache / "sms_spam" / "SMSSpamCollection").splitlines()
    messages = [line.split("\t", 1)[1] for line in lines]
    assert len(messages) == 5574
    mismatched = [m for m in messages if scratch.encode(m) != fast.encode(m)]
    assert mismatched == []


@pytest.mark.parametrize("backend", ["scratch", "tiktoken"])
def test_decode_inverts_encode(backend):
    tok = get_tokenizer(backend)
    for text in EDGE_CASES:
        assert tok.decode(tok.encode(text, allowed_special="all")) == text
        assert tok.decode(tok.encode(text, disallowed_special=())) == text


def test_decode_mid_character_gives_replacement_like_tiktoken(scratch, fast):
    ids = fast.encode("naïve 🤖 café")
    prefixes = [ids[:n] for n in range(len(ids) + 1)]
    assert [scratch.decode(p) for p in prefixes] == [fast.decode(p) for p in prefixes]
    assert any("\ufffd" in scratch.decode(p) for p in prefixes)


def test_both_backends_share_the_interface(scratch, fast):
    for tok in (scratch, fast):
        assert tok.eot_token == 50256
        assert tok.n_vocab == 50257
    assert get_tokenizer("scratch") is scratch  # built once per backend
    with pytest.raises(UserError, match="unknown tokenizer backend"):
        get_tokenizer("sentencepiece")


# -- training ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def verdict() -> str:
    return read_text(fetch("text/the-verdict.txt"))


@pytest.fixture(scope="module")
def trained(verdict) -> BPETokenizer:
    return BPETokenizer().train(verdict, 400)


def test_training_reaches_the_asked_vocab_size(trained):
    assert trained.n_vocab == 400
    assert len(trained.ranks) == 399 and trained.eot_token == 399


def test_training_round_trips_arbitrary_strings(trained):
    for text in [*EDGE_CASES, "never seen: ǅ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦜 \x00"]:
        assert trained.decode(trained.encode(text, allowed_special="all")) == text


def test_training_compresses_its_text(trained, verdict):
    assert len(trained.encode(verdict)) < 0.6 * len(verdict.encode("utf-8"))


def test_training_is_deterministic(trained, verdict):
    assert BPETokenizer().train(verdict, 400).ranks == trained.ranks


def test_ties_go_to_the_smallest_pair():
    # pieces "ab" and " cd": the pairs (a,b), (' ',c), (c,d) all occur once
    tok = BPETokenizer().train("ab cd", 258, special_tokens=())
    assert [tok.vocab[256], tok.vocab[257]] == [b" c", b"ab"]


def test_incremental_training_learns_the_same_merges_as_a_full_recount(verdict):
    ours = BPETokenizer().train(verdict, 320, special_tokens=())
    naive, _ = naive_train(verdict, 320)
    assert [ours.vocab[i] for i in range(256, 320)] == naive


def test_training_never_merges_across_special_tokens():
    # Were the special text not cut out, "<|" would be the first merge (it ties with "he" and has smaller ids).
    tok = BPETokenizer().train("hello<|endoftext|>" * 50, 261)
    assert not any(b"<" in token and len(token) > 1 for token in tok.ranks)
    assert tok.encode("hello<|endoftext|>", allowed_special="all")[-1] == tok.eot_token


def test_training_rejects_impossible_vocab_sizes():
    with pytest.raises(UserError, match="at least 257"):
        BPETokenizer().train("abc", 100)
    with pytest.raises(UserError, match="only supports a vocabulary"):
        BPETokenizer().train("abc", 1000)


def test_save_load_round_trip(trained, tmp_path):
    trained.save(tmp_path / "tok.json")
    loaded = BPETokenizer.load(tmp_path / "tok.json")
    assert loaded.ranks == trained.ranks and loaded.special_tokens == trained.special_tokens
    text = "A new sentence, with <|endoftext|> and 🤖."
    assert loaded.encode(text, allowed_special="all") == trained.encode(text, allowed_special="all")


def test_gpt2_vocabulary_survives_save_and_load(scratch, fast, tmp_path):
    scratch.save(tmp_path / "gpt2.json")
    loaded = BPETokenizer.load(tmp_path / "gpt2.json")
    assert loaded.encode(EDGE_CASES[14]) == fast.encode(EDGE_CASES[14])


def test_load_of_a_bad_file_is_a_user_error(tmp_path):
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="cannot load"):
        BPETokenizer.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="cannot load"):
        BPETokenizer.load(tmp_path / "missing.json")


def test_gpt2_pieces_in_their_printable_spelling(scratch):
    assert [token_text(scratch.decode_single_token_bytes(i)) for i in scratch.encode("Hello world\n<|endoftext|>", allowed_special="all")] == [
        "Hello", "Ġworld", "Ċ", "<|endoftext|>"]
