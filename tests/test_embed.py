"""mav embed: companion shards of precomputed CLIP embeddings, read by the DataModules, trained on by P and D without
the CLIP towers; the loss on precomputed embeddings equals the loss with the live CLIP."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datamodules.decode import decode_image, to_float
from datamodules.embeds import EmbedInfo, load_npy, shard_keys, zip_companion
from datamodules.skips import SkipCounter
from datamodules.tars import iter_tar
from datamodules.text_image import TextImageDataModule
from datamodules.video import VideoDataModule
from lightning_mav.commands import embed as embed_command
from lightning_mav.nn.clip import CLIP
from lightning_mav.stages.decoder import DecoderStage
from lightning_mav.stages.prior import PriorStage
from tests.helpers import TINY_CLIP_32, TINY_PRIOR, TINY_UNET, fit, save_tiny_clip

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def run_embed(*args: str) -> embed_command.EmbedReport:
    return embed_command.main([*args, "--no-progress"])


@pytest.fixture(scope="module")
def made(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny CLIP, and companions of every Moving Shapes image shard (with --text) and video shard."""
    tmp = tmp_path_factory.mktemp("embed")
    torch.manual_seed(0)  # module fixtures run before the per-test seeding
    clip = save_tiny_clip(tmp / "clip.ckpt", TINY_CLIP_32)
    images, videos = tmp / "images", tmp / "videos"
    reports = {"images": run_embed("--clip", clip, "--urls", str(shapes_root / "images"), "--out", str(images),
                                   "--size", "32", "--text", "--batch-size", "5"),
               "videos": run_embed("--clip", clip, "--urls", str(shapes_root / "videos"), "--out", str(videos),
                                   "--size", "32", "--batch-size", "40")}
    return {"clip": clip, "images": images, "videos": videos, "reports": reports, "tmp": tmp}


def live_clip(made: dict[str, Any]) -> CLIP:
    return CLIP.from_checkpoint(made["clip"])


def image_data(shapes_root: Path, embeds: Path | None, **kw: Any) -> TextImageDataModule:
    return TextImageDataModule(urls=str(shapes_root / "images" / "train-*.tar"), image_size=32, batch_size=4,
                               shuffle_buffer=8, embeds=None if embeds is None else str(embeds), **kw)


def video_data(shapes_root: Path, embeds: Path | None) -> VideoDataModule:
    return VideoDataModule(urls=str(shapes_root / "videos" / "train-*.tar"), num_frames=4, video_size=32, fps_min=8,
                           fps_max=24, batch_size=2, shuffle_buffer=4, embeds=None if embeds is None else str(embeds))


def first_batch(data: Any) -> dict[str, Any]:
    data.setup("fit")
    return next(iter(data.train_dataloader()))


# ------------------------------------------------------------------------------------------- the companions
@pytest.mark.parametrize("kind", ["images", "videos"])
def test_companions_have_the_shards_keys_in_order(made: dict[str, Any], shapes_root: Path, kind: str) -> None:
    shards = sorted((shapes_root / kind).glob("*.tar"))
    assert sorted(p.name for p in made[kind].glob("*.tar")) == [p.name for p in shards]
    assert made["reports"][kind].samples == sum(len(shard_keys(str(p))) for p in shards)
    for shard in shards[:3]:
        assert shard_keys(str(made[kind] / shard.name)) == shard_keys(str(shard))
    fields = {"images": {"image_embed.npy", "text_embed.npy", "text_hidden.npy", "text_mask.npy"},
              "videos": {"frame_embed.npy"}}[kind]
    sample = next(iter_tar(str(made[kind] / shards[0].name), SkipCounter()))
    assert {k for k in sample if not k.startswith("__")} == fields
    info = EmbedInfo.read(str(made[kind]))
    assert (info.kind, info.size, info.embed_dim, info.text) == (kind, 32, 32, kind == "images")


def test_image_embeddings_are_the_live_clips(made: dict[str, Any], shapes_root: Path) -> None:
    clip = live_clip(made)
    shard = shapes_root / "images" / "train-000001.tar"
    originals = list(iter_tar(str(shard), SkipCounter()))
    companions = list(iter_tar(str(made["images"] / shard.name), SkipCounter()))
    x = torch.stack([to_float(decode_image(s["png"], 32)[0]) for s in originals])
    stored = np.stack([load_npy(c["image_embed.npy"]) for c in companions])
    torch.testing.assert_close(torch.from_numpy(stored), clip.encode_image(x, normalize=False), atol=1e-5, rtol=0)


def test_second_run_resumes_and_completes_a_deleted_shard(made: dict[str, Any], shapes_root: Path) -> None:
    out = made["tmp"] / "resume"
    args = ("--clip", made["clip"], "--urls", str(shapes_root / "images" / "val-*.tar"), "--out", str(out),
            "--size", "32")
    first = run_embed(*args)
    assert len(first.written) == 8 and not first.skipped
    again = run_embed(*args)
    assert not again.written and len(again.skipped) == 8
    victim = out / "val-000003.tar"
    before = [s for s in iter_tar(str(victim), SkipCounter())]
    victim.unlink()
    stale = out / ".val-000003.tar.999999.tmp"  # what a killed run leaves behind
    stale.write_bytes(b"half a tar")
    third = run_embed(*args)
    assert third.written == [str(victim)] and len(third.skipped) == 7
    assert not stale.exists()
    after = list(iter_tar(str(victim), SkipCounter()))
    assert [s["__key__"] for s in after] == [s["__key__"] for s in before]
    for a, b in zip(after, before):
        np.testing.assert_allclose(load_npy(a["image_embed.npy"]),
                                   load_npy(b["image_embed.npy"]), atol=1e-6)


def test_a_run_killed_midway_leaves_no_shard(made: dict[str, Any], shapes_root: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = made["tmp"] / "killed"
    args = ("--clip", made["clip"], "--urls", str(shapes_root / "images" / "val-00000{0,1}.tar"), "--out", str(out),
            "--size", "32", "--batch-size", "1")
    calls = {"n": 0}
    members = embed_command.Embedder.members

    def dies_on_the_second_batch(self: Any, decoded: list) -> list:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a kill in the middle of the first shard
        return members(self, decoded)

    monkeypatch.setattr(embed_command.Embedder, "members", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_embed(*args)
    assert sorted(p.name for p in out.iterdir()) == ["embeds.json"]  # no shard, no temporary file
    monkeypatch.setattr(embed_command.Embedder, "members", members)
    report = run_embed(*args)
    assert len(report.written) == 2
    assert shard_keys(str(out / "val-000000.tar")) == shard_keys(str(shapes_root / "images" / "val-000000.tar"))


def test_ranks_split_the_shards(made: dict[str, Any], shapes_root: Path) -> None:
    out = made["tmp"] / "ranks"
    args = ("--clip", made["clip"], "--urls", str(shapes_root / "images" / "val-*.tar"), "--out", str(out),
            "--size", "32")
    reports = [run_embed(*args, "--rank", str(r), "--world-size", "2") for r in range(2)]
    assert [Path(p).name for p in reports[0].written] == [f"val-00000{i}.tar" for i in (0, 2, 4, 6)]
    assert [Path(p).name for p in reports[1].written] == [f"val-00000{i}.tar" for i in (1, 3, 5, 7)]


# ------------------------------------------------------------------------------------------- the DataModules
def test_datamodules_yield_the_companions_embeddings(made: dict[str, Any], shapes_root: Path) -> None:
    clip = live_clip(made)
    batch = first_batch(image_data(shapes_root, made["images"]))
    assert batch["image_embed"].shape == (4, 32) and batch["text_hidden"].shape == (4, 16, 32)
    torch.testing.assert_close(batch["image_embed"], clip.encode_image(batch["image"], normalize=False),
                               atol=1e-5, rtol=0)
    e_x, hidden, mask = clip.encode_text_hidden(clip.tokenize(batch["caption"]), normalize=False)
    torch.testing.assert_close(batch["text_embed"], e_x, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch["text_hidden"], hidden, atol=1e-5, rtol=0)
    assert torch.equal(batch["text_mask"], mask)

    video = first_batch(video_data(shapes_root, made["videos"]))
    assert video["frame_embed"].shape == (2, 4, 32)  # [B, F, D]: the clip's own frames, whatever fps it drew
    frames = video["video"].flatten(0, 1)
    torch.testing.assert_close(video["frame_embed"].flatten(0, 1), clip.encode_image(frames, normalize=False),
                               atol=1e-5, rtol=0)


def test_a_companion_that_does_not_line_up_skips_its_samples() -> None:
    shard = [{"__key__": k, "png": b"x"} for k in ("a", "b", "c")]
    # missing at the end: only "c" is skipped
    out = list(zip_companion(iter([dict(s) for s in shard]), iter([{"__key__": "a"}, {"__key__": "b"}])))
    assert ["__embed_error__" in s for s in out] == [False, False, True]
    # another shard's companion: nothing lines up from the first mismatch on
    out = list(zip_companion(iter([dict(s) for s in shard]), iter([{"__key__": "a"}, {"__key__": "x"},
                                                                   {"__key__": "c"}])))
    assert ["__embed_error__" in s for s in out] == [False, True, True]


def test_bad_companion_folders_are_one_line_errors(made: dict[str, Any], shapes_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"embeds\.json not found.*mav embed"):
        image_data(shapes_root, tmp_path / "nowhere").setup("fit")
    partial = tmp_path / "partial"
    shutil.copytree(made["images"], partial)
    (partial / "train-000002.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"no companion .*train-000002\.tar for shard"):
        image_data(shapes_root, partial).setup("fit")
    shutil.copy(partial / "train-000001.tar", partial / "train-000000.tar")  # another shard's companion
    shutil.copy(partial / "train-000001.tar", partial / "train-000002.tar")
    with pytest.raises(ValueError, match=r"companion .*train-000000\.tar does not match shard"):
        image_data(shapes_root, partial).setup("fit")
    with pytest.raises(ValueError, match=r"holds images embedded at size 32.*reads images at size 16"):
        TextImageDataModule(urls=str(shapes_root / "images" / "train-*.tar"), image_size=16,
                            embeds=str(made["images"])).setup("fit")


def test_command_errors_are_one_line(made: dict[str, Any], shapes_root: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--out", str(shapes_root / "images")], "is the folder of the shard"),
        (["--out", str(made["images"]), "--size", "16"], "was written with other settings"),
        (["--out", str(made["tmp"] / "v"), "--kind", "videos", "--text"], "--text: video shards are unlabeled"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            run_embed("--clip", made["clip"], "--urls", str(shapes_root / "images" / "val-*.tar"), "--text", *extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        run_embed("--clip", str(made["tmp"] / "missing.ckpt"), "--urls", str(shapes_root), "--out", "x")
    assert "CLIP checkpoint not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the stages
def losses(live: Any, precomputed: Any, batch: dict[str, Any], drop: tuple[str, ...]) -> tuple[float, float]:
    """Loss of ``live`` on ``batch`` without the precomputed ``drop`` keys and of ``precomputed`` with them, both
    with the same generator seed."""
    bare = {k: v for k, v in batch.items() if k not in drop}
    with torch.no_grad():
        a = live.compute_loss(bare, generator=torch.Generator().manual_seed(3))[0]
        b = precomputed.compute_loss(batch, generator=torch.Generator().manual_seed(3))[0]
    return a.item(), b.item()


@pytest.mark.parametrize("embed_space", ["unit", "raw"])
def test_prior_loss_with_precomputed_embeddings_equals_the_live_clips(made: dict[str, Any], shapes_root: Path,
                                                                      embed_space: str) -> None:
    batch = first_batch(image_data(shapes_root, made["images"]))

    def prior(**towers: bool) -> PriorStage:
        torch.manual_seed(0)
        return PriorStage(made["clip"], **TINY_PRIOR, embed_space=embed_space, **towers)

    live, bare = prior(), prior(clip_image_tower=False, clip_text_tower=False)
    left = [n for n, _ in bare.named_parameters() if n.startswith("clip.")]
    assert left == ["clip.model.logit_scale"]  # no CLIP tower left, only the contrastive temperature
    a, b = losses(live, bare, batch, ("image_embed", "text_embed", "text_hidden", "text_mask"))
    assert abs(a - b) <= 1e-5 and a > 0
    with pytest.raises(ValueError, match="clip_text_tower is false"):
        bare.compute_loss({k: v for k, v in batch.items() if not k.startswith("text_")})


def test_decoder_loss_with_precomputed_embeddings_equals_the_live_clips(made: dict[str, Any],
                                                                        shapes_root: Path) -> None:
    batch = first_batch(image_data(shapes_root, made["images"]))

    def decoder(**kw: Any) -> DecoderStage:
        torch.manual_seed(0)
        stage = DecoderStage(**{"unet": TINY_UNET, **kw}, clip_ckpt=made["clip"], image_size=32)
        for p in stage.unet.parameters():  # the zero-initialised output layers would hide the conditioning
            if not p.any():
                p.data.normal_(0.0, 0.2)
        stage.unet.image_embed_proj.weight.data.mul_(30)  # nearby frames embed alike: make their difference count
        return stage

    live, bare = decoder(), decoder(clip_image_tower=False)
    assert not [n for n, _ in bare.named_parameters() if n.startswith("clip.model.visual")]
    assert [n for n, _ in live.named_parameters() if n.startswith("clip.model.visual")]
    a, b = losses(live, bare, batch, ("image_embed",))
    assert abs(a - b) <= 1e-5 and a > 0
    with pytest.raises(ValueError, match="clip_image_tower is false .*data.init_args.embeds"):
        bare.compute_loss({"image": batch["image"]})

    # D_t: the embedding of the frame cond_frame picks, out of the clip's precomputed frame embeddings
    video = first_batch(video_data(shapes_root, made["videos"]))
    dt = {"unet": {**TINY_UNET, "temporal": True, "fps_cond": True}, "cond_frame": "random"}
    live, bare = decoder(**dt), decoder(**dt, clip_image_tower=False)
    a, b = losses(live, bare, video, ("frame_embed",))
    assert abs(a - b) <= 1e-5 and a > 0


def test_decoder_trains_on_companions_without_the_image_tower(made: dict[str, Any], shapes_root: Path) -> None:
    data = TextImageDataModule(urls=str(shapes_root / "images" / "train-*.tar"),
                               val_urls=str(shapes_root / "images" / "val-*.tar"), image_size=32, batch_size=4,
                               shuffle_buffer=8, embeds=str(made["images"]))
    stage = DecoderStage(unet=TINY_UNET, clip_ckpt=made["clip"], image_size=32, clip_image_tower=False,
                         warmup_steps=0, sample_steps=2)
    trainer = fit(stage, data, steps=2, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=2)
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])


def test_sampling_from_a_checkpoint_loads_the_towers_again(made: dict[str, Any], tmp_path: Path) -> None:
    from lightning_mav.pipeline import load_stage

    torch.manual_seed(0)
    trained = PriorStage(made["clip"], **TINY_PRIOR, clip_image_tower=False, clip_text_tower=False)
    path = tmp_path / "prior.ckpt"
    torch.save({"state_dict": {k: v for k, v in trained.state_dict().items() if not k.startswith("clip.")},
                "hyper_parameters": dict(trained.hparams)}, path)
    loaded = load_stage(PriorStage, path, stage="P")
    assert loaded.clip.has_text_tower and loaded.clip.has_image_tower
    assert loaded.sample(["a red circle"], steps=2).shape == (1, 32)
