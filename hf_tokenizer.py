"""Hugging Face's `tokenizer.json` read from scratch (BPE models: Llama 3, Qwen, and most newer repos),
encoding and decoding exactly as the `tokenizers` library does.

    from hf_tokenizer import read_tokenizer_json
    tok = read_tokenizer_json(Path("tokenizer.json"), json.loads(Path("tokenizer.json").read_text()))
    tok.decode(tok.encode("Hello world"))  # 'Hello world'

A tokenizer.json describes a pipeline: added tokens are cut out of the text first, then each remaining
piece goes through a normaliser, a pre-tokenizer (a regex split, GPT-2's byte-to-character mapping,
or '▁' escaping) and BPE with an explicit ranked list of merges; decoding runs a chain of decoders.
tokenizer.load_tokenizer reads this file or a SentencePiece tokenizer.model, whichever a model ships.
"""
import heapq
import json
import math
import unicodedata
from collections.abc import Iterable, Iterator, Sequence, Set
from pathlib import Path
from typing import Literal

import regex

from common import UserError
from tokenizer_base import (CACHED_CHUNK_CHARS, SHORT_MERGE_SYMBOLS, SPACE, bytes_to_unicode, chunk_regex,
                            fuse_repeats, lone_surrogates_replaced, stream_encode, unicode_to_bytes)


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
        table = unicode_to_bytes()
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


def _decoder_kinds(spec: dict | None) -> set[str]:
    """The "type" of each step of tokenizer.json's "decoder", through nested Sequences."""
    if spec is None:
        return set()
    if spec.get("type") == "Sequence":
        return set().union(*(_decoder_kinds(s) for s in spec["decoders"]))
    return {spec.get("type")}


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
        self._byte_level = "ByteLevel" in _decoder_kinds(spec.get("decoder"))  # tokens spelled as GPT-2's vocab files
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

        # Chunks no merge crosses, for long words (see chunk_regex). Not when a merge involves a
        # byte or unknown token (their text is not the text they stand for) or subword markers.
        parts = {p for m in merges for p in m}
        markers = {f"<0x{b:02X}>" for b in range(256)} | ({unk} if unk else set())
        self._chunks = None
        if not self._prefix and not self._suffix and not parts & markers:
            self._chunks = chunk_regex({a[-1] + b[0] for a, b in merges}, SPACE)
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

    def decode_single_token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for: a <0xNN> token's byte, a byte-level token's bytes (GPT-2's
        printable spelling undone), else its text with '▁' as a space."""
        token, table = self.id_to_piece(i), unicode_to_bytes()
        if self.byte_fallback and _BYTE_TOKEN.fullmatch(token):
            return bytes([int(token[3:5], 16)])
        if self._byte_level and all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.replace(SPACE, " ").encode("utf-8")

    def encode(self, text: str, *, allowed_special: Literal["all"] | Set[str] = "all") -> list[int]:
        """tokenizers' encode(text, add_special_tokens=False).ids: special-token text becomes its id
        (only the allowed ones when a set is given; the others are plain text)."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        try:
            return self._encode_units(self._units(text, True, True, allowed))
        except UnicodeEncodeError:  # lone surrogates (not text tokenizers accepts): as U+FFFD
            return self.encode(lone_surrogates_replaced(text), allowed_special=allowed)

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids with special-token text encoded as plain text (added tokens that are not
        special, which are part of the vocabulary, still match)."""
        return self.encode(text, allowed_special=frozenset())

    def encode_blocks(self, blocks: Iterable[str]) -> Iterator[list[int]]:
        """The ids of one document given as consecutive blocks of text (see stream_encode)."""
        return stream_encode(blocks, lambda text, first, last: self._units(text, first, last, set()),
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
        first/last: the text starts/ends the input (see stream_encode)."""
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
                    word_ids = fuse_repeats(word_ids, self.unk_id)  # unknown characters on both sides of a cut
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


def read_tokenizer_json(path: Path, spec) -> HFTokenizer:
    """The tokenizer a parsed tokenizer.json describes, with the eos_token of the tokenizer_config.json
    beside it; UserError saying what is wrong with anything else."""
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
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
