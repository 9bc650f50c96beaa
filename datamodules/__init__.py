"""WebDataset DataModules: text-image pairs (img2dataset layout) and unlabeled video (video2dataset layout).

- ``TextImageDataModule`` / ``VideoDataModule``: the two DataModules (``text_image.py``, ``video.py``).
- ``shards``: splitting across ranks and workers, the streams and loaders, the shared base.
- ``tars``: shard URLs and reading tar shards into samples.
- ``skips``: skip counting (``SkipTally``).
- ``decode``: PyAV clip sampling and PIL image decoding.
- ``shapes``: the built-in Moving Shapes dataset (``mav data --out DIR``).

The names below are imported lazily, so ``from datamodules.shapes import render_frame`` (metrics, CLI) does not
pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TextImageDataModule": "datamodules.text_image",
    "VideoDataModule": "datamodules.video",
    "ShardDataModule": "datamodules.shards",
    "SkipTally": "datamodules.skips",
    "expand_urls": "datamodules.tars",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
