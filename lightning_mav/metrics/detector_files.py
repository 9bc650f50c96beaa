"""Detector weight files (I3D for FVD, C3D for IS): what kind of file a path is, which exact weights it holds, and
one readable error when a state dict does not fit the network."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

from torch import Tensor, nn


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding ``<name>/code/`` and ``<name>/constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


def file_digest(path: Path) -> str:
    """First 16 hex digits of the file's sha256: names the exact weights a score was computed with."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def unwrap_state_dict(obj: object) -> dict[str, Tensor]:
    """Accept a bare state dict, a ``{"state_dict": ...}`` checkpoint, and DataParallel ``module.`` keys."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError("expected a state dict (a mapping of parameter names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def check_state_keys(model: nn.Module, state: dict[str, Tensor], path: Path, expected: str) -> None:
    """Raise one readable error naming a few missing / unexpected / mis-shaped keys of ``state`` for ``model``:
    ``"<path> is not <expected>; missing: ...; unexpected: ...; wrong shape: ..."``."""
    own = model.state_dict()
    # BatchNorm's counter is absent from checkpoints saved by old PyTorch versions and unused in eval.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > 5 else ""
            parts.append(f"{label}: {', '.join(keys[:5])}{more}")
    raise ValueError(f"{path} is not {expected}; " + "; ".join(parts))
