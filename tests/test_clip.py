"""C_x (lightning_mav.nn.clip.CLIP) and its contrastive training stage (CLIPStage)."""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import text_global_pool

from lightning_mav.nn.clip import CLIP
from tests.helpers import SHAPE_CAPTIONS, caption_batch, fit, fit_batches, tiny_clip_cfg

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

CAPTIONS = [
    "a small red circle moving",
    "A LARGE Blue Square, top-left!",
    "a medium green triangle moving right slowly across an empty grey background " * 3,  # longer than the context
    "",
]


def tiny_cfg(custom_text: bool = False) -> dict:
    """A CLIP small enough to build and run in milliseconds: 32 px images, 16 tokens, a 2-layer text tower."""
    return tiny_clip_cfg(embed_dim=32, image_size=32, context_length=16, text_layers=2, custom_text=custom_text)


@pytest.fixture(scope="module")
def clip() -> CLIP:
    return CLIP("tiny", model_cfg=tiny_cfg())


def test_tokenizer_matches_open_clip(clip: CLIP) -> None:
    tokens = clip.tokenize(CAPTIONS)
    assert tokens.shape == (len(CAPTIONS), 16) and tokens.dtype == torch.long
    assert torch.equal(tokens, open_clip.get_tokenizer("ViT-B-32", context_length=16)(CAPTIONS))
    assert torch.equal(tokens, open_clip.tokenize(CAPTIONS, context_length=16))
    assert tokens[2, -1] == clip.tokenizer.eot_token_id  # truncated, still ends with EOT


@pytest.mark.parametrize("custom_text", [False, True])
def test_hidden_states_pool_to_open_clip_encode_text(custom_text: bool) -> None:
    clip = CLIP("tiny", model_cfg=tiny_cfg(custom_text))
    assert type(clip.model) is (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)
    tokens = clip.tokenize(CAPTIONS)
    e_x, hidden, mask = clip.encode_text_hidden(tokens, normalize=False)
    assert e_x.shape == (4, 32) and hidden.shape == (4, 16, 32) and mask.shape == (4, 16)
    reference = clip.model.encode_text(tokens)
    torch.testing.assert_close(e_x, reference, rtol=0, atol=1e-6)
    # Pooling the hidden states ourselves (EOT position, then the projection) gives the same embedding.
    proj = clip.model.text.text_projection if custom_text else clip.model.text_projection
    torch.testing.assert_close(text_global_pool(hidden, tokens, "argmax") @ proj, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(clip.encode_text(tokens), clip.model.encode_text(tokens, normalize=True))
    # Mask = SOT + BPE tokens + EOT.
    assert mask.tolist()[0] == [True] * 7 + [False] * 9
    assert mask[2].all() and mask[3].sum() == 2


def test_encode_image_normalises_and_resizes(clip: CLIP) -> None:
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    reference = clip.model.encode_image(((images + 1) / 2 - mean) / std, normalize=True)
    torch.testing.assert_close(clip.encode_image(images), reference)
    # Other sizes and aspect ratios: shortest side resized to 32, then a centre crop.
    assert clip.preprocess(torch.zeros(1, 3, 64, 96)).shape == (1, 3, 32, 32)
    y_e = clip.encode_image(torch.rand(3, 3, 48, 64) * 2 - 1)
    assert y_e.shape == (3, 32)
    torch.testing.assert_close(y_e.norm(dim=-1), torch.ones(3))


def test_frozen_by_default(clip: CLIP) -> None:
    assert not any(p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.training  # stays in eval mode inside a LightningModule
    assert not clip.encode_text(clip.tokenize(["a red circle"])).requires_grad
    trainable = CLIP("tiny", model_cfg=tiny_cfg(), freeze=False)
    assert all(p.requires_grad for p in trainable.parameters()) and trainable.training
    assert trainable.encode_image(torch.zeros(1, 3, 32, 32)).requires_grad


def test_mav_tiny_builds() -> None:
    clip = CLIP()  # the built-in default
    assert (clip.embed_dim, clip.text_width, clip.context_length, clip.image_size) == (128, 128, 32, (64, 64))
    assert clip.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 128)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weights_round_trip(clip: CLIP, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in clip.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    tokens, images = clip.tokenize(CAPTIONS), torch.rand(2, 3, 32, 32) * 2 - 1
    loaded = CLIP("tiny", pretrained=str(path), model_cfg=tiny_cfg())
    fresh = CLIP("tiny", model_cfg=tiny_cfg())
    assert torch.equal(loaded.encode_text(tokens), clip.encode_text(tokens))
    assert torch.equal(loaded.encode_image(images), clip.encode_image(images))
    assert not torch.allclose(fresh.encode_text(tokens), clip.encode_text(tokens))


def test_from_checkpoint_open_clip_weights(tmp_path: Path) -> None:
    clip = CLIP("mav-tiny")
    path = tmp_path / "open_clip_model.bin"
    torch.save(clip.model.state_dict(), path)
    with pytest.raises(ValueError, match="model_name"):
        CLIP.from_checkpoint(path)
    loaded = CLIP.from_checkpoint(path, model_name="mav-tiny")
    tokens = clip.tokenize(CAPTIONS)
    assert torch.equal(loaded.encode_text(tokens), clip.encode_text(tokens))


@pytest.mark.parametrize("name", ["mav-tiny", "mav-tiny-rn"])
def test_builtin_configs_embed_shapes_images(name: str, tmp_path: Path) -> None:
    clip = CLIP(name)
    images = torch.rand(3, 3, 32, 32) * 2 - 1  # the demo's 32 px images, resized to the tower's 64
    y_e, e_x = clip.encode_image(images), clip.encode_text(clip.tokenize(CAPTIONS[:3]))
    assert y_e.shape == e_x.shape == (3, 128)
    torch.testing.assert_close(y_e.norm(dim=-1), torch.ones(3))
    assert clip.image_size == (64, 64)
    path = tmp_path / "weights.bin"
    torch.save(clip.model.state_dict(), path)
    torch.testing.assert_close(CLIP.from_checkpoint(path, model_name=name).encode_image(images), y_e, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="mav-tiny-rn"):
        CLIP("mav-tiny-xl")


def test_missing_file_is_a_clear_error_and_never_downloads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError(f"download attempted: {args} {kwargs}")

    import huggingface_hub
    import open_clip.factory
    import open_clip.pretrained

    for module, name in [(open_clip.pretrained, "download_pretrained"), (open_clip.pretrained, "download_pretrained_from_hf"),
                         (open_clip.pretrained, "download_pretrained_from_url"), (open_clip.factory, "download_pretrained"),
                         (open_clip.factory, "download_pretrained_from_hf"), (huggingface_hub, "hf_hub_download")]:
        monkeypatch.setattr(module, name, no_download)
    missing = tmp_path / "nope" / "clip.pt"
    for make in (lambda: CLIP("ViT-B-32", pretrained=str(missing)),
                 lambda: CLIP("ViT-B-32", pretrained="openai"),  # a pretrained *tag* is just a missing file here
                 lambda: CLIP.from_checkpoint(missing)):
        with pytest.raises(FileNotFoundError) as err:
            make()
        message = str(err.value)
        assert "\n" not in message and ("nope/clip.pt" in message or "openai" in message)
    with pytest.raises(ValueError, match="schemas"):
        CLIP("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")


# --------------------------------------------------------------------------------------------------- CLIPStage
def train_steps(stage, batch: dict, steps: int) -> list[float]:
    """Plain optimisation steps on one batch (with the stage's temperature clamp); the losses."""
    optimizer, losses = stage.configure_optimizers()["optimizer"], []
    for step in range(steps):
        loss, _ = stage.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stage.on_train_batch_end(None, batch, step)
        losses.append(loss.item())
    return losses


def test_clip_stage_overfits_one_batch() -> None:
    from lightning_mav.stages.clip import CLIPStage

    stage = CLIPStage("tiny", model_cfg=tiny_cfg(), lr=2e-3, weight_decay=0.0, warmup_steps=0)
    assert all(p.requires_grad for p in stage.clip.parameters())
    batch = caption_batch()
    assert stage.compute_loss(batch)[1] == 8
    losses = train_steps(stage, batch, 40)
    assert losses[-1] < losses[0] / 10, losses
    assert stage.clip.model.logit_scale.item() <= math.log(100) + 1e-6


def test_clip_stage_checkpoint_loads_as_clip(tmp_path: Path) -> None:
    from lightning_mav.stages.clip import CLIPStage

    stage = CLIPStage("tiny", model_cfg=tiny_cfg(), lr=1e-3, warmup_steps=2)
    trainer = fit_batches(stage, [caption_batch()], steps=2)
    assert {"train/loss", "val/loss"} <= set(trainer.callback_metrics)
    path = tmp_path / "clip.ckpt"
    trainer.save_checkpoint(path)

    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain hyperparameters: no unsafe unpickling
    assert ckpt["hyper_parameters"]["model_cfg"] == tiny_cfg()
    assert any(k.startswith("clip.model.") for k in ckpt["state_dict"])
    clip = CLIP.from_checkpoint(path)
    assert not clip.training and not any(p.requires_grad for p in clip.parameters())
    tokens, images = clip.tokenize(SHAPE_CAPTIONS), torch.rand(2, 3, 32, 32) * 2 - 1
    reloaded = CLIPStage.load_from_checkpoint(path, weights_only=True)
    stage.eval()
    with torch.no_grad():  # same (fused) attention path everywhere, so outputs are bit-identical
        assert torch.equal(clip.encode_text(tokens), stage.clip.encode_text(tokens))
        assert torch.equal(clip.encode_image(images), stage.clip.encode_image(images))
        assert torch.equal(reloaded.clip.encode_text(tokens), clip.encode_text(tokens))


def test_clip_stage_ignores_evaluation_padding() -> None:
    from lightning_mav.stages.clip import CLIPStage

    stage = CLIPStage("tiny", model_cfg=tiny_cfg())
    batch = {**caption_batch(), "valid": torch.tensor([True] * 6 + [False] * 2)}
    loss, batch_size = stage.compute_loss(batch)
    real = {"image": batch["image"][:6], "caption": batch["caption"][:6]}
    assert batch_size == 6
    torch.testing.assert_close(loss, stage.compute_loss(real)[0])
    assert stage.compute_loss({**batch, "valid": torch.zeros(8, dtype=torch.bool)})[1] == 0


def test_cosine_lr_schedule_warms_up_then_decays_to_zero_at_max_steps() -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lightning_mav.stages.clip import CLIPStage

    class RecordLR(pl.Callback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    rates = {}
    for schedule in ("constant", "cosine"):
        stage = CLIPStage("tiny", model_cfg=tiny_cfg(), lr=1e-3, warmup_steps=2, lr_schedule=schedule)
        record = RecordLR()
        fit(stage, DataLoader([caption_batch()] * 6, batch_size=None), steps=6, limit_val_batches=0, callbacks=[record])
        rates[schedule] = record.lrs
    cosine = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 6)]
    assert rates["cosine"] == pytest.approx([1e-3 * f for f in cosine])
    assert rates["constant"] == pytest.approx([5e-4] + [1e-3] * 5)
    with pytest.raises(ValueError, match="lr_schedule"):
        CLIPStage("tiny", model_cfg=tiny_cfg(), lr_schedule="linear")


SHAPE_WORDS = [["circle", "square", "triangle"], ["small", "large"]]


def test_hard_negatives_swap_one_word_of_its_group() -> None:
    from lightning_mav.stages.clip import CLIPStage

    stage = CLIPStage("tiny", model_cfg=tiny_cfg(), hard_negative_words=SHAPE_WORDS)
    captions = list(SHAPE_CAPTIONS) + ["nothing to swap here", "A Circle, drawn."]
    negatives = stage.hard_negatives(captions)
    assert len(negatives) == len(captions) - 1  # the caption without a group word gets none
    for caption, negative in zip([c for c in captions if c != "nothing to swap here"], negatives):
        changed = [(a, b) for a, b in zip(caption.split(), negative.split()) if a != b]
        assert len(changed) == 1 and len(caption.split()) == len(negative.split()), (caption, negative)
        old, new = (w.strip(",.").lower() for w in changed[0])
        assert any(old in g and new in g for g in SHAPE_WORDS), (caption, negative)
    assert negatives[-1] in ("A Square, drawn.", "A Triangle, drawn.")  # case and punctuation kept
    assert stage.hard_negatives(captions) == negatives  # same step, same captions: same negatives (resume)
    seeded = [stage.hard_negatives(captions, torch.Generator().manual_seed(s)) for s in range(4)]
    assert len({tuple(n) for n in seeded}) > 1
    assert CLIPStage("tiny", model_cfg=tiny_cfg()).hard_negatives(captions) == []


@pytest.mark.parametrize("groups, match", [([["circle"]], "two or more distinct"),
                                           ([["circle", "red circle"]], "single words"),
                                           ([["circle", "square"], ["square", "triangle"]], "more than one group")])
def test_hard_negative_words_are_checked(groups: list, match: str) -> None:
    from lightning_mav.stages.clip import CLIPStage

    with pytest.raises(ValueError, match=f"hard_negative_words.*{match}"):
        CLIPStage("tiny", model_cfg=tiny_cfg(), hard_negative_words=groups)


def test_hard_negatives_add_contrast_and_are_learned() -> None:
    from lightning_mav.stages.clip import CLIPStage

    torch.manual_seed(0)
    plain = CLIPStage("tiny", model_cfg=tiny_cfg(), lr=2e-3, weight_decay=0.0, warmup_steps=0)
    stage = CLIPStage("tiny", model_cfg=tiny_cfg(), lr=2e-3, weight_decay=0.0, warmup_steps=0,
                      hard_negative_words=SHAPE_WORDS)
    stage.load_state_dict(plain.state_dict())
    batch = caption_batch()
    # Same weights: the text -> image half is the same, the image -> text half has more negatives to beat.
    assert stage.compute_loss(batch)[0].item() > plain.compute_loss(batch)[0].item()
    no_words = {**batch, "caption": [f"caption number {i}" for i in range(8)]}
    torch.testing.assert_close(stage.compute_loss(no_words)[0], plain.compute_loss(no_words)[0])

    train_steps(stage, batch, 60)
    stage.eval()
    with torch.no_grad():  # every image now prefers its caption to each word-swapped version of it
        image = stage.clip.encode_image(batch["image"])
        for i, caption in enumerate(batch["caption"]):
            words = caption.split()
            swaps = [" ".join(words[:j] + [o] + words[j + 1:]) for j, w in enumerate(words)
                     for g in SHAPE_WORDS if w in g for o in g if o != w]
            text = stage.clip.encode_text(stage.clip.tokenize([caption] + swaps))
            scores = text @ image[i]
            assert scores[0] > scores[1:].max(), (caption, scores)
