"""init_from: a parent's tensors land, only expected new layers may be absent, anything else is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_mav.checkpoints import NEW_EXTRA_IN, NEW_TEMPORAL, CheckpointError, init_from, load_checkpoint


class Parent(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.norm = nn.GroupNorm(1, width)


class Child(Parent):
    def __init__(self, width: int = 4) -> None:
        super().__init__(width)
        self.temporal_conv = nn.Conv1d(width, width, 3)
        self.fps_mlp = nn.Linear(8, width)


def save_stage(module: nn.Module, path: Path, **extra: object) -> Path:
    torch.save({"state_dict": {f"unet.{k}": v for k, v in module.state_dict().items()}, **extra}, path)
    return path


def test_parent_weights_land_and_new_layers_are_reported(tmp_path: Path) -> None:
    parent, child = Parent(), Child()
    report = init_from(child, save_stage(parent, tmp_path / "d.ckpt"), NEW_TEMPORAL)
    assert report.ok and set(report.new) == {k for k in child.state_dict() if "temporal" in k or "fps_" in k}
    assert len(report.loaded) == len(parent.state_dict())
    assert torch.equal(child.conv.weight, parent.conv.weight)
    assert "4 loaded, 4 new" in report.summary()


def test_ema_weights_are_preferred(tmp_path: Path) -> None:
    ema, raw = Parent(), Parent()
    ckpt = save_stage(ema, tmp_path / "ema.ckpt",
                      current_model_state={f"unet.{k}": v for k, v in raw.state_dict().items()})
    child = Child()
    report = init_from(child, ckpt)
    assert report.source == "EMA state_dict" and torch.equal(child.conv.weight, ema.conv.weight)


def test_wrong_network_is_a_clear_error(tmp_path: Path) -> None:
    other = nn.Sequential(nn.Conv2d(3, 4, 3))  # e.g. an SR checkpoint given to D_t
    with pytest.raises(CheckpointError, match=r"not a parent of this network.*missing 4.*unexpected 2"):
        init_from(Child(), save_stage(other, tmp_path / "sr.ckpt"))
    with pytest.raises(CheckpointError, match=r"shape-mismatched 4.*conv.weight: checkpoint \(8, 3, 3, 3\)"):
        init_from(Child(4), save_stage(Parent(8), tmp_path / "wide.ckpt"))
    # new layers of the wrong kind (extra_in allowed, temporal not) are missing, not silently random
    with pytest.raises(CheckpointError, match="missing 4"):
        init_from(Child(), save_stage(Parent(), tmp_path / "d.ckpt"), NEW_EXTRA_IN)


def test_nan_parent_is_refused_but_infinite_masks_are_not(tmp_path: Path) -> None:
    parent = Parent()
    parent.register_buffer("mask", torch.full((2, 2), float("-inf")))  # like CLIP's causal attention mask
    child = Child()
    child.register_buffer("mask", torch.zeros(2, 2))
    assert init_from(child, save_stage(parent, tmp_path / "ok.ckpt")).ok
    with torch.no_grad():
        parent.conv.weight.add_(1.0)
        parent.norm.weight[0] = float("nan")
    before = child.conv.weight.clone()
    with pytest.raises(CheckpointError, match=r"nan.ckpt: 1 tensor\(s\) of its state_dict hold NaN \[norm.weight\]"):
        init_from(child, save_stage(parent, tmp_path / "nan.ckpt"))
    assert torch.equal(child.conv.weight, before)  # nothing loaded


def test_missing_file_names_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nope.ckpt — run `lightning fit"):
        init_from(Child(), tmp_path / "nope.ckpt", hint="run `lightning fit --config experiments/decoder.yaml`")


def test_safetensors_and_bare_state_dicts(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    parent = Parent()
    save_file(parent.state_dict(), str(tmp_path / "d.safetensors"))
    torch.save(parent.state_dict(), tmp_path / "d.pt")
    for name in ("d.safetensors", "d.pt"):
        child = Child()
        assert init_from(child, tmp_path / name).ok
        assert torch.equal(child.norm.weight, parent.norm.weight)


class Evil:
    def __reduce__(self):  # would run code when unpickled without weights_only
        return (print, ("pwned",))


def test_checkpoints_load_weights_only(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "payload": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "evil.ckpt")
    (tmp_path / "trunc.ckpt").write_bytes((tmp_path / "evil.ckpt").read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*trunc.ckpt"):
        load_checkpoint(tmp_path / "trunc.ckpt")


def test_missing_parent_of_the_chain_names_the_command_to_run_first(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"run `lightning fit --config experiments/decoder.yaml` first"):
        init_from(Child(), tmp_path / "runs" / "decoder" / "checkpoints" / "last.ckpt")
