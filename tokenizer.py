"""Text in, token ids out: GPT-2's byte-level BPE written from scratch, the tokenizers other model
families ship (SentencePiece's tokenizer.model, Hugging Face's tokenizer.json), the downloads every
stage shares, and the datasets that turn text into next-token training windows.

    python tokenizer.py encode "Hello, world! It's 2024 <|endoftext|>"
    python tokenizer.py encode --tokenizer path/to/tokenizer.model "Hello, world!"

Reading order: errors and downloads (one cached, verified fetch helper that every stage uses), then
`BPETokenizer` (training, encoding, decoding, loading OpenAI's GPT-2 files), then `get_tokenizer`, the
one way stages get GPT-2's tokenizer, then `load_tokenizer` for the other families' files (a small
protobuf reader, SentencePiece's normaliser and BPE, tokenizer.json's pipeline), then data input
(in-memory sliding windows, and token files on disk for corpora larger than memory), then the
command line.
"""
import argparse
import functools
import glob
import heapq
import json
import math
import os
import re
import struct
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence, Set
from pathlib import Path
from typing import Literal

import numpy as np
import regex
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

from common import (ArgumentParser, ProgressLine, RunLock, UserError, _number_flag, atomic_write, positive_int,
                    run_stage, unit_interval, writable_file, writable_folder)
from download import MISTRAL_REPO, fetch, fetch_all


# ----------------------------------------------------------------------------------------------
# How every stage script starts and ends. tokenizer.py is the lowest layer (it imports nothing of
# ours), so the rules every stage shares live here: flags checked when parsed, one sentence and
# exit 1 for a user's mistake, 130 on Ctrl-C, files replaced atomically, run folders locked.


# ----------------------------------------------------------------------------------------------
# Downloads: one cache folder, one helper


# ----------------------------------------------------------------------------------------------
# Byte-level BPE from scratch
#
# Byte-pair encoding starts from the 256 possible bytes and learns merges: "the pair of tokens
# (b't', b'h') becomes the new token b'th'". To encode, text is first cut into pieces by a regex
# (words with their leading space, numbers, punctuation runs, whitespace), so no token ever spans
# two words; each piece's UTF-8 bytes are then merged, always applying the earliest-learned merge
# first, until no learned merge applies. Working on bytes rather than characters means any string
# can be encoded with no unknown token: at worst a character becomes its 1-4 UTF-8 bytes.
#
# The tokenizer is fully described by `ranks`: token bytes -> id, where a token's id is also its
# merge priority (a lower id was learned earlier). This is exactly how tiktoken stores it.

ENDOFTEXT = "<|endoftext|>"

# GPT-2's pre-tokenization: contractions, optional space + letters, optional space + digits,
# optional space + other symbols, then whitespace (a run of spaces gives its last space to the next
# word, so " world" keeps its space). This is tiktoken's spelling of GPT-2's pattern; the possessive
# quantifiers (++) only make it faster. Note the contractions are lower case only, as in GPT-2.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to a printable character, used only to read and write vocab files.

    OpenAI's encoder.json and vocab.bpe store tokens as text. Bytes that are printable characters
    map to themselves; the other 68 (control bytes, space, a few Latin-1 ones) map to the characters
    256, 257, ... in order, so a space becomes 'Ġ' and a newline 'Ċ'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {b: chr(b) for b in printable}, 256
    for b in range(256):
        if b not in table:
            table[b] = chr(shifted)
            shifted += 1
    return table


def _token_text(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_bytes(text: str) -> bytes:
    inverse = _unicode_to_bytes()
    return bytes(inverse[c] for c in text)


def read_gpt2_files(encoder_path: Path, vocab_path: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """OpenAI's GPT-2 files -> (ranks, special tokens).

    encoder.json maps each token (in the printable spelling above) to its id. vocab.bpe lists the
    50000 merges in the order they were learned; merge i creates token 256 + i, so a token's id is
    its merge priority. We check that, since BPE encoding relies on it."""
    try:
        encoder = json.loads(Path(encoder_path).read_text(encoding="utf-8"))
        merge_lines = Path(vocab_path).read_text(encoding="utf-8").split("\n")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the GPT-2 files {encoder_path} and {vocab_path} ({e}); delete them "
                        f"so they are downloaded again") from None
    special = {ENDOFTEXT: encoder.pop(ENDOFTEXT)}
    ranks = {_token_bytes(token): i for token, i in encoder.items()}
    merges = [line.split() for line in merge_lines[1:] if line]  # line 0 is "#version: 0.2"
    for i, (first, second) in enumerate(merges):
        if ranks.get(_token_bytes(first) + _token_bytes(second)) != 256 + i:
            raise UserError(f"{vocab_path} line {i + 2} does not match {encoder_path}; delete both files "
                            f"so they are downloaded again")
    return ranks, special


def _lone_surrogates_replaced(text: str) -> str:
    """What tiktoken does to text that is not valid Unicode: lone surrogates become U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def merge_pair(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `word`, left to right, by `new_id`."""
    out, i, first, second = [], 0, *pair
    while i < len(word):
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


class BPETokenizer:
    """Byte-level BPE with tiktoken's interface: encode, encode_ordinary, decode, eot_token, n_vocab.

    BPETokenizer() is the bare byte-level tokenizer (256 tokens); train() learns merges;
    from_gpt2_files() loads OpenAI's GPT-2 vocabulary; save() / load() keep our own."""

    def __init__(self, ranks: dict[bytes, int] | None = None, special_tokens: dict[str, int] | None = None,
                 pattern: str = GPT2_PATTERN, cache_size: int = 100_000):
        self.pattern, self.cache_size = pattern, cache_size
        self._regex = regex.compile(pattern)
        self._set_vocabulary(ranks if ranks is not None else {bytes([b]): b for b in range(256)},
                             special_tokens or {})

    def _set_vocabulary(self, ranks: dict[bytes, int], special_tokens: dict[str, int]) -> None:
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        assert not missing, f"a byte-level vocabulary needs all 256 single bytes; missing {missing[:5]}"
        self.ranks, self.special_tokens = ranks, special_tokens
        self.vocab = {i: token for token, i in ranks.items()}  # id -> bytes, for decoding
        self.vocab.update((i, token.encode("utf-8")) for token, i in special_tokens.items())
        assert len(self.vocab) == len(ranks) + len(special_tokens), "token ids must be unique"
        self._cache: dict[str, list[int]] = {}  # piece of text -> its ids; a piece repeats a lot

    @property
    def n_vocab(self) -> int:
        return max(self.vocab) + 1

    @property
    def eot_token(self) -> int:
        return self.special_tokens[ENDOFTEXT]

    # What every tokenizer of the project offers (see load_tokenizer): GPT-2 puts nothing before a
    # text, and its one special token, <|endoftext|>, ends one.
    bos_id = None

    @property
    def eos_id(self) -> int:
        return self.eot_token

    # -- training ------------------------------------------------------------------------------

    def train(self, text: str, vocab_size: int, special_tokens: Sequence[str] = (ENDOFTEXT,)) -> "BPETokenizer":
        """Learn merges from `text` until the vocabulary holds `vocab_size` tokens (special ones included).

        Each step merges the most frequent adjacent pair; ties go to the pair with the smallest ids
        (built from the earliest tokens), so training is deterministic. Special-token text is cut out
        first, so no merge crosses a document boundary. Returns self."""
        n_merged = vocab_size - len(special_tokens)  # byte tokens + merged tokens wanted
        if n_merged < 256:
            raise UserError(f"vocab_size must be at least {256 + len(special_tokens)} (256 bytes + "
                            f"{len(special_tokens)} special tokens), got {vocab_size}")
        text = _lone_surrogates_replaced(text)

        # 1. Pre-tokenize and count each distinct piece ("word") once: " the" may occur 10,000 times
        #    but is merged once, with its count as weight.
        counts: Counter[str] = Counter()
        chunks = regex.split("|".join(map(regex.escape, special_tokens)), text) if special_tokens else [text]
        for chunk in chunks:
            counts.update(self._regex.findall(chunk))
        words = [list(word.encode("utf-8")) for word in counts]  # each word as a list of token ids
        freqs = list(counts.values())

        # 2. Count every adjacent pair once, and remember which words contain it. After a merge only
        #    those words change, so only their pairs are recounted: far less work than recounting the
        #    whole corpus after every merge.
        pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> indices of words holding it
        for w, (word, freq) in enumerate(zip(words, freqs)):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += freq
                where[pair].add(w)
        # A heap finds the most frequent pair fast. Entries are (-count, pair), so ties pop the
        # smallest pair. A count change pushes a fresh entry; stale ones are skipped when popped.
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        vocab = [bytes([b]) for b in range(256)]
        ranks = {token: i for i, token in enumerate(vocab)}
        while len(vocab) < n_merged:
            while heap and pair_counts.get(heap[0][1]) != -heap[0][0]:
                heapq.heappop(heap)
            if not heap:
                raise UserError(f"the training text only supports a vocabulary of {len(vocab) + len(special_tokens)} "
                                f"tokens, fewer than the {vocab_size} asked for; use more text or a smaller vocab size")
            pair = heapq.heappop(heap)[1]
            merged = vocab[pair[0]] + vocab[pair[1]]
            # Two different pairs can spell the same bytes (b"a" + b"bc" and b"ab" + b"c"); they then
            # share one id, because an id is looked up by its bytes when encoding.
            new_id = ranks.setdefault(merged, len(vocab))
            if new_id == len(vocab):
                vocab.append(merged)

            # 3. Merge the pair in the words that hold it, and apply the count changes.
            delta: dict[tuple[int, int], int] = defaultdict(int)
            for w in where.pop(pair):
                old, freq = words[w], freqs[w]
                new = words[w] = merge_pair(old, pair, new_id)
                for p in zip(old, old[1:]):
                    delta[p] -= freq
                for p in zip(new, new[1:]):
                    delta[p] += freq
                    where[p].add(w)
                for p in set(zip(old, old[1:])) - set(zip(new, new[1:])) - {pair}:
                    where[p].discard(w)
            for p, change in delta.items():
                if change:
                    pair_counts[p] += change
                    if pair_counts[p]:
                        heapq.heappush(heap, (-pair_counts[p], p))
                    else:
                        del pair_counts[p]

        self._set_vocabulary(ranks, {token: n_merged + i for i, token in enumerate(special_tokens)})
        return self

    # -- encoding ------------------------------------------------------------------------------

    def _bpe(self, piece: bytes) -> list[int]:
        """Merge one pre-tokenized piece's bytes: repeatedly join the adjacent pair whose joined bytes
        have the lowest rank (leftmost on a tie), until no adjacent pair joins into a known token."""
        ranks = self.ranks
        if piece in ranks:  # a whole piece that is one token is emitted as is, as tiktoken does
            return [ranks[piece]]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best_rank, best = None, -1
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, i
            if best_rank is None:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return [ranks[part] for part in parts]

    def _encode_chunk(self, text: str) -> list[int]:
        return self._encode_pieces(self._regex.findall(text))

    def _encode_pieces(self, pieces: list[str]) -> list[int]:
        ids, cache = [], self._cache
        for piece in pieces:
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._bpe(piece.encode("utf-8"))
                if len(cache) >= self.cache_size:
                    cache.clear()  # bounded memory; frequent pieces come back in soon
                cache[piece] = piece_ids
            ids += piece_ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text` with special-token text treated as ordinary text."""
        try:
            return self._encode_chunk(text)
        except UnicodeEncodeError:
            return self._encode_chunk(_lone_surrogates_replaced(text))

    def encode(self, text: str, *, allowed_special: Literal["all"] | Set[str] = frozenset(),
               disallowed_special: Literal["all"] | Set[str] = "all") -> list[int]:
        """Encode `text` with tiktoken's special-token rules.

        Special-token text (e.g. "<|endoftext|>") raises ValueError unless allowed: it is there to
        stop user text from injecting control tokens. allowed_special="all" (or a set of tokens)
        encodes it as the special id; disallowed_special=() encodes it as plain text."""
        special = set(self.special_tokens)
        allowed = special if allowed_special == "all" else special & set(allowed_special)
        disallowed = special - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed and (found := regex.search("|".join(map(regex.escape, disallowed)), text)):
            raise ValueError(f"text contains the special token {found.group()!r}; pass allowed_special="
                             f"{{{found.group()!r}}} to encode it as a special token, or disallowed_special=() "
                             f"to encode it as plain text")
        if not allowed:
            return self.encode_ordinary(text)
        # Longest first, so that a special token that contains another one wins.
        specials = regex.compile("|".join(map(regex.escape, sorted(allowed, key=len, reverse=True))))
        ids, start = [], 0
        for match in specials.finditer(text):
            ids += self.encode_ordinary(text[start:match.start()])  # split apart as tiktoken does
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        return ids + self.encode_ordinary(text[start:])

    def encode_blocks(self, blocks: Iterable[str]) -> Iterator[list[int]]:
        """The ids of one document given as consecutive blocks of text, as encode_ordinary of their
        concatenation (see _stream_encode)."""
        return _stream_encode(blocks, lambda text, first, last: self._regex.findall(text), self._encode_pieces)

    # -- decoding ------------------------------------------------------------------------------

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.vocab[token]

    def id_to_piece(self, token: int) -> str:
        """A token as vocabulary files spell it (GPT-2's printable characters: ' world' is 'Ġworld')."""
        return _token_text(self.vocab[token])

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.vocab[i] for i in ids)

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        """Ids -> text. Ids that stop mid-character (e.g. the first byte of an emoji) decode to U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON: tokens in id order, in GPT-2's printable spelling."""
        assert sorted(self.ranks.values()) == list(range(len(self.ranks))), "save needs dense ids"
        tokens = [_token_text(token) for token, _ in sorted(self.ranks.items(), key=lambda item: item[1])]
        state = {"format": "bpe-tokenizer/1", "pattern": self.pattern, "tokens": tokens,
                 "special_tokens": self.special_tokens}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(state, ensure_ascii=False, indent=0))

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        """Read a vocabulary written by save()."""
        try:
            state = json.loads(Path(path).read_text(encoding="utf-8"))
            if state.get("format") != "bpe-tokenizer/1":
                raise ValueError("not a bpe-tokenizer/1 file")
            ranks = {_token_bytes(token): i for i, token in enumerate(state["tokens"])}
            return cls(ranks, state["special_tokens"], state["pattern"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot load a tokenizer from {path} ({e}); write one with: python tokenizer.py "
                            f"train INPUT --out FILE") from None

    @classmethod
    def from_gpt2_files(cls, encoder_path: Path | None = None, vocab_path: Path | None = None) -> "BPETokenizer":
        """OpenAI's GPT-2 tokenizer; the two files are downloaded into the cache when not given."""
        if encoder_path is None or vocab_path is None:
            cached = fetch_all("GPT-2's BPE files", "gpt2/encoder.json", "gpt2/vocab.bpe")
            encoder_path, vocab_path = encoder_path or cached[0], vocab_path or cached[1]
        ranks, special = read_gpt2_files(encoder_path, vocab_path)
        return cls(ranks, special, GPT2_PATTERN)


# ----------------------------------------------------------------------------------------------
# The one way stages get GPT-2's tokenizer

BACKENDS = ("tiktoken", "scratch")


def bos(tokenizer) -> list[int]:
    """What a text starts with for this tokenizer's model family: [bos_id], or [] (GPT-2)."""
    return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


def get_tokenizer(backend: str = "tiktoken") -> "TiktokenGPT2 | BPETokenizer":
    """GPT-2's tokenizer, built once per backend from the cached GPT-2 files.

    "tiktoken" is fast (Rust); "scratch" is BPETokenizer above and gives the same ids. Both offer
    encode(text, allowed_special=...), encode_ordinary, decode(ids), eot_token, n_vocab, bos_id (None)
    and eos_id (<|endoftext|>)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown tokenizer backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return _build_tokenizer(backend)


class TiktokenGPT2(tiktoken.Encoding):
    """tiktoken's Encoding with the two ids every tokenizer of the project names: no BOS, and
    <|endoftext|> as EOS."""
    bos_id = None

    @property
    def eos_id(self) -> int:
        return self.eot_token


@functools.lru_cache(maxsize=None)
def _build_tokenizer(backend: str) -> "TiktokenGPT2 | BPETokenizer":
    if backend == "scratch":
        return BPETokenizer.from_gpt2_files()
    ranks, special = read_gpt2_files(*fetch_all("GPT-2's BPE files", "gpt2/encoder.json", "gpt2/vocab.bpe"))
    # Built from our cached files rather than tiktoken.get_encoding("gpt2"), which would download
    # them again into its own cache.
    return TiktokenGPT2(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                        special_tokens=special, explicit_n_vocab=len(ranks) + len(special))


# ----------------------------------------------------------------------------------------------
# The tokenizers other model families ship, read from their own files
#
# Mistral 7B, Llama 2 and Phi-3 ship a SentencePiece `tokenizer.model`; Llama 3, Qwen and most newer
# repos a Hugging Face `tokenizer.json`. Both hold a BPE vocabulary, but reach the units that BPE
# merges differently from GPT-2:
# - SentencePiece normalises the text (optionally with compiled Unicode rules), writes each space as
#   '▁' (U+2581) and puts one '▁' before the text (the "dummy prefix"), so "Hello world" is merged
#   from "▁Hello▁world" with no pre-tokenizing regex. The merge made first is the one whose result
#   has the highest score. A character outside the vocabulary becomes its UTF-8 bytes as the pieces
#   <0x00>..<0xFF> ("byte fallback"), or the unknown piece.
# - tokenizer.json describes a pipeline: added tokens are cut out of the text first, then each
#   remaining piece goes through a normaliser, a pre-tokenizer (a regex split, GPT-2's byte-to-
#   character mapping, or '▁' escaping) and BPE with an explicit ranked list of merges; decoding runs
#   a chain of decoders.
# load_tokenizer(path) reads either and returns an object with the interface of GPT-2's tokenizers.

SPACE = "\u2581"  # '▁': how SentencePiece-style vocabularies write a space
CACHED_CHUNK_CHARS = 256  # longer chunks are merged every time rather than kept in the cache
SHORT_MERGE_SYMBOLS = 64  # up to this many symbols, a plain scan beats a heap for finding the best merge


def _char_class(chars: Iterable[str], negate: bool = False) -> str:
    """A `re` character class of `chars` plus every character beyond U+FFFF (with negate: of all
    other characters). `re` tests characters up to U+FFFF against a bitmap, but others one by one
    against a list; as a single range they stay fast. Callers treat the extra characters
    conservatively (as possibly merged, as possibly starting a rule)."""
    listed = "".join(re.escape(c) for c in sorted(c for c in chars if ord(c) <= 0xFFFF))
    return f"[{'^' if negate else ''}{listed}\U00010000-\U0010ffff]"


def _chunk_regex(joined: set[str], space: str) -> "re.Pattern":
    """A regex that cuts text into chunks no BPE merge crosses, so each chunk can be merged (and
    cached) on its own with the result of merging the whole text.

    `joined` holds every two adjacent characters some merge can join (a merge's last character on
    the left + first on the right). A merge across a boundary joins the two characters on either side
    of it, so boundaries between other pairs are never crossed. We cut at two kinds: around
    characters no merge touches (newlines and unknown characters in Mistral's vocabulary), and before
    each run of `space` when no merge joins a space to a character before it; then "▁like▁this" is
    cut into words, as GPT-2's regex cuts text. The chunks of any text concatenate back to it."""
    touched = {c for pair in joined for c in pair}
    untouched = f"{_char_class(touched, negate=True)}+"
    if space in touched and not any(pair[1] == space and pair[0] != space for pair in joined):
        words = f"{re.escape(space)}*{_char_class(touched - {space})}+|"
        return re.compile(f"{words}{re.escape(space)}+|{untouched}")
    return re.compile(f"{_char_class(touched)}+|{untouched}")


def _line_cuts(text: str, lookahead: int = 256) -> list[int]:
    """Places to try cutting a document: around the last line break that has a non-space character
    after it and at least `lookahead` characters after that. Just after it first (GPT-2-style regexes
    keep a line break with what comes before it), then just before it (normalisers that turn it into
    a space, which then belongs to the next word). [] if there is none."""
    end = text.rfind("\n", 0, max(len(text) - lookahead, 0))
    while end >= 0 and text[end + 1].isspace():
        end = text.rfind("\n", 0, end)
    if end < 0:
        return []
    return [end + 1, end] if end > 0 and not text[end - 1].isspace() else [end + 1]


def _stream_encode(blocks: Iterable[str], units, encode_units, max_failures: int = 8) -> Iterator[list[int]]:
    """Encode one document given as consecutive blocks of text, yielding ids as soon as they are final.

    units(text, first, last) cuts text into what the tokenizer encodes independently (words, chunks,
    special-token ids); first/last say whether text starts/ends the document (a dummy prefix belongs
    at the start, stripped spaces at the end). A cut is made at a line break, and only where the units
    before it, after it and of the whole text so far agree (with `lookahead` characters after the cut:
    no published pre-tokenizer pattern looks further ahead), so the ids equal those of the joined text
    in one call. After `max_failures` places in a row where they disagree (a normaliser that sees the
    whole text), the rest of the document is held and encoded in one call."""
    parts, first, failures = [], True, 0
    for block in blocks:
        parts.append(block)
        if failures >= max_failures:
            continue
        pending = "".join(parts)
        parts = [pending]
        cuts = _line_cuts(pending)
        whole = units(pending, first, True) if cuts else None
        for cut in cuts:
            head = units(pending[:cut], first, False)
            if head + units(pending[cut:], False, True) == whole:
                yield encode_units(head)
                parts, first, failures = [pending[cut:]], False, 0
                break
        else:
            failures += bool(cuts)
    yield encode_units(units("".join(parts), first, True))


def _fuse_repeats(ids: list[int], token: int) -> list[int]:
    """ids with every run of `token` collapsed to one (consecutive unknown pieces become one)."""
    return [i for k, i in enumerate(ids) if i != token or k == 0 or ids[k - 1] != token]


# -- SentencePiece's tokenizer.model: a protobuf ModelProto ----------------------------------------
#
# A protobuf message is a sequence of fields, each a varint key (field number << 3 | wire type) and
# a value: a varint (type 0), 8 bytes (1), a varint length and that many bytes (2: strings and
# nested messages), or 4 bytes (5: floats). We read the few fields encoding depends on
# (sentencepiece_model.proto): ModelProto {1: pieces, 2: trainer_spec, 3: normalizer_spec,
# 5: denormalizer_spec}; SentencePiece {1: piece, 2: score, 3: type}.

PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6
SP_BPE, SP_MODEL_TYPES = 2, {1: "Unigram", 2: "BPE", 3: "word", 4: "character"}


class ProtobufError(ValueError):
    """Bytes that are not a protobuf message; `truncated` when they end in the middle of a field."""

    def __init__(self, message: str, truncated: bool = False):
        super().__init__(message)
        self.truncated = truncated


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError(f"it ends in the middle of a number at byte {pos}", truncated=True)
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ProtobufError(f"a number at byte {pos} is longer than 10 bytes")


def protobuf_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """One protobuf message -> its (field number, value) pairs in file order: an int for varints,
    bytes for everything else (the 4 or 8 bytes of a fixed-size number, a string, a nested message)."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ProtobufError(f"field number 0 at byte {start}")
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire in (1, 2, 5):
            size = 8 if wire == 1 else 4 if wire == 5 else None
            if size is None:
                size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ProtobufError(f"a field at byte {start} needs {size} bytes, {len(data) - pos} are left",
                                    truncated=True)
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ProtobufError(f"unknown wire type {wire} at byte {start}")
        yield field, value


def read_sentencepiece_model(data: bytes) -> dict:
    """A tokenizer.model's bytes -> {"pieces": [(piece, score, type)], "trainer": {field: value},
    "normalizer": {...}, "denormalizer": {...} or None}, fields by number as in protobuf_fields.
    ProtobufError when the bytes are not one (or are cut short)."""
    pieces, specs = [], {}
    try:
        for field, value in protobuf_fields(data):
            if field == 1 and isinstance(value, bytes):
                piece = dict(protobuf_fields(value))
                if not set(piece) <= {1, 2, 3} or not isinstance(piece.get(1), bytes):
                    raise ProtobufError(f"piece {len(pieces)} is not a SentencePiece piece")
                pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece.get(2, bytes(4)))[0],
                               piece.get(3, PIECE_NORMAL)))
            elif field in (2, 3, 5) and isinstance(value, bytes):
                specs[field] = dict(protobuf_fields(value))
            elif field != 4:  # 4: self-test samples
                raise ProtobufError(f"field {field} is not part of a SentencePiece model")
    except ProtobufError as e:  # cut short only if what came before looked like a model
        raise ProtobufError(str(e), truncated=e.truncated and bool(pieces)) from None
    except (UnicodeDecodeError, struct.error, TypeError) as e:
        raise ProtobufError(f"piece {len(pieces)} is malformed ({e})") from None
    if not pieces:
        raise ProtobufError("it has no pieces")
    if 2 not in specs:
        raise ProtobufError(f"it ends after {len(pieces):,} pieces, before its settings", truncated=True)
    return {"pieces": pieces, "trainer": specs[2], "normalizer": specs.get(3, {}), "denormalizer": specs.get(5)}


def read_charsmap(blob: bytes) -> dict[str, str]:
    """SentencePiece's precompiled normalisation rules -> {text: its replacement}.

    The blob holds a uint32 size, then a Darts double-array trie (uint32 units) over the UTF-8 bytes
    of every rule's left side, then the right sides as NUL-terminated strings that the trie's leaf
    values point into. A unit holds its label (the byte leading to it), whether a key ends there, and
    an offset: the children of the unit at position p hang at base p ^ offset (the child for byte b
    at base ^ b) and the value of a key ending at p sits in the unit at the base. Units with equal
    suffixes share their children, so we walk down from the root, one byte of all keys at a time,
    with numpy (a rule set like nmt_nfkc has 200,000 rules)."""
    if len(blob) < 4:
        raise ValueError("the normalisation rules are cut short")
    size = struct.unpack("<I", blob[:4])[0]
    if size % 4 or 4 + size > len(blob):
        raise ValueError("the normalisation rules' trie size does not match the data")
    units = np.frombuffer(blob, dtype="<u4", count=size // 4, offset=4).astype(np.int64)
    replacements = blob[4 + size:]
    labels = units & 0x800000FF  # a leaf unit's label has its top bit set, so it is never a byte
    bases = np.arange(len(units)) ^ ((units >> 10) << ((units & (1 << 9)) >> 6))
    ends_key = ((units >> 8) & 1) == 1
    nodes = np.nonzero((labels > 0) & (labels < 256))[0]
    hangs_from = nodes ^ labels[nodes]  # the base each unit hangs from
    order = np.argsort(hangs_from, kind="stable")
    children, children_base = nodes[order], hangs_from[order]
    frontier, keys = bases[:1], np.zeros((1, 0), dtype=np.uint8)  # the root: unit 0, empty key
    found_keys, found_values = [], []
    while len(frontier):
        if keys.shape[1] == 64:
            raise ValueError("the normalisation rules' trie is corrupt")
        first = np.searchsorted(children_base, frontier, "left")
        counts = np.searchsorted(children_base, frontier, "right") - first
        parent = np.repeat(np.arange(len(frontier)), counts)
        child = children[np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())]
        keys = np.concatenate([keys[parent], labels[child, None].astype(np.uint8)], axis=1)
        found_keys += list(keys[ends_key[child]])
        found_values += (units[bases[child[ends_key[child]]]] & 0x7FFFFFFF).tolist()
        frontier = bases[child]
    text_at = functools.lru_cache(maxsize=None)(
        lambda start: replacements[start:replacements.index(b"\0", start)].decode("utf-8"))
    return {key.tobytes().decode("utf-8"): text_at(value) for key, value in zip(found_keys, found_values)}


class SentencePieceNormalizer:
    """SentencePiece's text normalisation (normalizer.cc), applied before encoding (and, as the
    "denormaliser", to decoded text where a model has one).

    At each position the longest user-defined symbol is kept as it is, else the longest rule
    (nmt_nfkc, nfkc_cf...) is applied, else the character is kept. Then, if asked: spaces at the
    start and end are removed and runs of spaces squeezed to one (remove_extra_whitespaces), spaces
    are written as '▁' (escape_whitespaces), and one '▁' is put before the text (add_dummy_prefix;
    after it with treat_whitespace_as_suffix)."""

    def __init__(self, spec: dict, user_symbols: Iterable[str] = (), whitespace_as_suffix: bool = False):
        self.rules = read_charsmap(spec[2]) if spec.get(2) else {}
        self.add_dummy_prefix = bool(spec.get(3, 1))
        self.remove_extra_whitespaces = bool(spec.get(4, 1))
        self.space = SPACE if spec.get(5, 1) else " "
        self.whitespace_as_suffix = whitespace_as_suffix
        self.user_symbols = frozenset(user_symbols)
        # first character -> the lengths of the symbols and rules starting with it, longest first
        self._user_lengths, self._rule_lengths = _lengths_by_first(self.user_symbols), _lengths_by_first(self.rules)
        # A regex finds where a symbol or rule may start: at a symbol's first character, at a
        # one-character rule, or before the second character of a longer rule (combining marks,
        # mostly: "e" + U+0301 -> "é"), so that plain text is skipped fast.
        singles = {*self._user_lengths, *(key for key in self.rules if len(key) == 1)}
        seconds = {key[1] for key in self.rules if len(key) > 1}
        starts = [_char_class(singles)] if singles else []
        if seconds:
            starts.append(f".(?={_char_class(seconds)})")
        self._starts = re.compile("|".join(starts), re.DOTALL) if starts else None
        # Without rules or whitespace clean-up, normalising is only escaping spaces and the prefix.
        self._simple = not self.rules and not self.remove_extra_whitespaces

    def _match(self, text: str, i: int) -> tuple[str, int] | None:
        """(replacement, length) of the user symbol or rule starting at text[i], or None."""
        c = text[i]
        for length in self._user_lengths.get(c, ()):
            if text[i:i + length] in self.user_symbols:
                return text[i:i + length], length
        for length in self._rule_lengths.get(c, ()):
            replacement = self.rules.get(text[i:i + length]) if i + length <= len(text) else None
            if replacement is not None:
                return replacement, length
        return None

    def _prefixes(self, text: str) -> list[tuple[str, bool]]:
        """text as (normalised piece, is_plain_run): runs of characters no rule or symbol touches
        stay whole (each of their characters normalises to itself)."""
        out, pos, run_start = [], 0, 0
        while self._starts is not None and (m := self._starts.search(text, pos)) is not None:
            i = m.start()
            match = self._match(text, i)
            if match is None:
                pos = i + 1
                continue
            if run_start < i:
                out.append((text[run_start:i], True))
            out.append((match[0], False))
            pos = run_start = i + match[1]
        if run_start < len(text):
            out.append((text[run_start:], True))
        return out

    def normalize(self, text: str, first: bool = True, last: bool = True) -> str:
        """Normalise text; first/last: whether it starts/ends the whole text (a document may be
        normalised in parts: the prefix belongs at its start, stripped spaces at its end)."""
        if not text:
            return ""
        space, squeeze = self.space, self.remove_extra_whitespaces
        if self._simple:
            body = text
        else:
            pieces = self._prefixes(text)
            if first and squeeze:  # spaces at the start are dropped; nothing else left means ""
                while pieces and (pieces[0][0] == " " or (pieces[0][1] and not pieces[0][0].strip(" "))):
                    pieces.pop(0)
                if not pieces:
                    return ""
            out, after_space = [], first and squeeze
            for piece, plain in pieces:
                if squeeze:
                    if after_space:
                        piece = piece.lstrip(" ")
                    if plain:
                        piece = _SPACE_RUNS.sub(" ", piece)
                    if piece:
                        after_space = piece.endswith(" ")
                out.append(piece)
            body = "".join(out)
        if space != " ":
            body = body.replace(" ", space)
        if first and self.add_dummy_prefix and not self.whitespace_as_suffix:
            body = space + body
        if last and squeeze:
            body = body.rstrip(space)
        if last and self.add_dummy_prefix and self.whitespace_as_suffix:
            body += space
        return body


_SPACE_RUNS = regex.compile(" {2,}")


def _lengths_by_first(keys: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """{first character: the lengths of the keys starting with it, longest first}"""
    lengths = defaultdict(set)
    for key in keys:
        lengths[key[0]].add(len(key))
    return {c: tuple(sorted(ls, reverse=True)) for c, ls in lengths.items()}


class SentencePieceTokenizer:
    """A SentencePiece BPE model (tokenizer.model), encoding and decoding exactly as the
    `sentencepiece` package does (bpe_model.cc, sentencepiece_processor.cc).

    encode(text) equals SentencePieceProcessor.encode(text): no BOS or EOS, and text such as "<s>"
    encoded as plain text; allowed_special="all" (or a set) turns control-piece text ("<s>", "</s>",
    "<unk>") into its id, encoding the text between them as separate pieces of text, as
    sentencepiece users build prompts."""

    def __init__(self, model: dict, name: str = "tokenizer.model", cache_size: int = 100_000):
        self.name, self.cache_size = name, cache_size
        trainer = model["trainer"]
        kind = trainer.get(3, 1)
        if kind != SP_BPE:
            raise UserError(f"{name} is a SentencePiece {SP_MODEL_TYPES.get(kind, f'type-{kind}')} model; only "
                            f"BPE models (Llama 2, Mistral, Phi-3) are supported")
        self.pieces = [piece for piece, _, _ in model["pieces"]]
        self.types = [kind for _, _, kind in model["pieces"]]
        # pieces BPE can produce (normal, user-defined, unused) -> id and score; control, unknown and
        # byte pieces are only looked up by exact text ("reserved")
        self._normal, self._reserved, self._score = {}, {}, {}
        for i, (piece, score, kind) in enumerate(model["pieces"]):
            if not piece or piece in self._normal or piece in self._reserved:
                raise UserError(f"{name} is not a valid SentencePiece model (piece {i} is empty or repeated)")
            if kind in (PIECE_NORMAL, PIECE_USER_DEFINED, PIECE_UNUSED):
                self._normal[piece], self._score[piece] = i, score
            else:
                self._reserved[piece] = i
        unknown = [i for i, kind in enumerate(self.types) if kind == PIECE_UNKNOWN]
        if len(unknown) != 1:
            raise UserError(f"{name} is not a valid SentencePiece model (it needs one unknown piece)")
        self.unk_id = unknown[0]
        self.byte_fallback = bool(trainer.get(35, 0))
        self._byte_ids = [self._reserved.get(f"<0x{b:02X}>") for b in range(256)]
        if self.byte_fallback and None in self._byte_ids:
            raise UserError(f"{name} is not a valid SentencePiece model (byte fallback without all 256 byte pieces)")
        self._byte_values = {i: b for b, i in enumerate(self._byte_ids) if i is not None}
        self._unused = {i for i, kind in enumerate(self.types) if kind == PIECE_UNUSED}
        self._user = frozenset(p for p, kind in zip(self.pieces, self.types) if kind == PIECE_USER_DEFINED)
        self._user_split = (regex.compile("|".join(regex.escape(s) for s in sorted(self._user, key=len, reverse=True))
                                          + "|.", regex.DOTALL) if self._user else None)
        text_field = lambda number, default: trainer[number].decode("utf-8") if trainer.get(number) else default
        self.unk_surface = text_field(44, " \u2047 ")
        self.bos_id = self._control_id(text_field(46, "<s>"))
        self.eos_id = self._control_id(text_field(47, "</s>"))
        self.normalizer = SentencePieceNormalizer(model["normalizer"], self._user, bool(trainer.get(24, 0)))
        denormalizer = model["denormalizer"]
        self.denormalizer = SentencePieceNormalizer(denormalizer) if denormalizer and denormalizer.get(2) else None
        self.special_tokens = {p: i for i, p in enumerate(self.pieces) if self.types[i] in (PIECE_CONTROL, PIECE_UNKNOWN)}
        # Chunks that merges never cross (see _chunk_regex); every internal pair of a piece can be joined.
        joined = {p[k - 1:k + 1] for p in self._normal if len(p) > 1 for k in range(1, len(p))}
        self._chunks = _chunk_regex(joined, self.normalizer.space)
        self._cache: dict[str, list[int]] = {}

    def _control_id(self, piece: str) -> int | None:
        i = self._piece_id(piece)
        return i if self.types[i] == PIECE_CONTROL else None

    def _piece_id(self, piece: str) -> int:
        """As sentencepiece's PieceToId: reserved pieces first, then normal ones, else the unknown id."""
        i = self._reserved.get(piece)
        return i if i is not None else self._normal.get(piece, self.unk_id)

    # -- the interface every tokenizer of the project offers -------------------------------------

    @property
    def n_vocab(self) -> int:
        return len(self.pieces)

    @property
    def eot_token(self) -> int:
        if self.eos_id is None:
            raise UserError(f"{self.name} has no end-of-sentence control piece to end a text with")
        return self.eos_id

    def id_to_piece(self, i: int) -> str:
        return self.pieces[i]

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids as SentencePieceProcessor.encode(text): no BOS/EOS, nothing special."""
        try:
            return self._encode_chunks(self._units(text, True, True))
        except UnicodeEncodeError:  # lone surrogates (not text sentencepiece accepts): as U+FFFD
            return self.encode_ordinary(_lone_surrogates_replaced(text))

    def encode(self, text: str, *, allowed_special: Literal["all"] | Set[str] = frozenset()) -> list[int]:
        """encode_ordinary, except that the text of allowed control pieces ("all": every control and
        unknown piece) becomes their ids; the text around them is encoded piece by piece."""
        return _encode_with_specials(self, text, allowed_special)

    def encode_blocks(self, blocks: Iterable[str]) -> Iterator[list[int]]:
        """The ids of one document given as consecutive blocks of text (see _stream_encode); their
        concatenation equals encode_ordinary of the joined text."""
        fuse = not self.byte_fallback
        previous_unknown = False
        for ids in _stream_encode(blocks, self._units, self._encode_chunks):
            if fuse and previous_unknown and ids[:1] == [self.unk_id]:
                ids = ids[1:]  # unknown pieces on both sides of a cut are one piece
            if ids:
                previous_unknown = ids[-1] == self.unk_id
            yield ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text as SentencePieceProcessor.decode: control pieces vanish, '▁' becomes a space,
        the dummy prefix's space is dropped, runs of byte pieces become the characters they spell
        (each invalid byte as U+FFFD), and the unknown piece shows as " ⁇ "."""
        out, pending, total = [], bytearray(), 0
        expect_prefix, prefix_seen = True, False  # whether the next piece may start with the dummy prefix
        strip_all = self.normalizer.remove_extra_whitespaces
        for i in ids:
            if not 0 <= i < len(self.pieces):
                raise ValueError(f"token id {i} is outside the vocabulary of {self.name} (0..{len(self.pieces) - 1})")
            kind = self.types[i]
            if kind == PIECE_BYTE:
                pending.append(self._byte_values[i])
                continue
            if pending:
                out.append(_decode_sentencepiece_bytes(pending))
                total += len(out[-1])
                pending.clear()
            if prefix_seen or total:
                expect_prefix = False
            piece, prefix_seen = self.pieces[i], False
            if kind == PIECE_CONTROL:
                piece = ""
            elif kind == PIECE_UNKNOWN:
                piece = self.unk_surface
            else:
                if expect_prefix and (self.normalizer.add_dummy_prefix or strip_all) and piece.startswith(SPACE):
                    piece, prefix_seen = piece[1:], not strip_all
                piece = piece.replace(SPACE, " ")
            out.append(piece)
            total += len(piece)
        if pending:
            out.append(_decode_sentencepiece_bytes(pending))
        text = "".join(out)
        return self.denormalizer.normalize(text) if self.denormalizer else text

    # -- encoding ----------------------------------------------------------------------------------

    def _units(self, text: str, first: bool, last: bool) -> list[str]:
        """The normalised text cut into chunks that merges never cross."""
        return self._chunks.findall(self.normalizer.normalize(text, first, last))

    def _encode_chunks(self, chunks: list[str]) -> list[int]:
        ids, cache = [], self._cache
        for chunk in chunks:
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = self._encode_chunk(chunk)
                if len(chunk) <= CACHED_CHUNK_CHARS:
                    if len(cache) >= self.cache_size:
                        cache.clear()  # bounded memory; frequent chunks come back in soon
                    cache[chunk] = chunk_ids
            ids += chunk_ids
        if not self.byte_fallback and self.unk_id in ids:
            ids = _fuse_repeats(ids, self.unk_id)  # as sentencepiece, a run of unknown pieces is one
        return ids

    def _encode_chunk(self, chunk: str) -> list[int]:
        """Merge one chunk and map its symbols to ids (unused pieces split back into their parts,
        unknown ones into byte pieces when the model has byte fallback)."""
        if self._user_split is not None:  # user-defined symbols are single symbols that never merge
            symbols = self._user_split.findall(chunk)
            frozen = [s in self._user for s in symbols]
        else:
            symbols, frozen = list(chunk), None
        parts: dict[str, tuple[str, str]] = {}  # unused piece -> the two symbols it was made of
        merge = self._merge_short if len(symbols) <= SHORT_MERGE_SYMBOLS else self._merge_long
        ids: list[int] = []
        for symbol in merge(symbols, frozen, parts):
            self._emit(symbol, parts, ids)
        return ids

    def _emit(self, symbol: str, parts: dict[str, tuple[str, str]], ids: list[int]) -> None:
        i = self._piece_id(symbol)
        if i in self._unused and symbol in parts:
            for part in parts[symbol]:
                self._emit(part, parts, ids)
        elif i == self.unk_id and self.byte_fallback:
            ids += [self._byte_ids[b] for b in symbol.encode("utf-8")]
        else:
            ids.append(i)

    def _pair_score(self, left: str, right: str, parts: dict) -> float:
        """The score of the piece left + right, or -inf when there is none. Like sentencepiece, notes
        the parts of an unused piece each time the pair comes up (it is split back at the end)."""
        score = self._score.get(left + right, -math.inf)
        if self._unused and score > -math.inf and self._normal[left + right] in self._unused:
            parts[left + right] = (left, right)
        return score

    def _merge_short(self, symbols: list[str], frozen: list[bool] | None, parts: dict) -> list[str]:
        """Merge the adjacent pair whose result has the highest score, leftmost on a tie, until no
        pair makes a piece: sentencepiece's order, found by scanning (fast for a short chunk)."""
        score = self._pair_score
        scores = [-math.inf if frozen and (frozen[k] or frozen[k + 1]) else score(symbols[k], symbols[k + 1], parts)
                  for k in range(len(symbols) - 1)]
        while scores:
            best = max(scores)
            if best == -math.inf:
                break
            k = scores.index(best)
            symbols[k:k + 2] = [symbols[k] + symbols[k + 1]]
            if frozen:
                frozen[k:k + 2] = [False]
            del scores[k]
            if k > 0:
                scores[k - 1] = -math.inf if frozen and frozen[k - 1] else score(symbols[k - 1], symbols[k], parts)
            if k < len(scores):
                scores[k] = -math.inf if frozen and frozen[k + 1] else score(symbols[k], symbols[k + 1], parts)
        return symbols

    def _merge_long(self, symbols: list[str], frozen: list[bool] | None, parts: dict) -> list[str]:
        """The same merges for a long chunk, as bpe_model.cc makes them: candidate pairs in a heap
        (highest score, then leftmost), symbols in a linked list, stale candidates skipped."""
        n = len(symbols)
        frozen = frozen or [False] * n
        prev, nxt = list(range(-1, n - 1)), [*range(1, n), -1]
        heap = []

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0 and not frozen[left] and not frozen[right]:
                s = self._pair_score(symbols[left], symbols[right], parts)
                if s > -math.inf:
                    heapq.heappush(heap, (-s, left, right, len(symbols[left]) + len(symbols[right])))

        for k in range(n - 1):
            push(k, k + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != size:
                continue  # one side was merged into something else since
            symbols[left] += symbols[right]
            symbols[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        return [s for s in symbols if s]


def _decode_sentencepiece_bytes(data: bytes | bytearray) -> str:
    """Bytes from byte pieces -> text as sentencepiece decodes them: each valid UTF-8 character as
    itself, each byte that does not start one as U+FFFD (Python's "replace" would merge some)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out, i = [], 0
    while i < len(data):
        lead = data[i]
        length = 1 if lead < 0x80 else 2 if lead >> 5 == 6 else 3 if lead >> 4 == 14 else 4 if lead >> 3 == 30 else 0
        try:
            if not length or i + length > len(data):
                raise UnicodeDecodeError("utf-8", b"", 0, 1, "")
            out.append(bytes(data[i:i + length]).decode("utf-8"))
            i += length
        except UnicodeDecodeError:
            out.append("\ufffd")
            i += 1
    return "".join(out)


def _encode_with_specials(tok, text: str, allowed_special) -> list[int]:
    """The text of allowed special tokens as their ids, the text between them through encode_ordinary."""
    allowed = tok.special_tokens if allowed_special == "all" else {
        t: i for t, i in tok.special_tokens.items() if t in allowed_special}
    if not allowed:
        return tok.encode_ordinary(text)
    specials = regex.compile("|".join(map(regex.escape, sorted(allowed, key=len, reverse=True))))
    ids, start = [], 0
    for match in specials.finditer(text):
        ids += tok.encode_ordinary(text[start:match.start()])
        ids.append(allowed[match.group()])
        start = match.end()
    return ids + tok.encode_ordinary(text[start:])


# -- Hugging Face's tokenizer.json with a BPE model --------------------------------------------------
#
# Each part of the pipeline is a JSON object with a "type"; we build each into a small function. A
# piece of text travels as (text, head, at_start): head says that it starts a piece the file's
# parts see whole (prefixes are added to such pieces only), at_start that it starts the whole input
# (Metaspace's prepend_scheme "first").

HF_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _hf_pattern(spec: dict) -> "regex.Pattern":
    """A {"String": ...} or {"Regex": ...} pattern of tokenizer.json as a compiled regex."""
    if "Regex" in spec:
        return regex.compile(spec["Regex"])
    return regex.compile(regex.escape(spec["String"]))


def _splitter(pattern: "regex.Pattern", behavior: str, invert: bool = False):
    """tokenizers' NormalizedString.split as a function: text -> (pieces, whether the first piece
    starts the text). Pieces are the pattern's matches and the text between them, joined as
    `behavior` says (Isolated, Removed, MergedWithPrevious, MergedWithNext, Contiguous); `invert`
    swaps which are the matches; empty pieces are dropped."""
    if behavior == "Isolated" and not pattern.groups:  # every piece kept: regex.split does it in C
        with_group = regex.compile(f"({pattern.pattern})", pattern.flags)
        return lambda text: ([piece for piece in with_group.split(text) if piece], True)
    if behavior not in ("Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous"):
        raise ValueError(f"the split behavior {behavior!r} is not supported")

    def split(text: str) -> tuple[list[str], bool]:
        spans, prev = [], 0  # [start, end, is_match]
        for m in pattern.finditer(text):
            if m.start() == m.end():
                continue
            if prev < m.start():
                spans.append([prev, m.start(), invert])
            spans.append([m.start(), m.end(), not invert])
            prev = m.end()
        if prev < len(text):
            spans.append([prev, len(text), invert])
        if behavior == "Removed":
            spans = [s for s in spans if not s[2]]
        elif behavior != "Isolated":  # a match joins its neighbour (Contiguous: runs of the same kind join)
            merged, previous_match = [], False
            for span in (reversed(spans) if behavior == "MergedWithNext" else spans):
                joins = span[2] == previous_match if behavior == "Contiguous" else span[2] and not previous_match
                if joins and merged:
                    merged[-1] = ([span[0], merged[-1][1], False] if behavior == "MergedWithNext"
                                  else [merged[-1][0], span[1], False])
                else:
                    merged.append(span)
                previous_match = span[2]
            spans = merged[::-1] if behavior == "MergedWithNext" else merged
        return [text[start:end] for start, end, _ in spans], bool(spans) and spans[0][0] == 0
    return split


def _hf_normalizer(spec: dict | None):
    """tokenizer.json's "normalizer" -> f(text, head, tail) -> text (head/tail: the text starts/ends
    its piece, so prefixes and stripping apply), or None."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [_hf_normalizer(s) for s in spec["normalizers"]]

        def sequence(text, head, tail):
            for step in steps:
                text = step(text, head, tail)
            return text
        return sequence
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda text, head, tail: unicodedata.normalize(kind, text)
    if kind == "Lowercase":  # character by character, as Rust's char::to_lowercase (no final sigma)
        return lambda text, head, tail: text.lower() if "Σ" not in text else "".join(c.lower() for c in text)
    if kind == "Prepend":
        prepend = spec["prepend"]
        return lambda text, head, tail: prepend + text if head and text else text
    if kind == "Replace":
        pattern, content = _hf_pattern(spec["pattern"]), spec["content"]
        return lambda text, head, tail: pattern.sub(lambda m: content, text)
    if kind == "Strip":
        left, right = spec.get("strip_left", True), spec.get("strip_right", True)

        def strip(text, head, tail):
            if left and head:
                text = _LEADING_SPACE.sub("", text)
            if right and tail:
                text = _TRAILING_SPACE.sub("", text)
            return text
        return strip
    if kind == "StripAccents":
        return lambda text, head, tail: "".join(c for c in text if unicodedata.category(c) not in ("Mn", "Mc", "Me"))
    raise ValueError(f"the normalizer {kind!r} is not supported")


_LEADING_SPACE, _TRAILING_SPACE = regex.compile(r"^\s+"), regex.compile(r"\s+$")


def _chain(steps: list):
    """tokenizer.json's "Sequence" of pre-tokenizers or decoders: each step's output is the next one's input."""
    def chained(items):
        for step in steps:
            items = step(items)
        return items
    return chained


def _hf_pre_tokenizer(spec: dict | None):
    """tokenizer.json's "pre_tokenizer" -> f(pieces) -> pieces, over (text, head, at_start) tuples;
    None when there is none (each piece is then one word)."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        return _chain([_hf_pre_tokenizer(s) for s in spec["pretokenizers"]])

    def splitting(pattern, behavior, invert=False):  # each piece becomes new pieces, each a fresh one
        split = _splitter(pattern, behavior, invert)

        def pre_tokenize(pieces):
            out = []
            for text, head, at_start in pieces:
                parts, first_at_start = split(text)
                out += [(part, True, at_start and first_at_start and k == 0) for k, part in enumerate(parts)]
            return out
        return pre_tokenize
    if kind == "Split":
        return splitting(_hf_pattern(spec["pattern"]), spec["behavior"], spec.get("invert", False))
    if kind == "Digits":
        return splitting(regex.compile(r"\p{N}"), "Isolated" if spec.get("individual_digits", False) else "Contiguous")
    if kind == "WhitespaceSplit":
        return splitting(regex.compile(r"\s"), "Removed")
    if kind == "Whitespace":
        return splitting(regex.compile(r"\w+|[^\w\s]+"), "Removed", invert=True)
    if kind == "ByteLevel":
        add_prefix, use_regex = spec.get("add_prefix_space", True), spec.get("use_regex", True)
        split = _splitter(regex.compile(HF_GPT2_PATTERN), "Isolated")
        table = dict(enumerate(bytes_to_unicode()[b] for b in range(256)))  # byte -> printable character
        to_chars = lambda text: text.encode("utf-8").decode("latin-1").translate(table)

        def byte_level(pieces):
            out = []
            for text, head, at_start in pieces:
                if add_prefix and head and not text.startswith(" "):
                    text = " " + text
                parts = split(text)[0] if use_regex else [text]
                out += [(to_chars(part), True, at_start and k == 0) for k, part in enumerate(parts)]
            return out
        return byte_level
    if kind == "Metaspace":
        replacement = spec.get("replacement", SPACE)
        scheme = _prepend_scheme(spec)
        split = spec.get("split", True)
        split_at = _splitter(regex.compile(regex.escape(replacement)), "MergedWithNext")

        def metaspace(pieces):
            out = []
            for text, head, at_start in pieces:
                text = text.replace(" ", replacement)
                if not text.startswith(replacement) and (scheme == "always" and head or scheme == "first" and at_start):
                    text = replacement + text
                parts, first_at_start = split_at(text) if split else ([text], True)
                out += [(part, True, at_start and first_at_start and k == 0) for k, part in enumerate(parts)]
            return out
        return metaspace
    raise ValueError(f"the pre-tokenizer {kind!r} is not supported")


def _prepend_scheme(spec: dict) -> str:
    if spec.get("add_prefix_space") is False:
        return "never"
    return spec.get("prepend_scheme", "always")


def _hf_decoder(spec: dict | None):
    """tokenizer.json's "decoder" -> f(tokens) -> tokens (join them for the text); None if absent."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        return _chain([_hf_decoder(s) for s in spec["decoders"]])
    if kind == "ByteLevel":  # tokens spelled in GPT-2's printable characters back to bytes, then UTF-8
        table = _unicode_to_bytes()
        to_bytes = lambda t: bytes(table[c] for c in t) if all(c in table for c in t) else t.encode("utf-8")
        return lambda tokens: [b"".join(map(to_bytes, tokens)).decode("utf-8", "replace")]
    if kind == "Replace":
        pattern, content = _hf_pattern(spec["pattern"]), spec["content"]
        return lambda tokens: [pattern.sub(lambda m: content, t) for t in tokens]
    if kind == "ByteFallback":
        return _byte_fallback_decoder
    if kind == "Fuse":
        return lambda tokens: ["".join(tokens)]
    if kind == "Strip":
        content, start, stop = spec["content"], spec.get("start", 0), spec.get("stop", 0)

        def strip(tokens):
            out = []
            for t in tokens:
                begin = 0
                while begin < min(start, len(t)) and t[begin] == content:
                    begin += 1
                end = len(t)
                while len(t) - end < stop and end > begin and t[end - 1] == content:
                    end -= 1
                out.append(t[begin:end])
            return out
        return strip
    if kind == "Metaspace":
        replacement, scheme = spec.get("replacement", SPACE), _prepend_scheme(spec)
        return lambda tokens: [t.replace(replacement, "" if k == 0 and scheme != "never" else " ")
                               for k, t in enumerate(tokens)]
    raise ValueError(f"the decoder {kind!r} is not supported")


_BYTE_TOKEN = regex.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_fallback_decoder(tokens: list[str]) -> list[str]:
    """Runs of <0xNN> tokens -> the text they spell, or one U+FFFD per byte if it is not valid UTF-8."""
    out, pending = [], bytearray()
    for t in tokens + [None]:
        m = _BYTE_TOKEN.fullmatch(t) if t is not None and len(t) == 6 else None
        if m:
            pending.append(int(m.group(1), 16))
            continue
        if pending:
            try:
                out.append(pending.decode("utf-8"))
            except UnicodeDecodeError:
                out += ["\ufffd"] * len(pending)
            pending = bytearray()
        if t is not None:
            out.append(t)
    return out


def _hf_bos_id(spec: dict | None) -> int | None:
    """The id the post-processor puts before a text, or None (what bos_id reports)."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "TemplateProcessing":
        first = spec["single"][0] if spec.get("single") else {}
        if "SpecialToken" in first:
            return spec["special_tokens"][first["SpecialToken"]["id"]]["ids"][0]
        return None
    if kind in ("RobertaProcessing", "BertProcessing"):
        return spec["cls"][1]
    if kind == "Sequence":
        return next((i for p in spec["processors"] if (i := _hf_bos_id(p)) is not None), None)
    return None


# Tokens that end a text in the families we know, tried when no tokenizer_config.json names one.
KNOWN_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")


class HFTokenizer:
    """A Hugging Face tokenizer.json with a BPE model, encoding and decoding exactly as the
    `tokenizers` library does (Tokenizer.encode(text, add_special_tokens=False), Tokenizer.decode).

    encode(text) matches special tokens in the text, as tokenizers does; encode_ordinary(text)
    encodes their text as plain text (tokenizers' encode_special_tokens). decode skips special
    tokens, as tokenizers' decode does by default. eos_id comes from the tokenizer_config.json beside
    the file, else from the special tokens that end texts in the families we know."""

    def __init__(self, spec: dict, config: dict | None = None, name: str = "tokenizer.json",
                 cache_size: int = 100_000):
        self.name, self.cache_size = name, cache_size
        model = spec["model"]
        self.vocab: dict[str, int] = model["vocab"]
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        if any(len(m) != 2 for m in merges):
            raise ValueError("a merge is not two tokens")
        self._prefix = model.get("continuing_subword_prefix") or ""
        self._suffix = model.get("end_of_word_suffix") or ""
        # (left id, right id) -> (rank, merged id); a later duplicate wins, as in tokenizers
        self._merges = {(self.vocab[a], self.vocab[b]): (rank, self.vocab[a + b[len(self._prefix):]])
                        for rank, (a, b) in enumerate(merges)}
        unk = model.get("unk_token")
        self.unk_id = self.vocab.get(unk) if unk is not None else None
        self.fuse_unk = bool(model.get("fuse_unk", False))
        self.byte_fallback = bool(model.get("byte_fallback", False))
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self._byte_ids = [self.vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self.normalizer = _hf_normalizer(spec.get("normalizer"))
        self.pre_tokenizer = _hf_pre_tokenizer(spec.get("pre_tokenizer"))
        self.decoder = _hf_decoder(spec.get("decoder"))
        self.bos_id = _hf_bos_id(spec.get("post_processor"))

        # Added tokens: an existing vocabulary token keeps its id. Tokens marked "normalized" are
        # matched after normalisation, the others in the raw text.
        self.added = []
        for token in spec.get("added_tokens", []):
            content = token["content"]
            i = self.vocab.get(content, token["id"])
            text = self.normalizer(content, True, True) if token.get("normalized", True) and self.normalizer else content
            self.added.append({**token, "id": i, "text": text})
        self.special_tokens = {t["content"]: t["id"] for t in self.added if t.get("special")}
        self._added_by_text = [{t["text"]: t for t in self.added if bool(t.get("normalized", True)) == normalized}
                               for normalized in (False, True)]
        self._added_regex = [regex.compile("|".join(map(regex.escape, sorted(by_text, key=len, reverse=True))))
                             if by_text else None for by_text in self._added_by_text]
        self.n_vocab = max([*self.vocab.values(), *(t["id"] for t in self.added)]) + 1
        # id -> token text, for decoding; added tokens decode as their (normalised) text
        self._tokens = [None] * self.n_vocab
        for token, i in self.vocab.items():
            self._tokens[i] = token
        for t in self.added:
            self._tokens[t["id"]] = t["text"]
        self._special_ids = {t["id"] for t in self.added if t.get("special")}
        self.eos_id = self._eos_from(config or {})

        # Chunks no merge crosses, for long words (see _chunk_regex). Not when a merge involves a
        # byte or unknown token (their text is not the text they stand for) or subword markers.
        parts = {p for m in merges for p in m}
        markers = {f"<0x{b:02X}>" for b in range(256)} | ({unk} if unk else set())
        self._chunks = None
        if not self._prefix and not self._suffix and not parts & markers:
            self._chunks = _chunk_regex({a[-1] + b[0] for a, b in merges}, SPACE)
        # Chunks of a word are encoded apart unless unknown characters at the end of one and the start
        # of the next would have been fused into one unknown token.
        fused_unknowns = self.fuse_unk and self.unk_id is not None and not (self.byte_fallback and None not in self._byte_ids)
        self._chunks_apart = self._chunks is not None and not fused_unknowns
        self._cache: dict[str, list[int]] = {}

    def _eos_from(self, config: dict) -> int | None:
        token = config.get("eos_token")
        if isinstance(token, dict):
            token = token.get("content")
        ids = {t["content"]: t["id"] for t in self.added} | self.vocab
        if isinstance(token, str) and token in ids:
            return ids[token]
        return next((self.special_tokens[t] for t in KNOWN_EOS_TOKENS if t in self.special_tokens), None)

    # -- the interface every tokenizer of the project offers -------------------------------------

    @property
    def eot_token(self) -> int:
        if self.eos_id is None:
            raise UserError(f"{self.name} names no token that ends a text; put the model's tokenizer_config.json "
                            f"(with its eos_token) beside it")
        return self.eos_id

    def id_to_piece(self, i: int) -> str:
        return self._tokens[i] if 0 <= i < len(self._tokens) and self._tokens[i] is not None else ""

    def encode(self, text: str, *, allowed_special: Literal["all"] | Set[str] = "all") -> list[int]:
        """tokenizers' encode(text, add_special_tokens=False).ids: special-token text becomes its id
        (only the allowed ones when a set is given; the others are plain text)."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        try:
            return self._encode_units(self._units(text, True, True, allowed))
        except UnicodeEncodeError:  # lone surrogates (not text tokenizers accepts): as U+FFFD
            return self.encode(_lone_surrogates_replaced(text), allowed_special=allowed)

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids with special-token text encoded as plain text (added tokens that are not
        special, which are part of the vocabulary, still match)."""
        return self.encode(text, allowed_special=frozenset())

    def encode_blocks(self, blocks: Iterable[str]) -> Iterator[list[int]]:
        """The ids of one document given as consecutive blocks of text (see _stream_encode)."""
        return _stream_encode(blocks, lambda text, first, last: self._units(text, first, last, set()),
                              self._encode_units)

    def decode(self, ids: Sequence[int]) -> str:
        """tokenizers' decode(ids): special tokens and ids outside the vocabulary are skipped, the
        others go through the file's decoder (without one, tokens are joined by spaces)."""
        tokens = [self._tokens[i] for i in ids
                  if 0 <= i < len(self._tokens) and self._tokens[i] is not None and i not in self._special_ids]
        return "".join(self.decoder(tokens)) if self.decoder else " ".join(tokens)

    # -- encoding ----------------------------------------------------------------------------------

    def _find_added(self, text: str, normalized: bool, allowed: set[str]) -> list[int | tuple[int, int]]:
        """tokenizers' AddedVocabulary.find_matches: the added tokens in text (leftmost, longest
        first), as ids, and the text between them as (start, end); special tokens not allowed are
        passed over, and single_word, lstrip and rstrip are honoured."""
        pattern, by_text = self._added_regex[normalized], self._added_by_text[normalized]
        if pattern is None:
            return [(0, len(text))] if text else []
        out, done = [], 0
        for m in pattern.finditer(text):
            token = by_text[m.group()]
            if token.get("special") and token["content"] not in allowed:
                continue
            start, stop = m.span()
            if token.get("single_word") and ((start > 0 and _WORD.match(text, start - 1)) or _WORD.match(text, stop)):
                continue  # a single-word token must not touch a word character on either side
            if token.get("lstrip"):
                while start > done and _WHITESPACE.match(text, start - 1, start):
                    start -= 1
            if token.get("rstrip"):
                stop = _WHITESPACES.match(text, stop).end()
            if done < start:
                out.append((done, start))
            out.append(token["id"])
            done = stop
        if done < len(text):
            out.append((done, len(text)))
        return out

    def _units(self, text: str, first: bool, last: bool, allowed: set[str]) -> list[str | int]:
        """text -> the words BPE merges one by one, and the ids of the added tokens found in it.
        first/last: the text starts/ends the input (see _stream_encode)."""
        pieces = []  # (text, head, at_start) and added-token ids, in order
        for item in self._find_added(text, False, allowed):
            if isinstance(item, int):
                pieces.append(item)
                continue
            start, end = item
            head, tail = start > 0 or first, end < len(text) or last
            piece = text[start:end]
            if self.normalizer:
                piece = self.normalizer(piece, head, tail)
            for j, sub in enumerate(self._find_added(piece, True, allowed)):
                if isinstance(sub, int):
                    pieces.append(sub)
                else:
                    at_start = first and start == 0 and j == 0 and sub[0] == 0
                    pieces.append((piece[sub[0]:sub[1]], head or sub[0] > 0, at_start))
        units, run = [], []
        for piece in pieces + [None]:  # pre-tokenize each run of text pieces between added tokens
            if isinstance(piece, tuple):
                run.append(piece)
                continue
            for word, _, _ in self.pre_tokenizer(run) if self.pre_tokenizer else run:
                # A long word (all of the text, without a pre-tokenizer) is merged chunk by chunk.
                if self._chunks_apart and len(word) > CACHED_CHUNK_CHARS and word not in self.vocab:
                    units += self._chunks.findall(word)
                elif word:
                    units.append(word)
            run = []
            if piece is not None:
                units.append(piece)
        return units

    def _encode_units(self, units: list[str | int]) -> list[int]:
        ids = []
        for unit in units:
            if isinstance(unit, int):
                ids.append(unit)
            elif self.ignore_merges and unit in self.vocab:
                ids.append(self.vocab[unit])  # a word that is a token is kept whole
            elif self._chunks is None or len(unit) <= CACHED_CHUNK_CHARS:
                ids += self._encode_chunk(unit)
            else:  # a long word whose chunks may fuse unknown characters: chunk by chunk, then fused
                word_ids = []
                for chunk in self._chunks.findall(unit):
                    word_ids += self._encode_chunk(chunk)
                if self.fuse_unk and self.unk_id in word_ids:
                    word_ids = _fuse_repeats(word_ids, self.unk_id)  # unknown characters on both sides of a cut
                ids += word_ids
        return ids

    def _encode_chunk(self, chunk: str) -> list[int]:
        chunk_ids = self._cache.get(chunk)
        if chunk_ids is None:
            chunk_ids = self._merge(self._symbols(chunk))
            if len(chunk) <= CACHED_CHUNK_CHARS:
                if len(self._cache) >= self.cache_size:
                    self._cache.clear()  # bounded memory; frequent words come back in soon
                self._cache[chunk] = chunk_ids
        return chunk_ids

    def _symbols(self, word: str) -> list[int]:
        """The ids BPE starts from (tokenizers' merge_word): each character's token, else its
        <0xNN> byte tokens (byte_fallback), else the unknown token (runs fused with fuse_unk)."""
        symbols, pending_unknown, vocab, last = [], False, self.vocab, len(word) - 1
        for k, c in enumerate(word):
            s = (self._prefix + c if k and self._prefix else c) + (self._suffix if k == last else "")
            i = vocab.get(s)
            if i is not None:
                if pending_unknown:
                    symbols.append(self.unk_id)
                    pending_unknown = False
                symbols.append(i)
            elif self.byte_fallback and None not in (byte_ids := [self._byte_ids[b] for b in s.encode("utf-8")]):
                symbols += byte_ids  # (tokenizers puts these before a pending unknown token too)
            elif self.unk_id is not None:  # without one, tokenizers drops the character
                if pending_unknown and not self.fuse_unk:
                    symbols.append(self.unk_id)
                pending_unknown = True
        return symbols + [self.unk_id] * pending_unknown

    def _merge(self, symbols: list[int]) -> list[int]:
        """Apply the lowest-ranked merge among adjacent pairs, leftmost on a tie, until none applies."""
        if len(symbols) > SHORT_MERGE_SYMBOLS:
            return self._merge_long(symbols)
        merges, inf = self._merges, (math.inf, -1)
        ranks = [merges.get(pair, inf)[0] for pair in zip(symbols, symbols[1:])]
        while ranks:
            best = min(ranks)
            if best == math.inf:
                break
            k = ranks.index(best)
            symbols[k:k + 2] = [merges[symbols[k], symbols[k + 1]][1]]
            del ranks[k]
            if k > 0:
                ranks[k - 1] = merges.get((symbols[k - 1], symbols[k]), inf)[0]
            if k < len(ranks):
                ranks[k] = merges.get((symbols[k], symbols[k + 1]), inf)[0]
        return symbols

    def _merge_long(self, symbols: list[int]) -> list[int]:
        """The same merges for a long word, as tokenizers' Word::merge_all makes them: a heap of
        (rank, position, merged id), stale entries skipped."""
        merges, n = self._merges, len(symbols)
        alive, prev, nxt = [True] * n, list(range(-1, n - 1)), [*range(1, n), -1]
        heap = [(m[0], k, m[1]) for k in range(n - 1) if (m := merges.get((symbols[k], symbols[k + 1])))]
        heapq.heapify(heap)
        while heap:
            _, k, new = heapq.heappop(heap)
            right = nxt[k]
            if not alive[k] or right < 0 or merges.get((symbols[k], symbols[right]), (0, -1))[1] != new:
                continue
            symbols[k], alive[right] = new, False
            nxt[k] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = k
            if prev[k] >= 0 and (m := merges.get((symbols[prev[k]], new))):
                heapq.heappush(heap, (m[0], prev[k], m[1]))
            if nxt[k] >= 0 and (m := merges.get((new, symbols[nxt[k]]))):
                heapq.heappush(heap, (m[0], k, m[1]))
        return [s for s, a in zip(symbols, alive) if a]


_WORD, _WHITESPACE, _WHITESPACES = regex.compile(r"\w"), regex.compile(r"\s"), regex.compile(r"\s*")


# -- reading either file -------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # a model folder's tokenizer, in this order


def load_tokenizer(path: str | Path) -> "SentencePieceTokenizer | HFTokenizer | BPETokenizer":
    """The tokenizer stored at `path`: a SentencePiece tokenizer.model, a Hugging Face tokenizer.json
    (BPE), our own BPETokenizer file, or a model folder holding tokenizer.json or tokenizer.model
    (tokenizer.json first: it also lists the chat tokens added to a model). A file read once is
    kept, and read again when it changes."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not found:
            raise UserError(f"{path} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the model's tokenizer "
                            f"files into it")
        path = found[0]
    try:
        stat = path.stat()
    except OSError as e:
        raise _open_error(path, e) from None
    return _load_tokenizer_cached(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(path: Path, mtime_ns: int, size: int):
    return _load_tokenizer(path)


def _load_tokenizer(path: Path):
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _open_error(path, e) from None
    neither = (f"{path} is neither a SentencePiece model (tokenizer.model) nor a Hugging Face tokenizer.json; "
               f"point to the model's tokenizer file")
    if data.lstrip()[:1] == b"{":
        return _load_json_tokenizer(path, data)
    try:
        model = read_sentencepiece_model(data)
    except ProtobufError as e:
        if e.truncated:
            raise UserError(f"{path} is an incomplete SentencePiece model ({e}); download or copy it again") from None
        raise UserError(neither) from None
    try:
        return SentencePieceTokenizer(model, str(path))
    except (ValueError, IndexError) as e:  # normalisation rules that do not decode
        raise UserError(f"{path} is a corrupt SentencePiece model ({e}); download or copy it again") from None


def _load_json_tokenizer(path: Path, data: bytes):
    try:
        spec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); it may be cut short: download or copy it again") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        if isinstance(spec, dict) and spec.get("format") == "bpe-tokenizer/1":
            return BPETokenizer.load(path)
        raise UserError(f"{path} is JSON but not a Hugging Face tokenizer.json (it has no \"model\")")
    kind = spec["model"].get("type", "BPE" if "merges" in spec["model"] else None)
    if kind != "BPE":
        raise UserError(f"{path} holds a {kind or 'untyped'} tokenizer model; only BPE tokenizer.json files are "
                        f"supported (WordPiece and Unigram are not)")
    config_path = path.with_name("tokenizer_config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (OSError, ValueError):
        raise UserError(f"{config_path} is not valid JSON; fix it or remove it") from None
    try:
        return HFTokenizer(spec, config if isinstance(config, dict) else {}, str(path))
    except (KeyError, IndexError, TypeError, ValueError, regex.error) as e:
        reason = e if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise UserError(f"{path} is a tokenizer.json this project cannot read ({reason})") from None


# ----------------------------------------------------------------------------------------------
# Data input: text -> next-token windows

def _bad_utf8(path: Path, offset: int) -> UserError:
    return UserError(f"{path} is not valid UTF-8 (bad byte at offset {offset}); convert it to UTF-8, or decode "
                     f"with replacement characters (errors='replace', on the command line --errors replace)")


def _open_error(path: Path, e: OSError) -> UserError:
    if isinstance(e, FileNotFoundError):
        return UserError(f"{path} does not exist")
    if isinstance(e, IsADirectoryError):
        return UserError(f"{path} is a folder, not a text file")
    return UserError(f"cannot read {path} ({e.strerror})")


def read_text(path: str | Path, errors: str = "strict") -> str:
    """A whole UTF-8 text file; errors="replace" decodes bad bytes as U+FFFD instead of failing."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _open_error(path, e) from None
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise _bad_utf8(path, e.start) from None


class GPTDataset(Dataset):
    """Next-token windows over one token sequence: item i is (x, y), both (max_length,) int64, with
    x = ids[s : s + max_length], y = ids[s + 1 : s + max_length + 1] and s = i * stride.

    stride < max_length makes windows overlap (more samples, more repetition); stride == max_length
    uses each token once as a target."""

    def __init__(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise UserError(f"max_length and stride must be positive, got {max_length} and {stride}")
        self.ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))  # (N,)
        if len(self.ids) <= max_length:
            raise UserError(f"the text has {len(self.ids)} tokens, too few for one window of {max_length} tokens "
                            f"plus its next-token target; use more text or a smaller max_length")
        self.max_length = max_length
        self.starts = range(0, len(self.ids) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.starts[i]
        return self.ids[s:s + self.max_length], self.ids[s + 1:s + 1 + self.max_length]


def create_dataloader(text: str, tokenizer: "tiktoken.Encoding | BPETokenizer | None" = None, *,
                      batch_size: int = 4, max_length: int = 256, stride: int = 128,
                      shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                      generator: torch.Generator | None = None) -> DataLoader:
    """Tokenize `text` (GPT-2 by default; "<|endoftext|>" counts as the special token) into a
    DataLoader of (x, y) batches, each (batch_size, max_length) int64."""
    tokenizer = tokenizer or get_tokenizer()
    if not text:
        raise UserError("the text is empty; give some text to train on")
    dataset = GPTDataset(tokenizer.encode(text, allowed_special="all"), max_length, stride)
    if drop_last and len(dataset) < batch_size:
        raise UserError(f"the text gives {len(dataset)} windows of {max_length} tokens, fewer than one batch of "
                        f"{batch_size}; use more text, or a smaller batch size, max_length or stride")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


# -- corpora larger than memory: flat token files, read back through memmaps ----------------------

def corpus_files(source: str | Path) -> list[Path]:
    """A file, every file under a folder (hidden ones skipped), or the files a glob matches; sorted."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(f for f in path.rglob("*")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
        if not files:
            raise UserError(f"the folder {path} holds no files")
        return files
    if any(c in str(source) for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(source), recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"no files match {source}")
        return files
    raise UserError(f"{source} does not exist")


def _utf8_cut(data: bytes) -> int:
    """Where a UTF-8 character cut off at the end of `data` starts (len(data) if none is cut off)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: ASCII or the start of a character
            needed = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) - back if back < needed else len(data)
    return len(data)


def read_blocks(path: Path, errors: str, block_bytes: int) -> Iterator[tuple[str, int]]:
    """Decode a file block by block, yielding (text, bytes it came from); a bad byte names its offset."""
    offset, carry = 0, b""
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(block_bytes)
                data = carry + block
                cut = _utf8_cut(data) if block else len(data)  # keep a cut-off character for the next block
                data, carry = data[:cut], data[cut:]
                try:
                    text = data.decode("utf-8", errors)
                except UnicodeDecodeError as e:
                    raise _bad_utf8(path, offset + e.start) from None
                yield text, len(data)
                offset += len(data)
                if not block:
                    return
    except OSError as e:
        raise _open_error(path, e) from None


def _split_safely(text: str) -> int:
    """An index at which `text` can be cut without changing how GPT-2's regex splits it, or 0.

    We cut just before a newline that follows a non-space character: no pre-tokenized piece contains
    both (the non-space piece ends there, and the whitespace pieces start at the newline), and the
    piece before the cut cannot see the cut through its look-ahead or `$`."""
    cut = text.rfind("\n")
    while cut > 0 and text[cut - 1].isspace():
        cut = text.rfind("\n", 0, cut)
    return max(cut, 0)


def _tiktoken_gpt2_blocks(enc: tiktoken.Encoding, blocks: Iterable[str], num_threads: int) -> Iterator[list[int]]:
    """The ids of one document through tiktoken's GPT-2 encoding: the text is cut where GPT-2's regex
    allows (_split_safely) and the chunks are encoded num_threads at a time (tiktoken releases the GIL)."""
    pending, chunks = "", []
    for text in blocks:
        pending += text
        if cut := _split_safely(pending):
            chunks.append(pending[:cut])
            pending = pending[cut:]
        if len(chunks) >= num_threads:
            yield from enc.encode_ordinary_batch(chunks, num_threads=num_threads)
            chunks = []
    yield from enc.encode_ordinary_batch([*chunks, pending], num_threads=num_threads)


def document_ids(tokenizer, blocks: Iterable[str], num_threads: int) -> Iterator[list[int]]:
    """The ids of one document (no BOS/EOS) as lists, from its text blocks, for any tokenizer."""
    if isinstance(tokenizer, tiktoken.Encoding) and tokenizer._pat_str == GPT2_PATTERN:
        return _tiktoken_gpt2_blocks(tokenizer, blocks, num_threads)
    if hasattr(tokenizer, "encode_blocks"):  # ours: cut where it provably changes nothing
        return tokenizer.encode_blocks(blocks)
    return iter([tokenizer.encode_ordinary("".join(blocks))])  # any other: the document whole


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2, Mistral, Llama 2), else uint32 (Llama 3's 128k tokens)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare_corpus(source: str | Path, out_dir: str | Path, *, tokenizer=None, tokenizer_name: str = "gpt2",
                   val_fraction: float = 0.1, errors: str = "strict", num_threads: int | None = None,
                   block_bytes: int = 1 << 20) -> dict:
    """Tokenize a text file, folder or glob into out_dir/{train,val}.bin + meta.json.

    `tokenizer` is any of the project's tokenizers (None: GPT-2 through tiktoken); `tokenizer_name`
    is recorded in meta.json. Each file is one document: bos(tokenizer) + its ids + the end-of-text
    id. The .bin files are flat token ids, uint16 when the vocabulary fits, else uint32 (read them
    with load_token_folder); the last `val_fraction` of the tokens is the validation split. Text is
    read `block_bytes` at a time and cut only where the ids cannot change, so a corpus never has to
    fit in memory; tiktoken encodes on `num_threads` threads, our pure-Python tokenizers on this one.
    Returns meta.json's contents plus the bytes read and the seconds taken."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = corpus_files(source)
    tok = tokenizer if tokenizer is not None else get_tokenizer("tiktoken")
    if tok.eos_id is None:
        raise UserError(f"the tokenizer {tokenizer_name} has no end-of-text token to close each document with")
    dtype, start_ids, end_id = token_dtype(tok.n_vocab), bos(tok), tok.eos_id
    num_threads = num_threads or os.cpu_count() or 1
    total_bytes = sum(f.stat().st_size for f in files)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_tmp, val_tmp = out_dir / "tokens.bin.tmp", out_dir / "val.bin.tmp"
    start, bytes_done, n_tokens = time.perf_counter(), 0, 0
    progress = ProgressLine(f"tokenizing {len(files)} file(s)", total_bytes)
    try:
        with RunLock(out_dir), open(all_tmp, "wb") as out:
            def write(ids: list[int]) -> None:
                nonlocal n_tokens
                np.asarray(ids, dtype=dtype).tofile(out)
                n_tokens += len(ids)

            for path in files:
                has_text = False

                def blocks(path: Path = path) -> Iterator[str]:  # the file's text, counted as it is read
                    nonlocal bytes_done, has_text
                    for text, n_bytes in read_blocks(path, errors, block_bytes):
                        has_text = has_text or bool(text)
                        bytes_done += n_bytes
                        progress.update(bytes_done, f"{n_tokens:,} tokens")
                        yield text

                started = False  # BOS is written before the first ids of a file that has text
                for ids in document_ids(tok, blocks(), num_threads):
                    if has_text and not started:
                        write(start_ids)
                        started = True
                    write(ids)
                if has_text:
                    write([end_id])
            progress.close()  # before any error below, so that the message starts on a line of its own
            if n_tokens == 0:
                raise UserError(f"{source} holds no text to tokenize")
            out.flush()
            # The tail becomes val.bin; the file is then cut to the head and renamed train.bin.
            n_val = int(n_tokens * val_fraction)
            tokens = np.memmap(all_tmp, dtype=dtype, mode="r")
            tokens[n_tokens - n_val:].tofile(val_tmp)
            del tokens  # unmap before cutting the file
            os.truncate(all_tmp, dtype.itemsize * (n_tokens - n_val))
            os.replace(all_tmp, out_dir / "train.bin")
            os.replace(val_tmp, out_dir / "val.bin")
            meta = {"vocab_size": tok.n_vocab, "dtype": dtype.name, "eot_token": end_id, "bos_id": tok.bos_id,
                    "eos_id": end_id, "tokenizer_name": tokenizer_name, "train_tokens": n_tokens - n_val,
                    "val_tokens": n_val, "sources": [str(f) for f in files]}
            atomic_write(out_dir / "meta.json", json.dumps(meta, indent=2))
    finally:
        all_tmp.unlink(missing_ok=True)
        val_tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return {**meta, "bytes": total_bytes, "seconds": seconds, "mb_per_s": total_bytes / 1e6 / seconds}


def load_tokens(path: str | Path, dtype: str | np.dtype = "uint16") -> np.memmap:
    """A token file written by prepare_corpus, as a read-only memmap of `dtype` (nothing is read yet)."""
    path, dtype = Path(path), np.dtype(dtype)
    if not path.is_file():
        raise UserError(f"token file {path} does not exist; make it with: python tokenizer.py prepare INPUT --out DIR")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"token file {path} is empty")
    if size % dtype.itemsize:
        raise UserError(f"token file {path} has {size:,} bytes, not a whole number of {dtype.name} tokens: it is cut "
                        f"short or corrupt; prepare it again with: python tokenizer.py prepare INPUT --out DIR")
    return np.memmap(path, dtype=dtype, mode="r")


def load_token_folder(folder: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """A folder written by prepare_corpus -> (train, val, meta): read-only memmaps of meta's dtype
    (uint16 for folders written before meta.json had one) and meta.json's contents, after checking
    that meta.json is whole and that each .bin file holds the number of tokens it says."""
    folder = Path(folder)
    again = f"prepare it again with: python tokenizer.py prepare INPUT --out {folder}"
    if not folder.is_dir():
        raise UserError(f"the token folder {folder} does not exist; make it with: python tokenizer.py prepare "
                        f"INPUT --out {folder}")
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{meta_path} is missing; {again}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path} is not valid JSON ({e}); {again}") from None
    counts = ("train_tokens", "val_tokens", "vocab_size")
    if not isinstance(meta, dict) or not all(type(meta.get(key)) is int and meta[key] >= 0 for key in counts):
        raise UserError(f"{meta_path} does not give whole numbers for {', '.join(counts)}; {again}")
    dtype = meta.get("dtype", "uint16")
    if dtype not in ("uint16", "uint32"):
        raise UserError(f"{meta_path} names the token type {dtype!r}, not uint16 or uint32; {again}")
    dtype, splits = np.dtype(dtype), []
    for name, key in (("train.bin", "train_tokens"), ("val.bin", "val_tokens")):
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is missing; {again}")
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise UserError(f"{path} has {size:,} bytes, not a whole number of {dtype.name} tokens: it is cut short "
                            f"or corrupt; {again}")
        if size // dtype.itemsize != meta[key]:
            raise UserError(f"{path} holds {size // dtype.itemsize:,} tokens but meta.json says {meta[key]:,}: it "
                            f"is cut short or was changed; {again}")
        splits.append(np.memmap(path, dtype=dtype, mode="r") if size else np.empty(0, dtype=dtype))
    return splits[0], splits[1], meta


def sample_windows(tokens: np.ndarray, batch_size: int, block_size: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows from a flat token array: x (batch_size, block_size) int64, y = x shifted by one."""
    if len(tokens) <= block_size:
        raise UserError(f"the token file has {len(tokens)} tokens, too few for one window of {block_size} tokens "
                        f"plus its next-token target; use more text or a smaller block size")
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(tokens[s:s + block_size].astype(np.int64)) for s in starts])
    y = torch.stack([torch.from_numpy(tokens[s + 1:s + 1 + block_size].astype(np.int64)) for s in starts])
    return x, y  # (B, T), (B, T)


# ----------------------------------------------------------------------------------------------
# Command line

SAMPLE_TEXT = "Hello, world! It's 2024 and GPT-2 still splits   spaces, naïve café 🤖 <|endoftext|>"


def show_encodings(text: str, special: bool) -> dict:
    """Print ids and pieces from both backends and whether they agree."""
    ids = {}
    for backend in BACKENDS:
        tok = get_tokenizer(backend)
        ids[backend] = (tok.encode(text, allowed_special="all") if special
                        else tok.encode(text, disallowed_special=()))
        pieces = [tok.decode_single_token_bytes(i).decode("utf-8", "replace") for i in ids[backend]]
        print(f"{backend:>8} ids    ({len(ids[backend])}): {ids[backend]}")
        print(f"{backend:>8} pieces: {' | '.join(repr(p) for p in pieces)}")
    agree = ids["tiktoken"] == ids["scratch"]
    print(f"text: {text!r}\nbackends agree: {'yes' if agree else 'NO'}")
    return {"text": text, **ids, "agree": agree}


def show_tokenizer(tok, text: str, special: bool) -> dict:
    """Print the ids and pieces of `text` through a tokenizer read by load_tokenizer, and its decoding."""
    ids = tok.encode(text, allowed_special="all") if special else tok.encode_ordinary(text)
    pieces = [tok.id_to_piece(i) for i in ids]
    decoded = tok.decode(ids)
    print(f"ids    ({len(ids)}): {ids}")
    print(f"pieces: {' | '.join(repr(p) for p in pieces)}")
    print(f"decoded: {decoded!r}")
    print(f"{type(tok).__name__}: {tok.n_vocab:,} tokens; bos_id {tok.bos_id}, eos_id {tok.eos_id}")
    return {"text": text, "ids": ids, "pieces": pieces, "decoded": decoded}


def train_command(args: argparse.Namespace) -> dict:
    files = corpus_files(args.input)
    writable_file(args.out, "--out")
    if args.out.exists() and not args.force:
        raise UserError(f"{args.out} exists; use --force to replace it, or choose another --out")
    text = ENDOFTEXT.join(read_text(f, args.errors) for f in files)  # one document per file
    start = time.perf_counter()
    tok = BPETokenizer().train(text, args.vocab_size)
    seconds = time.perf_counter() - start
    tok.save(args.out)
    n_tokens = len(tok.encode(text, allowed_special="all"))
    bytes_per_token = len(text.encode("utf-8")) / max(n_tokens, 1)
    first = [tok.vocab[i].decode("utf-8", "replace") for i in range(256, min(266, len(tok.ranks)))]
    print(f"trained {tok.n_vocab} tokens on {len(text.encode('utf-8')) / 1e6:.2f} MB in {seconds:.2f} s; "
          f"{bytes_per_token:.2f} bytes per token; first merges {first}; saved {args.out}")
    return {"vocab_size": tok.n_vocab, "seconds": seconds, "bytes_per_token": bytes_per_token, "out": str(args.out)}


def prepare_command(args: argparse.Namespace) -> dict:
    corpus_files(args.input)  # a missing input is reported before anything is created
    tok = load_tokenizer(named_tokenizer(args.tokenizer)) if args.tokenizer else None
    # meta.json names the tokenizer as model cards do: a path, or its place in the download cache
    tokenizer_name = NAMED_TOKENIZERS.get(args.tokenizer) or (str(Path(args.tokenizer).resolve()) if args.tokenizer
                                                               else "gpt2")
    out = writable_folder(args.out, "--out")
    if not args.force and any((out / name).exists() for name in ("train.bin", "val.bin", "meta.json")):
        raise UserError(f"{out} already holds prepared tokens; use --force to replace them, or choose another --out")
    result = prepare_corpus(args.input, out, tokenizer=tok, tokenizer_name=tokenizer_name,
                            val_fraction=args.val_fraction, errors=args.errors, num_threads=args.threads)
    print(f"{result['train_tokens']:,} train and {result['val_tokens']:,} val tokens ({result['dtype']}) from "
          f"{len(result['sources'])} file(s) in {result['seconds']:.2f} s ({result['mb_per_s']:.1f} MB/s); wrote {out}")
    return result


# tokenizers the command line knows by name, each downloaded once into the cache
NAMED_TOKENIZERS = {"mistral": f"hf/{MISTRAL_REPO}/tokenizer.model"}


def named_tokenizer(name_or_path: str) -> Path:
    """--tokenizer's value: a path, or a name of NAMED_TOKENIZERS (fetched once)."""
    return fetch(NAMED_TOKENIZERS[name_or_path]) if name_or_path in NAMED_TOKENIZERS else Path(name_or_path)


def main(args: argparse.Namespace) -> dict:
    if args.command == "prepare":
        return prepare_command(args)
    if args.command == "train":
        return train_command(args)
    if args.tokenizer is not None:
        return show_tokenizer(load_tokenizer(named_tokenizer(args.tokenizer)), args.text, args.special)
    return show_encodings(args.text, args.special)


# the smallest vocabulary `train` can make: the 256 bytes and <|endoftext|>
vocab_size_flag = _number_flag(int, lambda v: v >= 257, "a whole number of at least 257 (256 bytes + <|endoftext|>)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description="GPT-2's BPE tokenizer from scratch beside tiktoken, the tokenizers other "
                            "model families ship, and corpus preparation. With no command, shows a sample "
                            "sentence through both GPT-2 backends.")
    parser.set_defaults(command=None, text=SAMPLE_TEXT, special=True, tokenizer=None)
    commands = parser.add_subparsers(dest="command")

    encode = commands.add_parser("encode", help="ids and pieces of TEXT (GPT-2's two backends, or --tokenizer)")
    encode.add_argument("text", help="text to encode")
    encode.add_argument("--tokenizer", default=None,
                        help="a tokenizer.model, tokenizer.json or model folder, or 'mistral' (Mistral 7B's, "
                             "downloaded once; needs HF_TOKEN) (default: GPT-2, both backends)")
    encode.add_argument("--special", action=argparse.BooleanOptionalAction, default=True,
                        help="encode special-token text such as <|endoftext|> or <s> as its special id "
                             "(--no-special: as plain text)")

    prepare = commands.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin")
    prepare.add_argument("input", help="a text file, a folder of text files, or a glob")
    prepare.add_argument("--out", type=Path, default=Path("out/tokens"), help="output folder")
    prepare.add_argument("--tokenizer", default=None,
                         help="a tokenizer.model, tokenizer.json or model folder, or 'mistral' (default: GPT-2 "
                              "through tiktoken)")
    prepare.add_argument("--val-fraction", type=unit_interval, default=0.1,
                         help="last fraction of tokens kept for validation")
    prepare.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                         help="encoding threads (tiktoken only)")

    train = commands.add_parser("train", help="train a new BPE vocabulary")
    train.add_argument("input", help="a text file, a folder of text files, or a glob")
    train.add_argument("--vocab-size", type=vocab_size_flag, default=1000,
                       help="tokens in the vocabulary, special ones included")
    train.add_argument("--out", type=Path, default=Path("out/bpe-tokenizer.json"), help="vocabulary file to write")

    for sub in (prepare, train):
        sub.add_argument("--errors", choices=("strict", "replace"), default="strict",
                         help="what to do with bytes that are not UTF-8: stop with an error, or decode as U+FFFD")
        sub.add_argument("--force", action="store_true", help="replace what an earlier run wrote to --out")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_stage(main, parse_args)
