"""What every stage shares: AdamW with linear warm-up, loss logging, the media hook, the frozen CLIP, init_from.

A stage subclass implements two methods and gets training, validation and media logging:

    compute_loss(batch, generator=None) -> (loss scalar, batch_size)
    media_from_batch(batch) -> {"name": images [N,3,H,W] | videos [N,3,F,H,W] in [-1, 1]}

``generator`` is None in training (fresh randomness) and seeded per batch in validation, so ``val/loss`` compares
checkpoints on the same noise and timesteps instead of on sampling luck.

Frozen CLIP (P and D stages): ``load_clip(clip_ckpt, clip_model)`` sets ``self.clip``; its tensors never enter this
stage's checkpoints (see ``on_save_checkpoint`` / ``on_load_checkpoint``) nor its optimizer (``requires_grad=False``).

Training randomness (noise, timesteps, dropped conditioning, crops) is reseeded at every batch from
``(seed_everything's seed, rank, global step, batch index)``: a run resumed from a checkpoint draws exactly the noise
the uninterrupted run would have drawn (nothing consumed by validation, media sampling or data loading between two
steps shifts it), and DDP ranks draw different noise. Without a global seed (``seed_everything: null``) training
keeps fresh randomness.

Non-finite losses: ``nonfinite="stop"`` (default) raises :class:`NonFiniteLossError` naming the step before
anything is back-propagated, so the model, its optimizer and the last checkpoint stay as they were;
``nonfinite="skip"`` returns None from ``training_step`` (Lightning then runs no backward and the optimizer has no
gradients to apply) and counts the skipped steps in ``train/nonfinite_skipped``. Under DDP the decision is taken
jointly (one rank's NaN reaches every rank through the gradient all-reduce anyway), so all ranks stop or skip
together instead of deadlocking.

FLOPs: ``flops_per_batch`` is counted by torch's ``FlopCounterMode`` on the first training batch (forward, loss and
backward: what the hardware really runs, recomputation under checkpointing included) and on the first validation
batch (forward); Lightning's ``ThroughputMonitor`` turns it into ``train/device/flops_per_sec`` and, on the GPUs it
knows (A100, H100, H200, ...), ``train/device/mfu``.

Media: the first validation batch (its first ``media_batch_size`` items) is kept on the CPU; the lead's media callback
calls :meth:`StageBase.log_media` under ``no_grad``/eval (and EMA weights when enabled), and the stage samples from
that fixed conditioning with a fixed seed, so successive images show the training progress and nothing else.
"""
from __future__ import annotations

import fnmatch
import inspect
import math
import os
import warnings
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from pytorch_lightning.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_mav.checkpoints import NEW_TEMPORAL, KeyReport, init_from, load_checkpoint

NonFinite = Literal["stop", "skip"]
LRSchedule = Literal["constant", "cosine"]


#: hyperparameters a stage records about itself, not options: a checkpoint's hparams hand them back to the
#: constructor (``load_from_checkpoint``), which ignores them
RECORDED_HPARAMS = ("parent_ckpt",)


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or infinite (``nonfinite="stop"``)."""


def step_seed(*parts: int | str) -> int:
    """A 63-bit seed from ints/strings, the same in every process (``hash()`` of a str is salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def _head(batch: Any, n: int) -> Any:
    """The first ``n`` items of a (nested) batch, tensors detached on the CPU."""
    if isinstance(batch, Tensor):
        return batch[:n].detach().cpu() if batch.dim() else batch.detach().cpu()
    if isinstance(batch, dict):
        return {k: _head(v, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch[:n])
    return batch


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


class StageBase(pl.LightningModule):
    """Base LightningModule of the stages.

    The options every stage shares, defined here once: each stage's ``__init__`` forwards ``**options`` to this one
    (LightningCLI still validates them and ``--print_config`` shows them under ``model.init_args``). The optimizer
    options left None take the stage's :attr:`optimizer_defaults`; the resolved values are saved in ``hparams``.

    Args:
        lr: peak learning rate (reached after ``warmup_steps``).
        weight_decay: AdamW decoupled weight decay, applied to matrices/kernels only (not biases, norms, embeddings
            of rank 1).
        betas: AdamW betas.
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr``, stepped every optimizer step.
        lr_schedule: after the warm-up, ``"constant"`` or ``"cosine"`` (half a cosine from ``lr`` to 0 at the
            trainer's ``max_steps``; a short run then ends on small steps instead of at full ``lr``).
        media_batch_size: how many validation items the media hook keeps and samples from.
        media_seed: seed of the media samples (same noise every time).
        nonfinite: what a NaN/Inf training loss does: ``"stop"`` raises :class:`NonFiniteLossError` (naming the
            step; the last checkpoint is left intact), ``"skip"`` skips that optimizer step and counts it in
            ``train/nonfinite_skipped``.
    """

    #: glob patterns (network-relative names) of the tensors a child stage adds to its parent's network:
    #: the only tensors ``init_from`` may find missing, and the only ones trained under ``freeze_spatial``.
    new_param_patterns: tuple[str, ...] = NEW_TEMPORAL
    #: stage options added after checkpoints were already saved, with the value those older checkpoints were
    #: trained with: ``on_load_checkpoint`` (called on resume, by ``load_from_checkpoint`` and by
    #: ``pipeline.load_stage``) applies them when a checkpoint's hyperparameters lack the key, so an old checkpoint
    #: behaves as it was trained, not as today's default.
    legacy_hparams: dict[str, Any] = {}
    #: the optimizer options a stage uses when its config leaves them unset (None)
    optimizer_defaults: dict[str, Any] = {"lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.99), "warmup_steps": 0}

    def __init__(
        self,
        lr: float | None = None,
        weight_decay: float | None = None,
        betas: tuple[float, float] | None = None,
        warmup_steps: int | None = None,
        lr_schedule: LRSchedule = "constant",
        media_batch_size: int = 4,
        media_seed: int = 0,
        nonfinite: NonFinite = "stop",
        **recorded: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(recorded) - set(RECORDED_HPARAMS))
        if unknown:  # the message Python gives for any other constructor (config errors name the key from it)
            raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument '{unknown[0]}'")
        given = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "warmup_steps": warmup_steps}
        lr, weight_decay, betas, warmup_steps = (self.optimizer_defaults[k] if v is None else v
                                                 for k, v in given.items())
        self._shared_options = {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas),
                                "warmup_steps": warmup_steps, "lr_schedule": lr_schedule,
                                "media_batch_size": media_batch_size, "media_seed": media_seed,
                                "nonfinite": nonfinite}
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.lr_schedule: LRSchedule = lr_schedule
        self.media_batch_size, self.media_seed = media_batch_size, media_seed
        self.nonfinite: NonFinite = nonfinite
        self.nonfinite_skipped = 0  # optimizer steps skipped for a non-finite loss (kept in checkpoints)
        self.clip: nn.Module | None = None
        self.init_report: KeyReport | None = None
        self._media_batch: Any = None
        self._flops: dict[str, float] = {}  # "train" / "val" -> FLOPs of one batch (see flops_per_batch)
        self._flop_counter: tuple[str, FlopCounterMode] | None = None

    def save_hyperparameters(self, *args: Any, frame: Any = None, **kwargs: Any) -> None:
        """Lightning's, plus the resolved shared options (which reach a stage as ``**options``, so Lightning would
        record only those given): a checkpoint's hyperparameters rebuild the stage as it trained."""
        super().save_hyperparameters(*args, frame=frame or inspect.currentframe().f_back, **kwargs)
        for key, value in self._shared_options.items():
            self.hparams[key] = value

    @classmethod
    def option_names(cls) -> set[str]:
        """Every keyword the stage's constructor accepts: its own and the shared ones it forwards to StageBase."""
        names: set[str] = set()
        for klass in cls.__mro__:
            if klass is pl.LightningModule:
                break
            if "__init__" in vars(klass):
                names |= {n for n, p in inspect.signature(klass.__init__).parameters.items()
                          if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        return names

    # ------------------------------------------------------------------ subclass contract
    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        """(scalar loss, batch size) for one batch."""
        raise NotImplementedError

    def media_from_batch(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Samples (and references) for the media logger from a kept validation batch, values in [-1, 1]."""
        raise NotImplementedError

    # ------------------------------------------------------------------ distributed strategies
    def unused_parameters_reason(self) -> str | None:
        """Why some training steps leave trainable parameters without a gradient (None: every step uses every
        trainable parameter). Under DDP such steps need ``find_unused_parameters=True``; see :meth:`setup`."""
        return None

    def setup(self, stage: str) -> None:
        """Under FSDP, shard per block with the frozen CLIP left out (:meth:`_configure_fsdp`). Under DDP, turn on
        ``find_unused_parameters`` exactly when :meth:`unused_parameters_reason` gives a reason
        (one info line), unless the strategy was given the flag (``ddp_find_unused_parameters_false`` / ``_true``,
        ``DDPStrategy(find_unused_parameters=...)``): a plain ``ddp`` (or ``auto`` on several devices) then just works.

        Exact, where a graph touching every parameter (``+ 0 * p.sum()``) is not: DDP leaves the gradient of a
        parameter no rank used at None, as a single process does, and AdamW skips such a parameter, whereas a zero
        gradient would still decay its weights and its moments. Runs before the strategy wraps the model, on every
        rank; the flag's cost (a graph traversal after each forward) is paid only by the stages that need it.
        """
        trainer = self._trainer
        strategy = trainer.strategy if trainer is not None else None
        if isinstance(strategy, FSDPStrategy):
            self._configure_fsdp(strategy)
        reason = self.unused_parameters_reason() if stage == "fit" and trainer is not None else None
        if reason and isinstance(strategy, DDPStrategy):
            # Lightning keeps DistributedDataParallel's keyword arguments here until it wraps the model (after this
            # hook); it offers no public way for a module to ask for the flag
            ddp_kwargs = strategy._ddp_kwargs
            if "find_unused_parameters" not in ddp_kwargs:
                ddp_kwargs["find_unused_parameters"] = True
                rank_zero_info(f"DDP: find_unused_parameters=True: {reason}")

    def _configure_fsdp(self, strategy: FSDPStrategy) -> None:
        """What a plain ``fsdp`` leaves unset: each U-Net / prior ``Block`` its own FSDP unit (its parameters gathered
        only while it runs) and the frozen CLIP kept out of sharding (``ignored_modules``: whole on every rank, never
        in the optimizer or the checkpoint). Set on the strategy (``FSDPStrategy(auto_wrap_policy=...,
        ignored_modules=...)``), the user's choice stays."""
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from lightning_mav.nn.prior import Block as PriorBlock
        from lightning_mav.nn.unet import Block as UNetBlock

        kwargs = strategy.kwargs  # FullyShardedDataParallel's keyword arguments, read when it wraps the model
        units = {type(m) for m in self.modules() if type(m) in (UNetBlock, PriorBlock)}
        said = []
        if units and "auto_wrap_policy" not in kwargs:
            kwargs["auto_wrap_policy"] = ModuleWrapPolicy(units)
            said.append(f"each of the {sum(type(m) in units for m in self.modules())} blocks an FSDP unit")
        if self.clip is not None and not {"ignored_modules", "ignored_states"} & kwargs.keys():
            kwargs["ignored_modules"] = [self.clip]
            said.append("the frozen CLIP left whole (ignored_modules)")
        if said:
            rank_zero_info(f"FSDP: {', '.join(said)}")
        # torch warns for every nn.ModuleList it wraps, though a Block implements forward (FSDP calls it whole)
        warnings.filterwarnings("ignore", message="FSDP will not all-gather parameters for containers")

    # ------------------------------------------------------------------ steps and logging
    def on_fit_start(self) -> None:
        # The frozen CLIP stays in eval mode by design (nn/clip.py), so Lightning's "Found N module(s) in eval mode at
        # the start of training" would greet every stage that holds one; silenced only when every eval-mode module is
        # part of it, so that any other module left in eval mode is still reported.
        in_eval = [name for name, m in self.named_modules() if not m.training]
        if self.clip is not None and getattr(self.clip, "frozen", False) and all(
                name == "clip" or name.startswith("clip.") for name in in_eval):
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode",
                                    category=PossibleUserWarning)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Reseed the global RNG (CPU and CUDA) per batch so the training noise is a function of the step, not of
        # everything drawn before it: what makes a resumed run continue the uninterrupted one exactly.
        seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything (LightningCLI's `seed_everything`)
        if seed is not None:
            torch.manual_seed(step_seed(int(seed), self.global_rank, self.global_step, batch_idx))
        self._start_flop_count("train")

    def on_after_backward(self) -> None:
        self._stop_flop_count("train")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._stop_flop_count(None)  # a skipped (non-finite) step ran no backward: count the next batch instead

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        loss, batch_size = self.compute_loss(batch)
        if not self._all_finite(loss):
            return self._nonfinite_step(loss, batch_idx)
        self.log_loss("train", loss, batch_size)
        if self.nonfinite == "skip":
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True, on_epoch=False)
        return loss

    def _all_finite(self, loss: Tensor) -> bool:
        """Whether the loss is finite on every rank (one tiny all-reduce per step under DDP)."""
        bad = (~torch.isfinite(loss.detach())).any().float()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        return not bool(bad.item())

    def _nonfinite_step(self, loss: Tensor, batch_idx: int) -> None:
        where = f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if self.nonfinite == "skip":
            self.nonfinite_skipped += 1
            rank_zero_warn(f"non-finite train/loss ({loss.detach().float().item()}) at {where}: optimizer step skipped "
                           f"({self.nonfinite_skipped} so far)")
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True, on_epoch=False)
            return None  # Lightning: no backward, no gradients for the optimizer to apply
        last = getattr(self._trainer.checkpoint_callback, "last_model_path", "") if self._trainer else ""
        raise NonFiniteLossError(
            f"non-finite train/loss ({loss.detach().float().item()}) at {where}: training stopped before the update; "
            f"the last good checkpoint is untouched{f' ({last})' if last else ''}. A resume (--ckpt_path last) "
            f"replays the same data and noise, so change something: a lower lr, or model.init_args.nonfinite: skip "
            f"to skip such steps")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        generator = torch.Generator().manual_seed(batch_idx)
        self._start_flop_count("val")
        loss, batch_size = self.compute_loss(batch, generator=generator)
        self._stop_flop_count("val")
        self.log_loss("val", loss, batch_size)
        return loss

    def log_loss(self, split: str, loss: Tensor, batch_size: int, name: str = "loss") -> None:
        """Log ``{split}/{name}``: every step in training, the epoch mean (synced across ranks) in validation.

        One of on_step/on_epoch only, so the logged key is exactly ``train/loss`` / ``val/loss`` (no _step suffix).
        """
        train = split == "train"
        self.log(f"{split}/{name}", loss, prog_bar=True, on_step=train, on_epoch=not train,
                 batch_size=batch_size, sync_dist=not train)

    # ------------------------------------------------------------------ FLOPs (for ThroughputMonitor)
    @property
    def flops_per_batch(self) -> float | None:
        """FLOPs of one batch of the running loop (training: forward + backward; validation: forward), None until
        its first batch was counted."""
        trainer = self._trainer
        return self._flops.get("val" if trainer is not None and trainer.validating else "train")

    def _start_flop_count(self, split: str) -> None:
        if split not in self._flops and self._flop_counter is None:
            counter = FlopCounterMode(display=False)
            counter.__enter__()
            self._flop_counter = (split, counter)

    def _stop_flop_count(self, split: str | None) -> None:
        """Close the open count; keep its total if it is ``split``'s (None: discard)."""
        if self._flop_counter is None:
            return
        counted, counter = self._flop_counter
        counter.__exit__(None, None, None)
        self._flop_counter = None
        if split == counted:
            self._flops[split] = float(counter.get_total_flops())

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the trainable parameters + per-step linear warm-up, then ``lr_schedule``.

        Fused AdamW on CUDA and on the CPU (one kernel per step, several times faster than foreach on the CPU:
        docs/choices.md#fused-adamw); foreach for devices without a fused kernel,
        and under ``16-mixed`` with gradient clipping: a fused optimizer unscales the gradients inside its own step,
        so Lightning cannot clip them first and refuses the combination (fp16 GPUs: V100, T4).
        """
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        trainer = self._trainer
        scaled_and_clipped = (trainer is not None and bool(trainer.gradient_clip_val)
                              and getattr(trainer.precision_plugin, "scaler", None) is not None)
        fused = bool(params) and all(p.device.type in ("cuda", "cpu") for p in params) and not scaled_and_clipped
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.betas,
                                      fused=fused or None, foreach=None if fused else True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Lightning's MixedPrecision refuses any clipping with a fused optimizer, since such an optimizer unscales
        # inside its step; under bf16-mixed nothing is scaled (no GradScaler), so the gradients are clipped as they
        # are, as in fp32 (Lightning-AI/pytorch-lightning#21435).
        plugin = self.trainer.precision_plugin
        model = self.trainer.model
        if isinstance(self.trainer.strategy, FSDPStrategy) and gradient_clip_val and (
                gradient_clip_algorithm or "norm") == "norm" and hasattr(model, "clip_grad_norm_"):
            # FSDP shards the gradients: only its root module knows their global norm (Lightning's FSDPPrecision
            # refuses 'norm' and points here)
            model.clip_grad_norm_(gradient_clip_val)
            return
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            super(MixedPrecision, plugin).clip_gradients(optimizer, gradient_clip_val or 0.0,
                                                         GradClipAlgorithmType(gradient_clip_algorithm or "norm"))
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step``: linear warm-up, then constant or cosine to 0."""
        warmup = max(int(self.warmup_steps), 0)
        factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
        total = self._trainer.max_steps if self._trainer is not None else -1
        if self.lr_schedule == "cosine":
            if total is None or total <= 0:
                raise ValueError("lr_schedule: cosine needs trainer.max_steps (the step the cosine reaches 0 at)")
            progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
            factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
        return factor

    # ------------------------------------------------------------------ networks: parents and freezing
    def inherit_configs(self, init_from: str | None, **configs: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        """Network configs (e.g. ``unet=..., diffusion=...``) = the parent checkpoint's, updated with this stage's.

        A child config lists only what changes (``unet: {temporal: true}``). The merged dicts are written back
        into ``hparams``, so the child's own checkpoint is complete and its children can inherit from it in turn.
        """
        parent = (load_checkpoint(init_from).get("hyper_parameters") or {}) if init_from is not None else {}
        self.parent_hparams: dict[str, Any] = dict(parent)  # for stage options a child inherits (SR's residual)
        merged = {name: {**(parent.get(name) or {}), **(own or {})} for name, own in configs.items()}
        self.hparams.update(merged)
        return merged

    def init_network(self, network: nn.Module, path: str | None, prefix: str = "unet.") -> KeyReport | None:
        """Start ``network`` from a parent stage checkpoint (D -> D_t, SR_l -> SR_t); see lightning_mav.checkpoints.

        Afterwards ``hparams.init_from`` is cleared (the path is kept as ``hparams.parent_ckpt``): the child's
        checkpoint holds every weight, so loading it must never need the parent file (nor its relative path).
        """
        if path is None:
            return None
        self.init_report = init_from(network, path, allow_new=self.new_param_patterns, prefix=prefix)
        rank_zero_info(self.init_report.summary())  # one line in the run log: what the child started from
        if "init_from" in self.hparams:
            self.hparams.update(init_from=None, parent_ckpt=str(path))
        return self.init_report

    def is_new_param(self, name: str) -> bool:
        """Whether a network-relative parameter name is one a child adds (temporal, fps, extra inputs)."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.new_param_patterns)

    def freeze_except_new(self, network: nn.Module) -> list[str]:
        """Freeze the parent's (spatial) parameters of ``network``; return the names left trainable."""
        trainable = []
        for name, p in network.named_parameters():
            p.requires_grad_(self.is_new_param(name))
            if p.requires_grad:
                trainable.append(name)
        if not trainable:
            raise ValueError("freeze_spatial: the network has no temporal/new parameters to train (temporal=False?)")
        return trainable

    # ------------------------------------------------------------------ frozen CLIP (P and D stages)
    def load_clip(self, clip_ckpt: str | None, clip_model: str | None = None) -> nn.Module | None:
        """The frozen CLIP (``C_x`` and image encoder); kept out of this stage's checkpoints.

        ``clip_ckpt``: a CLIPStage ``.ckpt`` (the architecture is in it), or an open_clip weights file of any open_clip
        architecture, named by ``clip_model`` (``ViT-L-14``, ``ViT-H-14``, ...; open_clip files carry no config).
        """
        if clip_ckpt is None:
            return None
        from lightning_mav.nn.clip import CLIP

        self.clip = CLIP.from_checkpoint(clip_ckpt, model_name=clip_model, freeze=True)
        return self.clip

    def inherit_clip(self, clip_ckpt: str | None, clip_model: str | None) -> tuple[str | None, str | None]:
        """``(clip_ckpt, clip_model)``: the given ones, or with ``clip_ckpt`` unset the parent checkpoint's (D_t's
        from D, ↑F's from D_t; after :meth:`inherit_configs`), so a chain names its CLIP once; written into
        ``hparams`` for this stage's children."""
        parent = getattr(self, "parent_hparams", {})
        if clip_ckpt is None and parent.get("clip_ckpt"):
            clip_ckpt, clip_model = parent["clip_ckpt"], parent.get("clip_model")
        self.hparams.update(clip_ckpt=clip_ckpt, clip_model=clip_model)
        return clip_ckpt, clip_model

    # The frozen CLIP is a separate artefact (its own run): saving it in every stage would duplicate it, so its
    # tensors are stripped on save and put back, from the CLIP just loaded from clip_ckpt, before a load. Loading
    # therefore stays strict (a genuinely missing U-Net tensor still fails), and Lightning's EMA callback, which
    # strictly reloads "current_model_state" on resume, finds every key.
    _CKPT_STATES = ("state_dict", "current_model_state")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped
        for key in self._CKPT_STATES:
            if isinstance(checkpoint.get(key), dict):
                checkpoint[key] = {k: v for k, v in checkpoint[key].items() if not k.startswith("clip.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_skipped = int(checkpoint.get("nonfinite_skipped", 0))
        saved = checkpoint.get("hyper_parameters") or {}
        for key, value in self.legacy_hparams.items():
            if key not in saved:
                setattr(self, key, value)
                self.hparams[key] = value
        if self.clip is None:
            return
        clip_state = {f"clip.{k}": v for k, v in self.clip.state_dict().items()}
        for key in self._CKPT_STATES:
            if isinstance(checkpoint.get(key), dict):
                checkpoint[key] = {**clip_state, **checkpoint[key]}

    # ------------------------------------------------------------------ media
    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._media_batch is None:
            self._media_batch = _head(batch, self.media_batch_size)

    def media_generator(self) -> torch.Generator:
        """A CPU generator seeded with ``media_seed``: every media call draws the same noise."""
        return torch.Generator().manual_seed(self.media_seed)

    @torch.no_grad()
    def log_media(self) -> dict[str, Tensor]:
        """``{name: images [N,3,H,W] | videos [N,3,F,H,W]}`` in [-1, 1] from the kept batch (``{}`` before any
        validation batch was seen)."""
        if self._media_batch is None:
            return {}
        was_training = self.training
        self.eval()  # the callback does this too; sampling in train mode (dropout) would be a silent bug
        try:
            media = self.media_from_batch(_to(self._media_batch, self.device))
        finally:
            self.train(was_training)
        return {k: v.float().clamp(-1, 1) for k, v in media.items()}

    def set_media_batch(self, batch: dict[str, Any]) -> None:
        """Choose the media conditioning explicitly (tests, scripts) instead of the first validation batch."""
        self._media_batch = _head(batch, self.media_batch_size)


def resolve_pixel_diffusion(config: dict[str, Any]) -> dict[str, Any]:
    """Fill in the defaults of a pixel-space diffusion (D, D_t, ↑F, SR_*) *in place*, so the resolved values land in
    ``hparams`` and every child inherits what its parent really trained with; returns ``config``.

    ``objective: v``: the cosine schedule ends at ᾱ_T ≈ 0 and sampling starts at t = T-1 (trailing spacing), where an
    eps-prediction says nothing about x0 (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps Are
    Flawed", §3.2). ``min_snr_gamma: 5`` (Min-SNR-γ weighting, Hang et al. 2023): the nearly clean timesteps no
    longer crowd out the noisy ones (docs/choices.md#v-objective-and-min-snr). ``clip_sample: 1.0``: pixels live
    in [-1, 1].
    """
    config.setdefault("objective", "v")
    config.setdefault("min_snr_gamma", 5.0)
    config.setdefault("clip_sample", 1.0)
    return config


def trainable_names(module: nn.Module) -> list[str]:
    """Names of the parameters that will be trained."""
    return [n for n, p in module.named_parameters() if p.requires_grad]
