"""Decoding one sample's bytes: images with PIL, video clips with PyAV, captions as UTF-8.

Everything here is a pure function of (bytes, options, rng). A bad input raises ``SampleError`` whose
``reason`` is the name under which the caller counts the skip (``data/skipped/<reason>``); inputs that can be
repaired without guessing (grayscale, alpha, palette, 16-bit) are repaired and the repair is reported back.

Video decoding is on the training hot path, so ``decode_clip`` decodes only what the clip needs: it picks the
frame indices first (``plan_clip``), seeks to the keyframe before the first one, converts only the selected
frames (resize in libswscale, straight to the output size), and stops at the last one.
"""

from __future__ import annotations

import io
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from PIL import Image

Crop = Literal["center", "random"]


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` names the skip counter it goes to."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float32 in [-1, 1] (same shape)."""
    return x.to(torch.float32).div_(127.5).sub_(1.0)


# ------------------------------------------------------------------------------------------------ captions
def decode_caption(data: bytes | None, *, required: bool) -> str:
    """UTF-8 caption text, stripped. Reasons: ``missing_caption``, ``empty_caption``, ``non_utf8_caption``.

    With ``required=False`` a missing or empty caption is simply ``""``; non-UTF-8 bytes still raise, so the
    caller can decide to keep the sample and count the dropped caption.
    """
    if data is None:
        if required:
            raise SampleError("missing_caption")
        return ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exn:
        raise SampleError("non_utf8_caption", str(exn)) from None
    text = text.lstrip("\ufeff").strip()
    if not text and required:
        raise SampleError("empty_caption")
    return text


# ------------------------------------------------------------------------------------------------ geometry
def resize_dims(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after resizing the short side to ``size``, keeping the aspect ratio (long side >= size)."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def crop_offsets(width: int, height: int, size: int, crop: Crop, rng: random.Random) -> tuple[int, int]:
    """(left, top) of a ``size`` x ``size`` window inside a ``width`` x ``height`` image."""
    if crop == "center":
        return (width - size) // 2, (height - size) // 2
    if crop == "random":
        return rng.randint(0, width - size), rng.randint(0, height - size)
    raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")


# -------------------------------------------------------------------------------------------------- images
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert to 8-bit RGB where the conversion is unambiguous; return (image, repair reason or None)."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("L", "1"):
        return img.convert("RGB"), "repaired_grayscale"
    if mode == "P":
        has_alpha = "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        return (_flatten_alpha(img) if has_alpha else img), "repaired_palette"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _flatten_alpha(img.convert("RGBA")), "repaired_alpha"
    if mode.startswith("I"):  # "I;16", "I;16B", "I" (32-bit int, how PIL often holds 16-bit PNGs)
        arr = np.asarray(img).astype(np.float32)
        if arr.max(initial=0) > 255:  # 16-bit range -> 8 bits
            arr = arr / 257.0
        gray = np.clip(arr.round(), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB"), "repaired_16bit"
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB"), "repaired_mode"
    raise SampleError("unsupported_image_mode", mode)  # e.g. "F": float data with no known range


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    # Transparent regions become white, as a browser would show the image on a page.
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def decode_image(data: bytes, size: int, *, crop: Crop = "center",
                 rng: random.Random | None = None) -> tuple[torch.Tensor, str | None]:
    """Decode, repair to RGB, resize the short side to ``size`` and crop a square.

    Returns (uint8 tensor ``[3, size, size]``, repair reason or None).
    Reasons raised: ``decode_error`` (PIL cannot decode it, truncated file, decompression bomb),
    ``unsupported_image_mode``.
    """
    rng = rng or random.Random(0)
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # DCT-domain downscale: decode big JPEGs at >= size, much faster
        img.load()
    except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for bad bytes
        raise SampleError("decode_error", repr(exn)) from None
    img, repair = _to_rgb(img)
    width, height = resize_dims(img.width, img.height, size)
    if (width, height) != img.size:
        img = img.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = crop_offsets(width, height, size, crop, rng)
    arr = np.array(img)[top:top + size, left:left + size]  # np.array copies: PIL's buffer is read-only
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), repair


# -------------------------------------------------------------------------------------------------- videos
@dataclass(frozen=True)
class ClipPlan:
    """Which native frames a clip takes: ``start + k * stride`` for k < num_frames, at ``fps`` = native/stride."""

    start: int
    stride: int
    num_frames: int
    fps: float

    @property
    def indices(self) -> list[int]:
        return [self.start + k * self.stride for k in range(self.num_frames)]


def plan_clip(num_native: int, native_fps: float, num_frames: int, fps_min: float, fps_max: float,
              rng: random.Random) -> ClipPlan:
    """Draw a target fps uniformly in [fps_min, fps_max], turn it into a native-frame stride and a start.

    ``stride = round(native_fps / target)``, kept to the strides whose fps ``native_fps / stride`` lies in
    ``[fps_min, fps_max]`` where one does (rounding alone gives 40 fps for a 40 fps video and a drawn 27, above an
    ``fps_max`` of 30); the fps actually used is ``native_fps / stride``. When the video is too short for that
    stride, the stride shrinks to the largest that fits (so short clips come out at a higher fps than drawn; the
    returned fps is always the true one).
    Raises ``too_short_video`` when even stride 1 does not fit (fewer native frames than ``num_frames``).
    """
    if num_native < num_frames:
        raise SampleError("too_short_video", f"{num_native} frames < {num_frames}")
    target = rng.uniform(fps_min, fps_max)
    stride = max(1, round(native_fps / target))
    lo, hi = max(1, math.ceil(native_fps / fps_max - 1e-9)), math.floor(native_fps / fps_min + 1e-9)
    if lo <= hi:  # some stride lands in [fps_min, fps_max]
        stride = min(max(stride, lo), hi)
    if num_frames > 1:
        stride = min(stride, (num_native - 1) // (num_frames - 1))
    span = (num_frames - 1) * stride + 1
    start = rng.randint(0, num_native - span)
    return ClipPlan(start=start, stride=stride, num_frames=num_frames, fps=native_fps / stride)


@dataclass(frozen=True)
class Clip:
    """A decoded clip: uint8 ``frames [F, 3, H, W]``, the ``fps`` it plays at, and the native indices used."""

    frames: torch.Tensor
    fps: float
    indices: list[int]


def _probe(container: av.container.InputContainer) -> tuple[av.video.stream.VideoStream, float, int]:
    """First video stream, its native fps and frame count (estimated from the duration when not stored)."""
    if not container.streams.video:
        raise SampleError("corrupt_mp4", "no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise SampleError("corrupt_mp4", "unknown frame rate")
    fps = float(rate)
    count = stream.frames
    if count <= 0:
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / av.time_base
        else:
            seconds = 0.0
        count = int(seconds * fps + 1e-6)
    return stream, fps, count


def decode_clip(data: bytes, *, num_frames: int = 16, size: int = 64, fps_min: float = 1.0,
                fps_max: float = 30.0, crop: Crop = "center", rng: random.Random | None = None,
                threads: int = 1) -> Clip:
    """Sample and decode ``num_frames`` frames of an mp4 (see ``plan_clip``), all with the same square crop.

    Returns a ``Clip`` with uint8 ``frames [num_frames, 3, size, size]``.
    Reasons raised: ``corrupt_mp4`` (not a video, broken stream, frames missing), ``too_short_video``.
    ``threads`` is the decoder's thread count; 1 is right inside DataLoader workers (they are the parallelism).
    """
    rng = rng or random.Random(0)
    return decode_planned_clip(data, lambda count, native_fps: plan_clip(count, native_fps, num_frames, fps_min,
                                                                         fps_max, rng),
                               size=size, crop=crop, rng=rng, threads=threads, corrupt_reason="corrupt_mp4")


def _decode_indices(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                    native_fps: float, wanted: list[int], *, seek: bool) -> list[av.VideoFrame] | None:
    """Decode the frames with native indices ``wanted`` (sorted); None if any could not be found."""
    ticks_to_frames = float(stream.time_base) * native_fps  # float, not Fraction: this runs per frame
    start_pts = stream.start_time or 0
    if seek:
        # Seek to the keyframe at or before the first wanted frame; decoding resumes from there.
        target = start_pts + int(wanted[0] / ticks_to_frames)
        container.seek(target, stream=stream, backward=True, any_frame=False)
    todo = set(wanted)
    found: dict[int, av.VideoFrame] = {}
    counter = -1
    for frame in container.decode(stream):
        counter += 1
        if frame.pts is None:
            if seek:
                return None  # no timestamps: only sequential counting from frame 0 is reliable
            index = counter
        else:
            index = round((frame.pts - start_pts) * ticks_to_frames)
        if index in todo:
            found[index] = frame
            todo.discard(index)
            if not todo:
                break  # stop early: nothing after the last wanted frame is decoded
        elif index > wanted[-1]:
            break
    if todo:
        return None
    return [found[i] for i in wanted]


def _crop_and_stack(frames: list[av.VideoFrame], plan: ClipPlan, size: int, crop: Crop,
                    rng: random.Random) -> Clip:
    width, height = resize_dims(frames[0].width, frames[0].height, size)
    left, top = crop_offsets(width, height, size, crop, rng)  # one crop window for every frame
    downscale = width <= frames[0].width
    interpolation = "AREA" if downscale else "BICUBIC"
    # One reformatter for the whole clip: libswscale builds its scaling context once, not once per frame
    # (per-frame `frame.to_ndarray(width=...)` spends most of its time rebuilding it).
    reformatter = VideoReformatter()
    arrays = []
    for frame in frames:
        rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24",
                                   interpolation=interpolation).to_ndarray()
        arrays.append(rgb[top:top + size, left:left + size])
    video = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [F, 3, H, W]
    return Clip(frames=video, fps=plan.fps, indices=plan.indices)


def decode_planned_clip(source: bytes | str | os.PathLike[str], plan: Callable[[int, float], ClipPlan], *,
                        size: int, crop: Crop = "center", rng: random.Random | None = None,
                        threads: int = 1, corrupt_reason: str = "corrupt_video") -> Clip:
    """Decode the frames that ``plan(num_native, native_fps)`` picks, from any container PyAV reads (mp4, and
    UCF-101's xvid ``.avi``), resized and cropped as ``decode_clip`` does (short side to ``size``, one square crop).

    ``source`` is the file's bytes or its path (a path is read by FFmpeg, not loaded whole). ``plan`` is called once,
    after probing, so the caller's sampling rule can depend on the frame count (e.g. a fixed start per file for
    evaluation, where ``plan_clip`` draws an fps). Returns a ``Clip`` with uint8 ``frames [F, 3, size, size]``.
    Reasons raised: ``corrupt_reason`` (not a video, broken stream, frames missing; ``decode_clip``'s mp4 shards
    say ``corrupt_mp4``), and whatever ``plan`` raises (``too_short_video``).
    """
    rng = rng or random.Random(0)
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source), mode="r") as container:
            try:
                stream, native_fps, count = _probe(container)
            except SampleError as exn:  # _probe names its reasons after mp4; here the container can be anything
                raise SampleError(corrupt_reason, str(exn)) from None
            clip_plan = plan(count, native_fps)
            stream.codec_context.thread_count = threads
            frames = _decode_indices(container, stream, native_fps, clip_plan.indices, seek=clip_plan.start > 0)
            if frames is None:  # the seek landed badly or timestamps are odd: one slow, safe retry from frame 0
                container.seek(0, stream=stream)
                frames = _decode_indices(container, stream, native_fps, clip_plan.indices, seek=False)
            if frames is None:
                raise SampleError(corrupt_reason, "frames missing")
    except SampleError:
        raise
    except Exception as exn:  # FFmpeg errors for broken containers / streams, unreadable files
        raise SampleError(corrupt_reason, repr(exn)) from None
    return _crop_and_stack(frames, clip_plan, size, crop, rng)
