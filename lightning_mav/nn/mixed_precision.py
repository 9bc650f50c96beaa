"""What bf16 autocast runs in float32 instead, and why: two CPU kernels that are slower in bf16 than in fp32.

On a CPU with bf16 instructions ``bf16-mixed`` makes convolutions and matmuls several times faster, but in torch 2.14
two CPU kernels go the other way: the flash-attention *backward* and (on AMX CPUs) GroupNorm's backward are slower in
bf16 than in fp32, and whole steps were faster with both in fp32
(docs/choices.md#attention-and-groupnorm-in-fp32-under-autocast). GroupNorm in fp32 is also ADM's ``GroupNorm32``
(statistics over many values want fp32); on CUDA autocast already runs group_norm in fp32 and attention keeps its
bf16 flash kernels, so only the CPU path changes there.

- :func:`native_bf16`: whether a device computes bf16 natively, the choice of ``auto`` precision (demo, pipeline);
  :func:`cpu_bf16_isa` names the CPU's bf16 instructions.
- :func:`attention`: ``scaled_dot_product_attention`` for our own layers, fp32 under CPU autocast.
- :class:`GroupNorm32`: GroupNorm computed in fp32 under any autocast, returned in the input's dtype.
- :class:`CPUAttentionFP32`: a function mode for attention we do not own (open_clip's ``nn.MultiheadAttention``),
  entered around the CLIP stage's training forward only: a Python mode sees every op, too costly for the U-Nets.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


def cpu_bf16_isa() -> str | None:
    """This CPU's bf16 matmul instructions: ``"AMX-BF16"`` (tile units, Intel Sapphire Rapids on), ``"AVX512-BF16"``
    (dot products in vector registers: AMD Zen 4 on, Intel Cooper Lake), or ``None``. AMX is the faster of the two
    (docs/choices.md#bf16-on-cpus)."""
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    return "AMX-BF16" if caps.get("amx_bf16") else "AVX512-BF16" if caps.get("avx512_bf16") else None


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matmuls/convs natively: a CUDA GPU of compute capability 8.0 or later (Ampere
    on; V100 and T4 only emulate bf16), or a CPU with AMX-BF16 (Intel Sapphire Rapids on) or AVX512-BF16 (AMD Zen 4
    on, Intel Cooper Lake).

    CPUs without bf16 instructions are left in fp32: there bf16 autocast adds casts without faster kernels to pay
    for them.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return cpu_bf16_isa() is not None
    return False


def cpu_autocast(device: torch.device) -> bool:
    """Whether CPU autocast is on and ``device`` is the CPU."""
    return device.type == "cpu" and torch.is_autocast_enabled("cpu")


def _float(x: Any) -> Any:
    return x.float() if isinstance(x, Tensor) and x.is_floating_point() else x


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """``F.scaled_dot_product_attention`` (``[N, heads, L, d]``), in fp32 under CPU autocast; output in ``q``'s
    dtype."""
    if not cpu_autocast(q.device):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=_float(attn_mask),
                                             dropout_p=dropout_p)
    return out.to(q.dtype)


class GroupNorm32(nn.GroupNorm):
    """``nn.GroupNorm`` that normalises in fp32 under autocast and returns the input's dtype (ADM's GroupNorm32);
    without autocast it is ``nn.GroupNorm``."""

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
            return super().forward(x)
        with torch.autocast(device, enabled=False):
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


class CPUAttentionFP32(TorchFunctionMode):
    """Context manager: under CPU autocast, ``nn.MultiheadAttention`` (in- and out-projections included) and any
    direct ``scaled_dot_product_attention`` call run in fp32; outputs come back in the input's dtype."""

    _FP32 = frozenset({F.multi_head_attention_forward, F.scaled_dot_product_attention})

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in self._FP32 or not cpu_autocast(args[0].device):
            return func(*args, **kwargs)
        dtype = args[0].dtype
        with torch.autocast("cpu", enabled=False):
            out = func(*map(_float, args), **{k: _float(v) for k, v in kwargs.items()})
        if isinstance(out, Tensor):
            return out.to(dtype)
        return tuple(o.to(dtype) if isinstance(o, Tensor) and o.is_floating_point() else o for o in out)
