"""Shared fixtures: a seeded global RNG, one intra-op thread, a small Moving Shapes dataset generated once per
test session. Helpers and tiny configs live in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import single_thread, write_ucf101


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for each test (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_per_module() -> Iterator[None]:
    """One intra-op thread from a module's first test (and its module-scoped fixtures) to its last."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real shards in both layouts (text-image pairs and unlabeled mp4 videos), 32 px, a few seconds to write."""
    from datamodules.shapes import generate

    out = tmp_path_factory.mktemp("shapes")
    return Path(generate(out, num_images=64, num_videos=16, num_val_images=16, num_val_videos=8,
                         image_size=32, video_size=32, seed=0))


@pytest.fixture(scope="session")
def ucf101(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A UCF-101-style folder ``UCF-101/<ClassName>/v_<ClassName>_gXX_cYY.avi`` (tests.helpers.VIDEOS) and each
    key's frames."""
    root = tmp_path_factory.mktemp("data") / "UCF-101"
    return root, write_ucf101(root)
