"""The embedding cache (``cache_dir=`` / ``--cache``): hits, misses for anything that changes an
embedding, damaged entries recomputed, interrupted runs resumed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hf_cache_layout, random_image
from test_speed import CountingEncoder, counting_scorer

from nearid_metric import NearIDScore, create_scorer
from nearid_metric.cache import ArrayStore, content_key
from nearid_metric.embedding_cache import cache_signature
from nearid_metric.scorer import embed_images


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    """Five pictures and an unreadable file."""
    paths = []
    for i in range(5):
        paths.append(tmp_path / "images" / f"{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        random_image(300 + i, (40 + 6 * i, 48)).save(paths[-1])
    paths.append(tmp_path / "images" / "bad.png")
    paths[-1].write_bytes(b"")
    return paths


def embed(scorer, paths, cache) -> tuple[torch.Tensor, dict[int, str]]:
    return scorer.embed_with_failures(paths, batch_size=2, cache_dir=cache)


def test_second_run_hits_the_cache_for_every_image(images, checkpoint_dir, tmp_path):
    cache = tmp_path / "cache"
    first = counting_scorer(checkpoint_dir)
    emb, failures = embed(first, images, cache)
    assert sum(first.encoder.calls) == 5 and failures == {5: "empty file (0 bytes)"}

    again = counting_scorer(checkpoint_dir)
    cached, failures_again = embed(again, images, cache)
    assert again.encoder.calls == []  # nothing embedded
    assert torch.equal(cached[:5], emb[:5]) and torch.isnan(cached[5]).all()
    assert failures_again == failures  # the bad file is not cached: it is read again and reported again
    # other paths to the same bytes are hits too, and the store holds one row per content
    copy = tmp_path / "copy.png"
    shutil.copyfile(images[0], copy)
    assert torch.equal(again.embed([copy], cache_dir=cache), emb[:1]) and again.encoder.calls == []
    with ArrayStore(cache, signature=cache_signature(first), shape=(first.embed_dim,)) as store:
        assert len(store) == 5 and content_key(copy) in store


def test_second_run_does_not_read_unchanged_files_to_hash_them(images, checkpoint_dir, tmp_path, monkeypatch):
    import nearid_metric.cache as cache_module

    monkeypatch.setattr(cache_module, "RACY_SECONDS", 0.0)  # remember the hashes of just-written files
    cache = tmp_path / "cache"
    first, failures = embed(counting_scorer(checkpoint_dir), images, cache)
    hashed, real = [], cache_module.read_image_file
    monkeypatch.setattr(cache_module, "read_image_file", lambda path: hashed.append(path) or real(path))
    again = counting_scorer(checkpoint_dir)
    second, failures_again = embed(again, images, cache)
    assert hashed == [] and again.encoder.calls == [] and (cache / "file-hashes.sqlite").exists()
    assert torch.equal(second[:5], first[:5]) and failures_again == failures
    images[0].write_bytes(images[1].read_bytes())  # now a copy of image 1: hashed again, and a hit
    third, _ = embed(again, images, cache)
    assert [Path(p).name for p in hashed] == ["0.png"] and torch.equal(third[0], first[1])


def test_in_memory_pictures_are_cached_by_pixels(checkpoint_dir, tmp_path):
    pictures = [random_image(320 + i, (30, 30 + i)) for i in range(3)]
    first = counting_scorer(checkpoint_dir)
    emb = first.embed(pictures, cache_dir=tmp_path)
    again = counting_scorer(checkpoint_dir)
    assert torch.equal(again.embed([p.copy() for p in pictures], cache_dir=tmp_path), emb)
    assert again.encoder.calls == []


def test_anything_that_changes_an_embedding_misses(images, checkpoint_dir, tmp_path):
    """Another precision, revision, model (readout) or preprocessing gets its own entries."""
    cache = tmp_path / "cache"
    base = counting_scorer(checkpoint_dir)
    base_emb, _ = embed(base, images, cache)

    hub = tmp_path / "hub"
    revision_a = hf_cache_layout(checkpoint_dir, hub, "org/nearid", "a" * 40)
    revision_b = hf_cache_layout(checkpoint_dir, tmp_path / "hub2", "org/nearid", "b" * 40)
    other_resize = tmp_path / "other" / checkpoint_dir.name  # same folder name and weights, bicubic resize
    shutil.copytree(checkpoint_dir, other_resize)
    config = json.loads((other_resize / "preprocessor_config.json").read_text())
    (other_resize / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 3}))
    variants = {
        "precision": counting_scorer(checkpoint_dir, precision="bf16"),
        "revision a": counting_scorer(revision_a),
        "revision b": counting_scorer(revision_b),
        "model": create_scorer("siglip2-mean", pretrained=checkpoint_dir, device="cpu"),
        "preprocessing": counting_scorer(other_resize),
    }
    variants["model"].encoder = CountingEncoder(variants["model"].encoder)
    assert variants["preprocessing"].signature == base.signature  # only the preprocessing digest tells them apart
    signatures = {cache_signature(s) for s in [base, *variants.values()]}
    assert len(signatures) == 6
    for name, scorer in variants.items():
        emb, _ = embed(scorer, images, cache)
        assert sum(scorer.encoder.calls) == 5, name  # all missed
        if name.startswith("revision"):  # the same weights: the same numbers, stored apart all the same
            assert torch.equal(emb[:5], base_emb[:5])
        else:  # its own embeddings, not the fp32 bilinear NearID ones
            assert not torch.allclose(emb[:5], base_emb[:5], atol=1e-4), name
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 6


def test_damaged_part_is_detected_and_recomputed(images, checkpoint_dir, tmp_path, caplog):
    cache = tmp_path / "cache"
    emb, _ = embed(counting_scorer(checkpoint_dir), images, cache)
    (part,) = cache.glob("*/part-*.safetensors")
    data = bytearray(part.read_bytes())
    data[-8:] = b"\x00\x00\xc0\x7f" * 2  # the last two floats (end of the tensor) become NaN; same size
    part.write_bytes(bytes(data))

    again = counting_scorer(checkpoint_dir)
    with caplog.at_level(logging.WARNING, logger="nearid_metric"):
        recomputed, _ = embed(again, images, cache)
    assert sum(again.encoder.calls) == 5  # not used: every entry of the damaged part is recomputed
    assert any(str(part) in r.getMessage() for r in caplog.records)
    assert torch.equal(recomputed[:5], emb[:5])


def test_entry_that_is_not_a_unit_vector_is_recomputed(images, checkpoint_dir, tmp_path, caplog):
    """A row that passes the part checksum but cannot be an embedding (zeros) is not used."""
    cache = tmp_path / "cache"
    scorer = counting_scorer(checkpoint_dir)
    with ArrayStore(cache, signature=cache_signature(scorer), shape=(scorer.embed_dim,)) as store:
        store.put([content_key(images[1])], np.zeros((1, scorer.embed_dim), np.float32))
    with caplog.at_level(logging.WARNING, logger="nearid_metric"):
        emb, _ = embed(scorer, images[:3], cache)
    assert sum(scorer.encoder.calls) == 3
    assert "not unit vectors" in caplog.text
    assert torch.equal(emb, NearIDScore.from_pretrained(checkpoint_dir, device="cpu").embed(images[:3], batch_size=2))


def test_interrupted_run_resumes_where_it_stopped(images, checkpoint_dir, tmp_path):
    class Interrupted(CountingEncoder):
        def forward(self, pixels):
            if len(self.calls) == 2:
                raise KeyboardInterrupt
            return super().forward(pixels)

    cache = tmp_path / "cache"
    scorer = NearIDScore.from_pretrained(checkpoint_dir, device="cpu")
    scorer.encoder = Interrupted(scorer.encoder)
    with pytest.raises(KeyboardInterrupt):
        embed(scorer, images, cache)
    resumed = counting_scorer(checkpoint_dir)
    emb, failures = embed(resumed, images, cache)
    assert sum(resumed.encoder.calls) == 1  # the first two batches (4 images) were kept
    fresh, _ = embed(NearIDScore.from_pretrained(checkpoint_dir, device="cpu"), images, None)
    assert torch.equal(emb[:5], fresh[:5]) and set(failures) == {5}


def test_several_scorers_share_one_pass_and_cache(images, checkpoint_dir, clip_folder, tmp_path):
    """Only the scorer missing an image runs on it; both columns equal separate uncached runs."""
    cache = tmp_path / "cache"
    nearid, clip = counting_scorer(checkpoint_dir), create_scorer("clip-i", pretrained=clip_folder, device="cpu")
    clip.encoder = CountingEncoder(clip.encoder)
    embed(nearid, images[:3], cache)
    together, failures = embed_images([nearid, clip], images, batch_size=2, cache_dir=cache)
    assert sum(nearid.encoder.calls) == 3 + 2 and sum(clip.encoder.calls) == 5
    for scorer, got in zip((nearid, clip), together):
        alone, _ = embed_images([scorer], images, batch_size=2)
        assert torch.allclose(got[:5], alone[0][:5], atol=1e-6)
    assert failures == {5: "empty file (0 bytes)"}


def test_cli_cache_flag(images, checkpoint_dir, tmp_path, monkeypatch):
    import nearid_metric.scorer as scorer_module
    from nearid_metric.cli.score import main

    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    for i, path in enumerate(images[:4]):
        shutil.copyfile(path, (ref if i < 2 else gen) / f"{i % 2}.png")
    forwards = []
    real = scorer_module.Scorer._forward
    monkeypatch.setattr(scorer_module.Scorer, "_forward", lambda self, x: forwards.append(len(x)) or real(self, x))
    outputs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        assert main([str(ref), str(gen), "--model", str(checkpoint_dir), "--cache", str(tmp_path / "cache"),
                     "--out", str(out), "--num-workers", "0", "--no-progress"]) == 0
        outputs.append((out / "scores.csv").read_text())
        assert sum(forwards) == 4  # the first run embeds the 4 images, the second none
    assert outputs[0] == outputs[1]
