"""FVD, CLIPSIM and the analytic Moving Shapes metrics, as torchmetrics."""

from lightning_mav.metrics.fvd import FrechetVideoDistance, frechet_distance, resize_video
from lightning_mav.metrics.i3d import InceptionI3d, TorchScriptI3D, load_i3d

__all__ = [
    "FrechetVideoDistance",
    "InceptionI3d",
    "TorchScriptI3D",
    "frechet_distance",
    "load_i3d",
    "resize_video",
]
