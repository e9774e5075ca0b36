"""CLIP-T: the BPE tokenizer against transformers' ``CLIPTokenizer`` and OpenAI's (open_clip's) tokenizer, and the
text tower against ``CLIPModel.get_text_features`` on tiny random checkpoints with the real 49408-token vocabulary.

The vocabulary is built from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI's BPE) the way the
``openai/clip-*`` repos' ``vocab.json`` / ``merges.txt`` are: the 256 byte characters, their ``</w>`` forms, the
first 49152 - 256 - 2 merges, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

from pathlib import Path

import ftfy
import pytest
import torch
import torch.nn.functional as F
from conftest import random_image, randomize_, record_tensor_reads
from test_paper_scorers import CLIP_PREPROCESSOR, image_features, reference_processor, write_preprocessor

from nearid_metric import create_scorer, create_text_scorer, image_text_scores
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


# --- the text tower -----------------------------------------------------------------------------------


def save_clip_with_text(folder: Path, eos_token_id: int, vocab: Path, seed: int = 21):
    """A tiny random CLIPModel with CLIP's real vocabulary size and context (49408 tokens, 77 positions)."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
                max_position_embeddings=77, bos_token_id=49406 if eos_token_id != 2 else 0,
                eos_token_id=eos_token_id, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, patch_size=32,
                  image_size=224)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    randomize_(model, seed)
    model.eval().save_pretrained(folder)
    write_preprocessor(folder, CLIP_PREPROCESSOR)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((vocab / name).read_bytes())
    return model


@pytest.fixture(scope="module", params=[2, 49407], ids=["legacy-eos-2", "eos-49407"])
def hf_clip_text(request, tmp_path_factory, clip_vocab):
    """(folder, CLIPModel) with the config's eos_token_id 2 (the openai repos: pooled at the largest id) or 49407."""
    folder = tmp_path_factory.mktemp(f"clip-text-{request.param}")
    return folder, save_clip_with_text(folder, request.param, clip_vocab)


def reference_batch(folder: Path, prompts: list[str]) -> dict[str, torch.Tensor]:
    """CLIPProcessor-style text input: padded to 77 with the pad token, with its attention mask (as
    :func:`transformers_ids`, the fixed text for the tokenizers-backed tokenizer)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder)
    texts = [ftfy.fix_text(p) for p in prompts] if tokenizer.is_fast else prompts
    return tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")


def text_features(model, folder: Path, prompts: list[str]) -> torch.Tensor:
    """get_text_features on :func:`reference_batch`, L2-normalised."""
    batch = reference_batch(folder, prompts)
    with torch.no_grad():
        out = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


def test_text_embeddings_match_get_text_features(hf_clip_text):
    folder, model = hf_clip_text
    scorer = create_text_scorer("clip-t", pretrained=folder, device="cpu")
    got = scorer.embed_texts(PROMPTS)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (len(PROMPTS), 16)
    assert (got - text_features(model, folder, PROMPTS)).abs().max() < TOL
    assert torch.allclose(scorer.embed_texts(PROMPTS, batch_size=4), got, atol=1e-6)
    assert scorer.tokenize(PROMPTS[:2]).shape == (2, 77)


def test_image_text_scores_match_clip_logits(hf_clip_text):
    """The image scorer is clip-i on the same folder; cosines equal CLIPModel's logits_per_image / logit_scale."""
    folder, model = hf_clip_text
    text_scorer = create_text_scorer("clip-t", pretrained=folder, device="cpu")
    clip_i = create_scorer("clip-i", pretrained=folder, device="cpu")
    assert text_scorer.image_scorer.signature == clip_i.signature
    images = [random_image(300 + i, size, mode) for i, (size, mode) in enumerate(
        [((301, 517), "RGB"), ((517, 301), "L"), ((255, 255), "RGBA"), ((224, 300), "P")])]
    prompts = PROMPTS[:4]
    image_emb = text_scorer.image_scorer.embed(images)
    assert torch.equal(image_emb, clip_i.embed(images))
    scores = image_text_scores(image_emb, text_scorer.embed_texts(prompts))
    pixel_values = reference_processor(folder)(images=images, return_tensors="pt")["pixel_values"]
    batch = reference_batch(folder, prompts)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], pixel_values=pixel_values).logits_per_image
    expected = logits.diagonal() / model.logit_scale.exp()
    assert scores.shape == (4,) and (scores - expected).abs().max() < TOL
    assert (image_emb - image_features(model, pixel_values)).abs().max() < TOL
    with pytest.raises(ValueError, match="aligned"):
        image_text_scores(image_emb, text_scorer.embed_texts(prompts[:3]))


def test_signature_names_the_text_tower(hf_clip_text, tmp_path):
    import hashlib

    folder, _ = hf_clip_text
    scorer = create_text_scorer("clip-t-l14", pretrained=folder, device="cpu")
    bpe = hashlib.sha256((folder / "vocab.json").read_bytes() + (folder / "merges.txt").read_bytes()).hexdigest()
    assert scorer.name == "clip-t-l14" and scorer.image_scorer.name == "clip-l14"
    assert scorer.signature.startswith("clip-t-l14:local:")
    assert f"|transformers:text77-bpe{bpe[:12]}|fp32|" in scorer.signature


def test_bf16_close_to_fp32(hf_clip_text):
    folder, _ = hf_clip_text
    full = create_text_scorer("clip-t", pretrained=folder, device="cpu").embed_texts(PROMPTS)
    half = create_text_scorer("clip-t", pretrained=folder, device="cpu", precision="bf16").embed_texts(PROMPTS)
    assert half.dtype == torch.float32 and (full * half).sum(-1).min() > 0.99


def test_text_tower_reads_only_its_tensors(hf_clip_text, monkeypatch):
    """Only text_model.* and text_projection are read for the text tower (the image scorer reads its own)."""
    from nearid_metric.convert_clip import load_clip_text

    read, _ = record_tensor_reads(monkeypatch)
    load_clip_text(hf_clip_text[0], dtype=torch.float32, device="cpu")
    assert read and all(key.startswith(("text_model.", "text_projection.")) for key in read)


def test_refusals_name_the_problem(hf_clip_text, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = hf_clip_text
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (bare / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="vocab.json, merges.txt"):
        create_text_scorer("clip-t", pretrained=bare, device="cpu")
    create_scorer("clip-i", pretrained=bare, device="cpu")  # clip-i needs no tokenizer files
    stray = tmp_path / "stray"
    stray.mkdir()
    for path in folder.iterdir():
        (stray / path.name).write_bytes(path.read_bytes())
    save_file({**load_file(folder / "model.safetensors"), "text_model.extra.weight": torch.zeros(2)},
              stray / "model.safetensors")
    with pytest.raises(KeyError, match="text_model.extra.weight"):
        create_text_scorer("clip-t", pretrained=stray, device="cpu")
    with pytest.raises(ValueError, match="unknown text scorer 'clip'"):
        create_text_scorer("clip")


def test_registry_names_fetch_the_tokenizer_only_for_clip_t(hf_clip_text, tmp_path, monkeypatch):
    """The CLIP registry entries fetch vocab.json and merges.txt too, but clip-i loads a cached snapshot without
    them (e.g. one fetched by an earlier version); clip-t names them when they are missing."""
    import huggingface_hub

    folder, _ = hf_clip_text
    snapshot = tmp_path / "models--openai--clip-vit-base-patch32" / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    asked = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        assert repo_id == "openai/clip-vit-base-patch32"
        asked.append(sorted(allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    scorer = create_scorer("clip-i", device="cpu")
    assert scorer.signature.startswith(f"clip-i:openai/clip-vit-base-patch32@{'1' * 40}|")
    assert asked[-1] == sorted(["config.json", "model.safetensors", "preprocessor_config.json", "vocab.json",
                                "merges.txt"])
    with pytest.raises(FileNotFoundError, match="vocab.json, merges.txt"):
        create_text_scorer("clip-t", device="cpu")
    for name in ("vocab.json", "merges.txt"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    text_scorer = create_text_scorer("clip-t", device="cpu")
    assert text_scorer.signature.startswith(f"clip-t:openai/clip-vit-base-patch32@{'1' * 40}|")
    assert text_scorer.image_scorer.signature == scorer.signature


def test_text_scorer_table():
    from nearid_metric.hub import registry
    from nearid_metric.scorers import scorer_info
    from nearid_metric.text import TEXT_SCORERS

    assert TEXT_SCORERS == {"clip-t": scorer_info("clip-i").weights, "clip-t-l14": scorer_info("clip-l14").weights}
    assert registry()[TEXT_SCORERS["clip-t"]]["repo_id"] == "openai/clip-vit-base-patch32"
    assert registry()[TEXT_SCORERS["clip-t-l14"]]["repo_id"] == "openai/clip-vit-large-patch14"
