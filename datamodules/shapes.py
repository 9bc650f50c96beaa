"""Moving Shapes: the built-in, offline dataset that the demo and the tests train on.

A deterministic (seeded) generator that writes *real* WebDataset shards in the two layouts the
DataModules read, so the same code path serves the toy data and production data:

- ``images/{train,val}-%06d.tar`` — img2dataset layout: ``KEY.png`` (one coloured shape of a given kind,
  colour and size at a 3x3-grid position on a plain background), ``KEY.txt`` (a caption from templates,
  "a small red circle in the top left"), ``KEY.json`` (img2dataset-like metadata plus the ground-truth
  attributes); plus img2dataset's ``_stats.json`` side file per shard.
- ``videos/{train,val}-%06d.tar`` — video2dataset layout, *unlabeled*: ``KEY.mp4`` (H.264, 24 or 30 fps,
  2-4 s: one or two shapes moving at constant velocity and bouncing off the walls) and ``KEY.json``
  (fps / duration / frame count, and the ground truth under ``"ground_truth"``, a key the DataModules never
  read as a caption). No ``KEY.txt``: the videos carry no text, as in the paper.
- ``eval/prompts.txt`` / ``eval/prompts.jsonl`` — held-out prompts for evaluation: one per (colour, shape)
  pair, phrased with *motion* templates ("a small red circle moving") whose wording never occurs in a
  training caption. Every colour/shape combination does occur in training images; only the prompt strings
  are new, so evaluation measures text-to-video generalisation of phrasing and motion, not unseen attributes.
- ``DONE`` — written last; a directory without it is a half-written dataset and is regenerated.

``render_frame`` is a pure function so the metrics code can re-use the palette and the geometry.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import webdataset as wds
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 210),
    "orange": (245, 140, 30),
    "purple": (120, 60, 170),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "white": (235, 235, 235),
}
# Shape extent (circle diameter, square side, triangle base and height) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.2, "medium": 0.3, "large": 0.4}
# Normalised (x, y) centres of the 3x3 grid; y grows downwards. Margins keep a large shape inside the frame.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3), "top": (0.5, 0.3), "top right": (0.7, 0.3),
    "left": (0.3, 0.5), "center": (0.5, 0.5), "right": (0.7, 0.5),
    "bottom left": (0.3, 0.7), "bottom": (0.5, 0.7), "bottom right": (0.7, 0.7),
}
_WHERE: dict[str, str] = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} {where}",
    "a {color} {shape} {where}",
    "a {size} {color} {shape} {where} on a {background} background",
    "a {size} {color} {shape} on a {background} background",
    "a picture of a {size} {color} {shape} {where}",
)
# Held-out: motion wording that no training caption uses.
EVAL_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} moving",
    "a {size} {color} {shape} bouncing around",
    "a {size} {color} {shape} sliding across the frame",
)
VIDEO_FPS: tuple[int, ...] = (24, 30)
VIDEO_SECONDS: tuple[float, float] = (2.0, 4.0)
DEFAULT_ROOT = Path("data/shapes")
_POSITION_JITTER = 0.04  # fraction of the side: images are not all pixel-identical per cell
_SPLIT_IDS = {"train-images": 1, "val-images": 2, "train-videos": 3, "val-videos": 4}


# ----------------------------------------------------------------------------------------------- rendering
def _rgb(color: str | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(color, str):
        return COLORS[color] if color in COLORS else BACKGROUNDS[color]
    r, g, b = (int(c) for c in color)
    return r, g, b


def shape_mask(shape: str, size_px: float, center_xy: Sequence[float], image_size: int) -> np.ndarray:
    """Boolean mask ``[H, W]`` of the pixels whose centres lie inside the shape.

    ``size_px`` is the circle's diameter, the square's side, the triangle's base and height (apex up).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    ys, xs = np.ogrid[:image_size, :image_size]
    dx = xs + 0.5 - float(center_xy[0])
    dy = ys + 0.5 - float(center_xy[1])
    half = size_px / 2.0
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Triangle: half-width grows linearly from 0 at the apex (dy = -half) to `half` at the base (dy = +half).
    return (dy <= half) & (np.abs(dx) <= (dy + half) / 2.0)


def draw_shape(canvas: np.ndarray, shape: str, color: str | Sequence[int], size_px: float,
               center_xy: Sequence[float]) -> np.ndarray:
    """Paint one shape into ``canvas`` (uint8 ``[H, W, 3]``, square) in place and return it."""
    canvas[shape_mask(shape, size_px, center_xy, canvas.shape[0])] = _rgb(color)
    return canvas


def render_frame(shape: str, color: str | Sequence[int], size_px: float, center_xy: Sequence[float],
                 image_size: int, background: str | Sequence[int] = "black") -> np.ndarray:
    """Render one shape on a plain background: uint8 ``[H, W, 3]`` with ``H = W = image_size``.

    Pure: the same arguments always give the same pixels (the metrics re-render reference frames with it).
    ``color`` / ``background`` are names from ``COLORS`` / ``BACKGROUNDS`` or RGB triples; ``center_xy`` is in
    pixels, x to the right and y downwards.
    """
    canvas = np.empty((image_size, image_size, 3), dtype=np.uint8)
    canvas[:] = _rgb(background)
    return draw_shape(canvas, shape, color, size_px, center_xy)


def bounce(p0: float, velocity: float, t: float, lo: float, hi: float) -> float:
    """Position at time ``t`` of a point starting at ``p0`` with constant ``velocity`` reflecting off [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return lo
    x = (p0 - lo + velocity * t) % (2 * span)  # unfold the reflections into a triangle wave
    return lo + (x if x <= span else 2 * span - x)


def object_center(obj: dict[str, Any], t: float, image_size: int) -> tuple[float, float]:
    """Centre (pixels) at time ``t`` (seconds) of a moving object from a video's ground truth."""
    half = obj["size_px"] / 2.0
    (x0, y0), (vx, vy) = obj["start_xy"], obj["velocity_xy"]
    return (bounce(x0, vx, t, half, image_size - half), bounce(y0, vy, t, half, image_size - half))


def render_video_frame(objects: Sequence[dict[str, Any]], t: float, image_size: int,
                       background: str | Sequence[int]) -> np.ndarray:
    """Frame at time ``t`` of a Moving Shapes video given its ground-truth ``objects``: uint8 ``[H, W, 3]``."""
    canvas = np.empty((image_size, image_size, 3), dtype=np.uint8)
    canvas[:] = _rgb(background)
    for obj in objects:
        draw_shape(canvas, obj["shape"], obj["color"], obj["size_px"], object_center(obj, t, image_size))
    return canvas


# ------------------------------------------------------------------------------------------------ sampling
def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One independent stream per sample: the output does not depend on generation order or shard sizes.
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def color_shape_pairs(seed: int) -> list[tuple[str, str]]:
    """All (colour, shape) pairs in a seeded order; training image ``i`` uses pair ``i % len(pairs)``, so any
    split of at least ``len(COLORS) * len(SHAPES)`` images contains every pair (the eval prompts rely on it)."""
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    order = np.random.default_rng([seed, 7]).permutation(len(pairs))
    return [pairs[i] for i in order]


def sample_image_attributes(rng: np.random.Generator, image_size: int,
                            color_shape: tuple[str, str] | None = None) -> dict[str, Any]:
    """Draw size, grid position (with jitter), background and, unless given, colour and shape for one image."""
    position = _pick(rng, list(POSITIONS))
    jitter = rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, size=2)
    cx, cy = (np.asarray(POSITIONS[position]) + jitter) * image_size
    size = _pick(rng, list(SIZES))
    color, shape = color_shape or (_pick(rng, list(COLORS)), _pick(rng, SHAPES))
    return {
        "shape": shape, "color": color, "size": size,
        "size_px": SIZES[size] * image_size, "position": position, "center_xy": [float(cx), float(cy)],
        "background": _pick(rng, list(BACKGROUNDS)),
    }


def caption_for(attrs: dict[str, Any], template: str) -> str:
    """Fill a caption template with an attribute dict (``where`` comes from the grid position)."""
    return template.format(size=attrs["size"], color=attrs["color"], shape=attrs["shape"],
                           where=_WHERE.get(attrs.get("position", "center"), ""),
                           background=attrs.get("background", "black"))


def sample_video_attributes(rng: np.random.Generator, image_size: int) -> dict[str, Any]:
    """Draw fps, duration, background and 1-2 objects with constant velocity (pixels per second)."""
    fps = int(rng.choice(VIDEO_FPS))
    num_frames = int(round(rng.uniform(*VIDEO_SECONDS) * fps))
    objects = []
    for _ in range(1 if rng.random() < 0.7 else 2):
        size = _pick(rng, list(SIZES))
        half = SIZES[size] * image_size / 2
        speed = rng.uniform(0.3, 0.8) * image_size
        angle = rng.uniform(0, 2 * math.pi)
        objects.append({
            "shape": _pick(rng, SHAPES), "color": _pick(rng, list(COLORS)), "size": size,
            "size_px": SIZES[size] * image_size,
            "start_xy": [float(v) for v in rng.uniform(half, image_size - half, size=2)],
            "velocity_xy": [speed * math.cos(angle), speed * math.sin(angle)],
        })
    return {"fps": fps, "num_frames": num_frames, "background": _pick(rng, list(BACKGROUNDS)),
            "objects": objects}


# ------------------------------------------------------------------------------------------------ encoding
def encode_png(frame: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W, 3]`` array (lossless, so decoded pixels equal ``render_frame``'s)."""
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def encode_mp4(frames: Sequence[np.ndarray] | np.ndarray, fps: int, *, crf: int = 20,
               keyframe_interval: int | None = None) -> bytes:
    """H.264 mp4 bytes of uint8 frames ``[T, H, W, 3]`` (H and W even) at a constant ``fps``.

    One keyframe per second by default, like typical web video, so seeking actually skips work.
    Deterministic bytes: single-threaded x264 without MB-tree rate control, which otherwise encodes the same YUV
    frames of these tiny videos to different bytes now and then (docs/choices.md#moving-shapes-deterministic-mp4-bytes).
    """
    frames = list(frames)
    height, width = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "no-mbtree=1",
                          "g": str(keyframe_interval or fps)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def _num_shards(num_samples: int, samples_per_shard: int, min_shards: int) -> int:
    # At least `min_shards` (so 2 ranks x 4 workers can split even tiny validation sets), never empty ones.
    return max(1, min(num_samples, max(min_shards, math.ceil(num_samples / samples_per_shard))))


def _write_split(directory: Path, name: str, samples: Sequence[dict[str, Any]], num_shards: int) -> None:
    """Write ``samples`` in contiguous blocks into ``name-%06d.tar`` + img2dataset ``_stats.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(samples), num_shards + 1).round().astype(int)
    for shard, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        with wds.TarWriter(str(directory / f"{name}-{shard:06d}.tar"), mtime=0.0) as sink:
            for sample in samples[lo:hi]:
                sink.write(sample)
        stats = {"count": int(hi - lo), "successes": int(hi - lo), "failed_to_download": 0,
                 "failed_to_resize": 0}
        (directory / f"{name}-{shard:06d}_stats.json").write_text(json.dumps(stats))


def _image_samples(num: int, split: str, image_size: int, seed: int) -> list[dict[str, Any]]:
    out = []
    pairs = color_shape_pairs(seed)
    for i in range(num):
        rng = _rng(seed, split, i)
        attrs = sample_image_attributes(rng, image_size, pairs[i % len(pairs)])
        caption = caption_for(attrs, _pick(rng, CAPTION_TEMPLATES))
        frame = render_frame(attrs["shape"], attrs["color"], attrs["size_px"], attrs["center_xy"],
                             image_size, attrs["background"])
        key = f"{_SPLIT_IDS[split]:02d}{i:07d}"
        meta = {"key": key, "status": "success", "caption": caption, "width": image_size,
                "height": image_size, "ground_truth": attrs}
        out.append({"__key__": key, "png": encode_png(frame), "txt": caption.encode("utf-8"),
                    "json": json.dumps(meta).encode("utf-8")})
    return out


def _video_samples(num: int, split: str, video_size: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for i in range(num):
        attrs = sample_video_attributes(_rng(seed, split, i), video_size)
        fps, n = attrs["fps"], attrs["num_frames"]
        frames = [render_video_frame(attrs["objects"], t / fps, video_size, attrs["background"]) for t in range(n)]
        key = f"{_SPLIT_IDS[split]:02d}{i:07d}"
        meta = {"key": key, "status": "success", "fps": fps, "duration": n / fps, "num_frames": n,
                "width": video_size, "height": video_size,
                "ground_truth": {"background": attrs["background"], "objects": attrs["objects"]}}
        out.append({"__key__": key, "mp4": encode_mp4(frames, fps), "json": json.dumps(meta).encode("utf-8")})
    return out


def eval_prompts(seed: int = 0) -> list[dict[str, Any]]:
    """Held-out prompts: every (colour, shape) pair once, size and motion wording cycled deterministically."""
    rng = np.random.default_rng([seed, 99])
    prompts = []
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        template = EVAL_TEMPLATES[i % len(EVAL_TEMPLATES)]
        attrs = {"shape": shape, "color": color, "size": size}
        prompts.append({"prompt": template.format(**attrs), **attrs, "color_rgb": list(COLORS[color]),
                        "size_fraction": SIZES[size], "motion": True})
    return prompts


# ------------------------------------------------------------------------------------------------ generate
def generate(out: str | Path = DEFAULT_ROOT, *, num_images: int = 4096, num_videos: int = 256,
             num_val_images: int = 256, num_val_videos: int = 32, image_size: int = 128, video_size: int = 64,
             seed: int = 0, samples_per_shard: int = 512, video_samples_per_shard: int = 32,
             min_shards: int = 8) -> Path:
    """Write the Moving Shapes dataset under ``out`` and return ``out`` as a Path.

    Deterministic in ``seed`` (same sizes and seed give the same pixels and captions). Anything a previous,
    unfinished run left in ``images/``, ``videos/`` or ``eval/`` is replaced; ``DONE`` is written last.
    ``video_size`` must be even (H.264 4:2:0).
    """
    if video_size % 2:
        raise ValueError(f"video_size must be even for H.264 4:2:0, got {video_size}")
    out = Path(out)
    (out / "DONE").unlink(missing_ok=True)
    for sub in ("images", "videos", "eval"):
        shutil.rmtree(out / sub, ignore_errors=True)

    for split, num in (("train", num_images), ("val", num_val_images)):
        samples = _image_samples(num, f"{split}-images", image_size, seed)
        _write_split(out / "images", split, samples, _num_shards(num, samples_per_shard, min_shards))
    for split, num in (("train", num_videos), ("val", num_val_videos)):
        samples = _video_samples(num, f"{split}-videos", video_size, seed)
        _write_split(out / "videos", split, samples, _num_shards(num, video_samples_per_shard, min_shards))

    (out / "eval").mkdir(parents=True, exist_ok=True)
    prompts = eval_prompts(seed)
    (out / "eval" / "prompts.txt").write_text("".join(p["prompt"] + "\n" for p in prompts))
    (out / "eval" / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))

    params = dict(num_images=num_images, num_videos=num_videos, num_val_images=num_val_images,
                  num_val_videos=num_val_videos, image_size=image_size, video_size=video_size, seed=seed)
    (out / "DONE").write_text(json.dumps(params) + "\n")
    return out


def is_complete(root: str | Path) -> bool:
    """True when ``root`` holds a fully written dataset (its ``DONE`` marker exists)."""
    return (Path(root) / "DONE").is_file()
