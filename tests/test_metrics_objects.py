"""Issue 30's metrics on synthetic videos with known answers: objects and flecks per frame, background noise, a
ghosted pair (the linear blend of a moved object), centroid error, edge sharpness and grain, a known speed, and the
95% intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.shapes import render_frame
from lightning_mav.metrics.ghosting import frame_ghosting, interpolation_objects, video_ghost_rate, video_opacity
from lightning_mav.metrics.intervals import UnitMeans, format_interval, t_interval, wilson_interval
from lightning_mav.metrics.objects import ObjectCounts, frame_objects, video_object_stats
from lightning_mav.metrics.sharpness import edge_sharpness, flat_grain, sr_edges
from lightning_mav.metrics.speed import video_speeds

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


def _video(frames: list[np.ndarray]) -> Tensor:
    """uint8 frames ``F x [H, W, 3]`` -> ``[1, 3, F, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1


def _square_video(speed: float = 2.0, frames: int = 16, side: float = 12.0, color: str = "red",
                  background: str = "black") -> list[np.ndarray]:
    """A square moving right at ``speed`` pixels per frame from x = 12, on a flat background."""
    return [render_frame("square", color, side, (12 + speed * t, 32), SIZE, background) for t in range(frames)]


# ------------------------------------------------------------------------------------------------ objects, flecks
def test_clean_square_is_one_object_without_flecks_or_noise() -> None:
    stats = video_object_stats(np.stack(_square_video()).astype(np.float32))
    assert stats == {"one_object": 1.0, "flecks": 0.0, "strays": 0.0, "background_std": 0.0}
    found = frame_objects(_square_video()[0].astype(np.float32))
    assert found.object_areas == (144,) and found.flecks == 0  # a 12 x 12 square


def test_flecks_and_a_stray_object_are_counted() -> None:
    frames = _square_video(frames=4)
    for frame in frames[:2]:  # three 1-pixel flecks and one 2x2 fleck, far from the square and each other
        frame[50, 5], frame[50, 20], frame[5, 50] = 255, 255, 255
        frame[56:58, 40:42] = (40, 200, 210)
    frames[3] = frames[3].copy()
    frames[3][44:56, 44:56] = (40, 170, 60)  # a second 12 x 12 object in the last frame
    stats = video_object_stats(np.stack(frames).astype(np.float32))
    assert stats["flecks"] == pytest.approx(4 * 2 / 4)  # 4 flecks in 2 of 4 frames
    assert stats["strays"] == pytest.approx(1 / 4)
    assert stats["one_object"] == pytest.approx(3 / 4)  # frames with flecks still hold exactly one object
    counts = ObjectCounts()
    counts.update(torch.cat([_video(frames), _video(_square_video(frames=4))]))
    out = counts.compute()
    assert float(out["one_object"]["mean"]) == pytest.approx((3 / 4 + 1) / 2)
    assert float(out["flecks"]["mean"]) == pytest.approx(1.0) and float(out["flecks"]["n"]) == 2
    low, high = wilson_interval(1.75, 2)
    assert float(out["one_object"]["low"]) == pytest.approx(low) and float(out["one_object"]["high"]) == pytest.approx(high)


def test_background_noise_reads_the_noise_std() -> None:
    rng = np.random.default_rng(0)
    frames = [f.astype(np.float32) + rng.normal(0, 4.0, f.shape).astype(np.float32)
              for f in _square_video(frames=4, background="gray")]
    stats = video_object_stats(np.stack(frames))
    assert stats["background_std"] == pytest.approx(4.0, rel=0.05)
    assert stats["one_object"] == 1.0 and stats["flecks"] == 0.0  # 4-unit noise is far below the threshold


# ------------------------------------------------------------------------------------------------ ghosting
def _keyframes_and_blend(shift: float, weight: float = 0.4) -> tuple[Tensor, Tensor]:
    """Real clip (6 frames: keyframes 0 and 5, the object moving ``shift`` px per frame) and its linear blend."""
    real = _video(_square_video(speed=shift, frames=6))
    w = torch.arange(6).float().view(1, 1, -1, 1, 1) / 5
    blend = (1 - w) * real[:, :, :1] + w * real[:, :, 5:]
    return real, blend


def test_a_real_frame_is_not_ghosted_and_the_blend_of_a_moved_object_is() -> None:
    real, blend = _keyframes_and_blend(shift=3.0)  # 15 px between keyframes: more than the 12 px square
    frames = (real[0].permute(1, 2, 3, 0).numpy() + 1) * 127.5
    alpha, fg = video_opacity(frames)
    assert all(frame_ghosting(alpha[t], fg[t])[0] == 0.0 for t in range(6))
    blended = (blend[0].permute(1, 2, 3, 0).numpy() + 1) * 127.5
    alpha, fg = video_opacity(blended, reference=frames)
    fraction, centroid = frame_ghosting(alpha[2], fg[2])  # weight 2/5: copies at opacity 0.6 and 0.4
    assert fraction == 1.0  # both copies semi-transparent, no opaque pixel
    assert centroid == pytest.approx((12, 32), abs=0.01)  # the more opaque copy, the first keyframe's place
    # ↑F's scores: a perfect interpolator (the real clip itself) against the blend
    scores = interpolation_objects(real, real, 5)
    assert scores["ghost_rate"].tolist() == [0.0] and scores["centroid_error"].tolist() == [0.0]
    assert scores["blend_ghost_rate"].tolist() == [0.5]  # weights 2/5 and 3/5 ghosted, 1/5 and 4/5 faint
    # the blend's visible object sits at the nearer keyframe: 3, 6, 6, 3 px from the truth (weights 1/5..4/5)
    assert scores["blend_centroid_error"].tolist() == [pytest.approx(4.5)]
    assert video_ghost_rate(blend, 5).tolist() == [0.5] and video_ghost_rate(real, 5).tolist() == [0.0]


def test_a_half_overlapping_blend_is_ghosted_a_small_shift_is_not() -> None:
    real, _ = _keyframes_and_blend(shift=1.2)  # 6 px between keyframes: the copies overlap by half
    assert interpolation_objects(real, real, 5)["blend_ghost_rate"].tolist() == [0.5]
    real, _ = _keyframes_and_blend(shift=0.2)  # 1 px: a blurred edge, not a ghost
    assert interpolation_objects(real, real, 5)["blend_ghost_rate"].tolist() == [0.0]


# ------------------------------------------------------------------------------------------------ SR edges, grain
def _step_images() -> Tensor:
    """Two 32 px images: black left half, white right half (one vertical edge), ``[2, 3, 32, 32]``."""
    x = -torch.ones(2, 3, 32, 32)
    x[..., 16:] = 1
    return x


def test_edge_sharpness_of_a_blurred_edge_and_bicubic() -> None:
    sharp = _step_images()
    assert edge_sharpness(sharp, sharp).tolist() == [1.0, 1.0]
    ramp = sharp.clone()  # the step smeared into a 4-pixel ramp: slope 2/4 per pixel against 2/2 on the real edge
    ramp[..., 14:18] = torch.tensor([-0.75, -0.25, 0.25, 0.75])
    assert edge_sharpness(ramp, sharp).tolist() == [pytest.approx(0.5), pytest.approx(0.5)]
    lowres = F.avg_pool2d(sharp, 4)  # 8 px; bicubic back to 32 is softer than the real edge, sharper than the ramp
    scores = sr_edges(sharp, sharp, lowres)
    assert scores["sharpness"].tolist() == [1.0, 1.0]
    assert 0.5 < float(scores["bicubic_sharpness"][0]) < 0.9
    assert scores["grain"].tolist() == [0.0, 0.0] and scores["real_grain"].tolist() == [0.0, 0.0]


def test_grain_on_flat_areas_reads_the_noise_std() -> None:
    sharp = _step_images()
    noisy = sharp + torch.randn(sharp.shape, generator=torch.Generator().manual_seed(0)) * (6 / 127.5)
    grain = flat_grain(noisy, sharp)
    assert grain.tolist() == [pytest.approx(6.0, rel=0.08)] * 2  # white noise of std 6 (0..255 units)
    assert flat_grain(sharp, sharp).tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------------------------ speed
def test_speed_of_a_square_moving_two_pixels_per_frame() -> None:
    speeds = video_speeds(torch.cat([_video(_square_video(speed=2.0)), _video(_square_video(speed=0.5))]))
    assert (speeds * SIZE).tolist() == [pytest.approx(2.0), pytest.approx(0.5)]


# ------------------------------------------------------------------------------------------------ intervals
def test_wilson_and_t_intervals_on_known_values() -> None:
    assert wilson_interval(0, 24) == (pytest.approx(0.0, abs=1e-12), pytest.approx(0.1380, abs=1e-4))
    assert wilson_interval(12, 24) == (pytest.approx(0.3143, abs=1e-4), pytest.approx(0.6857, abs=1e-4))
    assert wilson_interval(24, 24) == (pytest.approx(0.8620, abs=1e-4), 1.0)
    values = [1.0, 2.0, 3.0, 4.0]  # mean 2.5, s = 1.291, t(0.975, 3) = 3.182 -> half-width 2.054
    low, high = t_interval(sum(values), sum(v * v for v in values), len(values))
    assert (low, high) == (pytest.approx(0.4457, abs=1e-4), pytest.approx(4.5543, abs=1e-4))
    assert all(math.isnan(v) for v in t_interval(1.0, 1.0, 1))
    assert format_interval(0.44, (0.3, 0.58), digits=2) == "0.44 [0.30, 0.58]"
    assert format_interval("not computed: no samples", (0.1, 0.2)) == "not computed: no samples"
    assert format_interval(0.5, (math.nan, math.nan)) == "0.5000"
    means = UnitMeans(("rate", "px"), rates=("rate",))
    means.update({"rate": [0.0] * 12 + [1.0] * 12, "px": values})
    out = means.compute()
    assert float(out["rate"]["low"]) == pytest.approx(0.3143, abs=1e-4)
    assert float(out["px"]["high"]) == pytest.approx(4.5543, abs=1e-4) and float(out["px"]["n"]) == 4
    with pytest.raises(ValueError, match="rate: a rate's values must lie in"):
        means.update({"rate": [1.5]})
