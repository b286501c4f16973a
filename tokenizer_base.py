"""What every tokenizer of the project shares: GPT-2's table from bytes to printable characters, the
ids that start a document, special tokens cut out of a text, the places where a long document can be
cut so that each part is encoded on its own with the ids of the whole, and the chunks of a text that
no merge crosses.

    from tokenizer_base import bytes_to_unicode
    bytes_to_unicode()[ord(" ")]  # 'Ġ': how GPT-2's vocabulary files write a space

tokenizer.py (GPT-2's BPE and the command line), sentencepiece_tokenizer.py, hf_tokenizer.py and
corpus.py (token files) import this file and it imports none of them, as minbpe's tokenizers share
its base.py: the command line in tokenizer.py uses the other three, so they cannot import it.
"""
import functools
import re
from collections.abc import Collection, Iterable, Iterator

import regex


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


@functools.lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of bytes_to_unicode: printable character -> byte."""
    return {c: b for b, c in bytes_to_unicode().items()}


def token_text(token: bytes) -> str:
    """A token's bytes in GPT-2's printable spelling (b' world' -> 'Ġworld')."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def token_bytes(text: str) -> bytes:
    """A token in GPT-2's printable spelling back to its bytes ('Ġworld' -> b' world')."""
    inverse = unicode_to_bytes()
    return bytes(inverse[c] for c in text)


def lone_surrogates_replaced(text: str) -> str:
    """What tiktoken does to text that is not valid Unicode: lone surrogates become U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def bos(tokenizer) -> list[int]:
    """What a text starts with for this tokenizer's model family: [bos_id], or [] (GPT-2)."""
    return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


# -- special tokens ------------------------------------------------------------------------------

def special_pattern(tokens: Collection[str]) -> "regex.Pattern":
    """A regex that finds any of `tokens` in a text, longest first, so that a special token that
    contains another one wins."""
    return regex.compile("|".join(map(regex.escape, sorted(tokens, key=len, reverse=True))))


def encode_with_specials(encode_ordinary, text: str, allowed: dict[str, int]) -> list[int]:
    """The text of the `allowed` special tokens (text -> id) as their ids, and the text between them
    through encode_ordinary, each stretch on its own (as tiktoken and sentencepiece users do)."""
    if not allowed:
        return encode_ordinary(text)
    ids, start = [], 0
    for match in special_pattern(allowed).finditer(text):
        ids += encode_ordinary(text[start:match.start()])
        ids.append(allowed[match.group()])
        start = match.end()
    return ids + encode_ordinary(text[start:])


# -- cutting a long document ---------------------------------------------------------------------

def line_break_run(text: str, lookahead: int = 0) -> tuple[int, int] | None:
    """(start, stop) of the run of whitespace that holds the last line break of `text` with at least
    `lookahead` characters after it, or None. Long documents are cut at either end of such a run.

    Cutting at its start is always safe for GPT-2's regex when a non-space character comes before
    it: the piece before the cut ends at that character (no piece holds a non-space character
    followed by whitespace), and the pieces from the run on are found the same with or without the
    text before it. Just after the run is where GPT-2-style regexes end a line (they keep a line
    break with the whitespace before it); other tokenizers are checked (stream_encode)."""
    end = text.rfind("\n", 0, max(len(text) - lookahead, 0))
    if end < 0:
        return None
    start, stop = end, end + 1
    while start > 0 and text[start - 1].isspace():
        start -= 1
    while stop < len(text) and text[stop].isspace():
        stop += 1
    return start, stop


LOOKAHEAD = 256  # characters kept after a cut: no published pre-tokenizer pattern looks further ahead


def stream_encode(blocks: Iterable[str], units, encode_units, max_failures: int = 8) -> Iterator[list[int]]:
    """Encode one document given as consecutive blocks of text, yielding ids as soon as they are final.

    units(text, first, last) cuts text into what the tokenizer encodes independently (words, chunks,
    special-token ids); first/last say whether text starts/ends the document (a dummy prefix belongs
    at the start, stripped spaces at the end). A cut is made around a line break (line_break_run), and
    only where the units before it, after it and of the whole text so far agree, with LOOKAHEAD
    characters after the cut, so the ids equal those of the joined text in one call. After
    `max_failures` places in a row where they disagree (a normaliser that sees the whole text), the
    rest of the document is held and encoded in one call."""
    parts, first, failures = [], True, 0
    for block in blocks:
        parts.append(block)
        if failures >= max_failures:
            continue
        pending = "".join(parts)
        parts = [pending]
        run = line_break_run(pending, LOOKAHEAD)
        # Just after the run first; then just before it (for normalisers that turn a line break into
        # a space, which then belongs to the next word). Each with LOOKAHEAD characters after it.
        cuts = [c for c in reversed(run or ()) if 0 < c <= len(pending) - LOOKAHEAD]
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


# -- cutting a text where no merge crosses (SentencePiece and tokenizer.json vocabularies) ---------

SPACE = "\u2581"  # '▁': how SentencePiece-style vocabularies write a space
CACHED_CHUNK_CHARS = 256  # longer chunks are merged every time rather than kept in the cache
SHORT_MERGE_SYMBOLS = 64  # up to this many symbols, a plain scan beats a heap for finding the best merge


def char_class(chars: Iterable[str], negate: bool = False) -> str:
    """A `re` character class of `chars` plus every character beyond U+FFFF (with negate: of all
    other characters). `re` tests characters up to U+FFFF against a bitmap, but others one by one
    against a list; as a single range they stay fast. Callers treat the extra characters
    conservatively (as possibly merged, as possibly starting a rule)."""
    listed = "".join(re.escape(c) for c in sorted(c for c in chars if ord(c) <= 0xFFFF))
    return f"[{'^' if negate else ''}{listed}\U00010000-\U0010ffff]"


def chunk_regex(joined: set[str], space: str) -> "re.Pattern":
    """A regex that cuts text into chunks no BPE merge crosses, so each chunk can be merged (and
    cached) on its own with the result of merging the whole text.

    `joined` holds every two adjacent characters some merge can join (a merge's last character on
    the left + first on the right). A merge across a boundary joins the two characters on either side
    of it, so boundaries between other pairs are never crossed. We cut at two kinds: around
    characters no merge touches (newlines and unknown characters in Mistral's vocabulary), and before
    each run of `space` when no merge joins a space to a character before it; then "▁like▁this" is
    cut into words, as GPT-2's regex cuts text. The chunks of any text concatenate back to it."""
    touched = {c for pair in joined for c in pair}
    untouched = f"{char_class(touched, negate=True)}+"
    if space in touched and not any(pair[1] == space and pair[0] != space for pair in joined):
        words = f"{re.escape(space)}*{char_class(touched - {space})}+|"
        return re.compile(f"{words}{re.escape(space)}+|{untouched}")
    return re.compile(f"{char_class(touched)}+|{untouched}")


def fuse_repeats(ids: list[int], token: int) -> list[int]:
    """ids with every run of `token` collapsed to one (consecutive unknown pieces become one)."""
    return [i for k, i in enumerate(ids) if i != token or k == 0 or ids[k - 1] != token]
