"""FVD: the Fréchet distance itself, the I3D network and its loader, the metric's states, DDP exactness, the cached
real statistics."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor, nn

from lightning_mav.metrics import (
    FrechetVideoDistance,
    InceptionI3d,
    TorchScriptI3D,
    frechet_distance,
    load_i3d,
    real_stats_path,
)
from tests.helpers import run_ddp

pytestmark = pytest.mark.usefixtures("one_thread")


def _videos(n: int, seed: int, frames: int = 16, size: int = 32) -> Tensor:
    """``n`` smooth-ish random videos ``[n, 3, frames, size, size]`` in [-1, 1].

    Tiny clips keep I3D cheap on CPU (the reference uses 16 frames at 224x224).
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 8, 8, generator=g) * 2 - 1
    return nn.functional.interpolate(coarse, size=(frames, size, size), mode="trilinear", align_corners=False)


def _i3d(seed: int = 0) -> InceptionI3d:
    torch.manual_seed(seed)
    return InceptionI3d().eval()


def _scipy_fd(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The textbook computation (as in the TTUR / StyleGAN-V code): general sqrtm of the product."""
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    for d, n in ((8, 50), (64, 300)):
        a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.5
        mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
        mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
        ours = frechet_distance(*(torch.from_numpy(t) for t in (mu1, s1, mu2, s2)))
        assert ours.dtype == torch.float64
        assert float(ours) == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-6)
    # Identical Gaussians: zero, also when the covariance is singular (fewer samples than dimensions).
    x = torch.from_numpy(rng.normal(size=(10, 40)))
    mu, sigma = x.mean(0), torch.cov(x.T)
    assert abs(float(frechet_distance(mu, sigma, mu, sigma))) < 1e-8


def test_i3d_random_weights_give_400_features_for_16_frames() -> None:
    net = _i3d()
    x = _videos(2, seed=1)
    with torch.no_grad():
        logits = net(x)
        features = net.features(x)
    assert logits.shape == (2, 400, 1)  # 16 frames -> one temporal logit step, as at 224x224
    assert features.shape == (2, 400)
    assert torch.isfinite(features).all()
    assert (features[0] - features[1]).abs().max() > 1e-3  # random weights still see the input


def test_state_dict_layout_and_roundtrip(tmp_path: Path) -> None:
    net = _i3d()
    state = net.state_dict()
    # The pytorch-i3d port's names.
    for key in ("Conv3d_1a_7x7.conv3d.weight", "Conv3d_1a_7x7.bn.running_var", "Mixed_3b.b0.conv3d.weight",
                "Mixed_5c.b3b.bn.bias", "logits.conv3d.weight", "logits.conv3d.bias"):
        assert key in state
    assert state["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 3, 7, 7, 7)
    assert state["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1)
    # Old checkpoints lack BatchNorm's counter: still loads.
    path = tmp_path / "rgb_test.pt"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    loaded = load_i3d(path)
    assert isinstance(loaded, InceptionI3d) and not loaded.training
    assert loaded.weights_source.startswith("state_dict:rgb_test.pt:sha256=")
    x = _videos(1, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), net.features(x))
    # A DataParallel-style prefix is stripped.
    torch.save({"module." + k: v for k, v in state.items()}, path)
    assert isinstance(load_i3d(path), InceptionI3d)


def test_wrong_keys_give_a_clear_error(tmp_path: Path) -> None:
    state = _i3d().state_dict()
    state["Mixed_3b.branch0.weight"] = state.pop("Mixed_3b.b0.conv3d.weight")
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="pytorch-i3d layout") as err:
        load_i3d(path)
    assert "missing: Mixed_3b.b0.conv3d.weight" in str(err.value)
    assert "unexpected: Mixed_3b.branch0.weight" in str(err.value)
    # A different number of classes (e.g. Charades' 157) names the shape problem.
    torch.save(InceptionI3d(num_classes=157).state_dict(), path)
    with pytest.raises(ValueError, match=r"wrong shape: logits.conv3d.weight \(157, 1024, 1, 1, 1\)"):
        load_i3d(path)


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "i3d_torchscript.pt"
    with pytest.raises(FileNotFoundError, match=f"I3D weights not found at {missing}"):
        load_i3d(missing)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        FrechetVideoDistance(str(missing))


class _FakeDetector(nn.Module):
    """Stands in for StyleGAN-V's TorchScript I3D: same call signature, checks how it is called."""

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        if x.dtype != torch.uint8 or not (rescale and resize and return_features):
            raise RuntimeError("called unlike StyleGAN-V")
        return x.float().mean(dim=(1, 2)).flatten(1)  # [B, H*W]: 400 for 20x20 frames


def test_torchscript_detector_is_loaded_and_called_like_stylegan_v(tmp_path: Path) -> None:
    path = tmp_path / "i3d_torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated, but the detector is TorchScript
        torch.jit.save(torch.jit.script(_FakeDetector()), str(path))
    net = load_i3d(path)
    assert isinstance(net, TorchScriptI3D)
    assert net.weights_source.startswith("torchscript:i3d_torchscript.pt:sha256=")
    videos = torch.rand(3, 3, 4, 20, 20) * 2 - 1
    expected = (videos * 127.5 + 128).clamp(0, 255).to(torch.uint8).float().mean(dim=(1, 2)).flatten(1)
    torch.testing.assert_close(net.features(videos), expected)
    # Through the metric: the detector resizes itself, so the metric's 224 resize is not applied.
    fvd = FrechetVideoDistance(path)
    fvd.update(videos, real=True)
    fvd.update(videos, real=False)
    assert abs(float(fvd.compute())) < 1e-6  # features ~100: covariance trace ~1e6
    assert fvd.report()["weights_source"] == net.weights_source


def test_fvd_is_zero_on_identical_sets_and_grows_with_noise() -> None:
    fvd = FrechetVideoDistance(_i3d(), resize=None, reset_real_features=False)
    real = _videos(6, seed=3)
    fvd.update(real, real=True)
    fvd.update(real, real=False)
    assert abs(float(fvd.compute())) < 1e-9
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(4))
    scores = []
    for sigma in (0.1, 0.3, 1.0):
        fvd.reset()  # keeps the real statistics
        assert int(fvd.real_count) == 6 and int(fvd.fake_count) == 0
        fvd.update((real + sigma * noise).clamp(-1, 1), real=False)
        scores.append(float(fvd.compute()))
    assert 0 < scores[0] < scores[1] < scores[2], scores
    report = fvd.report()
    assert report["fvd"] == pytest.approx(scores[2]) and report["num_real"] == 6 and report["num_fake"] == 6
    assert report["weights_source"] == "module:InceptionI3d"


def test_fvd_of_an_independent_real_split_is_near_zero_and_grows_with_noise() -> None:
    fvd = FrechetVideoDistance(_i3d(), resize=None, max_samples=None, reset_real_features=False)
    real, other_real = _videos(24, seed=10), _videos(24, seed=11)  # two independent draws of the same "data"
    fvd.update(real, real=True)
    fvd.update(other_real, real=False)
    independent = float(fvd.compute())
    noise = torch.randn(other_real.shape, generator=torch.Generator().manual_seed(12))
    scores = []
    for sigma in (0.2, 0.4, 0.8):
        fvd.reset()  # keeps the real statistics
        fvd.update((other_real + sigma * noise).clamp(-1, 1), real=False)
        scores.append(float(fvd.compute()))
    # Sampling noise alone gives a small positive FVD; corrupted videos are far away, and farther the more noise.
    assert 0 < independent < 0.2 * scores[0], (independent, scores)
    assert scores[0] < scores[1] < scores[2], scores


class _MeanFeatures(nn.Module):
    """A cheap feature network: per-channel, per-frame means -> [B, 3 * F]."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(3, 4)).flatten(1)


def test_states_are_sums_and_max_samples_stops_counting() -> None:
    videos = torch.rand(7, 3, 4, 8, 8) * 2 - 1
    fvd = FrechetVideoDistance(_MeanFeatures(), num_features=12, resize=(6, 6), max_samples=5)
    fvd.update(videos[:4], real=True)
    fvd.update(videos[4:], real=True)  # only one more is counted
    assert int(fvd.real_count) == 5
    # Bilinear resize is per channel, so channels x frames can be resized as one image stack.
    resized = nn.functional.interpolate(videos[:5].flatten(1, 2), size=(6, 6), mode="bilinear", align_corners=False)
    features = resized.mean(dim=(2, 3)).double()  # [5, 3 * 4], (channel, frame) order like _MeanFeatures
    torch.testing.assert_close(fvd.real_sum, features.sum(0))
    torch.testing.assert_close(fvd.real_outer_sum, features.T @ features)
    # States do not grow with the number of samples.
    assert fvd.real_outer_sum.shape == (12, 12)
    with pytest.raises(RuntimeError, match="needs >= 2 real and >= 2 generated"):
        fvd.compute()
    with pytest.raises(ValueError, match=r"expected videos \[B, 3, F, H, W\]"):
        fvd.update(videos[:, 0], real=False)


def _ddp_worker(rank: int, world: int, videos: tuple[Tensor, Tensor]) -> dict:
    fvd = FrechetVideoDistance(_i3d(), resize=None, max_samples=None)
    # Interleaved shards, as a DistributedSampler hands them out.
    fvd.update(videos[0][rank::world], real=True)
    fvd.update(videos[1][rank::world], real=False)
    capped = FrechetVideoDistance(_MeanFeatures(), num_features=3 * 8, resize=None, max_samples=5)
    capped.update(videos[0][rank::world], real=True)
    result = {"fvd": fvd.report()}
    with capped.sync_context():
        result["capped_real"] = int(capped.real_count)
    return result


def test_ddp_two_processes_match_one() -> None:
    real, fake = _videos(6, seed=5, frames=8, size=16), _videos(6, seed=6, frames=8, size=16)
    single = FrechetVideoDistance(_i3d(), resize=None, max_samples=None)
    single.update(real, real=True)
    single.update(fake, real=False)
    expected = float(single.compute())

    for result in run_ddp(_ddp_worker, (real, fake), world_size=2):
        # The reduction of float64 sums is exact; float32 I3D features may differ in the last bits between
        # batch sizes / thread counts, hence not 1e-12.
        assert result["fvd"]["fvd"] == pytest.approx(expected, rel=1e-5)
        assert result["fvd"]["num_real"] == 6 and result["fvd"]["num_fake"] == 6
        assert result["capped_real"] == 5  # 3 + 2: max_samples is a global count under DDP


# ---------------------------------------------------------------------------------------------- cached real stats
class _Counting(nn.Module):
    """Wraps a feature network, counting the videos it sees; keeps its ``weights_source``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.weights_source: str = inner.weights_source
        self.videos = 0

    def features(self, x: Tensor) -> Tensor:
        self.videos += x.shape[0]
        return self.inner.features(x)


def _i3d_file(path: Path, seed: int) -> Path:
    """A random I3D saved as a state dict: its ``weights_source`` names the file and its sha256."""
    torch.save(_i3d(seed).state_dict(), path)
    return path


def _unreadable() -> Iterator[Tensor]:
    """Real batches that must not be read."""
    raise AssertionError("real videos were read although their statistics are cached")
    yield  # a generator: nothing runs until it is iterated


def test_real_statistics_are_computed_once_then_loaded(tmp_path: Path) -> None:
    weights = _i3d_file(tmp_path / "i3d.pt", seed=0)
    real, fake = _videos(8, seed=20, frames=8, size=16), _videos(6, seed=21, frames=8, size=16)
    clips = {"resolution": 16, "num_frames": 8, "sampling": {"data": "synthetic", "offset": "first frame"}}

    first_net = _Counting(load_i3d(weights))
    first = FrechetVideoDistance(first_net, resize=None, max_samples=None)
    key = first.real_stats_key(**clips)
    assert json.loads(key) == {"detector": first_net.weights_source, "resolution": [16, 16], "num_frames": 8,
                               "sampling": {"data": "synthetic", "offset": "first frame"}, "resize": None,
                               "max_samples": None}
    assert "sha256=" in json.loads(key)["detector"]
    path = real_stats_path(tmp_path / "cache", key)
    assert first.load_or_compute_real_stats(path, iter([real[:5], real[5:]]), **clips) is False
    assert first_net.videos == 8 and path.is_file() and first.real_stats_file == str(path)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    first.update(fake, real=False)
    fvd_first = float(first.compute())
    plain = FrechetVideoDistance(load_i3d(weights), resize=None, max_samples=None)
    plain.update(real, real=True)
    plain.update(fake, real=False)
    assert fvd_first == pytest.approx(float(plain.compute()), abs=1e-10)

    # Second run: loaded; the detector sees only the generated videos.
    second_net = _Counting(load_i3d(weights))
    second = FrechetVideoDistance(second_net, resize=None, max_samples=None)
    assert second.load_or_compute_real_stats(path, _unreadable(), **clips) is True
    assert second_net.videos == 0 and second.real_stats_file == str(path)
    second.update(fake, real=False)
    assert second_net.videos == 6
    assert float(second.compute()) == pytest.approx(fvd_first, abs=1e-10)
    assert second.report()["num_real"] == 8 and second.report()["num_fake"] == 6
    second.reset()  # the loaded statistics stay
    second.update(fake, real=False)
    assert float(second.compute()) == pytest.approx(fvd_first, abs=1e-10)
    with pytest.raises(RuntimeError, match="real statistics come from"):
        second.update(real, real=True)

    # Another key (clip sampling, frame count, detector weights, sample cap) is another file, and this file is
    # refused, not used.
    other_weights = _i3d_file(tmp_path / "i3d_other.pt", seed=1)
    others = [
        (FrechetVideoDistance(load_i3d(weights), resize=None, max_samples=None),
         {**clips, "sampling": {"data": "synthetic", "offset": "random"}}),
        (FrechetVideoDistance(load_i3d(weights), resize=None, max_samples=None), {**clips, "num_frames": 16}),
        (FrechetVideoDistance(load_i3d(other_weights), resize=None, max_samples=None), clips),
        (FrechetVideoDistance(load_i3d(weights), resize=None, max_samples=2048), clips),
    ]
    for metric, other_clips in others:
        other_key = metric.real_stats_key(**other_clips)
        assert other_key != key and real_stats_path(tmp_path / "cache", other_key) != path
        with pytest.raises(ValueError, match="holds FVD real statistics for another key") as err:
            metric.load_or_compute_real_stats(path, _unreadable(), **other_clips)
        assert str(path) in str(err.value) and other_key in str(err.value) and "\n" not in str(err.value)
        assert metric.real_stats_file is None and int(metric.real_count) == 0
    # Batches that do not match the key are refused before anything is written.
    wrong = tmp_path / "cache" / "wrong.pt"
    with pytest.raises(ValueError, match=r"do not match the cache key \(8 frames of 32x32\)"):
        FrechetVideoDistance(load_i3d(weights), resize=None).load_or_compute_real_stats(
            wrong, iter([real]), **{**clips, "resolution": 32})
    assert not wrong.exists()


def test_real_statistics_file_is_written_atomically_and_checked(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fvd = FrechetVideoDistance(_MeanFeatures(), num_features=12, resize=None)
    fvd.update(torch.rand(5, 3, 4, 8, 8) * 2 - 1, real=True)
    key = fvd.real_stats_key(resolution=8, num_frames=4, sampling="every clip from frame 0")
    path = fvd.save_real_stats(tmp_path / "real.pt", key)
    written = path.read_bytes()

    def torn_save(obj: object, f: str, *args: object, **kwargs: object) -> None:
        Path(f).write_bytes(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        fvd.save_real_stats(path, key)  # over an existing file: it stays whole
    with pytest.raises(OSError, match="disk full"):
        fvd.save_real_stats(tmp_path / "new.pt", key)  # a new file: none appears
    monkeypatch.undo()
    assert path.read_bytes() == written and list(tmp_path.iterdir()) == [path]

    loaded = FrechetVideoDistance(_MeanFeatures(), num_features=12, resize=None)
    loaded.load_real_stats(path, key)
    for a, b in zip(loaded.real_gaussian(), fvd.real_gaussian(), strict=True):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    with pytest.raises(FileNotFoundError, match="FVD real statistics not found at"):
        loaded.load_real_stats(tmp_path / "missing.pt", key)
    bad = tmp_path / "bad.pt"
    for content, message in (
        (lambda: bad.write_text("not statistics"), "is not an FVD real-statistics file"),
        (lambda: torch.save({"mean": torch.zeros(12)}, bad), "is not an FVD real-statistics file"),
        (lambda: torch.save({**torch.load(path, weights_only=True), "mean": torch.zeros(3)}, bad), "malformed"),
    ):
        content()
        with pytest.raises(ValueError, match=message) as err:
            loaded.load_real_stats(bad, key)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


def _ddp_cache_worker(rank: int, world: int, real: Tensor, fake: Tensor, path: str) -> dict:
    fvd = FrechetVideoDistance(_MeanFeatures(), num_features=3 * 8, resize=None, max_samples=None)
    loaded = fvd.load_or_compute_real_stats(path, iter([real[rank::world]]), resolution=16, num_frames=8,
                                            sampling="all")
    fvd.update(fake[rank::world], real=False)
    return {"loaded": loaded, **fvd.report()}


def test_ddp_real_statistics_cache_matches_one_process(tmp_path: Path) -> None:
    real, fake = _videos(7, seed=30, frames=8, size=16), _videos(6, seed=31, frames=8, size=16)
    single = FrechetVideoDistance(_MeanFeatures(), num_features=3 * 8, resize=None, max_samples=None)
    single.update(real, real=True)
    single.update(fake, real=False)
    expected = float(single.compute())
    path = str(tmp_path / "real.pt")
    for loaded in (False, True):  # computed by both ranks and written by rank 0, then loaded by both
        for result in run_ddp(_ddp_cache_worker, real, fake, path, world_size=2):
            assert result["loaded"] is loaded
            assert result["fvd"] == pytest.approx(expected, rel=1e-9)
            assert result["num_real"] == 7 and result["num_fake"] == 6


# ---------------------------------------------------------------------------------------------- frame FID / IS
class _FrameStats(nn.Module):
    """A cheap frame feature network on uint8 frames ``[N, 3, H, W]`` -> per-channel mean and std ``[N, 6]``."""

    num_features = 6

    def forward(self, x: Tensor) -> Tensor:
        assert x.dtype == torch.uint8
        x = x.float()
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_frame_fid_needs_local_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_mav.metrics import frames

    with pytest.raises(ValueError, match="need a local Inception weights file"):
        frames.FrameFID()
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match=f"Inception weights not found at {missing}"):
        frames.FrameFID(missing)
    with pytest.raises(FileNotFoundError, match="never download"):
        frames.FrameInceptionScore(missing)
    missing.write_bytes(b"")
    monkeypatch.setattr(frames, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        frames.FrameFID(missing)


def test_frame_fid_and_is_count_every_frame() -> None:
    from lightning_mav.metrics.frames import FrameFID, FrameInceptionScore, video_frames_uint8

    videos = torch.rand(3, 3, 4, 16, 16) * 2 - 1
    frames = video_frames_uint8(videos)
    assert frames.shape == (12, 3, 16, 16) and frames.dtype == torch.uint8
    torch.testing.assert_close(frames[5], ((videos[1, :, 1] + 1) * 127.5).round().to(torch.uint8))
    fid = FrameFID(feature=_FrameStats())
    fid.update(videos, real=True)
    fid.update(videos, real=False)
    assert int(fid.real_features_num_samples) == 12
    assert abs(float(fid.compute())) < 1e-3
    fid.update(videos.flip(0).clamp(-1, 0), real=False)  # darker frames: farther away
    assert float(fid.compute()) > 1.0
    score = FrameInceptionScore(feature=_FrameStats(), splits=2)
    score.update(videos)
    mean, _ = score.compute()
    assert sum(f.shape[0] for f in score.features) == 12 and float(mean) >= 1.0
