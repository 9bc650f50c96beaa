"""P (lightning_mav.nn.prior.Prior) and its diffusion training stage (PriorStage)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_mav.nn.prior import Prior
from tests.helpers import SHAPE_CAPTIONS, TINY_CLIP_32, TINY_PRIOR, caption_batch, fit_batches, save_tiny_clip

PRIOR = {"dim": 64, "depth": 2, "heads": 2, "dim_head": 32}

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CLIPStage-format checkpoint (what CLIP.from_checkpoint reads; tests/test_clip.py trains a real one)."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip.ckpt", TINY_CLIP_32)


def make_stage(clip_ckpt: str, **kwargs):
    from lightning_mav.stages.prior import PriorStage

    return PriorStage(clip_ckpt, **{**PRIOR, "warmup_steps": 0, **kwargs})


# --------------------------------------------------------------------------------------------------- Prior
def prior_inputs(b: int = 3, length: int = 6, d: int = 16, w: int = 24) -> dict:
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False  # a short caption: padding after its EOT
    return {"y_t": torch.randn(b, d), "t": torch.tensor([0, 500, 999]), "text_embed": torch.randn(b, d),
            "text_hidden": torch.randn(b, length, w), "text_mask": mask}


def test_prior_conditioning_and_masks() -> None:
    prior = Prior(embed_dim=16, text_width=24, max_text_len=8, **PRIOR).eval()
    x = prior_inputs()
    args = {k: x.pop(k) for k in ("y_t", "t")}
    out = prior(*args.values(), **x)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    assert torch.equal(out, prior(*args.values(), **x, drop_cond=torch.zeros(3, dtype=torch.bool)))

    # Padded tokens are invisible: changing their hidden states changes nothing.
    padded = x["text_hidden"].clone()
    padded[0, 3:] = torch.randn(3, 24)
    torch.testing.assert_close(prior(*args.values(), **{**x, "text_hidden": padded}), out, rtol=0, atol=1e-6)

    # Dropped conditioning ignores the text entirely (and stays finite with every text token masked) ...
    drop = torch.tensor([True, False, True])
    dropped = prior(*args.values(), **x, drop_cond=drop)
    other_text = {**x, "text_hidden": torch.randn(3, 6, 24), "text_embed": torch.randn(3, 16)}
    torch.testing.assert_close(prior(*args.values(), **other_text, drop_cond=drop)[drop], dropped[drop], rtol=0, atol=1e-6)
    # ... while kept samples depend on it, and are unaffected by the others being dropped.
    assert not torch.allclose(prior(*args.values(), **other_text)[1], out[1])
    torch.testing.assert_close(dropped[1], out[1], rtol=0, atol=1e-6)
    # The timestep and the noised embedding matter.
    assert not torch.allclose(prior(args["y_t"], torch.tensor([1, 1, 1]), **x), out)
    assert not torch.allclose(prior(torch.randn(3, 16), args["t"], **x), out)


# --------------------------------------------------------------------------------------------------- PriorStage
def test_prior_stage_overfits_one_batch(clip_ckpt: str) -> None:
    stage = make_stage(clip_ckpt, lr=1e-3, weight_decay=0.0, cond_drop_prob=0.0)
    trainable = {n.split(".")[0] for n, p in stage.named_parameters() if p.requires_grad}
    assert trainable == {"prior"}  # the CLIP stays frozen
    optimizer = stage.configure_optimizers()["optimizer"]
    batch, losses = caption_batch(), []
    for _ in range(80):
        loss, batch_size = stage.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert batch_size == 8
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5  # timesteps are random: average a few steps
    assert last < first / 10, (first, last)


def test_precomputed_image_embed_is_used(clip_ckpt: str) -> None:
    stage = make_stage(clip_ckpt)
    batch = caption_batch()
    precomputed = {"caption": batch["caption"], "image_embed": 3.0 * stage.clip.encode_image(batch["image"])}
    loss, _ = stage.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    loss_pre, _ = stage.compute_loss(precomputed, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss_pre, loss)  # normalised again, so any scale of the stored vectors works
    wrong = {**precomputed, "image_embed": torch.randn(8, 32)}
    assert stage.compute_loss(wrong, generator=torch.Generator().manual_seed(0))[0] != loss


def test_prior_stage_ignores_evaluation_padding(clip_ckpt: str) -> None:
    stage = make_stage(clip_ckpt)
    batch = {**caption_batch(), "valid": torch.tensor([True] * 6 + [False] * 2)}
    other_padding = {**batch, "image": torch.cat([batch["image"][:6], torch.rand(2, 3, 32, 32)])}
    loss, batch_size = stage.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    assert batch_size == 6
    torch.testing.assert_close(stage.compute_loss(other_padding, generator=torch.Generator().manual_seed(0))[0], loss)


def test_sampling_is_deterministic_and_guided(clip_ckpt: str) -> None:
    stage = make_stage(clip_ckpt).eval()
    prompts = SHAPE_CAPTIONS[:3]

    def sample(seed: int, scale: float) -> torch.Tensor:
        return stage.sample(prompts, steps=4, guidance_scale=scale, generator=torch.Generator().manual_seed(seed))

    y_e = sample(0, 3.0)
    assert y_e.shape == (3, 32)
    torch.testing.assert_close(y_e.norm(dim=-1), torch.ones(3))
    assert torch.equal(sample(0, 3.0), y_e)
    assert not torch.allclose(sample(1, 3.0), y_e)

    # Guidance scale 1 is exactly the conditional prediction; 0 exactly the unconditional one.
    cond = stage.encode_text(prompts)

    def branch(drop: bool) -> torch.Tensor:
        def fn(y_t, t, drop_cond):
            return stage.prior(y_t, t, **cond, drop_cond=torch.full((3,), drop))
        out = stage.diffusion.sample(fn, (3, 32), steps=4, generator=torch.Generator().manual_seed(0))
        return torch.nn.functional.normalize(out, dim=-1)

    torch.testing.assert_close(sample(0, 1.0), branch(False), rtol=0, atol=1e-6)
    torch.testing.assert_close(sample(0, 0.0), branch(True), rtol=0, atol=1e-5)
    assert not torch.allclose(sample(0, 1.0), y_e)


def test_prior_stage_checkpoint_has_no_clip_and_reloads(clip_ckpt: str, tmp_path: Path) -> None:
    from lightning_mav.stages.prior import PriorStage

    stage = make_stage(clip_ckpt, lr=1e-3)
    trainer = fit_batches(stage, [caption_batch()], steps=2)
    assert {"train/loss", "val/loss"} <= set(trainer.callback_metrics)
    path = tmp_path / "prior.ckpt"
    trainer.save_checkpoint(path)

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["clip_ckpt"] == clip_ckpt
    assert not [k for k in ckpt["state_dict"] if k.startswith("clip.")]
    assert any(k.startswith("prior.") for k in ckpt["state_dict"])

    reloaded = PriorStage.load_from_checkpoint(path, weights_only=True)
    for name, tensor in stage.state_dict().items():  # prior from the checkpoint, CLIP from clip_ckpt
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    seed = torch.Generator().manual_seed(0)
    stage.eval()
    assert torch.equal(reloaded.sample(SHAPE_CAPTIONS[:2], steps=3, generator=seed),
                       stage.sample(SHAPE_CAPTIONS[:2], steps=3, generator=torch.Generator().manual_seed(0)))


def test_prior_with_an_open_clip_weights_file_reloads_strictly(tmp_path: Path) -> None:
    """``clip_ckpt`` an open_clip weights file with ``clip_model`` its architecture: the checkpoint keeps none of the
    CLIP, and ``load_from_checkpoint`` (strict) and the pipeline's ``load_stage`` rebuild it from the recorded file."""
    from lightning_mav.nn.clip import CLIP
    from lightning_mav.pipeline import load_stage
    from lightning_mav.stages.prior import PriorStage

    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(CLIP("mav-tiny").model.state_dict(), weights)
    stage = PriorStage(str(weights), clip_model="mav-tiny", **TINY_PRIOR, lr=1e-3, warmup_steps=0)
    batch = {**caption_batch(), "image": torch.rand(8, 3, 64, 64) * 2 - 1}
    trainer = fit_batches(stage, [batch], steps=1)
    path = tmp_path / "prior.ckpt"
    trainer.save_checkpoint(path)
    assert not [k for k in torch.load(path, weights_only=True)["state_dict"] if k.startswith("clip.")]
    for reloaded in (PriorStage.load_from_checkpoint(path, weights_only=True), load_stage(PriorStage, path, stage="P")):
        assert reloaded.hparams.clip_model == "mav-tiny"
        for name, tensor in stage.state_dict().items():
            assert torch.equal(reloaded.state_dict()[name], tensor), name
