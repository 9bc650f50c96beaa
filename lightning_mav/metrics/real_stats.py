"""FVD's cached real statistics: what they are keyed by, where they live, how they are written and read back.

The real side of FVD is a Gaussian (mean ``[d]``, covariance ``[d, d]``, float64, and the number of videos) that
depends on the feature network's weights, the real clips' resolution and length, how the clips are cut from the
real videos, the metric's resize and its sample cap. ``real_stats_key`` writes all of these as one canonical JSON
string, stored in the file beside the statistics: a file is only ever used under the key it was written with.

A file is ``torch.save({"format", "key", "mean", "cov", "count"})``, written to a temporary name beside its path and
renamed into place (an interrupted write leaves no partial file), and read with ``torch.load(weights_only=True)``.
``FrechetVideoDistance`` uses these through ``save_real_stats`` / ``load_real_stats`` /
``load_or_compute_real_stats``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["REAL_STATS_FORMAT", "read_real_stats", "real_stats_key", "real_stats_path", "write_real_stats"]

REAL_STATS_FORMAT = "lightning_mav.fvd_real_stats/1"  # stored in every file; a file without it is refused

RealStats = tuple[Tensor, Tensor, int]  # mean [d], covariance [d, d] (float64, CPU), number of videos


def pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``H`` or ``(H, W)`` -> ``(H, W)``."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def real_stats_key(
    weights_source: str,
    *,
    resolution: int | tuple[int, int],
    num_frames: int,
    sampling: str | Mapping[str, Any],
    resize: int | tuple[int, int] | None = None,
    max_samples: int | None = None,
) -> str:
    """The key of a set of real statistics: canonical JSON (sorted keys) of everything they depend on.

    Args:
        weights_source: the feature network's ``weights_source`` (kind, file name, sha256 prefix of the weights).
        resolution: the real clips' frame size ``H`` or ``(H, W)`` as given to ``update`` (before any resize).
        num_frames: frames per real clip.
        sampling: how clips are cut from the real videos, as a string or a JSON-serialisable mapping, e.g.
            ``{"data": "ucf101/train", "offset": "random, seed 0", "fps": 25, "per_video": 1}``.
        resize: the metric's resize ``(H, W)`` (``None``: none).
        max_samples: the metric's cap on real videos (``None``: all).
    """
    h, w = pair(resolution)
    fields = {"detector": weights_source, "resolution": [h, w], "num_frames": int(num_frames), "sampling": sampling,
              "resize": None if resize is None else list(pair(resize)), "max_samples": max_samples}
    try:
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise TypeError(f"sampling must be a string or a JSON-serialisable mapping: {err}") from err


def real_stats_path(cache_dir: str | Path, key: str) -> Path:
    """``cache_dir / "fvd_real_<16 hex of sha256(key)>.pt"``: one file per key, so two keys never share a file."""
    return Path(cache_dir).expanduser() / f"fvd_real_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def write_real_stats(path: str | Path, key: str, stats: RealStats) -> Path:
    """Save ``stats`` under ``key`` at ``path`` atomically (temporary file beside it, then a rename); the path."""
    path = Path(path).expanduser()
    mean, cov, count = stats
    payload = {"format": REAL_STATS_FORMAT, "key": key, "mean": mean.double().cpu(), "cov": cov.double().cpu(),
               "count": int(count)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic on POSIX within one file system: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_real_stats(path: str | Path, key: str, num_features: int) -> RealStats:
    """The statistics saved at ``path`` under ``key``, for ``num_features``-wide features.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError (one line, naming the file): a file of another kind, one written under another key (both keys
            are named), or statistics of the wrong shape.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FVD real statistics not found at {path}")
    expected = f"a dict with format {REAL_STATS_FORMAT!r} written by FrechetVideoDistance.save_real_stats"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file (pickle, zip, EOF, weights_only refusals) is the same error
        raise ValueError(f"{path} is not an FVD real-statistics file (expected {expected}; torch.load failed: "
                         f"{type(err).__name__})") from err
    if not isinstance(payload, dict) or payload.get("format") != REAL_STATS_FORMAT:
        raise ValueError(f"{path} is not an FVD real-statistics file (expected {expected})")
    if payload.get("key") != key:
        raise ValueError(f"{path} holds FVD real statistics for another key, refusing them: the file's key is "
                         f"{payload.get('key')}, expected {key}")
    mean, cov, count = payload.get("mean"), payload.get("cov"), payload.get("count")
    d = num_features
    if not (isinstance(mean, Tensor) and mean.shape == (d,) and isinstance(cov, Tensor) and cov.shape == (d, d)
            and isinstance(count, int) and count >= 2):
        raise ValueError(f"{path} has malformed FVD real statistics (expected mean [{d}], cov [{d}, {d}] and a "
                         f"count >= 2)")
    return mean.double(), cov.double(), count
