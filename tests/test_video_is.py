"""Video Inception Score: the IS formula against the reference code's, the C3D network and its loader, the clip
conversion, and DDP exactness. Real C3D weights are never needed: random-init C3Ds in the real file formats."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lightning_mav.metrics import C3D, TorchScriptC3D, VideoInceptionScore, c3d_clips, inception_score, load_c3d
from tests.helpers import run_ddp

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantised(videos: Tensor) -> Tensor:
    """StyleGAN-V's uint8 conversion, written out independently of c3d_clips."""
    return torch.floor(torch.clamp(videos * 127.5 + 128, 0, 255)).to(torch.uint8)


def _videos_of_pixel(values: Tensor, frames: int = 16, size: int = 2) -> Tensor:
    """Videos ``[N, 3, frames, size, size]`` in [-1, 1] whose every pixel quantises to ``values[i]`` (0..255)."""
    x = (values.double() - 128 + 0.5) / 127.5  # the middle of the uint8 bin: robust to round-off
    return x.view(-1, 1, 1, 1, 1).expand(-1, 3, frames, size, size).float().contiguous()


class _PixelClassifier(nn.Module):
    """A perfectly confident classifier: the class is the clip's first uint8 pixel value."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def forward(self, clips: Tensor) -> Tensor:
        self.seen.append((tuple(clips.shape), clips.dtype))
        return nn.functional.one_hot(clips[:, 0, 0, 0, 0].long(), self.num_classes).float()


class _ConstantClassifier(nn.Module):
    """The same prediction for every clip."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.probs = torch.softmax(torch.randn(num_classes, generator=torch.Generator().manual_seed(0)), dim=0)

    def forward(self, clips: Tensor) -> Tensor:
        return self.probs.expand(clips.shape[0], -1)


class _MeanSoftmax(nn.Module):
    """A cheap, batch-independent stand-in for C3D: softmax of a fixed projection of per-frame channel means."""

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.proj = torch.randn(3 * 16, num_classes, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def forward(self, clips: Tensor) -> Tensor:
        features = clips.double().mean(dim=(3, 4)).flatten(1) / 32  # [B, 3 * 16]
        return torch.softmax(features @ self.proj, dim=1)


# ---------------------------------------------------------------------------------------------- the IS formula
def _stylegan_v_is(probs: np.ndarray, splits: int) -> tuple[float, float]:
    """StyleGAN-V's computation: rows shuffled in place by RandomState(42), consecutive splits, no epsilon."""
    probs = probs.copy()
    np.random.RandomState(42).shuffle(probs)
    n, scores = len(probs), []
    for i in range(splits):
        part = probs[i * n // splits:(i + 1) * n // splits]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


def _tganv2_is(probs: np.ndarray, splits: int, eps: float = 1e-20) -> tuple[float, float]:
    """TGANv2's computation: no shuffle, every probability + 1e-20."""
    n, scores = len(probs), []
    for i in range(splits):
        part = probs[i * n // splits:(i + 1) * n // splits] + eps
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_stylegan_v_and_tganv2() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(101, 0.2), size=53)  # peaked, like a trained classifier; 53: uneven splits
    assert (probs > 0).all()  # StyleGAN-V's logs have no epsilon: an exact zero would make its score NaN
    mean, std = inception_score(torch.from_numpy(probs), splits=10)
    assert mean.dtype == torch.float64
    ref_mean, ref_std = _stylegan_v_is(probs, 10)
    assert float(mean) == pytest.approx(ref_mean, rel=1e-12) and float(std) == pytest.approx(ref_std, rel=1e-10)
    mean, std = inception_score(torch.from_numpy(probs), splits=10, shuffle_seed=None)
    ref_mean, ref_std = _tganv2_is(probs, 10)
    assert float(mean) == pytest.approx(ref_mean, rel=1e-12) and float(std) == pytest.approx(ref_std, rel=1e-10)
    # The shuffle matters: without it the splits differ, and so does the score.
    assert float(mean) != pytest.approx(_stylegan_v_is(probs, 10)[0], rel=1e-6)
    # An exact zero probability: 0 log 0 = 0 (TGANv2's epsilon gives the same), not NaN.
    probs[:, 0] = 0
    probs /= probs.sum(axis=1, keepdims=True)
    mean, _ = inception_score(torch.from_numpy(probs), splits=5, shuffle_seed=None)
    assert float(mean) == pytest.approx(_tganv2_is(probs, 5)[0], rel=1e-12)
    with pytest.raises(ValueError, match="at least one video per split: 3 videos, 10 splits"):
        inception_score(torch.from_numpy(probs[:3]), splits=10)


def test_constant_classifier_scores_one() -> None:
    metric = VideoInceptionScore(_ConstantClassifier(101), splits=10)
    metric.update(torch.rand(12, 3, 16, 8, 8) * 2 - 1)
    metric.update(torch.rand(8, 3, 16, 8, 8) * 2 - 1)
    assert float(metric.compute()) == pytest.approx(1.0, abs=1e-12)
    report = metric.report()
    assert report["is_std"] == pytest.approx(0.0, abs=1e-12)
    assert report == {"is": report["is"], "is_std": report["is_std"], "splits": 10, "num_videos": 20,
                      "weights_source": "module:_ConstantClassifier"}


def test_confident_classifier_spread_evenly_scores_the_number_of_classes() -> None:
    classes, splits = 101, 10
    n = classes * splits
    # Labels arranged so that after the protocol's shuffle every split holds each class once.
    perm = np.random.RandomState(42).permutation(n)
    labels = torch.empty(n, dtype=torch.long)
    labels[torch.from_numpy(perm)] = torch.arange(n) % classes
    detector = _PixelClassifier(classes)
    metric = VideoInceptionScore(detector, splits=splits)
    for batch in _videos_of_pixel(labels).split(256):
        metric.update(batch)
    report = metric.report()
    assert report["is"] == pytest.approx(classes, rel=1e-12) and report["is_std"] == pytest.approx(0, abs=1e-9)
    assert report["num_videos"] == n
    assert detector.seen[0] == ((256, 3, 16, 2, 2), torch.uint8)
    # The same videos in label order: the shuffle leaves some classes twice and some absent in a split.
    plain = VideoInceptionScore(_PixelClassifier(classes), splits=splits)
    plain.update(_videos_of_pixel(torch.arange(n) % classes))
    assert 1 < float(plain.compute()) < classes - 10
    # One split: every class once per 101 videos whatever the order.
    single = VideoInceptionScore(_PixelClassifier(classes), splits=1)
    single.update(_videos_of_pixel(torch.arange(n) % classes))
    assert float(single.compute()) == pytest.approx(classes, rel=1e-12)


def test_detector_must_return_class_probabilities() -> None:
    class Logits(nn.Module):
        def forward(self, clips: Tensor) -> Tensor:
            return clips.float().mean(dim=(2, 3, 4))[:, :1].expand(-1, 7) - 100

    with pytest.raises(ValueError, match="did not return probabilities"):
        VideoInceptionScore(Logits(), num_classes=7).update(torch.zeros(2, 3, 16, 4, 4))
    with pytest.raises(ValueError, match=r"returned shape \(2, 7\), expected \(2, 101\)"):
        VideoInceptionScore(_MeanSoftmax(7)).update(torch.zeros(2, 3, 16, 4, 4))
    with pytest.raises(ValueError, match=r"expected videos \[B, 3, F, H, W\]"):
        VideoInceptionScore(_MeanSoftmax(7), num_classes=7).update(torch.zeros(2, 16, 4, 4))


def test_max_samples_stops_calling_the_detector() -> None:
    detector = _PixelClassifier(7)
    metric = VideoInceptionScore(detector, splits=2, max_samples=5, num_classes=7)
    metric.update(_videos_of_pixel(torch.tensor([0, 1, 2])))
    metric.update(_videos_of_pixel(torch.tensor([3, 4, 5, 6])))  # only two more count
    metric.update(_videos_of_pixel(torch.tensor([6])))  # full: the detector is not called
    assert [shape[0] for shape, _ in detector.seen] == [3, 2]
    assert metric.report()["num_videos"] == 5
    # Five distinct confident classes in splits of 2 and 3 videos: IS = mean(2, 3).
    assert float(metric.compute()) == pytest.approx(2.5, rel=1e-12)
    with pytest.raises(ValueError, match=r"max_samples \(1\) must be >= splits \(2\)"):
        VideoInceptionScore(detector, splits=2, max_samples=1)


# ---------------------------------------------------------------------------------------------- clip conversion
def test_clips_take_the_first_16_frames_and_stretch_short_videos() -> None:
    videos = torch.rand(2, 3, 20, 24, 40) * 2 - 1
    videos[0, 0, 0, 0, :3] = torch.tensor([-1.0, 0.0, 1.0])
    clips = c3d_clips(videos)
    assert clips.shape == (2, 3, 16, 24, 40) and clips.dtype == torch.uint8  # the detector resizes H, W itself
    torch.testing.assert_close(clips, _quantised(videos[:, :, :16]), rtol=0, atol=0)
    assert clips[0, 0, 0, 0, :3].tolist() == [0, 128, 255]
    # 8 frames -> 16: 'area' interpolation in time repeats each frame twice.
    short = torch.rand(1, 3, 8, 10, 12) * 2 - 1
    stretched = c3d_clips(short)
    assert stretched.shape == (1, 3, 16, 10, 12)
    torch.testing.assert_close(stretched, _quantised(short.repeat_interleave(2, dim=2)), rtol=0, atol=0)
    assert torch.equal(stretched[:, :, 0::2], stretched[:, :, 1::2])
    with pytest.raises(ValueError, match="expected float videos in"):
        c3d_clips(clips)


# ---------------------------------------------------------------------------------------------- C3D and its files
def test_c3d_layout_and_preprocessing() -> None:
    net = C3D().eval()
    state = net.state_dict()
    assert state["conv1a.weight"].shape == (64, 3, 3, 3, 3) and state["conv5b.weight"].shape == (512, 512, 3, 3, 3)
    assert state["fc6.weight"].shape == (4096, 8192) and state["fc8.weight"].shape == (101, 4096)
    assert state["offset"].shape == (3, 16, 112, 112)
    # Preprocessing: RGB -> BGR, aligned-corner bilinear resize to 112x112, 128 * x + offset.
    u = torch.randint(0, 256, (1, 3, 16, 40, 56), dtype=torch.uint8)
    x = net.preprocess(u)
    assert x.shape == (1, 3, 16, 112, 112)
    expected = 128 * (u.flip(1).float() / 127.5 - 1)
    for y, x_in in ((0, 0), (-1, -1)):  # align_corners=True keeps the corner pixels exactly
        torch.testing.assert_close(x[..., y, x_in], expected[..., y, x_in] + net.offset[..., y, x_in])
    # ... and maps output row 37 to input row 13 exactly (37 * 39 / 111 = 13; half-pixel centres would blend rows).
    torch.testing.assert_close(x[..., 37, 0], expected[..., 13, 0] + net.offset[..., 37, 0])
    with torch.no_grad():
        trunk = net.trunk(x)
    assert trunk.shape == (1, 512, 1, 4, 4)  # Chainer's cover_all pooling: 7 -> 4 at the last pool
    with pytest.raises(ValueError, match=r"C3D expects videos \[B, 3, 16, H, W\]"):
        net(u[:, :, :8])


class _Recording(nn.Module):
    """Passes clips to ``inner`` and records the shape and dtype it receives."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def forward(self, clips: Tensor) -> Tensor:
        self.seen.append((tuple(clips.shape), clips.dtype))
        return self.inner(clips)


def test_random_c3d_files_load_and_give_101_probabilities(tmp_path: Path) -> None:
    net = C3D().eval()
    clips = torch.randint(0, 256, (2, 3, 16, 112, 112), dtype=torch.uint8)
    with torch.no_grad():
        expected = net(clips)
    path = tmp_path / "c3d_ucf101.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated, but StyleGAN-V's detector is TorchScript
        torch.jit.save(torch.jit.script(net), str(path))
        metric = VideoInceptionScore(path, splits=1)  # load_c3d(path) inside
    detector = metric.detector
    assert isinstance(detector, TorchScriptC3D) and not detector.training
    assert detector.weights_source.startswith("torchscript:c3d_ucf101.pt:sha256=")
    with torch.no_grad():
        probs = detector(clips)
    assert probs.shape == (2, 101)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(probs, expected)

    # Through the metric: a short video of another size reaches the detector as 16 uint8 frames at its own size.
    recording = _Recording(detector)
    object.__setattr__(metric, "_detector", recording)
    metric.update(torch.rand(2, 3, 8, 64, 48) * 2 - 1)
    assert recording.seen == [((2, 3, 16, 64, 48), torch.uint8)]
    report = metric.report()
    assert report["num_videos"] == 2 and report["is"] >= 1.0
    assert report["weights_source"] == detector.weights_source
    del metric, detector, recording
    path.unlink()  # 300 MB

    # A state dict of C3D (in a checkpoint-style wrapper, DataParallel names) loads into C3D with the same weights.
    state_path = tmp_path / "c3d_state.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, state_path)
    loaded = load_c3d(state_path)
    assert isinstance(loaded, C3D) and loaded.weights_source.startswith("state_dict:c3d_state.pt:sha256=")
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    state_path.unlink()


def test_load_c3d_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "c3d_ucf101.pt"
    with pytest.raises(FileNotFoundError, match=f"C3D weights not found at {missing}") as err:
        load_c3d(missing)
    assert "never downloads" in str(err.value)
    with pytest.raises(FileNotFoundError, match="C3D weights not found"):
        VideoInceptionScore(missing)
    cases = {
        "notes.txt": (lambda p: p.write_text("not weights\n"), "torch.load failed"),
        "empty.pt": (lambda p: p.write_bytes(b""), "torch.load failed"),
        "list.pt": (lambda p: torch.save([1, 2, 3], p), "it holds a list"),
        "other.pt": (lambda p: torch.save({"Conv3d_1a_7x7.conv3d.weight": torch.zeros(1)}, p),
                     "missing: offset, conv1a.weight, conv1a.bias"),
    }
    for name, (write, detail) in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(ValueError) as err:
            load_c3d(path)
        message = str(err.value)
        assert str(path) in message and detail in message and "\n" not in message, message
        assert "c3d_ucf101.pt" in message or "C3D" in message


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, videos: Tensor) -> dict:
    full = VideoInceptionScore(_MeanSoftmax(), splits=3, num_classes=7)
    capped = VideoInceptionScore(_MeanSoftmax(), splits=3, max_samples=7, num_classes=7)
    shard = videos[rank::world]  # what an unshuffled DistributedSampler hands out
    for batch in (shard[:2], shard[2:]):
        full.update(batch)
        capped.update(batch)
    return {"full": full.report(), "full_compute": float(full.compute()), "capped": capped.report()}


def test_ddp_two_processes_match_one() -> None:
    videos = torch.rand(11, 3, 16, 6, 6) * 2 - 1  # 11: uneven shards (6 and 5)
    single = VideoInceptionScore(_MeanSoftmax(), splits=3, num_classes=7)
    single.update(videos)
    expected = single.report()
    capped = VideoInceptionScore(_MeanSoftmax(), splits=3, max_samples=7, num_classes=7)
    capped.update(videos)
    expected_capped = capped.report()
    # The order matters (it decides the splits): rank-by-rank concatenation would score differently.
    concatenated = VideoInceptionScore(_MeanSoftmax(), splits=3, num_classes=7)
    concatenated.update(torch.cat([videos[0::2], videos[1::2]]))
    assert float(concatenated.compute()) != pytest.approx(expected["is"], rel=1e-6)

    for result in run_ddp(_ddp_worker, videos, world_size=2):
        assert result["full"]["num_videos"] == 11 and result["capped"]["num_videos"] == 7
        assert result["full"]["is"] == pytest.approx(expected["is"], rel=1e-12)
        assert result["full"]["is_std"] == pytest.approx(expected["is_std"], rel=1e-9)
        assert result["full_compute"] == pytest.approx(expected["is"], rel=1e-12)
        assert result["capped"]["is"] == pytest.approx(expected_capped["is"], rel=1e-12)
