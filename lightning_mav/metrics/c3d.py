"""C3D fine-tuned on UCF-101: the classifier behind the video Inception Score that video papers report on UCF-101.

The protocol (TGAN, Saito et al. 2017; TGANv2, Saito et al. 2020; StyleGAN-V, Skorokhodov et al. 2022, whose
``c3d_ucf101.pt`` is a TorchScript copy of TGANv2's Chainer model) classifies 16-frame clips with C3D v1.0
(Tran et al. 2015) fine-tuned on UCF-101 (the Caffe ``c3d_ucf101_finetune_whole_iter_20000`` weights, 101 classes).

``C3D`` follows TGANv2's ``C3DVersion1UCF101`` (pfnet-research/tgan2, ``tgan2/models/c3d/c3d_ucf101.py``):

- the preprocessing is part of the network: RGB -> BGR (the Caffe weights saw BGR frames), every frame resized to
  112x112 by bilinear interpolation with aligned corners (Chainer's ``resize_images`` default; no crop, so
  non-square frames are squashed), then ``128 * x + offset`` for x in [-1, 1], where ``offset = 128 - mean`` and
  ``mean`` is the UCF-101 mean clip ``[3 (BGR), 16, 112, 112]`` (TGAN's ``mean2.npz``, its [8:120, 8:120] crop):
  the convolutions see pixel values on a 0..256 scale minus the per-pixel, per-frame mean;
- eight 3x3x3 convolutions (stride 1, padding 1), each followed by ReLU; max pools of (1, 2, 2) after conv1a and
  (2, 2, 2) after conv2a, conv3b, conv4b and conv5b. Chainer pools with ``cover_all=True`` (PyTorch's
  ``ceil_mode=True``), so the last pool takes 7x7 to 4x4 and fc6 reads 512 x 1 x 4 x 4 = 8192 values, flattened
  in (channel, time, height, width) order;
- fc6 and fc7 (4096, ReLU; their dropout is off at evaluation), fc8 (101 logits) and a softmax.

MAGVIT's independent JAX port of the same model (google-research/magvit, ``videogvt``'s UCF-101 Inception Score)
agrees: BGR flip, aligned-corner resize to 112x112, a stored per-pixel offset for the mean, one-pixel padding
before the last pool (it scales [0, 1] frames by 255 where TGANv2 scales [-1, 1] by 128). The original TGAN
evaluation script differs (frames resized to 128x128 with OpenCV's bicubic interpolation, the mean subtracted, then
the centre 112x112 crop); that variant is not implemented here.

The call is that of StyleGAN-V's detector: ``C3D()(videos)`` takes uint8-range RGB videos ``[B, 3, 16, H, W]``
(values 0..255, any H and W) and returns class probabilities ``[B, 101]``, so a ``C3D`` saved with
``torch.jit.save(torch.jit.script(C3D()), path)`` is a file of the same kind as ``c3d_ucf101.pt``. How that file
maps uint8 back to TGANv2's [-1, 1] input is inside the TorchScript and could not be checked here; ``C3D`` uses
``u / 127.5 - 1``: the centre of the interval of x that StyleGAN-V's truncating ``x * 127.5 + 128`` sends to u.

``load_c3d(path)`` reads StyleGAN-V's TorchScript file or a state dict of ``C3D`` (same layer names as the Chainer
and Caffe models, conv1a ... fc8, plus the ``offset`` buffer), from a local file only: nothing is downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mav.metrics.detector_files import check_state_keys, file_digest, is_torchscript, unwrap_state_dict

__all__ = ["C3D", "C3D_FRAMES", "C3D_SIZE", "TorchScriptC3D", "load_c3d"]

C3D_FRAMES = 16  # the network's clip length: fc6 and the mean clip are sized for exactly 16 frames
C3D_SIZE = 112  # frame side after the network's own resize

# UCF-101 channel means in BGR order (TGANv2 keeps them as a commented-out alternative to the per-pixel mean clip);
# they fill ``offset`` until real weights replace it with the full clip.
UCF101_BGR_MEAN = (90.25164795, 97.65701294, 101.4083252)


class C3D(nn.Module):
    """TGANv2's UCF-101 C3D with its preprocessing; ``forward(videos) -> probabilities [B, num_classes]``.

    Args:
        num_classes: fc8's width (101 UCF-101 actions).

    ``forward`` takes RGB videos ``[B, 3, 16, H, W]`` with values 0..255 (uint8, or a float tensor on that scale).
    The stages are public for inspection: ``preprocess`` -> ``[B, 3, 16, 112, 112]``, ``trunk`` ->
    ``[B, 512, 1, 4, 4]``, ``logits`` -> ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 101) -> None:
        super().__init__()
        self.num_classes = num_classes
        # Plain int attributes (TorchScript compiles them as constants of the module; globals it cannot read).
        self.num_frames, self.size = C3D_FRAMES, C3D_SIZE
        self.conv1a = nn.Conv3d(3, 64, 3, padding=1)
        self.conv2a = nn.Conv3d(64, 128, 3, padding=1)
        self.conv3a = nn.Conv3d(128, 256, 3, padding=1)
        self.conv3b = nn.Conv3d(256, 256, 3, padding=1)
        self.conv4a = nn.Conv3d(256, 512, 3, padding=1)
        self.conv4b = nn.Conv3d(512, 512, 3, padding=1)
        self.conv5a = nn.Conv3d(512, 512, 3, padding=1)
        self.conv5b = nn.Conv3d(512, 512, 3, padding=1)
        self.fc6 = nn.Linear(512 * 1 * 4 * 4, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, num_classes)
        mean = torch.tensor(UCF101_BGR_MEAN).view(3, 1, 1, 1).expand(3, C3D_FRAMES, C3D_SIZE, C3D_SIZE)
        self.register_buffer("offset", 128.0 - mean.clone())

    def preprocess(self, videos: Tensor) -> Tensor:
        """RGB ``[B, 3, 16, H, W]`` in 0..255 -> the convolutions' input ``[B, 3 (BGR), 16, 112, 112]``."""
        if videos.dim() != 5 or videos.shape[1] != 3 or videos.shape[2] != self.num_frames:
            raise ValueError("C3D expects videos [B, 3, 16, H, W] with values 0..255, got shape "
                             + str(list(videos.shape)))
        x = videos.float() / 127.5 - 1.0  # back to TGANv2's [-1, 1] input
        x = x.flip(1) * 128.0  # TGANv2's 1x1 "pre" convolution: RGB -> BGR, times 128
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        frames = F.interpolate(frames, size=(self.size, self.size), mode="bilinear", align_corners=True)
        x = frames.reshape(b, t, c, self.size, self.size).transpose(1, 2)
        return x + self.offset

    def trunk(self, x: Tensor) -> Tensor:
        """Preprocessed ``[B, 3, 16, 112, 112]`` -> conv5b's pooled output ``[B, 512, 1, 4, 4]``."""
        x = F.max_pool3d(F.relu(self.conv1a(x)), (1, 2, 2), ceil_mode=True)
        x = F.max_pool3d(F.relu(self.conv2a(x)), 2, ceil_mode=True)
        x = F.max_pool3d(F.relu(self.conv3b(F.relu(self.conv3a(x)))), 2, ceil_mode=True)
        x = F.max_pool3d(F.relu(self.conv4b(F.relu(self.conv4a(x)))), 2, ceil_mode=True)
        return F.max_pool3d(F.relu(self.conv5b(F.relu(self.conv5a(x)))), 2, ceil_mode=True)

    def logits(self, x: Tensor) -> Tensor:
        """Preprocessed ``[B, 3, 16, 112, 112]`` -> fc8 logits ``[B, num_classes]``."""
        x = self.trunk(x).flatten(1)
        return self.fc8(F.relu(self.fc7(F.relu(self.fc6(x)))))

    def forward(self, videos: Tensor) -> Tensor:
        """RGB ``[B, 3, 16, H, W]`` in 0..255 -> class probabilities ``[B, num_classes]`` (float32)."""
        return F.softmax(self.logits(self.preprocess(videos)), dim=1)


class TorchScriptC3D(nn.Module):
    """StyleGAN-V's TorchScript C3D (``c3d_ucf101.pt``) behind ``C3D``'s interface.

    StyleGAN-V calls it with no options on uint8 videos ``[B, 3, 16, H, W]`` and reads the output as class
    probabilities ``[B, 101]``; this wrapper does the same (the file resizes to 112x112 itself).
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, videos: Tensor) -> Tensor:
        """uint8 RGB ``[B, 3, 16, H, W]`` -> class probabilities ``[B, 101]``."""
        return self.detector(videos)


def load_c3d(path: str | Path, num_classes: int = 101) -> C3D | TorchScriptC3D:
    """Load the UCF-101 C3D from a local file, in eval mode, with gradients off. Never downloads.

    Args:
        path: StyleGAN-V's TorchScript detector (``c3d_ucf101.pt``, read with ``torch.jit.load``) or a state dict
            of ``C3D`` (read with ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` wrapper and
            DataParallel ``module.`` prefixes are accepted).
        num_classes: fc8's width for a state dict.

    Returns:
        The network, with ``weights_source`` set to ``"<kind>:<file name>:sha256=<16 hex>"``.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a file of another kind, or a state dict whose keys or shapes do not match (one line).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"C3D weights not found at {path} (the video Inception Score never downloads; "
                                f"pass a local file such as StyleGAN-V's c3d_ucf101.pt)")
    expected = "StyleGAN-V's TorchScript c3d_ucf101.pt or a state dict of lightning_mav.metrics.c3d.C3D"
    net: C3D | TorchScriptC3D
    if is_torchscript(path):
        try:
            net = TorchScriptC3D(torch.jit.load(str(path), map_location="cpu"))
        except RuntimeError as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path} looks like TorchScript but does not load (expected {expected}): "
                             f"{first_line}") from err
        kind = "torchscript"
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as err:
            raise ValueError(f"{path} is not {expected} (torch.load failed: {type(err).__name__})") from err
        try:
            state = unwrap_state_dict(obj)
        except ValueError as err:
            raise ValueError(f"{path} is not {expected} (it holds a {type(obj).__name__})") from err
        net = C3D(num_classes=num_classes)
        check_state_keys(net, state, path, "a state dict of lightning_mav.metrics.c3d.C3D (keys conv1a.weight ... "
                         "fc8.bias, offset)")
        net.load_state_dict(state)
        kind = "state_dict"
    net.weights_source = f"{kind}:{path.name}:sha256={file_digest(path)}"
    return net.eval().requires_grad_(False)
