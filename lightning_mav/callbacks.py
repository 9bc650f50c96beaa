"""Callbacks that are ours: sample media, gradient norm, data skip counts, a batch-size function for Lightning's
``ThroughputMonitor``, EMA with a warm-up of its decay (Lightning's ``EMAWeightAveraging`` underneath), a
``ModelCheckpoint`` whose ``last.ckpt`` is always the run's final step, and two fault-handling pieces:
``ExceptionCheckpoint`` (a checkpoint when a run dies, without Lightning's implicit resume) and ``AtomicCheckpointIO``
(checkpoint files that a kill can never leave half-written). Everything else (LR, throughput) is Lightning's own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torchvision
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.callbacks import EMAWeightAveraging as LightningEMA
from pytorch_lightning.callbacks import ModelCheckpoint as LightningModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.trainer.states import TrainerFn, TrainerStatus
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor

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


class EMAWeightAveraging(LightningEMA):
    """Lightning's ``EMAWeightAveraging`` whose decay warms up: after ``n`` updates the average moves with
    ``min(decay, (1 + n) / (10 + n))`` (TensorFlow's ``num_updates`` rule, as in latent-diffusion's ``LitEma``).

    Why: a constant decay of 0.999 leaves ``0.999^600 = 55%`` of the *initial* weights in the average after 600
    steps, and the average is what validation, media, ``last.ckpt`` (its ``state_dict``) and so every child stage
    and the pipeline use: a short run (the demo, a fine-tuning) would hand on mostly untrained weights. With the
    warm-up the average follows the weights early and settles to ``decay`` after about ``10 / (1 - decay)`` updates.
    ``warmup: false`` gives Lightning's constant decay.

    Frozen parameters (``requires_grad=False``: a stage's CLIP, D_t's spatial layers under ``freeze_spatial``) are
    not copied: the average holds the live tensors themselves and skips them in the update, since their average is
    the tensor. At the paper's scale that is a CLIP ViT-H (~1B parameters) neither doubled in memory nor averaged
    every step. Everything else (swapping for validation, checkpoint layout, resume) is Lightning's.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        self._kwargs["avg_fn"] = None  # AveragedModel: multi_avg_fn updates all tensors with foreach kernels
        self._kwargs["multi_avg_fn"] = _ema_update(decay, warmup)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            # Lightning's weight averaging keeps a whole copy of the module, which FSDP's sharded parameters cannot
            # update ("sharded models do not work with weight averaging"): off, said once, instead of a crash
            rank_zero_warn("EMAWeightAveraging is off under FSDP (Lightning's weight averaging does not support "
                           "sharded models): validation, media and checkpoints use the training weights")
            return
        super().setup(trainer, pl_module, stage)
        if self._average_model is not None:
            share_frozen_parameters(self._average_model.module, pl_module)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return self._average_model is not None and super().should_update(step_idx, epoch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:  # None: off under FSDP
            super().on_train_end(trainer, pl_module)


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also writes ``last.ckpt`` (``save_last``) at the run's final step.

    Why: Lightning writes ``last.ckpt`` every ``every_n_train_steps`` and at the end of training only if it never
    wrote one, so a run whose ``max_steps`` is not a multiple of the interval ends with ``last.ckpt`` from before
    its last steps, and ``last.ckpt`` is what every child stage (``init_from``), the pipeline and the evaluation load:
    a 360-step run with a checkpoint every 100 steps would hand on its step-300 weights
    (docs/choices.md#checkpoints-the-final-step-is-saved).
    The extra save happens after the last optimizer step, as the periodic ones do: before ``EMAWeightAveraging``
    copies the average into the model at ``on_train_end``, so the checkpoint keeps both the average (``state_dict``)
    and the training weights (``current_model_state``) a resume with a larger ``max_steps`` needs.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = 0 < trainer.max_steps <= trainer.global_step
        if self.save_last and final and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def share_frozen_parameters(average: torch.nn.Module, current: torch.nn.Module) -> int:
    """Puts ``current``'s frozen parameters in place of their copies in ``average`` (a deep copy); returns how many."""
    live = dict(current.named_parameters())
    shared = 0
    for name, _ in list(average.named_parameters()):
        if not live[name].requires_grad:
            owner, _, attr = name.rpartition(".")
            setattr(average.get_submodule(owner), attr, live[name])
            shared += 1
    return shared


def _ema_update(decay: float, warmup: bool) -> Callable[[list[Tensor], list[Tensor], Tensor | int], None]:
    """AveragedModel's ``multi_avg_fn``: decay ``min(decay, (1 + n) / (10 + n))`` (or ``decay``), shared tensors kept."""
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor | int) -> None:
        n = int(num_averaged)  # updates so far (AveragedModel's n_averaged)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        pairs = [(a, c) for a, c in zip(averaged, current) if a.data_ptr() != c.data_ptr()]  # shared: frozen
        floats = [(a, c) for a, c in pairs if a.is_floating_point()]
        if floats:  # d * a + (1 - d) * c, not lerp: a + w * (c - a) turns a constant -inf (attention masks) into NaN
            torch._foreach_mul_([a for a, _ in floats], d)
            torch._foreach_add_([a for a, _ in floats], [c for _, c in floats], alpha=1 - d)
        for a, c in pairs:  # integer buffers (counters) are copied, as torch's EMA does
            if not a.is_floating_point():
                a.copy_(c)

    return update


def run_dir(trainer: pl.Trainer) -> Path:
    """The run folder (``runs/<stage>``): the first logger's ``log_dir``, else ``default_root_dir``.

    Not ``trainer.log_dir``: that broadcasts from rank 0, a collective, which deadlocks DDP when called from code
    that runs on rank 0 only (media logging).
    """
    for lg in trainer.loggers:
        log_dir = getattr(lg, "log_dir", None)
        if log_dir:
            return Path(log_dir)
    return Path(trainer.default_root_dir)


class MediaLogger(Callback):
    """Every ``every_n_steps`` optimizer steps, on rank 0, ask the stage for samples (``pl_module.log_media()``:
    ``{name: images [N,3,H,W] | videos [N,3,F,H,W]}`` in [-1, 1]) and write them to TensorBoard and to
    ``<log_dir>/media/`` (PNG for images, mp4 + PNG contact sheet for videos).

    Samples come from the EMA weights when an ``EMAWeightAveraging`` callback is present (its averaged copy of the
    module), in eval mode, without gradients; the training weights are never touched. None under FSDP (said once).
    """

    def __init__(self, every_n_steps: int = 500, fps: float = 8.0, on_train_end: bool = True) -> None:
        self.every_n_steps = every_n_steps
        self.fps = fps
        self.at_train_end = on_train_end
        self._last_step = -1
        self._fsdp_said = False

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
            if isinstance(cb, LightningEMA) and getattr(cb, "_average_model", None) is not None:
                return cb._average_model.module  # a full copy of the module holding the averaged weights
        return pl_module

    @rank_zero_only
    def log_media(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            # rank 0 alone cannot run a sharded model (its forward gathers the weights from every rank)
            if not self._fsdp_said:
                rank_zero_warn("MediaLogger: no samples under FSDP; sample from the checkpoint with `mav generate`")
            self._fsdp_said = True
            return
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
        # fast_dev_run has no run folder (Lightning swaps the logger out): sample, but leave no files in the cwd
        out = None if trainer.fast_dev_run else run_dir(trainer) / "media"
        writer = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        step = trainer.global_step
        for name, x in items.items():
            x = x.detach().float().cpu()
            if x.ndim == 4:  # images [N,3,H,W]
                if writer is not None:
                    writer.add_images(f"samples/{name}", (x.clamp(-1, 1) + 1) / 2, step)
                if out is not None:
                    grid = torchvision.utils.make_grid(x, nrow=8, padding=1, pad_value=-1)
                    media.save_png(grid, out / f"{name}_step{step:07d}.png")
            else:  # videos [N,3,F,H,W]
                if writer is not None:
                    writer.add_video(f"samples/{name}", (x.permute(0, 2, 1, 3, 4).clamp(-1, 1) + 1) / 2, step,
                                     fps=self.fps)
                if out is not None:
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
    """Logs how many samples the data pipeline skipped, per reason, as ``data/skipped/<reason>``: totals over all
    workers and all ranks (corrupt samples never stop training, but they must never go unseen either).

    Each rank meets its own corrupt samples, so ranks hold different reasons: the totals are gathered as one object
    at logging steps (every ``log_every_n_steps``) and rank 0 logs the sums. A per-reason ``sync_dist`` instead would
    issue different collectives on different ranks and hang DDP.
    """

    def __init__(self) -> None:
        from datamodules.skips import SkipTally

        self.tally = SkipTally()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        totals = self.tally.update(batch)
        if not trainer._logger_connector.should_update_logs:  # the same decision on every rank
            return
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            every: list[dict[str, int] | None] = [None] * trainer.world_size
            torch.distributed.all_gather_object(every, totals)
            totals = {}
            for rank_totals in every:
                for reason, count in (rank_totals or {}).items():
                    totals[reason] = totals.get(reason, 0) + count
        for reason, count in sorted(totals.items()):  # `repaired_*` reasons count samples that were kept
            pl_module.log(f"data/skipped/{reason}", float(count), on_step=True, on_epoch=False, rank_zero_only=True)


class ExceptionCheckpoint(Callback):
    """Saves ``<dirpath>/<filename>.ckpt`` when a run dies on an exception (Ctrl-C, a non-finite loss with
    ``nonfinite: stop``, out of memory, ...): the state at that moment, for a post-mortem or an explicit
    ``--ckpt_path runs/<stage>/checkpoints/on_exception.ckpt``. It is removed after the next successful ``fit``.

    It never writes ``last.ckpt``: that stays the last periodic checkpoint, known good, which ``--ckpt_path last``
    resumes. And unlike Lightning's ``OnExceptionCheckpoint``, being configured does not make every ``fit`` resume:
    Lightning 2.x turns ``ckpt_path=None`` into ``"last"`` (the newest of on_exception.ckpt and last.ckpt) whenever an
    ``OnExceptionCheckpoint`` is present, so a fresh run of a stage would silently continue its old run (and stop at
    once, its ``max_steps`` reached), or load a crashed run's state into a changed architecture.

    Args:
        dirpath: folder of the file; ``"auto"``: beside the run's other checkpoints (``runs/<stage>/checkpoints``).
        filename: file name without ``.ckpt``; anything but ``last``.
    """

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str = "auto", filename: str = "on_exception") -> None:
        if not filename or filename == "last":
            raise ValueError(f"ExceptionCheckpoint: filename {filename!r} would replace a periodic checkpoint")
        self.dirpath, self.filename = dirpath, filename

    def ckpt_path(self, trainer: pl.Trainer) -> str:
        dirpath = self.dirpath
        if dirpath == "auto":
            dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or \
                os.path.join(run_dir(trainer), "checkpoints")
        return os.path.join(dirpath, self.filename + self.FILE_EXTENSION)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        path = self.ckpt_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"{type(exception).__name__}: saved the state at step {trainer.global_step} to {path}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning calls teardown only when the run ends without an exception: an older crash's file is stale now
        # (a fast_dev_run smoke test leaves the real run's files alone)
        if stage == TrainerFn.FITTING and trainer.state.status != TrainerStatus.INTERRUPTED \
                and not trainer.fast_dev_run:
            trainer.strategy.remove_checkpoint(self.ckpt_path(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing local checkpoints so that a kill at any moment leaves the previous
    file or the new one, never a torn one: the bytes go to a temporary file *in the target's folder*, are flushed to
    disk (fsync), and the file is renamed over the target (``os.replace``, atomic within a filesystem).

    Lightning's own save goes through an fsspec transaction whose temporary file lives in ``$TMPDIR``: where that is
    another filesystem than the run folder (tmpfs, a node-local /tmp under a network-mounted ``runs/``), the final
    step is a copy onto ``last.ckpt``, and a kill during the copy truncates it. Remote URLs (``s3://`` ...) keep
    Lightning's path. Temporary files left by a killed writer are removed by the next save of the same file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        fs, local = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        target = Path(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "xb") as f:  # "x": a fresh file with the usual (umask) permissions
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)  # the rename itself survives a power cut
        _remove_stale_temporaries(target)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary files of ``target`` whose writer process is gone (killed mid-save)."""
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            pid = int(tmp.name[len(target.name) + 2:].split(".")[0])
            os.kill(pid, 0)  # raises if no such process: the writer died
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue  # not ours, or a live process of another user
