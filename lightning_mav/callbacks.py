"""Callbacks that are ours: sample media, gradient norm, data skip counts and a batch-size function for
Lightning's ``ThroughputMonitor``. Everything else (checkpointing, EMA, LR, throughput) is Lightning's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.callbacks import Callback, EMAWeightAveraging
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from lightning_mav import media


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a data batch, for ``ThroughputMonitor(batch_size_fn=lightning_mav.callbacks.batch_size)``."""
    for key in ("video", "image"):
        if key in batch:
            return int(batch[key].shape[0])
    return len(batch["key"])


def frames_per_batch(batch: dict[str, Any]) -> int:
    """Frames in a batch (``length_fn`` for ThroughputMonitor: frames/s is the number video people compare)."""
    if "video" in batch:
        return int(batch["video"].shape[0] * batch["video"].shape[1])
    return batch_size(batch)


class MediaLogger(Callback):
    """Every ``every_n_steps`` optimizer steps, on rank 0, ask the stage for samples (``pl_module.log_media()``:
    ``{name: images [N,3,H,W] | videos [N,3,F,H,W]}`` in [-1, 1]) and write them to TensorBoard and to
    ``<log_dir>/media/`` (PNG for images, mp4 + PNG contact sheet for videos).

    Samples come from the EMA weights when an ``EMAWeightAveraging`` callback is present (its averaged copy of the
    module), in eval mode, without gradients; the training weights are never touched.
    """

    def __init__(self, every_n_steps: int = 500, fps: float = 8.0, on_train_end: bool = True) -> None:
        self.every_n_steps = every_n_steps
        self.fps = fps
        self.at_train_end = on_train_end
        self._last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._maybe_log(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the stages keep their media conditioning from the first validation batch: log as soon as it exists
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._maybe_log(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.log_media(trainer, pl_module)

    def _maybe_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        due = self._last_step < 0 or step - self._last_step >= self.every_n_steps
        if self.every_n_steps > 0 and step > 0 and due:
            self.log_media(trainer, pl_module)

    @staticmethod
    def _sampling_module(trainer: pl.Trainer, pl_module: pl.LightningModule) -> pl.LightningModule:
        for cb in trainer.callbacks:
            if isinstance(cb, EMAWeightAveraging) and getattr(cb, "_average_model", None) is not None:
                return cb._average_model.module  # a full copy of the module holding the averaged weights
        return pl_module

    @rank_zero_only
    def log_media(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = self._sampling_module(trainer, pl_module)
        if not hasattr(module, "log_media"):
            return
        if module is not pl_module and getattr(pl_module, "_media_batch", None) is not None:
            module.set_media_batch(pl_module._media_batch)  # the EMA copy predates the kept validation batch
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                items = module.log_media()
        finally:
            module.train(was_training)
        if not items:  # nothing to sample from yet (no validation batch seen): try again at the next chance
            return
        self._last_step = trainer.global_step
        out = Path(trainer.log_dir or trainer.default_root_dir) / "media"
        writer = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        step = trainer.global_step
        for name, x in items.items():
            x = x.detach().float().cpu()
            if x.ndim == 4:  # images [N,3,H,W]
                if writer is not None:
                    writer.add_images(f"samples/{name}", (x.clamp(-1, 1) + 1) / 2, step)
                grid = torchvision.utils.make_grid(x, nrow=8, padding=1, pad_value=-1)
                media.save_png(grid, out / f"{name}_step{step:07d}.png")
            else:  # videos [N,3,F,H,W]
                if writer is not None:
                    writer.add_video(f"samples/{name}", (x.permute(0, 2, 1, 3, 4).clamp(-1, 1) + 1) / 2, step,
                                     fps=self.fps)
                media.save_png(media.contact_sheet(x), out / f"{name}_step{step:07d}.png")
                media.write_mp4(x[0].permute(1, 0, 2, 3), out / f"{name}_step{step:07d}.mp4", fps=self.fps)
        if writer is not None:
            writer.flush()


class GradNormLogger(Callback):
    """Logs the total 2-norm of the gradients before each optimizer step as ``train/grad_norm``."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)


class SkipCountLogger(Callback):
    """Logs how many samples the data pipeline skipped, per reason, as ``data/skipped/<reason>`` (totals over
    all workers of this rank; corrupt samples never stop training, but they must never go unseen either)."""

    def __init__(self) -> None:
        from datamodules.shards import SkipTally

        self.tally = SkipTally()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        totals = self.tally.update(batch)
        for reason, count in totals.items():
            # per-rank totals, summed over ranks; `repaired_*` reasons count samples that were kept
            pl_module.log(f"data/skipped/{reason}", float(count), on_step=True, on_epoch=False, reduce_fx="sum",
                          sync_dist=True)
