"""lightning_mav.callbacks.EMAWeightAveraging: Lightning's EMA with the decay warm-up min(decay, (1+n)/(10+n))."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from lightning_mav.callbacks import EMAWeightAveraging
from tests.helpers import fit


def averaged_model(callback: EMAWeightAveraging, model: nn.Module) -> AveragedModel:
    return AveragedModel(model, use_buffers=True, **callback._kwargs)  # what WeightAveraging.setup builds


def test_decay_warms_up_then_settles() -> None:
    model = nn.Linear(1, 1, bias=False)
    model.register_buffer("count", torch.tensor(0))
    ema = averaged_model(EMAWeightAveraging(decay=0.9), model)
    expected = None
    for step in range(60):
        with torch.no_grad():
            model.weight.fill_(float(step))
            model.count.fill_(step)
        n = int(ema.n_averaged)
        ema.update_parameters(model)
        # n = 0 copies; then a lerp towards the current weights with 1 - min(decay, (1 + n) / (10 + n))
        expected = float(step) if expected is None else expected + (1 - min(0.9, (1 + n) / (10 + n))) * (step - expected)
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
        assert ema.module.count.item() == step  # integer buffers follow the model


def test_constant_infinite_buffers_stay_infinite() -> None:
    """CLIP's causal attention mask is a buffer of -inf: averaging it must not make NaNs."""
    model = nn.Module()
    model.register_buffer("mask", torch.full((2, 2), float("-inf")).triu(1))
    ema = averaged_model(EMAWeightAveraging(decay=0.999), model)
    for _ in range(3):
        ema.update_parameters(model)
    assert torch.equal(ema.module.mask, model.mask)


def test_short_run_average_is_mostly_trained_weights() -> None:
    """600 updates: a constant 0.999 keeps 55% of the initial weights, the warm-up under 2%."""
    start, trained = torch.zeros(1), torch.ones(1)
    results = {}
    for warmup in (True, False):
        model = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(start)
        ema = averaged_model(EMAWeightAveraging(decay=0.999, warmup=warmup), model)
        ema.update_parameters(model)  # the first update copies the start
        with torch.no_grad():
            model.weight.copy_(trained)
        for _ in range(599):
            ema.update_parameters(model)
        results[warmup] = ema.module.weight.item()
    assert results[False] == pytest.approx(1 - 0.999 ** 599, abs=1e-4)  # Lightning's constant decay: 0.45
    assert results[True] > 0.98


class FrozenPart(pl.LightningModule):
    """A trainable layer after a frozen one, as a stage after its frozen CLIP."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen, self.head = nn.Linear(4, 4), nn.Linear(4, 1)
        self.frozen.requires_grad_(False)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.head(self.frozen(batch)).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def fit_frozen_part(tmp_path, callbacks: list) -> FrozenPart:
    torch.manual_seed(0)
    module = FrozenPart()
    trainer = fit(module, torch.utils.data.DataLoader(torch.randn(20, 4), batch_size=4), steps=5,
                  callbacks=callbacks, default_root_dir=tmp_path,
                  accelerator="auto", devices="auto")  # the Trainer's defaults here, not fit's one CPU
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    return module


def test_frozen_parameters_are_shared_not_averaged(tmp_path) -> None:
    torch.manual_seed(0)
    start = FrozenPart()
    raw = fit_frozen_part(tmp_path, [])
    callback = EMAWeightAveraging(decay=0.9)
    module = fit_frozen_part(tmp_path, [callback])
    average = callback._average_model.module
    assert average.frozen.weight is module.frozen.weight and average.frozen.bias is module.frozen.bias
    assert average.head.weight is not module.head.weight
    ckpt = torch.load(tmp_path / "ema.ckpt", weights_only=True)
    assert torch.equal(ckpt["state_dict"]["frozen.weight"], start.frozen.weight)  # bit for bit: never averaged
    averaged = ckpt["state_dict"]["head.weight"]
    assert not torch.equal(averaged, raw.head.weight) and not torch.equal(averaged, start.head.weight)
