"""CLIP-T: the BPE tokenizer against transformers' ``CLIPTokenizer`` and OpenAI's (open_clip's) tokenizer.

The vocabulary is built from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI's BPE) the way the
``openai/clip-*`` repos' ``vocab.json`` / ``merges.txt`` are: the 256 byte characters, their ``</w>`` forms, the
first 49152 - 256 - 2 merges, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import ftfy
import pytest
import torch

from nearid_metric.tokenizer import ClipTokenizer

TOL = 1e-5
LONG = " ".join(f"word{i} and, more" for i in range(60))  # well over 77 tokens
PROMPTS = [
    "a photo of sks dog",
    "A Photo of a DOG on the Beach",  # mixed case
    "a café in Zürich, naïve façade",  # accents
    "a cat 🐱 wearing sunglasses 😎🕶",  # emoji
    "一只狗在海滩上 and 東京タワー",  # CJK
    "salt &amp; pepper &lt;3",  # HTML entities (unescaped by ftfy)
    "what's up? it'll be... great!!! (really) [yes] {no} #1 @home",  # contractions, punctuation
    "in 2024, 3.14159 or 1,000,000 items",  # digits one by one
    "   lots \t of\n\nwhitespace   here  ",
    "“curly” quotes ‘and’ full-width ＡＢＣ ﬁne",  # ftfy: straight quotes, half width, no ligature
    "cafÃ© mojibake",  # ftfy repairs it
    "<|startoftext|> literal special tokens <|endoftext|>",
    "",
    LONG,
    "a " + "very " * 80 + "long prompt",
]


@pytest.fixture(scope="session")
def clip_vocab(tmp_path_factory) -> Path:
    """A folder with OpenAI CLIP's vocab.json + merges.txt, made as the openai/clip-* repos' are."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    base = list(bytes_to_unicode().values())
    tokens = [*base, *(b + "</w>" for b in base), *("".join(m.split(" ")) for m in merges),
              "<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408
    folder = tmp_path_factory.mktemp("clip-vocab")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def transformers_ids(folder: Path, prompts: list[str]) -> list[list[int]]:
    """transformers' CLIPTokenizer, truncation at 77. transformers 4's is the Python one, which runs
    ftfy.fix_text first; transformers 5 has only the tokenizers-backed one, which does not, so it is given
    the fixed text (its own normalisation, NFC + whitespace + lower case, is then a no-op on it)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder)
    texts = [ftfy.fix_text(p) for p in prompts] if tokenizer.is_fast else prompts
    return tokenizer(texts, truncation=True, max_length=77)["input_ids"]


def unpadded(ids: torch.Tensor) -> list[int]:
    """A row of ids up to and including its final end-of-text token (the zeros after it dropped)."""
    row = ids.tolist()
    return row[:len(row) - row[::-1].index(49407)]


def test_ids_equal_transformers_clip_tokenizer(clip_vocab):
    ours = ClipTokenizer.from_folder(clip_vocab)(PROMPTS)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), 77)
    for prompt, got, expected in zip(PROMPTS, ours, transformers_ids(clip_vocab, PROMPTS)):
        assert unpadded(got) == expected, prompt
        assert got[len(expected):].eq(0).all()
    lengths = [len(e) for e in transformers_ids(clip_vocab, PROMPTS)]
    assert lengths[PROMPTS.index(LONG)] == 77 and lengths[PROMPTS.index("")] == 2


def test_ids_equal_openai_tokenizer(clip_vocab):
    """OpenAI's tokenizer (open_clip's copy; CustomConcept101's) cleans the same way (ftfy) but also unescapes
    HTML twice: equal on every prompt without an entity."""
    import open_clip

    prompts = [p for p in PROMPTS if "&" not in p and "<|" not in p]
    ours = ClipTokenizer.from_folder(clip_vocab)(prompts)
    assert torch.equal(ours, open_clip.tokenize(prompts))


def test_known_answers(clip_vocab):
    """Ids measured with transformers 4.57's Python CLIPTokenizer on these vocabulary files."""
    tokenizer = ClipTokenizer.from_folder(clip_vocab)
    assert unpadded(tokenizer(["A photo of a cat &amp; dog"])[0]) == [49406, 320, 1125, 539, 320, 2368, 261, 1929,
                                                                       49407]
    assert tokenizer.encode("salt &amp; pepper") == tokenizer.encode("salt & pepper")
    long = tokenizer([LONG])[0]
    assert long[0] == 49406 and long[-1] == 49407 and long.ne(0).all()
    with pytest.raises(TypeError):
        tokenizer("a single string")
