"""VideoDataModule and clip decoding: fps by stride, seek + early stop, video2dataset shards, bad inputs counted."""

from __future__ import annotations

import json
import random
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import webdataset as wds

from datamodules import decode as decode_module
from datamodules.decode import SampleError, decode_clip, plan_clip
from datamodules.shapes import encode_mp4
from datamodules.skips import SkipTally
from datamodules.video import VideoDataModule

NATIVE_FPS = 30
NUM_NATIVE = 60


def _index_video(num: int = NUM_NATIVE, fps: int = NATIVE_FPS, size: int = 32, keyframe_interval: int = 10) -> bytes:
    """Frame i shows i in binary as 8 black/white vertical bars, a code that survives H.264 and resizing."""
    bits = (np.arange(num)[:, None] >> np.arange(8)[None, :]) & 1  # [num, 8], least significant bar first
    columns = np.repeat(bits * 255, size // 8, axis=1).astype(np.uint8)  # [num, size]
    frames = np.broadcast_to(columns[:, None, :, None], (num, size, size, 3))
    return encode_mp4(frames, fps, crf=0, keyframe_interval=keyframe_interval)


def _decoded_indices(frames: torch.Tensor) -> list[int]:
    """Read the bar code back from decoded uint8 frames ``[F, 3, H, W]``."""
    bars = frames.float().mean(dim=(1, 2)).reshape(frames.shape[0], 8, -1).mean(-1) > 127  # [F, 8]
    return (bars.long() << torch.arange(8)).sum(-1).tolist()


@pytest.fixture(scope="module")
def index_video() -> bytes:
    return _index_video()


@pytest.mark.parametrize("target, stride", [(30.0, 1), (15.0, 2), (10.0, 3), (12.0, 2), (20.0, 2)])
def test_fps_is_realised_by_striding_native_frames(index_video: bytes, target: float, stride: int) -> None:
    for seed in range(4):
        clip = decode_clip(index_video, num_frames=16, size=32, fps_min=target, fps_max=target,
                           rng=random.Random(seed))
        got = _decoded_indices(clip.frames)
        assert got == clip.indices  # the frames are the ones planned ...
        assert np.diff(got).tolist() == [stride] * 15  # ... evenly `stride` native frames apart
        assert clip.fps == pytest.approx(NATIVE_FPS / stride)  # and fps is what that stride really gives
        assert 0 <= got[0] and got[-1] < NUM_NATIVE


def test_random_start_and_fps_range(index_video: bytes) -> None:
    starts, fpss = set(), set()
    for seed in range(40):
        clip = decode_clip(index_video, num_frames=4, size=16, fps_min=5.0, fps_max=30.0, rng=random.Random(seed))
        starts.add(clip.indices[0])
        fpss.add(clip.fps)
        assert _decoded_indices(clip.frames) == clip.indices
    assert len(starts) > 10  # starts spread over the video
    assert fpss <= {30 / s for s in range(1, 7)} and len(fpss) >= 4  # several strides drawn, all exact


def test_the_drawn_stride_keeps_the_fps_in_range() -> None:
    # 40 fps native, fps in [20, 30]: rounding 40/27 alone gives stride 1 (40 fps), 40/21 gives 2 (20 fps)
    fpss = {plan_clip(400, 40.0, 8, 20.0, 30.0, random.Random(seed)).fps for seed in range(50)}
    assert fpss == {20.0}  # stride 2 is the only one in range
    # 30 fps native, fps in [4, 8]: 30/4.1 rounds to 7 (4.29 fps), 30/4.0 to 8 (3.75, below fps_min)
    fpss = {plan_clip(900, 30.0, 8, 4.0, 8.0, random.Random(seed)).fps for seed in range(200)}
    assert fpss and all(4.0 <= f <= 8.0 for f in fpss) and len(fpss) >= 3
    # no stride lands in range (10 fps native, [12, 30]): the nearest one, stride 1
    assert plan_clip(100, 10.0, 8, 12.0, 30.0, random.Random(0)).fps == 10.0


def test_short_videos_shrink_the_stride_or_are_too_short() -> None:
    plan = plan_clip(60, 30.0, 16, 1.0, 1.0, random.Random(0))  # 1 fps would need 451 frames
    assert plan.stride == 3 and plan.fps == 10.0 and plan.indices[-1] < 60  # the largest stride that fits
    assert plan_clip(16, 30.0, 16, 1.0, 1.0, random.Random(0)).indices == list(range(16))
    with pytest.raises(SampleError) as info:
        plan_clip(15, 30.0, 16, 1.0, 30.0, random.Random(0))
    assert info.value.reason == "too_short_video"


class _CountingContainer:
    """Wraps a PyAV input container and counts the frames its decoder produces."""

    def __init__(self, inner) -> None:
        self.inner, self.decoded, self.seeks = inner, 0, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.inner.close()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def seek(self, *args, **kwargs):
        self.seeks += 1
        return self.inner.seek(*args, **kwargs)

    def decode(self, *args, **kwargs):
        for frame in self.inner.decode(*args, **kwargs):
            self.decoded += 1
            yield frame


def test_seeks_and_stops_early(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _index_video(num=120, keyframe_interval=10)
    opened: list[_CountingContainer] = []
    real_open = av.open

    def counting_open(*args, **kwargs):
        opened.append(_CountingContainer(real_open(*args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(decode_module.av, "open", counting_open)
    for seed in range(6):
        clip = decode_clip(data, num_frames=4, size=32, fps_min=30.0, fps_max=30.0, rng=random.Random(seed))
        container = opened[-1]
        assert _decoded_indices(clip.frames) == clip.indices
        first, last = clip.indices[0], clip.indices[-1]
        # decoding starts at the keyframe before the clip (<= 9 frames early) and ends at its last frame
        # (+ a few frames of decoder reordering delay), never running through the whole 120-frame video
        assert container.seeks == (1 if first > 0 else 0)
        assert container.decoded <= (last - first + 1) + 9 + 4
        assert container.decoded < 30


def test_same_crop_for_every_frame() -> None:
    # a static, non-square scene with a horizontal ramp: any crop offset shows up as a different ramp segment
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (32, 1, 3))
    data = encode_mp4([ramp] * 24, 24, crf=0)
    lefts = set()
    for seed in range(8):
        clip = decode_clip(data, num_frames=8, size=16, fps_min=24, fps_max=24, crop="random", rng=random.Random(seed))
        frames = clip.frames.float()
        assert clip.frames.shape == (8, 3, 16, 16)
        assert (frames - frames[0]).abs().max() <= 2  # one window for the whole clip
        lefts.add(round(frames[0, 0, 8, 0].item()))
    assert len(lefts) > 2  # but the window moves between clips


def test_shapes_round_trip(shapes_root: Path) -> None:
    dm = VideoDataModule(root=str(shapes_root), num_frames=8, video_size=32, batch_size=3, val_batch_size=3,
                         batches_per_epoch=2, shuffle_buffer=4)
    dm.prepare_data()
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert batch["video"].shape == (3, 8, 3, 32, 32) and batch["video"].dtype == torch.float32
        assert batch["video"].min() >= -1 and batch["video"].max() <= 1
        assert batch["fps"].dtype == torch.float32 and batch["fps"].shape == (3,)
        for fps in batch["fps"].tolist():  # native 24 or 30, divided by an integer stride, within [1, 30]
            assert 1 <= fps <= 30 and any(abs(n / fps - round(n / fps)) < 1e-4 for n in (24, 30))
        assert batch["caption"] == ["", "", ""]  # unlabeled: the json's ground truth never becomes a caption
    val = list(dm.val_dataloader())
    keys = [k for b in val for k, v in zip(b["key"], b["valid"]) if v]
    assert len(keys) == len(set(keys)) == 8
    again = list(dm.val_dataloader())  # evaluation clips are the same every pass (per-key seeds)
    assert all(torch.equal(a["video"], b["video"]) and torch.equal(a["fps"], b["fps"]) for a, b in zip(val, again))


def test_video2dataset_layout_every_bad_input_counted(tmp_path: Path, index_video: bytes) -> None:
    meta = lambda key, status="success": json.dumps({"key": key, "status": status}).encode()  # noqa: E731
    good = {
        "captioned": {"mp4": index_video, "txt": b"a gray ramp"},
        "uncaptioned": {"mp4": index_video},
        "latin1": ({"mp4": index_video, "txt": "café".encode("latin-1")}),  # kept, caption dropped and counted
        "wide": {"mp4": encode_mp4([np.zeros((32, 48, 3), np.uint8)] * 20, 24)},
    }
    bad = {
        "failed": ({"txt": b"a caption"}, "missing_mp4"),  # video2dataset's failed download: txt + json only
        "garbage": ({"mp4": b"\x00\x00\x00\x18ftypmp42 this is not a movie"}, "corrupt_mp4"),
        "halved": ({"mp4": index_video[: len(index_video) // 2]}, "corrupt_mp4"),
        "short": ({"mp4": _index_video(num=8)}, "too_short_video"),
        "empty": ({"mp4": b""}, "zero_byte_member"),
    }
    samples = [{"__key__": k, **m, "json": meta(k)} for k, m in good.items()]
    samples += [{"__key__": k, **m, "json": meta(k, "failed_to_download")} for k, (m, _) in bad.items()]
    for shard in range(3):
        with wds.TarWriter(str(tmp_path / f"{shard:05d}.tar")) as sink:
            for sample in samples[shard::3]:
                sink.write(sample)
    (tmp_path / "00000_stats.json").write_text("{}")
    dm = VideoDataModule(urls=str(tmp_path), val_urls=str(tmp_path / "{00000..00002}.tar"), num_frames=16,
                         video_size=24, val_batch_size=2)
    dm.setup("validate")
    tally = SkipTally()
    batches = list(dm.val_dataloader())
    for batch in batches:
        tally.update(batch)
        assert batch["video"].shape == (2, 16, 3, 24, 24) and batch["fps"].shape == (2,)
    valid = {k: (c, f) for b in batches
             for k, c, f, v in zip(b["key"], b["caption"], b["fps"].tolist(), b["valid"]) if v}
    assert sorted(valid) == sorted(good)
    assert valid["captioned"][0] == "a gray ramp" and valid["uncaptioned"][0] == "" and valid["latin1"][0] == ""
    assert tally.totals() == {"corrupt_mp4": 2, "missing_mp4": 1, "repaired_non_utf8_caption": 1,
                              "too_short_video": 1, "zero_byte_member": 1}


def test_bad_fps_range_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="fps_min"):
        VideoDataModule(fps_min=10.0, fps_max=5.0)
