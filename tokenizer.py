"""GPT-2's byte-level BPE tokenizer written from scratch, tiktoken as its fast path, the one way
stages get a tokenizer (GPT-2's, or any model's from its files), and the tokenizer command line.

    python tokenizer.py encode "Hello, world! It's 2024 <|endoftext|>"
    python tokenizer.py train corpus.txt --vocab-size 1000 --out out/bpe.json
    python tokenizer.py prepare 'corpus/*.txt' --out-dir out/tokens

Reading order: `BPETokenizer` (training, encoding, decoding, loading OpenAI's GPT-2 files), then
`get_tokenizer`, then `load_tokenizer` for a model's own files (sentencepiece_tokenizer.py and
hf_tokenizer.py read them), then the command line (corpus preparation itself is corpus.py).
"""
import argparse
import functools
import heapq
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence, Set
from pathlib import Path
from typing import Literal

import regex
import tiktoken

from common import (ArgumentParser, UserError, _number_flag, atomic_write, positive_int, run_stage, unit_interval,
                    writable_file, writable_folder)
from corpus import corpus_files, open_error, prepare_corpus, read_text
from download import MISTRAL_REPO, fetch, fetch_all
from hf_tokenizer import HFTokenizer, read_tokenizer_json
from sentencepiece_tokenizer import SentencePieceTokenizer, read_sentencepiece
from tokenizer_base import (encode_with_specials, line_break_run, lone_surrogates_replaced, special_pattern,
                            stream_encode, token_bytes, token_text)



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
#
# OpenAI's vocabulary files (and ours) store tokens as text, so each byte is spelled as one printable
# character (tokenizer_base.bytes_to_unicode, shared with the tokenizer.json reader): bytes that are
# printable characters spell themselves; the other 68 (control bytes, space, a few Latin-1 ones) are
# spelled by the characters U+0100, U+0101, ... in order, so b" world" is written "Ġworld" and a
# newline "Ċ". token_text and token_bytes convert between the two.

ENDOFTEXT = "<|endoftext|>"

# GPT-2's pre-tokenization: contractions, optional space + letters, optional space + digits,
# optional space + other symbols, then whitespace (a run of spaces gives its last space to the next
# word, so " world" keeps its space). This is tiktoken's spelling of GPT-2's pattern; the possessive
# quantifiers (++) only make it faster. Note the contractions are lower case only, as in GPT-2.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


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
    ranks = {token_bytes(token): i for token, i in encoder.items()}
    merges = [line.split() for line in merge_lines[1:] if line]  # line 0 is "#version: 0.2"
    for i, (first, second) in enumerate(merges):
        if ranks.get(token_bytes(first) + token_bytes(second)) != 256 + i:
            raise UserError(f"{vocab_path} line {i + 2} does not match {encoder_path}; delete both files "
                            f"so they are downloaded again")
    return ranks, special


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
        text = lone_surrogates_replaced(text)

        # 1. Pre-tokenize and count each distinct piece ("word") once: " the" may occur 10,000 times
        #    but is merged once, with its count as weight.
        counts: Counter[str] = Counter()
        chunks = special_pattern(special_tokens).split(text) if special_tokens else [text]
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
            return self._encode_chunk(lone_surrogates_replaced(text))

    def encode(self, text: str, *, allowed_special: Literal["all"] | Set[str] = frozenset(),
               disallowed_special: Literal["all"] | Set[str] = "all") -> list[int]:
        """Encode `text` with tiktoken's special-token rules.

        Special-token text (e.g. "<|endoftext|>") raises ValueError unless allowed: it is there to
        stop user text from injecting control tokens. allowed_special="all" (or a set of tokens)
        encodes it as the special id; disallowed_special=() encodes it as plain text."""
        special = set(self.special_tokens)
        allowed = special if allowed_special == "all" else special & set(allowed_special)
        disallowed = special - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed and (found := special_pattern(disallowed).search(text)):
            raise ValueError(f"text contains the special token {found.group()!r}; pass allowed_special="
                             f"{{{found.group()!r}}} to encode it as a special token, or disallowed_special=() "
                             f"to encode it as plain text")
        return encode_with_specials(self.encode_ordinary, text, {t: self.special_tokens[t] for t in allowed})

    def encode_blocks(self, blocks: Iterable[str]) -> Iterator[list[int]]:
        """The ids of one document given as consecutive blocks of text, as encode_ordinary of their
        concatenation (see stream_encode)."""
        return stream_encode(blocks, lambda text, first, last: self._regex.findall(text), self._encode_pieces)

    # -- decoding ------------------------------------------------------------------------------

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.vocab[token]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.vocab[i] for i in ids)

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        """Ids -> text. Ids that stop mid-character (e.g. the first byte of an emoji) decode to U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON: tokens in id order, in GPT-2's printable spelling."""
        assert sorted(self.ranks.values()) == list(range(len(self.ranks))), "save needs dense ids"
        tokens = [token_text(token) for token, _ in sorted(self.ranks.items(), key=lambda item: item[1])]
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
            ranks = {token_bytes(token): i for i, token in enumerate(state["tokens"])}
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

    def encode_blocks(self, blocks: Iterable[str], num_threads: int = 1) -> Iterator[list[int]]:
        """The ids of one document given as consecutive blocks of text, as encode_ordinary of their
        concatenation: the text is cut at the start of a run of whitespace holding a line break, after
        a non-space character (always safe for GPT-2's regex, see line_break_run), and the parts are
        encoded num_threads at a time (tiktoken releases the GIL)."""
        pending, parts = "", []
        for text in blocks:
            pending += text
            run = line_break_run(pending)
            if run and run[0] > 0:
                parts.append(pending[:run[0]])
                pending = pending[run[0]:]
            if len(parts) >= num_threads:
                yield from self.encode_ordinary_batch(parts, num_threads=num_threads)
                parts = []
        yield from self.encode_ordinary_batch([*parts, pending], num_threads=num_threads)


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
# A model's own tokenizer, read from its files

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
        raise open_error(path, e) from None
    return _read_tokenizer(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_tokenizer(path: Path, mtime_ns: int, size: int):
    """The tokenizer in the file at path; the file's mtime and size are part of the cache key."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise open_error(path, e) from None
    if data.lstrip()[:1] != b"{":
        return read_sentencepiece(path, data)
    try:
        spec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); it may be cut short: download or copy it again") from None
    if isinstance(spec, dict) and spec.get("format") == "bpe-tokenizer/1":
        return BPETokenizer.load(path)
    return read_tokenizer_json(path, spec)


# ----------------------------------------------------------------------------------------------
# Command line

SAMPLE_TEXT = "Hello, world! It's 2024 and GPT-2 still splits   spaces, naïve café 🤖 <|endoftext|>"


def show_piece(token: bytes) -> str:
    """A token's bytes as the command line shows them, the same for every tokenizer: as text where they
    are valid UTF-8 on their own (' was'), else as raw bytes (b'\\xf0\\x9f', a part of an emoji)."""
    try:
        return repr(token.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(token)


def show_encodings(text: str, special: bool) -> dict:
    """Print ids and pieces from both backends and whether they agree."""
    ids = {}
    for backend in BACKENDS:
        tok = get_tokenizer(backend)
        ids[backend] = (tok.encode(text, allowed_special="all") if special
                        else tok.encode(text, disallowed_special=()))
        pieces = [show_piece(tok.decode_single_token_bytes(i)) for i in ids[backend]]
        print(f"{backend:>8} ids    ({len(ids[backend])}): {ids[backend]}")
        print(f"{backend:>8} pieces: {' | '.join(pieces)}")
    agree = ids["tiktoken"] == ids["scratch"]
    print(f"text: {text!r}\nbackends agree: {'yes' if agree else 'NO'}")
    return {"text": text, **ids, "agree": agree}


def show_tokenizer(tok, text: str, special: bool) -> dict:
    """Print the ids and pieces of `text` through a tokenizer read by load_tokenizer, and its decoding."""
    ids = tok.encode(text, allowed_special="all") if special else tok.encode_ordinary(text)
    pieces = [show_piece(tok.decode_single_token_bytes(i)) for i in ids]
    decoded = tok.decode(ids)
    print(f"ids    ({len(ids)}): {ids}")
    print(f"pieces: {' | '.join(pieces)}")
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
    first = ", ".join(show_piece(tok.vocab[i]) for i in range(256, min(266, len(tok.ranks))))
    print(f"trained {tok.n_vocab} tokens on {len(text.encode('utf-8')) / 1e6:.2f} MB in {seconds:.2f} s; "
          f"{bytes_per_token:.2f} bytes per token; first merges {first}; saved {args.out}")
    return {"vocab_size": tok.n_vocab, "seconds": seconds, "bytes_per_token": bytes_per_token, "out": str(args.out)}


def prepare_command(args: argparse.Namespace) -> dict:
    corpus_files(args.input)  # a missing input is reported before anything is created
    tok = load_tokenizer(named_tokenizer(args.tokenizer)) if args.tokenizer else get_tokenizer()
    # meta.json names the tokenizer as model cards do: a path, or its place in the download cache
    tokenizer_name = NAMED_TOKENIZERS.get(args.tokenizer) or (str(Path(args.tokenizer).resolve()) if args.tokenizer
                                                               else "gpt2")
    out = writable_folder(args.out_dir, "--out-dir")
    if not args.force and any((out / name).exists() for name in ("train.bin", "val.bin", "meta.json")):
        raise UserError(f"{out} already holds prepared tokens; use --force to replace them, or choose another "
                        f"--out-dir")
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
    # default=SUPPRESS: the help says what no --tokenizer means, rather than "(default: None)"
    encode.add_argument("--tokenizer", default=argparse.SUPPRESS,
                        help="a tokenizer.model, tokenizer.json or model folder, or 'mistral' (Mistral 7B's, "
                             "downloaded once; needs HF_TOKEN) (default: GPT-2, both backends)")
    encode.add_argument("--special", action=argparse.BooleanOptionalAction, default=True,
                        help="encode special-token text such as <|endoftext|> or <s> as its special id "
                             "(--no-special: as plain text)")

    prepare = commands.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin")
    prepare.add_argument("input", help="a text file, a folder of text files, or a glob")
    prepare.add_argument("--out-dir", type=Path, default=Path("out/tokens"),
                         help="folder for train.bin, val.bin and meta.json")
    prepare.add_argument("--tokenizer", default=argparse.SUPPRESS,
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
    # --out, not --out-dir: train writes one file (a vocabulary), not a run folder
    train.add_argument("--out", type=Path, default=Path("out/bpe-tokenizer.json"), help="vocabulary file to write")

    for sub in (prepare, train):
        sub.add_argument("--errors", choices=("strict", "replace"), default="strict",
                         help="what to do with bytes that are not UTF-8: stop with an error, or decode as U+FFFD")
        sub.add_argument("--force", action="store_true", help="replace what an earlier run wrote there")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_stage(main, parse_args)
