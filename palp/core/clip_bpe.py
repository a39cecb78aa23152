"""CLIP's byte-level BPE, read without torch: the tokenizer of SD-1.x and 2.x (and SDXL's two),
for counting a prompt's tokens and for writing the tokenizer files of palp's tiny models.

The merges come from the data file that open_clip ships (``bpe_simple_vocab_16e6.txt.gz``),
found without importing open_clip: its package imports torch, torchvision and its model zoo,
seconds that every ``palp train`` and ``palp prepare`` would spend only to count tokens. The
text is normalised and split as SD's tokenizer does (:func:`clean`; then contractions, letter
runs, single digits, other symbol runs); tests/test_prompts.py checks the pieces against
open_clip's tokenizer and the counts against transformers' CLIPTokenizer.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import unicodedata
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, the same with "</w>", the merges, 2 specials
END_OF_WORD = "</w>"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")  # one token each, as SD's CLIPTokenizer reads them


def data_file() -> Path:
    """open_clip's copy of CLIP's merges, located without running open_clip's package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("CLIP's BPE data comes with open_clip_torch, which is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=1)
def byte_symbols() -> dict[int, str]:
    """Each byte's printable stand-in, in vocabulary order: the printable Latin-1 bytes are
    themselves (first), the others (controls, space, soft hyphen...) the code points from 256 up,
    in byte order (after them)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


@functools.lru_cache(maxsize=1)
def merges() -> tuple[tuple[str, str], ...]:
    """The first N_MERGES merge rules, in rank order (the file's first line is a header)."""
    lines = gzip.open(data_file()).read().decode("utf-8").split("\n")[1:N_MERGES + 1]
    return tuple(tuple(line.split()) for line in lines)


def vocabulary() -> list[str]:
    """CLIP's 49,408 tokens in id order: bytes, bytes ending a word, merges, start and end."""
    symbols = list(byte_symbols().values())
    return symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges()] + list(SPECIAL_TOKENS)


@functools.lru_cache(maxsize=1)
def _splitter():
    import regex

    specials = "|".join(regex.escape(t) for t in SPECIAL_TOKENS)
    return regex.compile(specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def clean(text: str) -> str:
    """The text as SD's tokenizer (transformers' CLIPTokenizer) reads it: Unicode NFC, runs of
    white space one space, lower case. (open_clip's tokenizer, and transformers' before its
    tokenizers backend, also mend mojibake and HTML entities, which only ever makes fewer
    tokens: a count made without that is never short.)"""
    import regex

    return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()


class ClipBpe:
    """``pieces(text)``: the BPE tokens CLIP's tokenizer makes of ``text`` (no start/end)."""

    def __init__(self):
        self.ranks = {pair: i for i, pair in enumerate(merges())}
        self.symbols = byte_symbols()
        self._words: dict[str, tuple[str, ...]] = {}

    def word(self, chunk: str) -> tuple[str, ...]:
        """One pre-split chunk's tokens: its bytes' symbols, the last one ending the word, merged
        pair by pair, the best-ranked pair first, until no pair has a rule."""
        if chunk in self._words:
            return self._words[chunk]
        if chunk in SPECIAL_TOKENS:
            return (chunk,)
        parts = [self.symbols[b] for b in chunk.encode("utf-8")]
        parts[-1] += END_OF_WORD
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._words[chunk] = tuple(parts)
        return self._words[chunk]

    def pieces(self, text: str) -> list[str]:
        return [p for chunk in _splitter().findall(clean(text)) for p in self.word(chunk)]


@functools.lru_cache(maxsize=1)
def clip_bpe() -> ClipBpe:
    return ClipBpe()
