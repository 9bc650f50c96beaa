"""bf16 autocast: what runs in fp32 (attention, GroupNorm), bf16-mixed training with clipping, the ``auto`` choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mav.nn import mixed_precision
from lightning_mav.nn.mixed_precision import CPUAttentionFP32, GroupNorm32, attention, cpu_bf16_isa, native_bf16
from lightning_mav.nn.unet import UNet
from tests.helpers import TINY_UNET, fit_batches

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def qkv(*shape: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).bfloat16().requires_grad_() for _ in range(3)]


def test_attention_runs_in_fp32_under_cpu_autocast_and_as_sdpa_outside() -> None:
    q, k, v = qkv(2, 4, 16, 8)
    mask = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True  # every query sees a key
    with torch.autocast(**BF16):
        out = attention(q, k, v, attn_mask=mask)
        bf16_kernel = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.bfloat16())  # computed in fp32, rounded once
    assert not torch.equal(bf16_kernel, reference.bfloat16())  # what autocast alone would have run
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask).bfloat16().float().square().sum().backward()
    assert all(torch.equal(g, r.grad.bfloat16()) for g, r in zip(grads, (qf, kf, vf)))  # fp32 backward
    a, b, c = (t.detach().float() for t in (q, k, v))
    assert torch.equal(attention(a, b, c), F.scaled_dot_product_attention(a, b, c))  # no autocast: plain SDPA


def test_group_norm32_normalises_in_fp32_and_returns_the_input_dtype() -> None:
    norm = GroupNorm32(4, 16)
    nn.init.normal_(norm.weight, generator=torch.Generator().manual_seed(2))
    x = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(3)) * 5 + 2
    plain = nn.GroupNorm(4, 16)
    plain.load_state_dict(norm.state_dict())
    assert torch.equal(norm(x), plain(x))  # fp32, no autocast: nn.GroupNorm itself
    with torch.device("meta"):  # devices without autocast (FLOP counting on meta tensors) work too
        assert GroupNorm32(4, 16)(torch.empty(2, 16, 4, 4)).shape == (2, 16, 4, 4)
    xb = x.bfloat16()
    with torch.autocast(**BF16):
        out = norm(xb)
        in_bf16 = plain(xb)
    assert out.dtype == torch.bfloat16
    reference = F.group_norm(xb.float(), 4, norm.weight, norm.bias, norm.eps).bfloat16()
    assert torch.equal(out, reference)
    # the same forward values (the bf16 kernel accumulates in fp32) but the backward is what differs: ours saves an
    # fp32 input for the fp32 kernel, autocast alone the bf16 one (~3x slower on the CPU)
    ours = out.grad_fn.next_functions[0][0]
    assert ours.name() == "NativeGroupNormBackward0" and ours._saved_input.dtype == torch.float32
    assert in_bf16.grad_fn._saved_input.dtype == torch.bfloat16


def test_cpu_attention_mode_runs_multihead_attention_in_fp32_and_nothing_else() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        reference = mha(x, x, x, need_weights=False)[0]
        with torch.autocast(**BF16):
            plain = mha(x, x, x, need_weights=False)[0]
            with CPUAttentionFP32():
                fixed = mha(x, x, x, need_weights=False)[0]
                linear = nn.functional.linear(x, mha.out_proj.weight)  # not attention: autocast as usual
    assert plain.dtype == linear.dtype == torch.bfloat16
    assert torch.equal(fixed, reference)  # fp32 throughout, back in the input's dtype (fp32 here)
    assert not torch.equal(plain.float(), reference)
    with CPUAttentionFP32():  # no autocast: the mode passes everything through
        assert torch.equal(mha(x, x, x, need_weights=False)[0], reference)


def test_unet_under_bf16_autocast_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    unet = UNet(**TINY_UNET, norm_groups=4, image_embed_dim=8, temporal=True, fps_cond=True, channels_last=True)
    for p in unet.parameters():  # zero-init output layers would make every output 0
        nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    x, t, e = torch.randn(1, 3, 4, 16, 16), torch.tensor([300]), torch.randn(1, 8)
    fps = torch.tensor([8.0])
    reference = unet(x, t, image_embed=e, fps=fps)
    with torch.autocast(**BF16):
        out = unet(x, t, image_embed=e, fps=fps)
    error = (out.float() - reference).norm() / reference.norm()
    assert 0 < error < 0.02, error


def test_bf16_mixed_training_clips_the_gradients_with_fused_adamw(tmp_path, monkeypatch) -> None:
    """Lightning's MixedPrecision refuses clipping with a fused optimizer even without a GradScaler (bf16)."""
    from lightning_mav.stages.decoder import DecoderStage
    from tests.test_decoder_stage import FAST, VIDEO_UNET, video_batch

    max_norms: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        max_norms.append(float(max_norm))
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    stage = DecoderStage(unet=VIDEO_UNET, **FAST)
    before = {k: v.clone() for k, v in stage.unet.state_dict().items()}
    trainer = fit_batches(stage, [video_batch()], steps=2, default_root_dir=tmp_path, precision="bf16-mixed",
                          gradient_clip_val=0.5)
    assert trainer.global_step == 2 and max_norms == [0.5, 0.5]
    assert trainer.optimizers[0].defaults["fused"]
    assert any(not torch.equal(v, before[k]) for k, v in stage.unet.state_dict().items())
    assert all(v.dtype == before[k].dtype for k, v in stage.unet.state_dict().items())  # fp32 master weights


@pytest.mark.parametrize(("amx", "avx512", "native"), [(True, True, True), (False, True, True), (False, False, False)])
def test_auto_precision_follows_the_cpus_bf16_instructions(monkeypatch, amx: bool, avx512: bool,
                                                            native: bool) -> None:
    from lightning_mav.demo import demo_precision
    from lightning_mav.pipeline import _resolve_dtype

    # Sapphire Rapids (AMX + AVX512-BF16), Zen 4 (AVX512-BF16 only), a CPU without bf16 instructions (AVX2)
    caps = {"amx_bf16": amx, "avx512_bf16": avx512, "avx2": True}
    monkeypatch.setattr(mixed_precision.torch.cpu, "get_capabilities", lambda: caps)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert native_bf16("cpu") is native
    assert cpu_bf16_isa() == ("AMX-BF16" if amx else "AVX512-BF16" if avx512 else None)
    assert _resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert demo_precision("auto") == ("bf16-mixed" if native else "32-true")
    assert demo_precision("32-true") == "32-true" and _resolve_dtype("fp32", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_auto_precision_on_cuda_needs_ampere_or_later(monkeypatch, capability: tuple[int, int], native: bool) -> None:
    from lightning_mav.pipeline import _resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert native_bf16("cuda") is native  # V100 / T4 emulate bf16: auto stays fp32 there
    assert _resolve_dtype("auto", torch.device("cuda")) == (torch.bfloat16 if native else torch.float32)
