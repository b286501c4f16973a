"""SentencePiece's `tokenizer.model` read from scratch: the protobuf file, the normaliser and the BPE
model, encoding and decoding exactly as the `sentencepiece` package does (Mistral 7B, Llama 2, Phi-3).

    from sentencepiece_tokenizer import read_sentencepiece
    tok = read_sentencepiece(Path("tokenizer.model"), Path("tokenizer.model").read_bytes())
    tok.encode("Hello world")  # [22557, 1526] with Mistral's

SentencePiece reaches the units BPE merges differently from GPT-2: it normalises the text (optionally
with compiled Unicode rules), writes each space as '▁' (U+2581) and puts one '▁' before the text (the
"dummy prefix"), so "Hello world" is merged from "▁Hello▁world" with no pre-tokenizing regex. The
merge made first is the one whose result has the highest score. A character outside the vocabulary
becomes its UTF-8 bytes as the pieces <0x00>..<0xFF> ("byte fallback"), or the unknown piece.
tokenizer.load_tokenizer reads this file or a tokenizer.json, whichever a model ships.
"""
import functools
import heapq
import math
import re
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence, Set
from pathlib import Path
from typing import Literal

import numpy as np
import regex

from common import UserError
from tokenizer_base import (CACHED_CHUNK_CHARS, SHORT_MERGE_SYMBOLS, SPACE, char_class, chunk_regex,
                            encode_with_specials, fuse_repeats, lone_surrogates_replaced, stream_encode)


# A tokenizer.model is a protobuf ModelProto message: a sequence of fields, each a varint key (field
# number << 3 | wire type) and a value: a varint (type 0), 8 bytes (1), a varint length and that many
# bytes (2: strings and nested messages), or 4 bytes (5: floats). We read the few fields encoding depends on
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
        starts = [char_class(singles)] if singles else []
        if seconds:
            starts.append(f".(?={char_class(seconds)})")
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
        # Chunks that merges never cross (see chunk_regex); every internal pair of a piece can be joined.
        joined = {p[k - 1:k + 1] for p in self._normal if len(p) > 1 for k in range(1, len(p))}
        self._chunks = chunk_regex(joined, self.normalizer.space)
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

    def decode_single_token_bytes(self, i: int) -> bytes:
        """The bytes piece i stands for: a byte piece's one byte, '▁' as a space, a control piece as its
        text ("<s>")."""
        if self.types[i] == PIECE_BYTE:
            return bytes([self._byte_values[i]])
        return self.pieces[i].replace(SPACE, " ").encode("utf-8")

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids as SentencePieceProcessor.encode(text): no BOS/EOS, nothing special."""
        try:
            return self._encode_chunks(self._units(text, True, True))
        except UnicodeEncodeError:  # lone surrogates (not text sentencepiece accepts): as U+FFFD
            return self.encode_ordinary(lone_surrogates_replaced(text))

    def encode(self, text: str, *, allowed_special: Literal["all"] | Set[str] = frozenset()) -> list[int]:
        """encode_ordinary, except that the text of allowed control pieces ("all": every control and
        unknown piece) becomes their ids; the text around them is encoded piece by piece."""
        allowed = self.special_tokens if allowed_special == "all" else {
            t: i for t, i in self.special_tokens.items() if t in allowed_special}
        return encode_with_specials(self.encode_ordinary, text, allowed)

    def encode_blocks(self, blocks: Iterable[str]) -> Iterator[list[int]]:
        """The ids of one document given as consecutive blocks of text (see stream_encode); their
        concatenation equals encode_ordinary of the joined text."""
        fuse = not self.byte_fallback
        previous_unknown = False
        for ids in stream_encode(blocks, self._units, self._encode_chunks):
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
            ids = fuse_repeats(ids, self.unk_id)  # as sentencepiece, a run of unknown pieces is one
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


def read_sentencepiece(path: Path, data: bytes) -> SentencePieceTokenizer:
    """The tokenizer in a tokenizer.model's bytes; UserError saying what is wrong with any other bytes."""
    try:
        model = read_sentencepiece_model(data)
    except ProtobufError as e:
        if e.truncated:
            raise UserError(f"{path} is an incomplete SentencePiece model ({e}); download or copy it again") from None
        raise UserError(f"{path} is neither a SentencePiece model (tokenizer.model) nor a Hugging Face "
                        f"tokenizer.json; point to the model's tokenizer file") from None
    try:
        return SentencePieceTokenizer(model, str(path))
    except (ValueError, IndexError) as e:  # normalisation rules that do not decode
        raise UserError(f"{path} is a corrupt SentencePiece model ({e}); download or copy it again") from None
