"""Writing what the networks make: mp4 (PyAV, H.264), gif and PNG contact sheets. Inputs are in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[..., 3, H, W]`` in [-1, 1] -> uint8 ``[..., H, W, 3]``."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def write_mp4(frames: torch.Tensor, path: str | Path, fps: float = 8.0, crf: int = 18) -> Path:
    """Encode ``frames [F, 3, H, W]`` as H.264 (yuv420p, so every player opens it). H and W are padded to even."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(frames)
    h, w = arr.shape[1] + arr.shape[1] % 2, arr.shape[2] + arr.shape[2] % 2
    arr = np.pad(arr, ((0, 0), (0, h - arr.shape[1]), (0, w - arr.shape[2]), (0, 0)), mode="edge")
    tmp = path.with_name(f".{path.name}.tmp")  # never leave half a video under the real name
    with av.open(str(tmp), mode="w", format="mp4") as container:
        from fractions import Fraction

        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in arr:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    tmp.replace(path)
    return path


def write_gif(frames: torch.Tensor, path: str | Path, fps: float = 8.0) -> Path:
    """``frames [F, 3, H, W]`` as a looping gif."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in to_uint8(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def contact_sheet(videos: torch.Tensor, max_frames: int = 8) -> np.ndarray:
    """``videos [N, 3, F, H, W]`` -> one uint8 image, a row per video, ``max_frames`` evenly spaced frames per row."""
    n, _, f, h, w = videos.shape
    idx = torch.linspace(0, f - 1, min(f, max_frames)).round().long()
    rows = to_uint8(videos[:, :, idx].permute(0, 2, 1, 3, 4))  # [N, k, H, W, 3]
    return rows.transpose(0, 2, 1, 3, 4).reshape(n * h, len(idx) * w, 3)


def save_png(image: np.ndarray | torch.Tensor, path: str | Path) -> Path:
    """A uint8 ``[H, W, 3]`` array, or a ``[3, H, W]`` tensor in [-1, 1], as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image) if isinstance(image, torch.Tensor) else image).save(path)
    return path


def read_video(path: str | Path) -> tuple[torch.Tensor, float]:
    """Decode a whole video (for tests and evaluation, not training): ``[F, 3, H, W]`` in [-1, 1] and its fps."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
        fps = float(stream.average_rate or stream.guessed_rate)
    return torch.stack(frames).permute(0, 3, 1, 2).float() / 127.5 - 1, fps
