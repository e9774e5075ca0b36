"""The fast input pipeline: content deduplication, out-of-memory back-off, fused attention,
torch.compile, and distributed scoring (2 gloo ranks equal 1 process, pair for pair)."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import random_image
from test_metric import free_port

from nearid_metric import NearIDScore, create_scorer
from nearid_metric.batching import CPU_PIXELS, CUDA_PIXELS, auto_batch_size, forward_in_chunks
from nearid_metric.cli.score import main
from nearid_metric.scorer import score_pairs


class CountingEncoder(torch.nn.Module):
    """Wraps an encoder and records the batch size of every forward call."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[int] = []

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(pixels))
        return self.inner(pixels)


class OutOfMemoryAbove(CountingEncoder):
    """A fake allocator: any forward of more than ``limit`` images raises an out-of-memory error."""

    def __init__(self, inner: torch.nn.Module, limit: int):
        super().__init__(inner)
        self.limit = limit
        self.raised = 0

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if len(pixels) > self.limit:
            self.raised += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(pixels)} images' worth")
        return super().forward(pixels)


def counting_scorer(checkpoint_dir, **kwargs) -> NearIDScore:
    scorer = NearIDScore.from_pretrained(checkpoint_dir, device="cpu", **kwargs)
    scorer.encoder = CountingEncoder(scorer.encoder)
    return scorer


# --- each distinct image embedded once --------------------------------------------------------


def test_repeated_reference_is_embedded_once(tmp_path, checkpoint_dir, monkeypatch):
    """A reference in many pairs, under other names (a copy, a symlink) and as an equal PIL image: one forward row."""
    import nearid_metric.loading as loading_module

    ref = tmp_path / "ref.png"
    random_image(1, (50, 40)).save(ref)
    shutil.copyfile(ref, tmp_path / "copy.png")
    (tmp_path / "link.png").symlink_to(ref)
    gens = [tmp_path / f"gen{i}.png" for i in range(3)]
    for i, gen in enumerate(gens):
        random_image(10 + i, (30, 60)).save(gen)
    in_memory = random_image(20, (45, 45))
    pairs = [(ref, gens[0]), (tmp_path / "copy.png", gens[1]), (tmp_path / "link.png", gens[2]), (ref, gens[1]),
             (in_memory, gens[0]), (in_memory.copy(), ref)]
    scorer = counting_scorer(checkpoint_dir)
    decoded = []
    real = loading_module.read_and_decode
    monkeypatch.setattr(loading_module, "read_and_decode", lambda p: decoded.append(Path(p).name) or real(p))
    (values,), scored, failures = score_pairs([scorer], pairs, batch_size=1)

    assert scorer.encoder.calls == [1] * 5  # ref, 3 generations, the in-memory picture
    assert sorted(decoded) == ["gen0.png", "gen1.png", "gen2.png", "ref.png"]
    assert scored.all() and not failures
    plain = NearIDScore.from_pretrained(checkpoint_dir, device="cpu")  # the same pairs one at a time
    expected = torch.cat([plain.score([r], [g], batch_size=1) for r, g in pairs])
    assert torch.equal(values, expected)


def test_equal_pixels_share_an_embedding_and_different_ones_do_not(checkpoint_dir):
    picture = random_image(3, (40, 30))
    tensor = torch.from_numpy(np.array(picture)).permute(2, 0, 1)
    palette = picture.convert("P", palette=1, colors=16)
    scorer = counting_scorer(checkpoint_dir)
    emb = scorer.embed([picture, tensor, picture.copy(), palette, palette.copy(), random_image(4, (40, 30))],
                       batch_size=1)
    assert scorer.encoder.calls == [1, 1, 1]  # the RGB picture (also as a tensor), the palette one, the other
    assert torch.equal(emb[0], emb[1]) and torch.equal(emb[0], emb[2]) and torch.equal(emb[3], emb[4])
    assert not torch.equal(emb[0], emb[3]) and not torch.equal(emb[0], emb[5])


# --- forward batches sized to the device, out-of-memory back-off ------------------------------------


def test_automatic_batch_size_follows_device_and_input_size():
    assert auto_batch_size(torch.device("cuda", 0), 384, 384) == CUDA_PIXELS // 384 ** 2 == 128
    assert auto_batch_size(torch.device("cpu"), 384, 384) == CPU_PIXELS // 384 ** 2 == 2
    assert auto_batch_size(torch.device("cuda"), 224, 224) > auto_batch_size(torch.device("cuda"), 518, 518) >= 1
    assert auto_batch_size(torch.device("cpu"), 4096, 4096) == 1


def test_out_of_memory_halves_the_batch_and_keeps_every_row(checkpoint_dir, caplog):
    """A fake allocator error above 3 images: 8 -> 4 -> 2 per forward, same embeddings, remembered next time."""
    images = [random_image(30 + i, (40 + i, 50)) for i in range(11)]
    expected = NearIDScore.from_pretrained(checkpoint_dir, device="cpu").embed(images, batch_size=2)
    scorer = NearIDScore.from_pretrained(checkpoint_dir, device="cpu")
    scorer.encoder = OutOfMemoryAbove(scorer.encoder, limit=3)
    with caplog.at_level(logging.WARNING, logger="nearid_metric"):
        got = scorer.embed(images, batch_size=8)
    assert torch.equal(got, expected)
    assert scorer.batch_limit == 2 and scorer.encoder.raised == 2
    assert [r.getMessage() for r in caplog.records] == [
        "nearid: out of memory at 8 images per forward pass, retrying with 4",
        "nearid: out of memory at 4 images per forward pass, retrying with 2",
    ]
    assert set(scorer.encoder.calls) == {1, 2}  # 11 rows in loader batches of 8: 2+2+2+2, then 2+1
    scorer.encoder.calls.clear()
    assert torch.equal(scorer.embed(images, batch_size=8), expected)
    assert scorer.encoder.raised == 2 and max(scorer.encoder.calls) == 2  # starts from the size that fit


def test_out_of_memory_at_one_image_is_a_clear_error():
    def never_fits(x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError, match="one image per forward pass"):
        forward_in_chunks(never_fits, torch.zeros(5, 2), 4, name="dinov2")
    out, size = forward_in_chunks(lambda x: x * 2, torch.arange(7.0)[:, None], 3)
    assert size == 3 and torch.equal(out, torch.arange(7.0)[:, None] * 2)


# --- fused attention, torch.compile ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nearid", "dinov2-518"])
def test_attention_runs_through_sdpa(name, checkpoint_dir, dino_folder, monkeypatch):
    """timm's attention layers (trunk and MAP head) call F.scaled_dot_product_attention, in bf16 too."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *args, **kwargs: calls.append(q.dtype) or real(q, *args, **kwargs))
    folder = checkpoint_dir if name == "nearid" else dino_folder
    create_scorer(name, pretrained=folder, device="cpu", precision="bf16").embed([random_image(5, (40, 40))])
    layers = 2 + (name == "nearid")  # 2 blocks, plus NearID's attention-pooling head
    assert calls == [torch.bfloat16] * layers


def test_compile_wraps_the_encoder_without_changing_results(checkpoint_dir, scorer, monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real, backend="eager"))  # no C++ toolchain needed
    compiled = NearIDScore.from_pretrained(checkpoint_dir, device="cpu", compile=True)
    assert isinstance(compiled.encoder, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.signature == scorer.signature
    images = [random_image(60 + i, (30 + 9 * i, 40)) for i in range(3)]
    assert torch.allclose(compiled.embed(images), scorer.embed(images), atol=1e-6)


# --- distributed: torchrun's environment, 2 gloo ranks on CPU ---------------------------------------


@pytest.fixture()
def pair_folders(tmp_path):
    """7 references (2 with equal bytes) x 5 generations (1 unreadable) for --pairing all."""
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    for i in range(6):
        random_image(100 + i, (40 + 5 * i, 50)).save(ref / f"r{i}.png")
    shutil.copyfile(ref / "r2.png", ref / "r2_copy.png")
    for j in range(4):
        random_image(200 + j, (60, 35 + 4 * j)).save(gen / f"g{j}.jpg", quality=90)
    (gen / "g_bad.png").write_bytes(b"not a picture")
    return ref, gen


def cli_args(ref: Path, gen: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [str(ref), str(gen), "--pairing", "all", "--model", str(checkpoint), "--out", str(out),
            "--batch-size", "2", "--num-workers", "0", "--no-progress", "--device", "cpu", *extra]


def _cli_rank(rank: int, world: int, port: int, argv: list[str], results: str) -> None:
    import nearid_metric.scorer as scorer_module

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    rows = []
    real = scorer_module.Scorer._forward
    scorer_module.Scorer._forward = lambda self, x: rows.append(len(x)) or real(self, x)
    code = main(argv)
    Path(results, f"{rank}.json").write_text(json.dumps({"exit": code, "rows": sum(rows)}))


def test_two_ranks_write_the_single_process_result(pair_folders, checkpoint_dir, tmp_path, monkeypatch):
    """torchrun-style 2-rank run (shared cache included) = 1-process run: same CSV bytes, same summary."""
    ref, gen = pair_folders
    cache = tmp_path / "cache"
    mp.spawn(_cli_rank, args=(2, free_port(), cli_args(ref, gen, checkpoint_dir, tmp_path / "ranks", "--cache",
                                                       str(cache)), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [r["exit"] for r in ranks] == [0, 0]
    # 10 distinct readable images (r2_copy is r2), in loader batches of 2 dealt to the ranks in turn
    assert [r["rows"] for r in ranks] == [6, 4]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks, so that every kernel splits its work the same way
    try:
        assert main(cli_args(ref, gen, checkpoint_dir, tmp_path / "single")) == 0
    finally:
        torch.set_num_threads(threads)
    single = (tmp_path / "single" / "scores.csv").read_text()
    assert (tmp_path / "ranks" / "scores.csv").read_text() == single
    assert len(single.splitlines()) == 1 + 7 * 4
    summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert json.loads((tmp_path / "ranks" / "summary.json").read_text()) == summary
    assert [Path(f["path"]).name for f in summary["failures"]] == ["g_bad.png"]

    # the ranks filled one cache between them: a later single-process run embeds nothing
    import nearid_metric.scorer as scorer_module

    forwards = []
    real = scorer_module.Scorer._forward
    monkeypatch.setattr(scorer_module.Scorer, "_forward", lambda self, x: forwards.append(len(x)) or real(self, x))
    assert main(cli_args(ref, gen, checkpoint_dir, tmp_path / "cached", "--cache", str(cache))) == 0
    assert forwards == []
    assert (tmp_path / "cached" / "scores.csv").read_text() == single


def test_distributed_flag_needs_torchrun(pair_folders, checkpoint_dir, tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    ref, gen = pair_folders
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(ref, gen, checkpoint_dir, tmp_path / "out", "--distributed"))
    assert exit_info.value.code == 2
    assert "torchrun --nproc-per-node" in capsys.readouterr().err
