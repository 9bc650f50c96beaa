"""The one U-Net: P3D identity D -> D_t, conditioning paths, zero-inits, checkpointing, key sets."""

from __future__ import annotations

import pytest
import torch

from lightning_mav.nn.unet import UNet, count_parameters, is_temporal_name
from tests.helpers import TINY_UNET

B, NF, H = 2, 3, 8
IMG, TXT, L = 12, 10, 5
BASE = {**TINY_UNET, "norm_groups": 8}
COND = dict(image_embed_dim=IMG, text_dim=TXT)


def _perturb(params, std: float = 0.05) -> None:
    """Move parameters off their init (zero-init layers included) so outputs are non-trivial."""
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * std)


def _inputs() -> dict[str, torch.Tensor]:
    return dict(
        x=torch.randn(B, 3, NF, H, H),
        t=torch.tensor([10.0, 700.0]),
        image_embed=torch.randn(B, IMG),
        text_hidden=torch.randn(B, L, TXT),
        text_mask=torch.tensor([[True] * L, [True, True, True, False, False]]),
    )


def _per_frame(model: UNet, inp: dict[str, torch.Tensor], **kw) -> torch.Tensor:
    """Run ``model`` on the frames of ``inp['x']`` as a batch of images; back to ``[B, C, F, H, W]``."""
    x = inp["x"]
    frames = x.transpose(1, 2).reshape(B * NF, *x.shape[1:2], *x.shape[3:])
    rep = {k: v.repeat_interleave(NF, 0) for k, v in inp.items() if k != "x"}
    out = model(frames, rep.pop("t"), **rep, **kw)
    return out.view(B, NF, *out.shape[1:]).transpose(1, 2)


def _d_and_dt(**extra) -> tuple[UNet, UNet]:
    """A randomised spatial ``D`` and a ``D_t`` (temporal, fps) built from its state dict."""
    d = UNet(**BASE, **COND)
    _perturb(d.parameters())
    dt = UNet(**BASE, **COND, temporal=True, fps_cond=True, **extra)
    missing, unexpected = dt.load_state_dict(d.state_dict(), strict=False)
    assert not unexpected and missing and all(is_temporal_name(k) for k in missing)
    return d.eval(), dt.eval()


@pytest.mark.parametrize("channels_last", [False, True])
def test_p3d_identity_whole_unet(channels_last: bool) -> None:
    """D_t at init == D applied frame by frame, with every block (attention, image + text context, fps)."""
    d, dt = _d_and_dt(channels_last=channels_last)
    inp = _inputs()
    ref = _per_frame(d, inp)
    assert ref.abs().mean() > 1e-2  # non-trivial output
    out = dt(**inp, fps=torch.tensor([4.0, 24.0]))
    assert out.shape == inp["x"].shape
    assert (out - ref).abs().max() <= 1e-5
    # images: the temporal layers are skipped, D_t == D
    img = inp["x"][:, :, 0]
    assert (dt(img, inp["t"], image_embed=inp["image_embed"]) - d(img, inp["t"], image_embed=inp["image_embed"])
            ).abs().max() <= 1e-5


def test_frames_interact_after_training_and_time_off_is_per_frame() -> None:
    _, dt = _d_and_dt()
    inp = _inputs()
    x2 = inp["x"].clone()
    x2[:, :, 0] += torch.randn_like(x2[:, :, 0])
    with torch.no_grad():
        y, y2 = dt(**inp), dt(**{**inp, "x": x2})
        assert torch.equal(y[:, :, NF - 1], y2[:, :, NF - 1])  # at init: frames independent
        _perturb(dt.temporal_parameters(), std=0.2)
        y, y2 = dt(**inp), dt(**{**inp, "x": x2})
        assert (y[:, :, NF - 1] - y2[:, :, NF - 1]).abs().max() > 1e-4  # frame 0 now reaches the last frame
        # time=False ignores the (now trained) temporal layers: == per-frame images
        assert (dt(**inp, time=False) - _per_frame(dt, inp)).abs().max() <= 1e-5


def test_state_dict_keys_d_to_dt_to_interp() -> None:
    d = UNet(**BASE, **COND)
    dt = UNet(**BASE, **COND, temporal=True, fps_cond=True)
    up_f = UNet(**BASE, **COND, temporal=True, fps_cond=True, extra_in_channels=4)
    kd, kt, kf = set(d.state_dict()), set(dt.state_dict()), set(up_f.state_dict())
    assert kd < kt and kt < kf
    new = kt - kd
    assert new == {k for k in kt if "temporal" in k or k.startswith("fps_")}
    assert any(k.startswith("fps_") for k in new) and any(".temporal." in k for k in new)
    assert not any(is_temporal_name(k) for k in kd)
    assert kf - kt == {"extra_in.weight"}
    # parameter split is a partition; counts agree
    counts = dt.parameter_counts()
    assert counts["spatial"] == count_parameters(d) and counts["total"] == count_parameters(dt)
    assert counts["temporal"] == sum(p.numel() for p in dt.temporal_parameters()) > 0
    assert {id(p) for p in dt.temporal_parameters()}.isdisjoint(id(p) for p in dt.spatial_parameters())
    dt.freeze_spatial()
    assert dt.parameter_counts()["trainable"] == counts["temporal"]


def test_extra_in_zero_init() -> None:
    _, dt = _d_and_dt()
    up_f = UNet(**BASE, **COND, temporal=True, fps_cond=True, extra_in_channels=4).eval()
    up_f.load_state_dict(dt.state_dict(), strict=False)
    inp = _inputs()
    extra = torch.randn(B, 4, NF, H, H)
    with torch.no_grad():
        base = dt(**inp)
        assert torch.equal(up_f(**inp, extra=extra), base)
        assert torch.equal(up_f(**inp), base)
        _perturb(up_f.extra_in.parameters())
        assert (up_f(**inp, extra=extra) - base).abs().max() > 1e-4


def test_fps_zero_init_then_dependent() -> None:
    _, dt = _d_and_dt()
    inp = _inputs()
    with torch.no_grad():
        a, b = dt(**inp, fps=torch.tensor([1.0, 1.0])), dt(**inp, fps=torch.tensor([30.0, 8.0]))
        assert torch.equal(a, b) and torch.equal(a, dt(**inp))
        _perturb(dt.fps_embed.parameters(), std=0.2)
        a, b = dt(**inp, fps=torch.tensor([1.0, 1.0])), dt(**inp, fps=torch.tensor([30.0, 8.0]))
        assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("channels_last", [False, True])
def test_fps_mix_interpolates_a_low_and_a_high_fps_kernel_by_log_fps(channels_last: bool) -> None:
    """``fps_mix=(4, 24)``: identity at init; fps <= 4 runs the low-fps kernels alone, fps >= 24 the original ones
    (a D_t without fps_mix given those kernels), fps 8 a mix of both: lerp at log(8/4) / log(24/4)."""
    d, dt = _d_and_dt(fps_mix=(4, 24), channels_last=channels_last)
    _, plain = _d_and_dt(channels_last=channels_last)
    low_names = [n for n, _ in dt.named_parameters() if n.endswith("_low_fps")]
    assert low_names and all(is_temporal_name(n) for n in low_names)  # new in D_t, trained with frozen spatial
    assert len(low_names) == 2 * sum(1 for n, _ in plain.named_parameters() if n.endswith("temporal.weight"))
    inp = _inputs()
    with torch.no_grad():
        plain.load_state_dict({k: v for k, v in dt.state_dict().items() if "_low_fps" not in k})
        torch.testing.assert_close(dt(**inp, fps=torch.tensor([2.0, 30.0])), plain(**inp, fps=torch.tensor([2.0, 30.0])))
        _perturb(dt.temporal_parameters(), std=0.05)
        high = {k: v for k, v in dt.state_dict().items() if "_low_fps" not in k}
        low = {k.replace("_low_fps", ""): v for k, v in dt.state_dict().items() if "_low_fps" in k}
        fps = torch.tensor([3.0, 40.0])  # clamped: all low, all high
        out = dt(**inp, fps=fps)
        plain.load_state_dict(high)
        as_high = plain(**inp, fps=fps)
        plain.load_state_dict({**high, **low})
        as_low = plain(**inp, fps=fps)
        torch.testing.assert_close(out[1], as_high[1])
        torch.testing.assert_close(out[0], as_low[0])
        assert (as_low[0] - as_high[0]).abs().max() > 1e-3
        mid = dt(**inp, fps=torch.tensor([8.0, 8.0]))
        assert (mid - out).abs().max() > 1e-4


def test_fps_mix_needs_temporal_layers_and_an_increasing_range() -> None:
    for kwargs in ({"fps_mix": (4, 24)}, {"temporal": True, "fps_mix": (24, 4)}):
        with pytest.raises(ValueError, match="^fps_mix needs temporal: true and 0 < fps_low < fps_high"):
            UNet(**BASE, **kwargs)


def test_drop_cond_uses_learned_null() -> None:
    d, _ = _d_and_dt()
    inp = _inputs()
    x, t = inp["x"][:, :, 0], inp["t"]
    cond = dict(image_embed=inp["image_embed"], text_hidden=inp["text_hidden"], text_mask=inp["text_mask"])
    with torch.no_grad():
        y = d(x, t, **cond)
        y_drop = d(x, t, **cond, drop_cond=torch.tensor([True, True]))
        null = dict(image_embed=d.null_image_embed.expand(B, -1), text_hidden=d.null_text_hidden.expand(B, 1, -1))
        assert (y - y_drop).abs().max() > 1e-4
        torch.testing.assert_close(y_drop, d(x, t, **null))  # == running with the learned nulls
        torch.testing.assert_close(y_drop, d(x, t))  # == no conditioning at all
        mixed = d(x, t, **cond, drop_cond=torch.tensor([False, True]))
        torch.testing.assert_close(mixed[0], y[0])
        torch.testing.assert_close(mixed[1], y_drop[1])
        # padded text tokens are ignored
        th = inp["text_hidden"].clone()
        th[1, 3:] = 50.0
        torch.testing.assert_close(d(x, t, **{**cond, "text_hidden": th}), y)


def test_image_embed_scale_multiplies_the_embedding_and_its_null() -> None:
    torch.manual_seed(0)
    scaled = UNet(**BASE, image_embed_dim=IMG, image_embed_scale="unit_rms")
    assert scaled.image_embed_scale == pytest.approx(IMG ** 0.5)
    _perturb(scaled.parameters())
    plain = UNet(**BASE, image_embed_dim=IMG)
    plain.load_state_dict(scaled.state_dict())
    x, t, y_e = torch.randn(B, 3, H, H), torch.tensor([10.0, 700.0]), torch.randn(B, IMG)
    with torch.no_grad():
        out = scaled(x, t, image_embed=y_e)
        torch.testing.assert_close(out, plain(x, t, image_embed=y_e * IMG ** 0.5))
        assert (out - plain(x, t, image_embed=y_e)).abs().max() > 1e-3
        dropped = scaled(x, t, image_embed=y_e, drop_cond=torch.tensor([True, True]))
        torch.testing.assert_close(dropped, plain(x, t, image_embed=scaled.null_image_embed.expand(B, -1) * IMG ** 0.5))
    for bad in (0.0, -1.0, "sqrt"):
        with pytest.raises(ValueError, match="image_embed_scale must be a positive number or 'unit_rms'"):
            UNet(**BASE, image_embed_dim=IMG, image_embed_scale=bad)


def test_gradient_checkpointing_same_gradients() -> None:
    _, dt = _d_and_dt()
    dt.train()
    _perturb(dt.temporal_parameters())
    inp = _inputs()

    def grads(ckpt: bool) -> dict[str, torch.Tensor]:
        dt.checkpointing = ckpt
        dt.zero_grad(set_to_none=True)
        dt(**inp, fps=torch.tensor([4.0, 24.0])).square().mean().backward()
        return {n: p.grad.clone() for n, p in dt.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 0.9 * len(list(dt.parameters()))
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)
    assert plain["fps_embed.mlp.2.weight"].abs().sum() > 0  # zero-init layers still get gradients


def test_lowres_conditioning_images_and_videos() -> None:
    sr = UNet(**BASE, lowres_cond=True).eval()
    _perturb(sr.parameters())
    t = torch.tensor([3.0, 400.0])
    with torch.no_grad():
        img = sr(torch.randn(B, 3, 16, 16), t, lowres=torch.randn(B, 3, 8, 8),
                 lowres_noise_level=torch.tensor([0.0, 100.0]))
        assert img.shape == (B, 3, 16, 16)
        x, lr = torch.randn(B, 3, 16, 16), torch.randn(B, 3, 8, 8)
        assert (sr(x, t, lowres=lr) - sr(x, t, lowres=lr, lowres_noise_level=torch.tensor([50.0, 50.0]))
                ).abs().max() > 1e-4
        torch.testing.assert_close(sr(x, t, lowres=lr), sr(x, t, lowres=lr, lowres_noise_level=torch.zeros(B)))
        sr_t = UNet(**BASE, lowres_cond=True, temporal=True).eval()
        sr_t.load_state_dict(sr.state_dict(), strict=False)
        xv, lrv = torch.randn(B, 3, NF, 16, 16), torch.randn(B, 3, NF, 8, 8)
        vid = sr_t(xv, t, lowres=lrv)
        assert vid.shape == (B, 3, NF, 16, 16)
        # per-frame upsampling: SR_t at init == SR_l on each frame
        ref = torch.stack([sr(xv[:, :, i], t, lowres=lrv[:, :, i]) for i in range(NF)], 2)
        assert (vid - ref).abs().max() <= 1e-5
        with pytest.raises(ValueError):
            sr(x, t)


def test_unconditioned_configs_and_shapes() -> None:
    m = UNet(in_channels=4, out_channels=6, dim=16, dim_mults=(1, 2, 2), num_res_blocks=1, attn_levels=(0, 2),
             mid_attn=False, heads=2, dim_head=8, norm_groups=8, temporal=True)
    with torch.no_grad():
        assert m(torch.randn(1, 4, 2, 8, 8), torch.tensor([1])).shape == (1, 6, 2, 8, 8)
        assert m(torch.randn(1, 4, 8, 8), torch.tensor([1])).shape == (1, 6, 8, 8)
    with pytest.raises(ValueError):
        UNet(dim=16, dim_mults=(1, 2), attn_levels=(2,))
