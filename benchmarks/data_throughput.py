"""Clip decoding throughput per DataLoader worker: our sampling (seek, stop early) vs. decoding every frame.

For each configuration it writes a real video2dataset-layout shard of H.264 mp4s (Moving Shapes content; the
"textured" rows add a panning noise texture so the bitrate is closer to real footage), then measures, on one
core, the same clips two ways:

- **ours** — the training pipeline as a worker runs it: ``ShardStream`` (tar reading, ``VideoCodec``:
  ``decode.plan_clip`` + ``decode.decode_clip``: seek to the keyframe before the clip, convert only the sampled
  frames with libswscale straight to the output size, stop after the last one) -> float batches.
- **naive** — decode every frame of the video to full-size RGB, then pick the same frame indices, resize the
  short side with torch (antialiased bilinear) and center-crop.

Throughput is clips per *CPU second* of this single-threaded process (``time.process_time``), i.e. clips/s per
core, which stays meaningful on a shared machine; wall-clock clips/s is printed beside it. Results go to the
"## Data throughput" section of ``benchmarks/RESULTS.md`` (replaced if present, other sections kept).

    python benchmarks/data_throughput.py            # full run (~1-2 min), writes RESULTS.md
    python benchmarks/data_throughput.py --quick --no-write
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from datamodules import shapes
from datamodules.decode import plan_clip
from datamodules.shards import ShardLoader, ShardStream
from datamodules.video import VideoCodec

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Data throughput"


@dataclass(frozen=True)
class Config:
    clip_size: int  # output frames are clip_size x clip_size
    source: tuple[int, int]  # (width, height) of the mp4s
    content: str  # "shapes" (the built-in dataset) or "textured"
    num_frames: int = 16


CONFIGS = (
    Config(64, (128, 128), "shapes"),
    Config(64, (128, 128), "textured"),
    Config(64, (640, 360), "textured"),
    Config(256, (384, 384), "shapes"),
    Config(256, (384, 384), "textured"),
)


# ----------------------------------------------------------------------------------------------- the data
def _video(rng: np.random.Generator, width: int, height: int, content: str) -> tuple[bytes, int]:
    """One Moving Shapes video (24/30 fps, 2-4 s) at ``width`` x ``height``; returns (mp4 bytes, frames)."""
    side = max(width, height)
    attrs = shapes.sample_video_attributes(rng, side)
    fps, n = attrs["fps"], attrs["num_frames"]
    texture = None
    if content == "textured":  # smooth-ish noise, panned 2 px per frame: every frame has fresh detail
        noise = rng.integers(0, 256, (height // 4 + 1, (width + 2 * n) // 4 + 1, 3), dtype=np.uint8)
        texture = noise.repeat(4, axis=0).repeat(4, axis=1)
    frames = []
    for t in range(n):
        frame = shapes.render_video_frame(attrs["objects"], t / fps, side, attrs["background"])[:height, :width]
        if texture is not None:
            background = (frame == frame[0, 0]).all(-1)
            frame = frame.copy()
            frame[background] = texture[:height, 2 * t:2 * t + width][background]
        frames.append(frame)
    return shapes.encode_mp4(frames, fps), n


def write_shard(path: Path, config: Config, num_videos: int, seed: int = 0) -> dict[str, float]:
    """A video2dataset-layout shard of ``num_videos`` mp4s; returns mean mp4 size (KiB) and frames."""
    rng = np.random.default_rng(seed)
    sizes, frames = [], []
    with wds.TarWriter(str(path)) as sink:
        for i in range(num_videos):
            data, n = _video(rng, *config.source, config.content)
            sink.write({"__key__": f"{i:06d}", "mp4": data, "json": b"{}"})
            sizes.append(len(data) / 1024)
            frames.append(n)
    return {"kib": float(np.mean(sizes)), "frames": float(np.mean(frames))}


# --------------------------------------------------------------------------------------------- the decoders
def naive_clip(data: bytes, num_frames: int, size: int, rng: random.Random) -> torch.Tensor:
    """Decode *every* frame to full-size RGB, then index, resize and crop: float ``[F, 3, size, size]``."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        native_fps = float(stream.average_rate)
        everything = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])  # [T, H, W, 3]
    plan = plan_clip(len(everything), native_fps, num_frames, 1.0, 30.0, rng)
    clip = torch.from_numpy(everything[plan.indices]).permute(0, 3, 1, 2).float()
    height, width = clip.shape[-2:]
    scale = size / min(height, width)
    clip = F.interpolate(clip, size=(max(size, round(height * scale)), max(size, round(width * scale))),
                         mode="bilinear", antialias=True, align_corners=False)
    top, left = (clip.shape[-2] - size) // 2, (clip.shape[-1] - size) // 2
    return clip[..., top:top + size, left:left + size].div(127.5).sub(1.0).clamp(-1, 1)


def _measure(fn, clips: int) -> tuple[float, float]:
    """(clips per CPU second, clips per wall second) of ``fn()``, which must produce ``clips`` clips."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return clips / cpu, clips / wall


def bench(path: Path, config: Config, clips: int, batch_size: int = 8) -> dict[str, float]:
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    codec = VideoCodec(config.num_frames, config.clip_size, 1.0, 30.0)
    stream = ShardStream([str(path)], codec, batch_size=batch_size, train=True, seed=0, shuffle_buffer=batch_size)
    batches = clips // batch_size
    loader = ShardLoader(stream, num_workers=0).with_epoch(batches)

    def ours() -> None:
        got = sum(batch["video"].shape[0] for batch in loader)
        assert got == batches * batch_size

    def naive() -> None:
        rng = random.Random(0)
        for i in range(batches * batch_size):
            clip = naive_clip(samples[i % len(samples)]["mp4"], config.num_frames, config.clip_size, rng)
            assert clip.shape == (config.num_frames, 3, config.clip_size, config.clip_size)

    ours()  # warm-up: imports, first swscale contexts, page cache
    naive_clip(samples[0]["mp4"], config.num_frames, config.clip_size, random.Random(0))
    ours_cpu, ours_wall = _measure(ours, batches * batch_size)
    naive_cpu, naive_wall = _measure(naive, batches * batch_size)
    return {"ours_cpu": ours_cpu, "ours_wall": ours_wall, "naive_cpu": naive_cpu, "naive_wall": naive_wall}


# ----------------------------------------------------------------------------------------------- reporting
def _table(rows: list[tuple[Config, dict[str, float], dict[str, float]]]) -> str:
    lines = ["| clip | source | content | mp4 KiB / frames | ours clips/s/core | naive clips/s/core | speed-up "
             "| ours wall clips/s | naive wall clips/s |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for config, shard, r in rows:
        lines.append(
            f"| {config.num_frames}x{config.clip_size}² | {config.source[0]}x{config.source[1]} | {config.content} "
            f"| {shard['kib']:.0f} / {shard['frames']:.0f} | **{r['ours_cpu']:.0f}** | {r['naive_cpu']:.0f} "
            f"| {r['ours_cpu'] / r['naive_cpu']:.1f}x | {r['ours_wall']:.0f} | {r['naive_wall']:.0f} |")
    return "\n".join(lines)


def _verdict(rows: list[tuple[Config, dict[str, float], dict[str, float]]]) -> str:
    target = [r["ours_cpu"] for c, _, r in rows if c.clip_size == 64 and c.source == (128, 128)]
    if not target:
        return "not measured in this run"
    return f"{'met' if min(target) >= 50 else 'NOT met'} ({min(target):.0f} clips/s/core at worst)"


def _section(table: str, clips: int, verdict: str) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"""{SECTION}

`python benchmarks/data_throughput.py` — {time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores (load average
{load:.1f} while measuring{": the machine was shared" if load > 1.5 else ""}), Python {platform.python_version()}, torch {torch.__version__},
PyAV {av.__version__} (FFmpeg {'.'.join(map(str, av.library_versions['libavcodec']))} libavcodec).

One worker (this process, torch and the decoder single-threaded), {clips} clips per row, fps drawn in [1, 30],
random start. *clips/s/core* = clips per CPU second of the process, which a shared machine does not distort;
wall-clock rates beside it. **ours**: the training path (`ShardStream` + `VideoCodec`: seek to the keyframe
before the clip, convert only the sampled frames with libswscale straight to the output size, stop after the last
one, float batches). **naive**: decode every frame to full-size RGB, index, resize with torch, crop. Sources are
H.264 (x264 veryfast, crf 20, a keyframe per second), 2-4 s at 24/30 fps; "shapes" is the built-in dataset's
flat content, "textured" pans a noise texture behind the shapes for a real-footage-like bitrate.

{table}

Target (issue 2): >= 50 clips/s per core for 16x64² from 128 px sources: {verdict}.
"""


def write_results(section: str, path: Path = RESULTS) -> None:
    """Replace the ``## Data throughput`` section of RESULTS.md (up to the next ``## ``), keep the others."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip() + "\n\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=96, help="clips per measurement (multiple of 8)")
    parser.add_argument("--videos", type=int, default=12, help="videos per shard")
    parser.add_argument("--quick", action="store_true", help="16 clips, 4 videos, first two rows only")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs, clips, videos = (CONFIGS[:2], 16, 4) if args.quick else (CONFIGS, args.clips, args.videos)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, config in enumerate(configs):
            path = Path(tmp) / f"bench-{i}.tar"
            shard = write_shard(path, config, videos, seed=i)
            result = bench(path, config, clips)
            rows.append((config, shard, result))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    table = _table(rows)
    print(table)
    if not args.no_write:
        write_results(_section(table, clips, _verdict(rows)))
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
