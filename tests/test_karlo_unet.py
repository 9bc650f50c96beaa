"""Karlo's decoder and super-resolution U-Nets (diffusers' layout) converted to our ``UNet``: the same function as
diffusers' models on tiny random configs, the same parameter counts on Karlo's real configs, ``D_t`` == ``D`` per
frame after the conversion, and one-line errors for what the conversion does not support."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mav.karlo.unet import unet_kwargs_from_diffusers, unet_state_from_diffusers
from lightning_mav.nn.unet import UNet, count_parameters, is_temporal_name

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCE = "/weights/karlo/decoder/config.json"
B, TOKENS, CLIP_DIM = 2, 4, 20
# Karlo's block types at toy widths: no attention on level 0, attention on the others and in the middle
TINY_DECODER = dict(
    sample_size=16, layers_per_block=2, in_channels=3, out_channels=6, block_out_channels=(32, 64, 96),
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=24, class_embed_type="identity",
    attention_head_dim=16, resnet_time_scale_shift="scale_shift", norm_num_groups=8)
TINY_TEXT_PROJ = dict(clip_extra_context_tokens=TOKENS, clip_embeddings_dim=CLIP_DIM, time_embed_dim=128,
                      cross_attention_dim=24)
TINY_SUPER_RES = dict(
    sample_size=16, layers_per_block=1, in_channels=6, out_channels=3, block_out_channels=(32, 64),
    down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2,
    add_attention=False, norm_num_groups=8)
# Karlo's real configs (diffusers' scripts/convert_kakao_brain_unclip_to_diffusers.py)
KARLO_DECODER = dict(
    sample_size=64, layers_per_block=3, in_channels=3, out_channels=6, block_out_channels=(320, 640, 960, 1280),
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=1536, class_embed_type="identity",
    attention_head_dim=64, resnet_time_scale_shift="scale_shift")
KARLO_TEXT_PROJ = dict(clip_extra_context_tokens=4, clip_embeddings_dim=768, time_embed_dim=1280,
                       cross_attention_dim=1536)
KARLO_SUPER_RES = dict(
    sample_size=256, layers_per_block=3, in_channels=6, out_channels=3, block_out_channels=(320, 640, 960, 1280),
    down_block_types=("ResnetDownsampleBlock2D",) * 4, up_block_types=("ResnetUpsampleBlock2D",) * 4,
    add_attention=False)


# ------------------------------------------------------------------------------------------------------ helpers
def rel_err(ours: Tensor, ref: Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomise(*modules: torch.nn.Module) -> None:
    """Perturb every all-zero / all-one parameter (zero-init output layers and biases, norm weights, the learned
    null embedding) so that no comparison is trivially 0 = 0."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                if bool((p == 0).all()) or bool((p == 1).all()):
                    p.add_(torch.randn_like(p) * 0.2)


def convert(model: torch.nn.Module, text_proj: torch.nn.Module | None = None,
            **overrides: Any) -> tuple[UNet, dict[str, Any]]:
    """Our ``UNet`` (eval) holding a diffusers model's (+ text_proj's) weights, and its kwargs."""
    kwargs = unet_kwargs_from_diffusers(dict(model.config), None if text_proj is None else dict(text_proj.config),
                                        source=SOURCE)
    state = unet_state_from_diffusers(model.state_dict(), kwargs,
                                      None if text_proj is None else text_proj.state_dict(), source=SOURCE)
    ours = UNet(**kwargs, **overrides).eval()
    missing, unexpected = ours.load_state_dict(state, strict=not overrides)
    assert not unexpected and all(is_temporal_name(k) for k in missing), (missing, unexpected)
    return ours, kwargs


def decoder_inputs() -> dict[str, Tensor]:
    """x, t, image / text embeddings, text hidden states and a text mask with padding in the first item."""
    return {"x": torch.randn(B, 3, 16, 16), "t": torch.tensor([3, 700]), "image_embed": torch.randn(B, CLIP_DIM),
            "text_embed": torch.randn(B, CLIP_DIM), "text_hidden": torch.randn(B, 5, CLIP_DIM),
            "text_mask": torch.tensor([[True, True, True, False, False], [True] * 5])}


def diffusers_decoder(decoder: UNet2DConditionModel, text_proj: UnCLIPTextProjModel, inp: dict[str, Tensor], *,
                      guidance: bool = False) -> Tensor:
    """As Karlo's pipeline calls them; ``guidance``: the unconditional half of the classifier-free-guidance batch."""
    rep = 2 if guidance else 1
    enc, additive = text_proj(image_embeddings=inp["image_embed"], prompt_embeds=inp["text_embed"].repeat(rep, 1),
                              text_encoder_hidden_states=inp["text_hidden"].repeat(rep, 1, 1),
                              do_classifier_free_guidance=guidance)
    mask = F.pad(inp["text_mask"].repeat(rep, 1), (text_proj.clip_extra_context_tokens, 0), value=True)
    out = decoder(inp["x"].repeat(rep, 1, 1, 1), inp["t"].repeat(rep), encoder_hidden_states=enc,
                  class_labels=additive, attention_mask=mask).sample
    return out[:B]


@pytest.fixture(scope="module")
def tiny_decoder() -> tuple[UNet2DConditionModel, UnCLIPTextProjModel]:
    torch.manual_seed(0)
    decoder, text_proj = UNet2DConditionModel(**TINY_DECODER).eval(), UnCLIPTextProjModel(**TINY_TEXT_PROJ).eval()
    randomise(decoder, text_proj)
    return decoder, text_proj


# -------------------------------------------------------------------------------------------------------- tests
@torch.no_grad()
def test_decoder_matches_diffusers(tiny_decoder: tuple[UNet2DConditionModel, UnCLIPTextProjModel]) -> None:
    decoder, text_proj = tiny_decoder
    ours, kwargs = convert(decoder, text_proj)
    assert kwargs["attn_levels"] == [1, 2] and kwargs["heads"] is None and kwargs["dim_head"] == 16
    assert not hasattr(ours, "null_text_hidden") and not hasattr(ours, "lowres_noise_embed")
    inp = decoder_inputs()
    kw = {k: inp[k] for k in ("image_embed", "text_hidden", "text_mask", "text_embed")}
    ref = diffusers_decoder(decoder, text_proj, inp)
    out = ours(inp["x"], inp["t"], **kw)
    assert out.shape == ref.shape == (B, 6, 16, 16) and ref.abs().max() > 0.1
    assert rel_err(out, ref) <= 1e-4
    # unconditional: the learned null image embedding; the text inputs stay (Karlo encodes the empty caption)
    ref_u = diffusers_decoder(decoder, text_proj, inp, guidance=True)
    out_u = ours(inp["x"], inp["t"], **kw, drop_cond=torch.ones(B, dtype=torch.bool))
    assert rel_err(out_u, ref_u) <= 1e-4
    assert rel_err(out_u, ref) > 1e-2  # the null embedding does change the output


@torch.no_grad()
def test_super_res_matches_diffusers() -> None:
    model = UNet2DModel(**TINY_SUPER_RES).eval()
    randomise(model)
    ours, kwargs = convert(model)
    assert kwargs["lowres_cond"] and not kwargs["lowres_noise_cond"] and kwargs["lowres_resize"] == "bicubic"
    assert kwargs["time_cond"] == "add" and not hasattr(ours, "lowres_noise_embed")
    x, lowres, t = torch.randn(B, 3, 16, 16), torch.rand(B, 3, 8, 8) * 2 - 1, torch.tensor([5, 900])
    up = F.interpolate(lowres, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    ref = model(torch.cat([x, up], 1), t).sample
    assert ref.abs().max() > 0.1
    assert rel_err(ours(x, t, lowres=lowres), ref) <= 1e-4
    # antialias changes upsampling (PIL's a = -0.5 kernel): the option is needed, not cosmetic
    plain = F.interpolate(lowres, size=(16, 16), mode="bicubic", align_corners=False)
    assert (plain - up).abs().max() > 1e-3


@pytest.mark.parametrize("head_dim", [16, None])
@torch.no_grad()
def test_super_res_with_mid_attention_matches_diffusers(head_dim: int | None) -> None:
    model = UNet2DModel(**{**TINY_SUPER_RES, "add_attention": True, "attention_head_dim": head_dim}).eval()
    randomise(model)
    ours, kwargs = convert(model)
    assert kwargs["mid_attn"] and ours.mid[1].spatial.heads == (4 if head_dim else 1)
    x, lowres, t = torch.randn(B, 3, 16, 16), torch.randn(B, 3, 8, 8), torch.tensor([5, 900])
    up = F.interpolate(lowres, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    assert rel_err(ours(x, t, lowres=lowres), model(torch.cat([x, up], 1), t).sample) <= 1e-4


def test_karlo_parameter_counts() -> None:
    with torch.device("meta"):
        decoder, text_proj = UNet2DConditionModel(**KARLO_DECODER), UnCLIPTextProjModel(**KARLO_TEXT_PROJ)
        super_res = UNet2DModel(**KARLO_SUPER_RES)
        kwargs = unet_kwargs_from_diffusers(dict(decoder.config), dict(text_proj.config), source=SOURCE)
        ours_decoder = UNet(**kwargs)
        ours_super_res = UNet(**unet_kwargs_from_diffusers(dict(super_res.config), source=SOURCE))
    assert kwargs["dim_mults"] == [1, 2, 3, 4] and kwargs["attn_levels"] == [1, 2, 3] and kwargs["dim_head"] == 64
    assert count_parameters(ours_decoder) == count_parameters(decoder) + count_parameters(text_proj)
    assert count_parameters(ours_super_res) == count_parameters(super_res)


@torch.no_grad()
def test_temporal_decoder_is_the_image_decoder_per_frame(
        tiny_decoder: tuple[UNet2DConditionModel, UnCLIPTextProjModel]) -> None:
    decoder, text_proj = tiny_decoder
    image, _ = convert(decoder, text_proj)
    video, _ = convert(decoder, text_proj, temporal=True, fps_cond=True)  # missing keys checked: temporal only
    assert video.parameter_counts()["temporal"] > 0
    inp, f = decoder_inputs(), 3
    clip = torch.randn(B, 3, f, 16, 16)
    kw = {k: inp[k] for k in ("image_embed", "text_hidden", "text_mask", "text_embed")}
    out = video(clip, inp["t"], **kw, fps=torch.tensor([4.0, 8.0]))
    frames = image(clip.transpose(1, 2).reshape(B * f, 3, 16, 16), inp["t"].repeat_interleave(f),
                   **{k: v.repeat_interleave(f, 0) for k, v in kw.items()})
    assert rel_err(out, frames.view(B, f, 6, 16, 16).transpose(1, 2)) <= 1e-5


def _error(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{SOURCE}: "), message
    return message


def test_unsupported_configs_are_rejected(tiny_decoder: tuple[UNet2DConditionModel, UnCLIPTextProjModel]) -> None:
    decoder, text_proj = tiny_decoder
    config, tp = dict(decoder.config), dict(text_proj.config)
    # Stable Diffusion's U-Net: rejected on its first block
    sd = {**config, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
    assert "down_block_types[0] is 'CrossAttnDownBlock2D', expected 'ResnetDownsampleBlock2D' or " \
           "'SimpleCrossAttnDownBlock2D'" in _error(unet_kwargs_from_diffusers, sd, tp, source=SOURCE)
    # another architecture altogether
    vae = {"_class_name": "AutoencoderKL", "in_channels": 3, "latent_channels": 4}
    assert "_class_name is 'AutoencoderKL', expected 'UNet2DConditionModel'" in \
        _error(unet_kwargs_from_diffusers, vae, source=SOURCE)
    # a down level with attention whose mirrored up level has none
    mismatched = {**config, "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D",
                                               "ResnetUpsampleBlock2D"]}
    assert "up_block_types[1] is 'ResnetUpsampleBlock2D', expected 'SimpleCrossAttnUpBlock2D' (mirroring " \
           "down_block_types[1]" in _error(unet_kwargs_from_diffusers, mismatched, tp, source=SOURCE)
    assert "cross_attention_norm is 'layer_norm', expected None" in _error(
        unet_kwargs_from_diffusers, {**config, "cross_attention_norm": "layer_norm"}, tp, source=SOURCE)
    assert "text_proj config is None" in _error(unet_kwargs_from_diffusers, config, source=SOURCE)
    # UNet2DConditionModel's UNetMidBlock2D is a single res block: not our middle block
    assert "mid_block_type is 'UNetMidBlock2D', expected 'UNetMidBlock2DSimpleCrossAttn'" in _error(
        unet_kwargs_from_diffusers, {**config, "mid_block_type": "UNetMidBlock2D"}, tp, source=SOURCE)
    # a super-res mid attention without GroupNorm (scale-shift time conditioning)
    sr = {**dict(UNet2DModel(**TINY_SUPER_RES).config), "add_attention": True, "resnet_time_scale_shift": "scale_shift"}
    assert "attn_norm_num_groups is None, expected None or 8" in _error(unet_kwargs_from_diffusers, sr, source=SOURCE)


def test_bad_state_dicts_are_rejected(tiny_decoder: tuple[UNet2DConditionModel, UnCLIPTextProjModel]) -> None:
    decoder, text_proj = tiny_decoder
    kwargs = unet_kwargs_from_diffusers(dict(decoder.config), dict(text_proj.config), source=SOURCE)
    state, tp = decoder.state_dict(), text_proj.state_dict()
    key = "down_blocks.1.resnets.0.conv1.weight"
    wrong = {**state, key: torch.zeros(64, 32, 1, 1)}
    assert f"key {key} has shape (64, 32, 1, 1), expected (64, 32, 3, 3) (for down.3.0.conv1.spatial.weight)" in \
        _error(unet_state_from_diffusers, wrong, kwargs, tp, source=SOURCE)
    key = "mid_block.attentions.0.add_v_proj.bias"
    missing = {k: v for k, v in state.items() if k != key}
    assert f"key {key} is missing, expected shape (192,) (for mid.1.spatial.to_context_kv.bias)" in \
        _error(unet_state_from_diffusers, missing, kwargs, tp, source=SOURCE)
    assert "key text_proj.learned_classifier_free_guidance_embeddings is missing" in \
        _error(unet_state_from_diffusers, state, kwargs, source=SOURCE)
    extra = {**state, "mid_block.attentions.0.norm_cross.weight": torch.ones(24)}
    assert "key mid_block.attentions.0.norm_cross.weight (shape (24,)) has no place" in \
        _error(unet_state_from_diffusers, extra, kwargs, tp, source=SOURCE)


def test_option_values_are_validated() -> None:
    for option, value in [("resample", "pool"), ("time_cond", "film"), ("attn_norm", "rms"), ("text_null", "zero"),
                          ("context_norm", "image"), ("lowres_resize", "nearest")]:
        with pytest.raises(ValueError, match=rf"^{option} must be one of \(.*\), got '{value}'$"):
            UNet(dim=8, dim_mults=(1,), attn_levels=(), **{option: value})
    with pytest.raises(ValueError, match="heads and dim_head cannot both be None"):
        UNet(dim=8, dim_mults=(1,), attn_levels=(), heads=None, dim_head=None)


@torch.no_grad()
def test_text_null_none_and_text_context_norm() -> None:
    net = UNet(dim=16, dim_mults=(1, 2), num_res_blocks=1, attn_levels=(1,), heads=None, dim_head=8, norm_groups=4,
               image_embed_dim=12, text_dim=10, text_embed_dim=6, text_null="none", context_norm="text").eval()
    assert not hasattr(net, "null_text_hidden") and net.mid[1].spatial.heads == 4
    x, t, img, hid = torch.randn(B, 3, 8, 8), torch.tensor([1, 2]), torch.randn(B, 12), torch.randn(B, 3, 10)
    null = net.null_image_embed.expand(B, -1)
    # drop_cond swaps the image embedding only; text_embed is untouched by it
    dropped = net(x, t, image_embed=img, text_hidden=hid, text_embed=torch.ones(B, 6), drop_cond=torch.ones(B).bool())
    assert torch.equal(dropped, net(x, t, image_embed=null, text_hidden=hid, text_embed=torch.ones(B, 6)))
    # no text hidden states: the image tokens alone, not layer-normed
    _, context, mask = net._context(B, img, None, None, None)
    assert context.shape == (B, 4, net.cond_dim) and mask is None
    assert torch.equal(context, net.image_tokens_proj(img).view(B, 4, -1))
    image_only = UNet(dim=8, dim_mults=(1,), attn_levels=(), image_embed_dim=12, context_norm="text")
    assert not hasattr(image_only, "context_norm")
