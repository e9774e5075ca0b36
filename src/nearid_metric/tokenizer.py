"""CLIP's byte-level BPE tokenizer, read from a checkpoint folder's ``vocab.json`` + ``merges.txt``.

The token ids are those of transformers' Python ``CLIPTokenizer`` with ``truncation=True`` at
the context length (77 for CLIP): the text is cleaned as it cleans it when ftfy is installed
(``ftfy.fix_text``, runs of whitespace to one space, stripped, lower case), split into words by
CLIP's pattern (contractions, letter runs, single digits, runs of other symbols), each word's
UTF-8 bytes mapped to printable characters and merged by BPE (the last character marked ``</w>``),
then framed as ``<|startoftext|> ... <|endoftext|>``. A longer text keeps its first
``context - 2`` tokens, so the end-of-text token is always there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
WORD_END = "</w>"
CONTEXT_LENGTH = 77
"""Tokens per text in OpenAI's CLIP (start and end tokens included)."""

_WORDS = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                       regex.IGNORECASE)
_SPACES = regex.compile(r"\s+")


@lru_cache(maxsize=1)
def byte_characters() -> tuple[str, ...]:
    """The printable character standing for each byte value 0..255 in byte-level BPE vocabularies.

    Bytes that are printable Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand
    for themselves; the other 68 take the code points from 256 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = (b for b in range(256) if b not in set(printable))
    extra = {b: 256 + i for i, b in enumerate(shifted)}
    return tuple(chr(b if b in printable else extra[b]) for b in range(256))


def clean(text: str) -> str:
    """The text as CLIP's tokenizer sees it: ``ftfy.fix_text``, whitespace runs to one space, stripped, lower case."""
    return _SPACES.sub(" ", ftfy.fix_text(text)).strip().lower()


class ClipTokenizer:
    """Text -> CLIP token ids, from a BPE vocabulary (token -> id) and its merges in priority order."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], context_length: int = CONTEXT_LENGTH):
        missing = [token for token in (BOS, EOS) if token not in vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks the special tokens {missing}")
        if context_length < 2:
            raise ValueError(f"context_length must leave room for the start and end tokens, got {context_length}")
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.context_length = context_length
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self._bytes = byte_characters()
        self._cache: dict[str, tuple[str, ...]] = {BOS: (BOS,), EOS: (EOS,)}

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, context_length: int = CONTEXT_LENGTH) -> ClipTokenizer:
        """Read ``vocab.json`` (token -> id) and ``merges.txt`` (``#version`` header, then one ``a b`` pair a line)."""
        folder = Path(folder)
        with open(folder / "vocab.json", encoding="utf-8") as f:
            vocab = json.load(f)
        if not isinstance(vocab, dict):
            raise ValueError(f"{folder / 'vocab.json'} is not a JSON object of token -> id")
        merges = []
        with open(folder / "merges.txt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if (number == 1 and line.startswith("#version")) or not line:
                    continue
                pair = line.split(" ")
                if len(pair) != 2:
                    raise ValueError(f"{folder / 'merges.txt'} line {number}: not a pair of symbols: {line!r}")
                merges.append((pair[0], pair[1]))
        return cls(vocab, merges, context_length)

    def bpe(self, word: str) -> tuple[str, ...]:
        """One word (byte characters) -> its BPE symbols, the last one ending in ``</w>``."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + WORD_END]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = tuple(symbols)
        return self._cache[word]

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``'s tokens, without start / end tokens and untruncated.

        A symbol missing from the vocabulary gets the end-of-text id (transformers' unknown token).
        """
        ids = []
        for word in _WORDS.findall(clean(text)):
            chars = "".join(self._bytes[b] for b in word.encode("utf-8"))
            ids.extend(self.vocab.get(symbol, self.eos_id) for symbol in self.bpe(chars))  # unknown: as transformers
        return ids

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> ids [N, context_length] int64: start, tokens (truncated), end, then 0s."""
        if isinstance(texts, str):
            raise TypeError("pass a sequence of texts, not one string")
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_id, *self.encode(text)[:self.context_length - 2], self.eos_id]
            out[row, :len(ids)] = torch.tensor(ids)
        return out
