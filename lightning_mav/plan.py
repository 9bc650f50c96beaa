"""``mav plan``: what a stage costs before any GPU is rented: parameters, FLOPs per sample, memory per GPU under DDP and
FSDP with and without gradient checkpointing, the largest per-GPU batch that fits, and days to ``max_steps``.

Nothing is guessed from formulas where it can be measured. The stage is built as ``lightning fit`` builds it, from the
same ``--config`` files and overrides (:class:`lightning_mav.trainer_cli.MAVCLI`, so the same merging and one-line config
errors), but under torch's ``FakeTensorMode``: every tensor has a shape, a dtype and a device and no data, so a
paper-size stage, its frozen CLIP included, builds and runs a training step in seconds without memory or weight files.
One training step (the stage's ``compute_loss``, then backward) runs on a synthetic batch of the data config's shapes:

- FLOPs: counted by StageBase's own ``FlopCounterMode`` hooks (``_start_flop_count`` / ``_stop_flop_count``), i.e. the
  number ``train/device/mfu`` is computed from (forward, loss and backward, checkpointing's recomputation included).
- Memory: a dispatch mode (:class:`LiveTensorBytes`) follows every tensor storage the step creates until it is freed;
  the peak of that live total is the step's memory above the weights (activations, temporaries and gradients). On
  real tensors this tracker agrees with the PyTorch profiler's allocation events (``benchmarks.common``), and the
  whole estimate is checked against real CPU steps in ``tests/test_plan.py``.
- Precision: ``bf16-mixed`` / ``16-mixed`` run under autocast, as Lightning's mixed precision does (weights, gradients
  and AdamW states stay fp32). The fake tensors live on the CPU (the autograd engine needs a real device for CUDA), so
  the CPU-only fp32 exceptions of ``lightning_mav.nn.mixed_precision`` (attention in fp32 under CPU autocast) are
  turned off: attention runs in bf16 as it does on a GPU.

FLOPs are counted at the configured batch. Memory is measured at batch 2 and 3 and extended linearly (every op of
a training step is linear in the batch); the memory is extended allocation by allocation (:class:`Timeline`), so the peak at a large batch falls where it
really falls (at the end of the forward pass, say, where at batch 2 it was the gradients at the end of the backward).

Memory per GPU (bytes; ``W`` all weights fp32 incl. the frozen CLIP, ``G`` gradients and ``E`` EMA copy of the
trainable parameters, ``O = 2G`` AdamW states, ``S(B)`` the measured step peak, which includes ``G``):

- one GPU: ``W + O + E + S(B)``;
- DDP: the same plus ``G`` for DDP's gradient buckets (``gradient_as_bucket_view=False``, torch's default);
- FSDP full shard at N GPUs: ``(W + G + O + E) / N + A(B) + 2·U``, ``A(B)`` the step's peak without gradients, ``U``
  the largest unit FSDP gathers (its fp32 parameters and gradients), assuming every U-Net / transformer block is
  wrapped (``auto_wrap_policy``; Lightning's plain ``fsdp`` wraps the whole model as one unit, which saves nothing).

The largest batch leaves ``headroom`` (10%) of the card for the allocator's fragmentation, CUDA/NCCL workspaces and
the data. Step time = FLOPs per step / (MFU · peak bf16 dense FLOP/s of the card).
"""
from __future__ import annotations

import contextlib
import re
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_mav.trainer_cli import EXPERIMENTS, MAVCLI, _fail, config_error

GiB = 1024 ** 3
#: peak dense bf16 tensor-core FLOP/s (NVIDIA data sheets: A100 SXM 312 TFLOP/s, H100 SXM 989 TFLOP/s)
PEAK_BF16 = {"A100": 312e12, "H100": 989e12}
GPU_MEMORY = 80 * GiB  # A100 80GB, H100 80GB
#: where a config leaves a required file unset (``???``) a plan puts this instead: it needs no file
PLACEHOLDER = "<unset: not needed for a plan>"
#: tensors created from real ones up to this many elements are computed for real (timesteps, crop offsets, coins:
#: values the stages' Python code reads); everything larger stays fake
_REAL_NUMEL = 1 << 16


# ------------------------------------------------------------------------------------------------ fake execution
class _SmallOpsReal(TorchDispatchMode):
    """Above ``FakeTensorMode``: an op on real (or no) tensor inputs whose outputs are small CPU tensors runs for real,
    so that ``.item()`` / ``.tolist()`` on timesteps, random crops and coin flips work; the networks stay fake."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, Tensor)]
        if any(isinstance(x, FakeTensor) for x in inputs):
            return func(*args, **kwargs)
        if inputs:  # only real (small) inputs: .item(), arithmetic on timesteps
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        out = func(*args, **kwargs)  # a factory: fake first, to see its size without allocating
        outs = [x for x in tree_flatten(out)[0] if isinstance(x, Tensor)]
        if outs and all(o.device.type == "cpu" and o.numel() <= _REAL_NUMEL for o in outs):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return out


class LiveTensorBytes(TorchDispatchMode):
    """Follows every tensor storage created while it is active until the storage is freed (a weak reference to the
    storage; views share their base's storage and count once). ``events`` is the timeline ``(storage id, ±bytes)``;
    :meth:`peak` replays it, optionally without some storages (e.g. the gradients)."""

    def __init__(self, fake_only: bool = False) -> None:
        super().__init__()
        self.fake_only = fake_only  # skip the real bookkeeping tensors of a fake step (their ops vary with values)
        self.events: list[tuple[int, int]] = []
        self._alive: dict[int, tuple[int, weakref.ref]] = {}  # storage address -> (id, weak ref)
        self._next = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and (isinstance(t, FakeTensor) or not self.fake_only):
                self._track(t)
        return out

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._alive:
            return
        ident, nbytes = self._next, storage.nbytes()
        self._next += 1

        def freed(_: Any, key: int = key, ident: int = ident, nbytes: int = nbytes) -> None:
            self._alive.pop(key, None)
            self.events.append((ident, -nbytes))

        self._alive[key] = (ident, weakref.ref(storage, freed))
        self.events.append((ident, nbytes))

    def ids_of(self, tensors: Sequence[Tensor]) -> set[int]:
        """Storage ids of tensors still alive (e.g. the parameters' ``.grad``)."""
        return {self._alive[t.untyped_storage()._cdata][0] for t in tensors
                if t.untyped_storage()._cdata in self._alive}

    def peak(self, without: set[int] = frozenset()) -> int:
        """Peak of the live bytes over the timeline, not counting the storages in ``without``."""
        live = top = 0
        for ident, nbytes in self.events:
            if ident not in without:
                live += nbytes
                top = max(top, live)
        return top


@contextlib.contextmanager
def fake_tensors() -> Iterator[FakeTensorMode]:
    """Tensors without data (see the module docstring), plus what a plan needs of the stages: no checkpoint or CLIP
    weights read, parents (``init_from``) and CLIPs of runs not trained yet planned from their YAMLs, GPU attention
    precision under CPU autocast."""
    import lightning_mav.nn.mixed_precision as mixed_precision
    import lightning_mav.stages.base as base
    import lightning_mav.stages.clip as clip_stage

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(base, "load_checkpoint", _checkpoint_hparams_only))
        stack.enter_context(mock.patch.object(base, "init_from", _no_weights))
        stack.enter_context(mock.patch.object(base, "rank_zero_info", lambda *a, **k: None))  # "init_from … loaded"
        stack.enter_context(mock.patch.object(base.StageBase, "load_clip", _clip_from_config))
        for module in (mixed_precision, clip_stage):
            stack.enter_context(mock.patch.object(module, "cpu_autocast", lambda device: False))
        stack.enter_context(fake)
        yield fake


# ------------------------------------------------------------------------------------------------ checkpoints
#: hyperparameters of parents planned from their YAMLs in this process: checkpoint path -> (hparams, YAMLs)
_PLANNED_PARENTS: dict[str, tuple[dict[str, Any], list[str]]] = {}
#: the overlays of the plan being built: a parent's overlay is the file of the parent's name beside them
_OVERLAYS: list[list[str]] = [[]]


def _run_stage(path: str | Path) -> str | None:
    """``<stage>`` of ``runs/<stage>/checkpoints/<file>``, the stage YAML that makes it, or None."""
    p = Path(path)
    return p.parent.parent.name if p.parent.name == "checkpoints" and p.parent.parent.name else None


def checkpoint_hparams(path: str | Path) -> dict[str, Any]:
    """The ``hyper_parameters`` of a stage checkpoint, without its weights: read from the file if it exists (memory
    mapped), else, for ``runs/<stage>/checkpoints/*.ckpt``, from the stage built (fake) from ``experiments/<stage>.yaml``
    and the overlays beside the plan's own (``experiments/paper/<stage>.yaml``)."""
    p = Path(path).expanduser()
    if p.is_file():
        with unset_fake_temporarily():
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        return dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    stage = _run_stage(p)
    if stage is None or not (EXPERIMENTS / f"{stage}.yaml").is_file():
        from lightning_mav.checkpoints import CheckpointError

        raise CheckpointError(f"checkpoint not found: {p} (a plan reads only its hyperparameters; give a file that "
                              "exists or runs/<stage>/checkpoints/… of a stage under experiments/)")
    key = str(p)
    if key not in _PLANNED_PARENTS:
        configs = [str(EXPERIMENTS / f"{stage}.yaml")]
        configs += [str(Path(o).parent / f"{stage}.yaml") for o in _OVERLAYS[-1]
                    if (Path(o).parent / f"{stage}.yaml").is_file()]
        cli = _PlanCLI(args=[a for c in configs for a in ("--config", c)], run=False, overlays=configs[1:])
        _PLANNED_PARENTS[key] = (dict(cli.model.hparams), configs)
    return _PLANNED_PARENTS[key][0]


def _checkpoint_hparams_only(path: str | Path, **_: Any) -> dict[str, Any]:
    return {"hyper_parameters": checkpoint_hparams(path), "state_dict": {}}


def _no_weights(module: nn.Module, path: str | Path, allow_new: Any = (), **_: Any) -> Any:
    from lightning_mav.checkpoints import KeyReport

    return KeyReport(path=str(path), source="plan: no weights loaded")


def _clip_from_config(self: Any, clip_ckpt: str | None, clip_model: str | None = None) -> nn.Module | None:
    """``StageBase.load_clip`` for a plan: the CLIP's architecture from ``clip_model`` (an open_clip file or unset
    ``???``) or from the CLIPStage checkpoint's hyperparameters (planned from clip.yaml if not trained yet)."""
    if clip_ckpt is None:
        return None
    from lightning_mav.nn.clip import CLIP

    if clip_model:
        self.clip = CLIP(clip_model, freeze=True)
    elif clip_ckpt == PLACEHOLDER:
        raise ValueError("clip_ckpt is unset (`???`) and clip_model names no architecture: give "
                         "--model.init_args.clip_model (e.g. ViT-H-14) to plan without the weights file")
    else:
        hp = checkpoint_hparams(clip_ckpt)
        self.clip = CLIP(hp.get("model_name", "mav-tiny"), model_cfg=hp.get("model_cfg"), freeze=True)
    return self.clip


# ------------------------------------------------------------------------------------------------ the stage
def _fill_placeholders(args: Sequence[str], tmp: Path) -> tuple[list[str], list[str]]:
    """``args`` with every ``--config`` file that holds ``???`` replaced by a copy in ``tmp`` where a plan's stand-in
    takes its place (``PLACEHOLDER`` under ``model``, null elsewhere: shard URLs); the dotted keys filled.
    (OmegaConf refuses a ``???`` as it reads the file, before any override could set it.)"""
    import yaml

    out, filled = list(args), []

    def fill(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v, f"{prefix}[{i}]") for i, v in enumerate(node)]
        if node == "???":
            filled.append(prefix)
            return PLACEHOLDER if prefix.startswith("model.") else None
        return node

    for i, arg in enumerate(args[:-1]):
        path = Path(args[i + 1])
        if arg == "--config" and path.is_file() and "???" in path.read_text():
            copy = tmp / f"{len(filled)}-{i}-{path.name}"
            copy.write_text(yaml.safe_dump(fill(yaml.safe_load(path.read_text()), ""), sort_keys=False))
            out[i + 1] = str(copy)
    return out, filled


class _PlanCLI(MAVCLI):
    """``MAVCLI`` that builds only the model, under :func:`fake_tensors`, and fills the ``???`` a plan does not need
    (shard URLs; a CLIP file whose architecture ``clip_model`` names)."""

    def __init__(self, args: list[str], run: bool = False, overlays: Sequence[str] = ()) -> None:
        _OVERLAYS.append(list(overlays))
        try:
            with tempfile.TemporaryDirectory(prefix="mav-plan-") as tmp:
                args, self.placeholders = _fill_placeholders(args, Path(tmp))
                super().__init__(args=args, run=False)
        finally:
            _OVERLAYS.pop()

    def _set_seed(self) -> None:  # nothing random is drawn that matters; no "Seed set" line
        pass

    def instantiate_classes(self) -> None:
        cfg = self.config.clone()
        cfg.data = None  # no data, trainer, logger or callbacks: only the LightningModule
        for key in ("callbacks", "logger", "plugins", "profiler", "strategy"):
            if key in cfg.trainer:
                cfg.trainer[key] = None
        try:
            self.model = self.parser.instantiate_classes(cfg).model
        except SystemExit:
            raise
        except Exception as e:
            import os

            if os.environ.get("MAV_TRACEBACK"):
                raise
            _fail(config_error(e, self.config))


# ------------------------------------------------------------------------------------------------ measurements
@dataclass
class Timeline:
    """A step's storage allocations and frees in order, each sized ``base + slope · (B - 2)`` bytes at batch ``B``
    (aligned from the same step at batch 2 and 3: the same ops run in the same order, only sizes change; batch 1 is
    avoided, where some ops take other paths), and which storages are the parameters' gradients."""

    ids: list[int]
    base: list[int]  # ± bytes at batch 2
    slope: list[int]  # ± bytes per extra sample
    grads: set[int]
    extended: str = "allocation by allocation"

    @classmethod
    def align(cls, two: LiveTensorBytes, three: LiveTensorBytes, grads: set[int], grads3: set[int]) -> "Timeline":
        """From the same step at batch 2 and 3; storages match by allocation order (frees that happen together,
        when autograd releases a node's saved tensors, may come in another order)."""
        size2 = {i: abs(n) for i, n in reversed(two.events)}  # each storage: allocated, maybe freed
        size3 = {i: abs(n) for i, n in reversed(three.events)}
        if size2.keys() != size3.keys() or len(two.events) != len(three.events):
            return cls.linear(two, three, grads, grads3)
        ids, seen, sign = [i for i, _ in two.events], set(), []
        for i in ids:
            sign.append(-1 if i in seen else 1)
            seen.add(i)
        return cls(ids, [s * size2[i] for i, s in zip(ids, sign)],
                   [s * (size3[i] - size2[i]) for i, s in zip(ids, sign)], grads)

    @classmethod
    def linear(cls, two: LiveTensorBytes, three: LiveTensorBytes, grads: set[int], grads3: set[int]) -> "Timeline":
        """When the step's ops depend on the batch (a Python loop over the samples: SR_h's random crops): the peaks
        at batch 2 and 3, with and without the gradients, extended linearly (a three-event timeline)."""
        p2, p3 = two.peak(), three.peak()
        a2, a3 = two.peak(without=grads), three.peak(without=grads3)
        return cls([0, 0, 1], [a2, -a2, p2], [a3 - a2, a2 - a3, p3 - p2], {1}, extended="linearly from the peaks")

    def peak(self, batch: float, gradients: bool = True) -> float:
        """Peak live bytes of the step at ``batch`` (without the gradients' storages if not ``gradients``)."""
        live = top = 0.0
        extra = batch - 2
        for ident, base, slope in zip(self.ids, self.base, self.slope):
            if gradients or ident not in self.grads:
                live += base + slope * extra
                top = max(top, live)
        return top


@dataclass
class StepCost:
    """One training step's cost: ``flops`` counted at the configured per-GPU ``batch``; ``peak(B)`` (live bytes above
    the weights, gradients included) and ``activations(B)`` (the same peak without the gradients) at any batch."""

    flops: float
    batch: int
    timeline: Timeline

    def peak(self, batch: float) -> float:
        return self.timeline.peak(batch)

    def activations(self, batch: float) -> float:
        return self.timeline.peak(batch, gradients=False)


def synthetic_batch(data: dict[str, Any], batch: int) -> dict[str, Any]:
    """A training batch of the shapes the data config ``{"class_path", "init_args"}`` yields (values random):
    text-image ``{"image": [B, 3, S, S], "caption"}``, video ``{"video": [B, F, 3, S, S], "fps": [B], "caption"}``."""
    kind, args = str(data.get("class_path", "")), data.get("init_args") or {}
    if kind.endswith("TextImageDataModule"):
        s = int(args.get("image_size", 64))
        return {"image": torch.randn(batch, 3, s, s), "caption": ["a caption"] * batch}
    if kind.endswith("VideoDataModule"):
        s, f = int(args.get("video_size", 64)), int(args.get("num_frames", 16))
        fps = (float(args.get("fps_min", 1.0)) + float(args.get("fps_max", 30.0))) / 2
        return {"video": torch.randn(batch, f, 3, s, s), "fps": torch.full((batch,), fps), "caption": [""] * batch}
    raise ValueError(f"data.class_path: a plan knows TextImageDataModule and VideoDataModule, got {kind or 'none'!r}")


AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "32-true": None, "32": None}


def _autocast_dtype(precision: Any) -> torch.dtype | None:
    key = str(precision)
    if key not in AUTOCAST:
        raise ValueError(f"trainer.precision: a plan knows {', '.join(AUTOCAST)}, got {key!r}")
    return AUTOCAST[key]


def checkpointed_modules(stage: nn.Module) -> list[nn.Module]:
    """The networks with a ``checkpointing`` switch (the U-Nets)."""
    return [m for m in stage.modules() if isinstance(getattr(m, "checkpointing", None), bool)]


def measure_step(stage: Any, data: dict[str, Any], batch: int, precision: Any) -> tuple[LiveTensorBytes, set[int]]:
    """(the storages' timeline, the gradients' storage ids) of one training step of ``stage`` at ``batch``, as
    Lightning runs it: ``compute_loss`` under the precision's autocast, then backward. Real or fake tensors alike."""
    fake = isinstance(next(stage.parameters(), None), FakeTensor)
    tracker = LiveTensorBytes(fake_only=fake)
    params = _training_step(stage, data, batch, precision, tracker)
    grads = tracker.ids_of([p.grad for p in params if p.grad is not None])
    for p in params:
        p.grad = None
    return tracker, grads


def count_flops(stage: Any, data: dict[str, Any], batch: int, precision: Any) -> float:
    """FLOPs of one training step at ``batch``, counted by StageBase's own hooks (``_start_flop_count`` /
    ``_stop_flop_count``, as ``on_train_batch_start`` / ``on_after_backward`` do). Its own step: the counter's module
    tracking keeps tensors alive, which must not enter the memory measurement."""
    stage._flops.pop("train", None)
    stage._start_flop_count("train")
    for p in _training_step(stage, data, batch, precision, contextlib.nullcontext(), after=stage._stop_flop_count):
        p.grad = None
    return stage._flops.pop("train")


def _training_step(stage: Any, data: dict[str, Any], batch: int, precision: Any, mode: Any,
                   after: Any = None) -> list[nn.Parameter]:
    dtype = _autocast_dtype(precision)
    stage.train()
    params = [p for p in stage.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    fake = isinstance(next(stage.parameters(), None), FakeTensor)
    inputs = synthetic_batch(data, batch)  # built like a loader's batch: not counted
    with _SmallOpsReal() if fake else contextlib.nullcontext(), mode:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss, _ = stage.compute_loss(inputs)
        loss.backward()
        if after is not None:
            after("train")
        del loss
    return params


def step_cost(stage: Any, data: dict[str, Any], precision: Any, batch: int) -> StepCost:
    """:class:`StepCost`: FLOPs counted at ``batch``, memory from the same step at batch 2 and 3."""
    (t2, grads), (t3, grads3) = (measure_step(stage, data, b, precision) for b in (2, 3))
    return StepCost(count_flops(stage, data, batch, precision), batch, Timeline.align(t2, t3, grads, grads3))


def _bytes(tensors: Iterator[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


#: modules FSDP would wrap one by one: U-Net blocks, prior / CLIP transformer blocks
_UNIT_NAMES = ("Block", "ResidualAttentionBlock")


def largest_unit(stage: nn.Module) -> int:
    """Bytes of the parameters of the largest FSDP unit: a U-Net / transformer block, or everything outside them."""
    units = [m for m in stage.modules() if type(m).__name__ in _UNIT_NAMES]
    inside = {id(p) for u in units for p in u.parameters()}
    rest = _bytes(p for p in stage.parameters() if id(p) not in inside)
    return max([rest] + [_bytes(u.parameters()) for u in units])


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """Everything ``mav plan`` reports about one stage (bytes, FLOPs, seconds); see the module docstring."""

    command: str
    stage: str
    configs: list[str]
    precision: str
    batch_size: int
    max_steps: int
    gpus: int
    mfu: float
    headroom: float
    params_trainable: int
    params_frozen: int
    weights: int
    grads: int
    adamw: int
    ema: int
    unit: int
    checkpointing: bool | None  # as configured; None: the stage has no checkpointing switch
    cost: dict[str, StepCost]  # "plain" / "checkpointing" -> the step's cost
    notes: list[str] = field(default_factory=list)

    def memory(self, batch: int, setting: str, strategy: str = "ddp", gpus: int | None = None) -> float:
        """Bytes per GPU at per-GPU ``batch``: ``strategy`` "single", "ddp" or "fsdp" (over ``gpus``)."""
        cost, n = self.cost[setting], gpus or self.gpus
        if strategy == "fsdp":
            return (self.weights + self.grads + self.adamw + self.ema) / n + cost.activations(batch) + 2 * self.unit
        total = self.weights + self.adamw + self.ema + cost.peak(batch)
        return total + (self.grads if strategy == "ddp" else 0)

    def estimate(self, batch: int, setting: str) -> float:
        """Weights + gradients + AdamW + activations on one device without EMA: what ``tests/test_plan.py`` checks
        against real steps (the measured step peak holds the gradients: ``weights + AdamW + peak``)."""
        return self.weights + self.adamw + self.cost[setting].peak(batch)

    def max_batch(self, setting: str, strategy: str = "ddp", memory: float = GPU_MEMORY) -> int:
        """The largest per-GPU batch whose :meth:`memory` fits ``memory`` less the headroom (0: none fits)."""
        budget = memory * (1 - self.headroom)

        def fits(batch: int) -> bool:
            return self.memory(batch, setting, strategy) <= budget

        if not fits(1):
            return 0
        lo, hi = 1, 2
        while fits(hi):  # memory grows with the batch: double, then bisect
            lo, hi = hi, hi * 2
            if hi > 1 << 24:
                return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    @property
    def setting(self) -> str:
        """The configured setting: ``checkpointing`` if the config turns it on."""
        return "checkpointing" if self.checkpointing else "plain"

    def flops_per_step(self, setting: str | None = None) -> float:
        return self.cost[setting or self.setting].flops

    def step_seconds(self, gpu: str, setting: str | None = None) -> float:
        return self.flops_per_step(setting) / (self.mfu * PEAK_BF16[gpu])

    def days(self, gpu: str, setting: str | None = None) -> float:
        return self.step_seconds(gpu, setting) * self.max_steps / 86400

    def to_dict(self) -> dict[str, Any]:
        """JSON: the measured quantities, and the derived ones for the configured batch, the cards and strategies."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cost"}
        derived: dict[str, Any] = {}
        for setting in self.cost:
            derived[setting] = {
                "flops_per_sample": self.cost[setting].flops / self.batch_size,
                "flops_per_step": self.flops_per_step(setting),
                "activations": self.cost[setting].activations(self.batch_size),
                "step_peak": self.cost[setting].peak(self.batch_size),
                "memory": {s: self.memory(self.batch_size, setting, s) for s in ("single", "ddp", "fsdp")},
                "max_batch": {s: self.max_batch(setting, s) for s in ("single", "ddp", "fsdp")},
                "step_seconds": {g: self.step_seconds(g, setting) for g in PEAK_BF16},
                "days": {g: self.days(g, setting) for g in PEAK_BF16},
            }
        out["derived"] = derived
        out["gpu_memory"], out["peak_bf16"] = GPU_MEMORY, PEAK_BF16
        return out

    def to_markdown(self, gpus: Sequence[str] = tuple(PEAK_BF16)) -> str:
        """The plan as markdown: a summary, the memory table, the time table."""
        b, n = self.batch_size, self.gpus
        settings = list(self.cost)
        label = {"plain": "no checkpointing", "checkpointing": "checkpointing"}
        flops = " / ".join(f"{self.cost[s].flops / b / 1e12:.3g} TFLOP ({label[s]})" for s in settings)
        lines = [
            f"### {self.stage}: {' + '.join(self.configs)}", "",
            f"`{self.command}`", "",
            f"- parameters: {self.params_trainable / 1e6:,.1f} M trained, {self.params_frozen / 1e6:,.1f} M frozen",
            f"- FLOPs per sample of a training step (forward + backward, counted): {flops}",
            f"- {self.precision}, batch {b} per GPU × {n} GPUs = {b * n}, {self.max_steps:,} steps"
            + (f", checkpointing {'on' if self.checkpointing else 'off'} in the config"
               if self.checkpointing is not None else ""),
            "",
        ]
        cols = [(s, st) for st in ("ddp", "fsdp") for s in settings]
        head = [f"{'DDP' if st == 'ddp' else f'FSDP/{n}'}, {label[s]}" for s, st in cols]
        rows = []

        def gib(x: float) -> str:
            return f"{x / GiB:,.1f}"

        share = {"ddp": 1, "fsdp": n}
        rows.append(["weights (fp32, frozen included)"] + [gib(self.weights / share[st]) for _, st in cols])
        rows.append(["gradients (fp32)"] + [gib(self.grads / share[st]) for _, st in cols])
        rows.append(["AdamW states (fp32)"] + [gib(self.adamw / share[st]) for _, st in cols])
        rows.append(["EMA copy"] + [gib(self.ema / share[st]) for _, st in cols])
        rows.append(["DDP buckets / FSDP gathered unit"]
                    + [gib(self.grads if st == "ddp" else 2 * self.unit) for _, st in cols])
        rows.append([f"activations at batch {b} (DDP: step peak − gradients)"]
                    + [gib(self.cost[s].peak(b) - self.grads if st == "ddp" else self.cost[s].activations(b))
                       for s, st in cols])
        rows.append([f"**total at batch {b}**"] + [f"**{gib(self.memory(b, s, st))}**" for s, st in cols])
        rows.append([f"largest batch in 80 GB ({self.headroom:.0%} headroom)"]
                    + [str(self.max_batch(s, st)) for s, st in cols])
        lines += _table(["per GPU, GiB"] + head, rows) + [""]
        time_rows = [[g, f"{self.mfu:.0%}"] + [f"{self.step_seconds(g, s):.3g} s" for s in settings]
                     + [_days(self.days(g, s)) for s in settings] for g in gpus]
        lines += _table(["GPU", "MFU"] + [f"step, {label[s]}" for s in settings]
                        + [f"days to {self.max_steps:,} steps, {label[s]}" for s in settings], time_rows)
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _days(days: float) -> str:
    return f"{days:,.1f}" if days >= 10 else f"{days:.2g}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def build_stage(args: Sequence[str]) -> tuple[Any, Any, list[str]]:
    """(the fake stage, the merged config, notes) for ``lightning fit`` arguments (``--config …`` and overrides);
    call inside :func:`fake_tensors`."""
    configs = _configs(args)
    before = dict(_PLANNED_PARENTS)
    cli = _PlanCLI(args=list(args), run=False, overlays=configs[1:])
    notes = [f"`{key}` is `???` in the config: not needed for a plan" for key in cli.placeholders]
    notes += [f"parent `{path}` not trained yet: its architecture planned from {' + '.join(map(_rel, files))}"
              for path, (_, files) in _PLANNED_PARENTS.items() if path not in before]
    return cli.model, cli.config, notes


def _configs(args: Sequence[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]


def _rel(path: str | Path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(EXPERIMENTS.parent))
    except ValueError:
        return str(path)


def make_plan(args: Sequence[str], *, gpus: int = 8, mfu: float = 0.4, headroom: float = 0.1,
              command: str = "") -> Plan:
    """The :class:`Plan` of the stage ``lightning fit <args>`` would train (``args``: ``--config`` files and
    overrides, no subcommand)."""
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    if not 0 <= headroom < 1:
        raise ValueError(f"--headroom must be in [0, 1), got {headroom}")
    with fake_tensors():
        stage, cfg, notes = build_stage(args)
        data = cfg.data.as_dict() if cfg.get("data") is not None and hasattr(cfg.data, "as_dict") else cfg.get("data")
        if not data:
            _fail("data: a plan needs the data config (its class_path gives the batch's shapes)")
        precision = str(cfg.trainer.precision)
        switches = checkpointed_modules(stage)
        configured = any(m.checkpointing for m in switches) if switches else None
        cost: dict[str, StepCost] = {}
        try:
            for setting in (("plain", "checkpointing") if switches else ("plain",)):
                for m in switches:
                    m.checkpointing = setting == "checkpointing"
                cost[setting] = step_cost(stage, data, precision, int(data["init_args"]["batch_size"]))
        except ValueError as e:
            _fail(str(e) if re.match(r"^[\w.]+: ", str(e)) else f"model: {e}")
        trainable = [p for p in stage.parameters() if p.requires_grad]
        frozen = [p for p in stage.parameters() if not p.requires_grad]
        ema = any("WeightAveraging" in str(cb.get("class_path", "")) if isinstance(cb, dict) else
                  "WeightAveraging" in str(getattr(cb, "class_path", "")) for cb in cfg.trainer.get("callbacks") or [])
        grads = 4 * sum(p.numel() for p in trainable)  # fp32 master weights: fp32 gradients
        plan = Plan(
            command=command, stage=type(stage).__name__, configs=[_rel(c) for c in _configs(args)],
            precision=precision, batch_size=int(data["init_args"]["batch_size"]),
            max_steps=int(cfg.trainer.max_steps), gpus=gpus, mfu=mfu, headroom=headroom,
            params_trainable=sum(p.numel() for p in trainable), params_frozen=sum(p.numel() for p in frozen),
            weights=_bytes(stage.parameters()) + _bytes(stage.buffers()), grads=grads, adamw=2 * grads,
            ema=grads if ema else 0, unit=largest_unit(stage), checkpointing=configured, cost=cost, notes=notes)
    if any(c.timeline.extended != "allocation by allocation" for c in cost.values()):
        plan.notes.append("the step runs a different number of ops at batch 2 and 3 (a loop over the samples): its "
                          "memory is extended linearly from the peaks at batch 2 and 3")
    if plan.max_steps <= 0:
        _fail("trainer.max_steps: a plan needs the number of steps (a positive max_steps)")
    if "video" in synthetic_batch(data, 1) and getattr(stage, "joint_image_prob", 0.0):
        plan.notes.append(f"a share of {stage.joint_image_prob:g} of the steps trains on images (joint_image_prob): "
                          "cheaper steps, not counted; every step is planned as a video step")
    return plan
