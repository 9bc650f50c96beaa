"""FVD, CLIPSIM, frame FID / IS and the analytic Moving Shapes metrics, as torchmetrics.

Nothing here downloads: I3D, CLIP and Inception weights come from local paths. Frame FID / IS need the
optional ``torch-fidelity`` package when used with Inception weights (importing them does not).
"""

from lightning_mav.metrics.clipsim import CLIPSIM
from lightning_mav.metrics.frames import FrameFID, FrameInceptionScore
from lightning_mav.metrics.fvd import FrechetVideoDistance, frechet_distance, resize_video
from lightning_mav.metrics.i3d import InceptionI3d, TorchScriptI3D, load_i3d
from lightning_mav.metrics.shapes import (
    ShapesFaithfulness,
    TemporalCoherence,
    detect_object,
    interpolation_psnr,
    parse_prompt,
    psnr,
    sr_psnr,
)

__all__ = [
    "CLIPSIM",
    "FrameFID",
    "FrameInceptionScore",
    "FrechetVideoDistance",
    "InceptionI3d",
    "ShapesFaithfulness",
    "TemporalCoherence",
    "TorchScriptI3D",
    "detect_object",
    "frechet_distance",
    "interpolation_psnr",
    "load_i3d",
    "parse_prompt",
    "psnr",
    "resize_video",
    "sr_psnr",
]
