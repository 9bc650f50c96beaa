"""Checkpoint chaining: ``init_from`` loads a parent stage's weights into a child network and says exactly what happened.

The chain of the paper is D → D_t → ↑F and SR_l → SR_t: each child is its parent plus *new* layers (temporal
convolutions and attention, the fps embedding, ↑F's extra input channels), all initialised so that the child starts
as the parent. Loading therefore has exactly one acceptable outcome: every parent tensor lands, and every tensor the
parent lacks is one of the expected new ones. Anything else (an SR checkpoint given to D_t, a width mismatch) is an
error that names the tensors, instead of the silent ``strict=False`` that loses runs elsewhere.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

# Parameter names that a child network may add on top of its parent (see lightning_mav.nn.unet).
NEW_TEMPORAL = ("*temporal*", "fps_*", "*.fps_*")
NEW_EXTRA_IN = ("extra_in*", "*.extra_in*")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (missing file, wrong network, unexpected tensors)."""


@dataclass
class KeyReport:
    """What ``init_from`` did with each tensor name."""

    path: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # in the child only, and expected (temporal, fps, extra_in)
    missing: list[str] = field(default_factory=list)  # in the child only, not expected
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint only
    mismatched: list[str] = field(default_factory=list)  # in both, different shapes
    source: str = "state_dict"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return (
            f"init_from {self.path} ({self.source}): {len(self.loaded)} loaded, {len(self.new)} new (expected), "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"
        )


def _require_file(path: str | os.PathLike, hint: str = "") -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        if not hint and p.parent.name == "checkpoints" and p.parent.parent.name:
            # runs/<stage>/checkpoints/last.ckpt is made by experiments/<stage>.yaml
            hint = f"run `lightning fit --config experiments/{p.parent.parent.name}.yaml` first"
        raise CheckpointError(f"checkpoint not found: {p}" + (f" — {hint}" if hint else ""))
    return p


def load_checkpoint(path: str | os.PathLike, *, hint: str = "") -> dict[str, Any]:
    """Load a Lightning ``.ckpt``/``.pt`` with ``weights_only=True`` (no pickled code runs), or a ``.safetensors``."""
    p = _require_file(path, hint)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {"state_dict": load_file(str(p))}
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or needs unsafe unpickling
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}: {e}".splitlines()[0]) from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {p} holds a {type(ckpt).__name__}, expected a dict of tensors")
    return ckpt if "state_dict" in ckpt else {"state_dict": ckpt}


def network_state_dict(ckpt: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of one network inside a stage checkpoint, with ``prefix`` (e.g. ``"unet."``) removed.

    With Lightning's ``EMAWeightAveraging`` the checkpoint's ``state_dict`` *is* the EMA average and the raw weights
    sit under ``current_model_state``; the EMA weights are what a child should start from.
    """
    source = "EMA state_dict" if "current_model_state" in ckpt else "state_dict"
    sd = ckpt["state_dict"]
    if prefix:
        picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not picked and not any(k.startswith(prefix) for k in sd):
            picked = dict(sd)  # a bare network state dict (e.g. .safetensors export)
        sd = picked
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, source


def require_no_nan(state: dict[str, torch.Tensor], path: str | os.PathLike, source: str = "state_dict") -> None:
    """Refuse a parent whose weights hold NaN (a diverged run, a broken average) before a child trains on it.

    Only NaN: ``-inf`` is legitimate in buffers such as attention masks.
    """
    bad = [k for k, v in state.items() if v.is_floating_point() and bool(torch.isnan(v).any())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensor(s) of its {source} hold NaN [{', '.join(bad[:4])}"
                              f"{' …' if len(bad) > 4 else ''}]: the run that wrote it diverged; retrain it")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def init_from(
    module: nn.Module,
    path: str | os.PathLike,
    allow_new: Iterable[str] = NEW_TEMPORAL,
    *,
    prefix: str = "unet.",
    hint: str = "",
) -> KeyReport:
    """Load the parent network at ``path`` into ``module``; fail unless the only differences are expected new layers.

    Args:
        module: the child network (e.g. the D_t U-Net).
        path: parent checkpoint (Lightning ``.ckpt``, ``.pt`` state dict or ``.safetensors``).
        allow_new: glob patterns of parameter names the child may have that the parent lacks.
        prefix: where the network sits inside the parent stage's state dict.
        hint: appended to the "not found" error, e.g. the command that creates the parent.
    """
    ckpt = load_checkpoint(path, hint=hint)
    sd, source = network_state_dict(ckpt, prefix)
    own = module.state_dict()
    report = KeyReport(path=str(path), source=source)
    for name, tensor in own.items():
        if name not in sd:
            (report.new if _matches(name, allow_new) else report.missing).append(name)
        elif sd[name].shape != tensor.shape:
            report.mismatched.append(f"{name}: checkpoint {tuple(sd[name].shape)} vs model {tuple(tensor.shape)}")
        else:
            report.loaded.append(name)
    report.unexpected = [k for k in sd if k not in own]
    if not report.ok:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")

        parts = [f"{n} {len(xs)} [{few(xs)}]" for n, xs in
                 (("missing", report.missing), ("unexpected", report.unexpected), ("shape-mismatched", report.mismatched)) if xs]
        raise CheckpointError(
            f"init_from {path}: not a parent of this network — " + "; ".join(parts)
            + f" (only new {', '.join(allow_new)} tensors may be absent)"
        )
    require_no_nan({k: sd[k] for k in report.loaded}, path, source)
    module.load_state_dict({k: sd[k] for k in report.loaded}, strict=False)
    return report

