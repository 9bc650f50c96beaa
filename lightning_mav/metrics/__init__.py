"""FVD, video IS, CLIPSIM, frame FID / IS and the analytic Moving Shapes metrics, as torchmetrics.

Nothing here downloads: I3D, C3D, CLIP and Inception weights come from local paths. Frame FID / IS need the
optional ``torch-fidelity`` package when used with Inception weights (importing them does not).
"""

from lightning_mav.metrics.c3d import C3D, TorchScriptC3D, load_c3d
from lightning_mav.metrics.clipsim import CLIPSIM
from lightning_mav.metrics.extension import ExtrapolationScore, constant_velocity_guess, extension_errors
from lightning_mav.metrics.frames import FrameFID, FrameInceptionScore
from lightning_mav.metrics.fvd import FrechetVideoDistance, frechet_distance, resize_video
from lightning_mav.metrics.i3d import InceptionI3d, TorchScriptI3D, load_i3d
from lightning_mav.metrics.real_stats import real_stats_key, real_stats_path
from lightning_mav.metrics.shapes import (
    ShapesFaithfulness,
    TemporalCoherence,
    detect_object,
    interpolation_psnr,
    parse_prompt,
    psnr,
    sr_psnr,
)
from lightning_mav.metrics.video_is import VideoInceptionScore, c3d_clips, inception_score

__all__ = [
    "C3D",
    "CLIPSIM",
    "ExtrapolationScore",
    "FrameFID",
    "FrameInceptionScore",
    "FrechetVideoDistance",
    "InceptionI3d",
    "ShapesFaithfulness",
    "TemporalCoherence",
    "TorchScriptC3D",
    "TorchScriptI3D",
    "VideoInceptionScore",
    "c3d_clips",
    "constant_velocity_guess",
    "detect_object",
    "extension_errors",
    "frechet_distance",
    "inception_score",
    "interpolation_psnr",
    "load_c3d",
    "load_i3d",
    "parse_prompt",
    "psnr",
    "real_stats_key",
    "real_stats_path",
    "resize_video",
    "sr_psnr",
]
