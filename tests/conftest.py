"""Shared fixtures: a small Moving Shapes dataset generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real shards in both layouts (text-image pairs and unlabeled mp4 videos), 32 px, a few seconds to write."""
    from datamodules.shapes import generate

    out = tmp_path_factory.mktemp("shapes")
    return Path(generate(out, num_images=64, num_videos=16, num_val_images=16, num_val_videos=8,
                         image_size=32, video_size=32, seed=0))
