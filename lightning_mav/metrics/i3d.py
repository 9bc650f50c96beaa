"""I3D (Inception-v1 inflated to 3-D, Kinetics-400), the feature network behind FVD.

``InceptionI3d`` follows Carreira & Zisserman, "Quo Vadis, Action Recognition?" (2017), with TensorFlow's
'SAME' padding computed at run time, and a state-dict layout identical to the widely used PyTorch port
(piergiaj/pytorch-i3d): ``Conv3d_1a_7x7.conv3d.weight``, ``Conv3d_1a_7x7.bn.running_mean``,
``Mixed_3b.b0.conv3d.weight``, ``Mixed_5c.b3b.bn.bias``, ``logits.conv3d.weight``, ``logits.conv3d.bias`` ...
so its released ``rgb_imagenet.pt`` loads as is.

``load_i3d(path)`` reads either such a state dict or StyleGAN-V's TorchScript detector (the reference
tf.hub I3D traced to TorchScript), from a local file only: nothing is ever downloaded.

Input videos are ``[B, 3, T, H, W]`` in [-1, 1] (the reference's scaling); FVD features are the 400 logits
averaged over time, ``InceptionI3d.features(x) -> [B, 400]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mav.metrics.detector_files import check_state_keys, file_digest, is_torchscript, unwrap_state_dict

__all__ = ["InceptionI3d", "TorchScriptI3D", "load_i3d"]


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding for one axis as (front, back): output size is ceil(size / stride)."""
    if size % stride == 0:
        total = max(kernel - stride, 0)
    else:
        total = max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> Tensor:
    """Zero-pad ``x [B, C, T, H, W]`` so a VALID conv/pool behaves like TF 'SAME'."""
    (pt0, pt1), (ph0, ph1), (pw0, pw1) = (
        _same_padding(s, k, st) for s, k, st in zip(x.shape[2:], kernel, stride)
    )
    return F.pad(x, (pw0, pw1, ph0, ph1, pt0, pt1))


class Unit3D(nn.Module):
    """Conv3d (no bias) -> BatchNorm3d -> ReLU with 'SAME' padding; the logits layer uses bias, no BN/ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        batch_norm: bool = True,
        activation: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.activation = kernel, stride, activation
        # padding=0 here: the 'SAME' padding depends on the input size, so it is added in forward.
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=0, bias=bias)
        # eps / momentum of the TF original (and of the port's checkpoints).
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if batch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C_in, T, H, W] -> [B, C_out, ceil(T/s_t), ceil(H/s_h), ceil(W/s_w)]``."""
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    """Max pooling with 'SAME' padding.

    Zero padding equals TF's -inf padding here because every pool follows a ReLU (inputs are >= 0).
    """

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, T, H, W] -> [B, C, ceil(T/s_t), ceil(H/s_h), ceil(W/s_w)]``."""
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1->3x3 | 1x1->3x3 | maxpool->1x1.

    ``widths = (b0, b1a, b1b, b2a, b2b, b3b)``; output channels ``b0 + b1b + b2b + b3b``.
    """

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(in_channels, w0)
        self.b1a = Unit3D(in_channels, w1a)
        self.b1b = Unit3D(w1a, w1b, kernel=(3, 3, 3))
        self.b2a = Unit3D(in_channels, w2a)
        # The original uses 3x3x3 here (not Inception-v1's 5x5); kept for weight compatibility.
        self.b2b = Unit3D(w2a, w2b, kernel=(3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, w3b)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C_in, T, H, W] -> [B, out_channels, T, H, W]``."""
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1
        )


class InceptionI3d(nn.Module):
    """Inception-v1 I3D; submodule names match the PyTorch port so its state dicts load unchanged.

    Args:
        num_classes: logits width (400 for Kinetics-400, the FVD network).
        in_channels: 3 for RGB.

    ``forward(x [B, 3, T, H, W] in [-1, 1]) -> logits [B, num_classes, T']`` per time step (T' = T/8 - 1 at
    the 224x224, T >= 16 reference input); ``features(x) -> [B, num_classes]`` averages them over time, as
    the reference FVD does. Inputs smaller than 224x224 (tests) also work: the final average pool shrinks
    to the feature map when the map is smaller than its (2, 7, 7) window.
    """

    def __init__(self, num_classes: int = 400, in_channels: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, kernel=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, kernel=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(192, (64, 96, 128, 16, 32, 32))
        self.Mixed_3c = InceptionModule(256, (128, 128, 192, 32, 96, 64))
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = InceptionModule(480, (192, 96, 208, 16, 48, 64))
        self.Mixed_4c = InceptionModule(512, (160, 112, 224, 24, 64, 64))
        self.Mixed_4d = InceptionModule(512, (128, 128, 256, 24, 64, 64))
        self.Mixed_4e = InceptionModule(512, (112, 144, 288, 32, 64, 64))
        self.Mixed_4f = InceptionModule(528, (256, 160, 320, 32, 128, 128))
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionModule(832, (256, 160, 320, 32, 128, 128))
        self.Mixed_5c = InceptionModule(832, (384, 192, 384, 48, 128, 128))
        # No dropout module: it has no weights and FVD only runs the network in eval mode.
        self.logits = Unit3D(1024, num_classes, batch_norm=False, activation=False, bias=True)
        self._init_weights()

    def _init_weights(self) -> None:
        """He-normal convs: with PyTorch's default init the signal fades through the ~20 layers (features
        of a random network vary ~1e-7 between inputs), which makes random-weight smoke runs meaningless."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def trunk(self, x: Tensor) -> Tensor:
        """``[B, 3, T, H, W] -> [B, 1024, T/8, H/32, W/32]`` (Mixed_5c output, sizes rounded up)."""
        for name, module in self.named_children():
            if name == "logits":
                break
            x = module(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, 3, T, H, W]`` in [-1, 1] -> per-time-step logits ``[B, num_classes, T']``."""
        x = self.trunk(x)
        # Reference head: VALID average pool over (2, 7, 7), stride 1; clamped for small test inputs.
        window = tuple(min(k, s) for k, s in zip((2, 7, 7), x.shape[2:]))
        x = self.logits(F.avg_pool3d(x, window, stride=1))
        return x.mean(dim=(3, 4))  # spatial squeeze (1x1 at 224x224; a mean for larger inputs)

    def features(self, x: Tensor) -> Tensor:
        """FVD features: ``x [B, 3, T, H, W]`` in [-1, 1] -> logits averaged over time ``[B, num_classes]``."""
        return self.forward(x).mean(dim=2)


class TorchScriptI3D(nn.Module):
    """StyleGAN-V's TorchScript I3D detector behind the same ``features`` interface as ``InceptionI3d``.

    The detector takes uint8-range videos ``[B, 3, T, H, W]`` and, called with ``rescale=True,
    resize=True, return_features=True``, maps them to [-1, 1], resizes to 224x224 and returns the 400
    pre-softmax features averaged over time. So this wrapper quantises [-1, 1] input to uint8 exactly
    as StyleGAN-V does and does not need the caller to resize (``resizes_input = True``).
    """

    resizes_input = True

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def features(self, x: Tensor) -> Tensor:
        """``x [B, 3, T, H, W]`` in [-1, 1], any H, W -> ``[B, 400]``."""
        x = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
        return self.detector(x, rescale=True, resize=True, return_features=True)

    def forward(self, x: Tensor) -> Tensor:
        """Same as ``features``."""
        return self.features(x)


def load_i3d(path: str | Path, num_classes: int = 400) -> InceptionI3d | TorchScriptI3D:
    """Load I3D weights from a local file, in eval mode, with gradients off. Never downloads.

    Args:
        path: either a state dict in the pytorch-i3d layout (``.pt``/``.pth``, read with
            ``torch.load(weights_only=True)``), or StyleGAN-V's TorchScript detector (``torch.jit.load``).
        num_classes: logits width of the state dict (400 = Kinetics-400).

    Returns:
        The network, with ``weights_source`` set to ``"<kind>:<file name>:sha256=<16 hex>"``.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the state dict's keys or shapes do not match (lists a few of each).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights not found at {path} (FVD never downloads; pass a local file)")
    net: InceptionI3d | TorchScriptI3D
    if is_torchscript(path):
        net = TorchScriptI3D(torch.jit.load(str(path), map_location="cpu"))
        kind = "torchscript"
    else:
        try:
            state = unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"{path} is neither an I3D state dict nor a TorchScript file: {err}") from err
        net = InceptionI3d(num_classes=num_classes)
        check_state_keys(net, state, path, "an InceptionI3d state dict in the pytorch-i3d layout (keys like "
                         "Conv3d_1a_7x7.conv3d.weight, Mixed_3b.b0.conv3d.weight, logits.conv3d.weight)")
        net.load_state_dict(state, strict=False)  # keys verified above; only num_batches_tracked may lack
        kind = "state_dict"
    net.weights_source = f"{kind}:{path.name}:sha256={file_digest(path)}"
    return net.eval().requires_grad_(False)
