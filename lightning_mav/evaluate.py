"""Evaluation runs: ``mav evaluate`` and ``lightning test --config experiments/eval.yaml``.

    prompts ──MakeAVideoPipeline (seeded)──> samples/NNNNN.pt   D_t's frames, ↑F's, the final ones, and the ablation
                                                                 (D per frame), lossless uint8; reused when rerun
            ──> videos/NNNNN-<prompt>.mp4 + .gif, sheets/NNNNN-<prompt>.png
            ──> scores ──> metrics.json + TensorBoard scalars (out/tb)

Scores (``EvalMetrics``; every one a ``torchmetrics.Metric`` with summed states, so DDP is exact):

- Moving Shapes faithfulness (colour / shape / size) on D_t's frames, temporal coherence of D_t's and ↑F's frames
  (before super-resolution: the shapes are segmented at the low resolution they are generated at), and the
  paper's ablation: the same prompts, image embeddings ``y_e`` and initial noise through D applied frame by frame
  (D_t's U-Net with ``time=False``: temporal layers and fps embedding off), scored on coherence next to D_t;
- motion: how far D_t's object moves per frame next to the objects of real validation clips at the same frame rate
  and size (and those clips' coherence, the metric's ceiling on this data);
- CLIPSIM of the final frames with the suite's own CLIP (the ``C_x`` P was trained with; *not* ViT-B/32, so not on
  the paper's 0.3049 scale);
- FVD against real clips of the validation video shards, only with local I3D weights (``--i3d PATH``);
- ↑F's PSNR on held-out frames of real validation clips (every ``skip``-th frame kept) next to a linear blend;
- SR PSNR of SR_l / SR_t / SR_h on real validation images / clips next to bicubic upsampling.

A stage whose checkpoint is missing (↑F, SR_t, SR_h, SR_l) is skipped and its scores read ``"not trained: ..."``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import random
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.aggregation import MeanMetric, SumMetric
from tqdm.auto import tqdm

from lightning_mav.checkpoints import CheckpointError, load_checkpoint
from lightning_mav.diffusion import Diffusion
from lightning_mav.media import contact_sheet, save_png, write_gif, write_mp4
from lightning_mav.metrics import (
    CLIPSIM,
    FrechetVideoDistance,
    ShapesFaithfulness,
    TemporalCoherence,
    interpolation_psnr,
    parse_prompt,
    sr_psnr,
)
from lightning_mav.pipeline import (
    CHAIN,
    DTYPE_HELP,
    DTYPES,
    STAGES,
    MakeAVideoPipeline,
    PerStage,
    default_checkpoint,
    parse_per_stage,
    per_stage,
    stage_generator,
    stop_index,
    train_command,
)
from lightning_mav.stages.superres import SuperResStage

__all__ = [
    "EvalMetrics",
    "EvaluationModule",
    "GenerationSettings",
    "PromptDataModule",
    "evaluate",
    "generate_batch",
    "load_chain",
    "load_prompts",
    "main",
    "sample_per_frame",
]

UCF_TEMPLATE = "a video of a person {class}"  # Make-A-Video's zero-shot UCF-101 prompts: one per class name
NO_I3D = "not computed: no I3D weights (--i3d PATH)"


# ============================================================================================== 1. prompts
def class_prompts(path: str | Path, template: str = UCF_TEMPLATE) -> list[str]:
    """UCF-101-style class templates: one prompt per class of a class list file.

    Lines are ``"1 ApplyEyeMakeup"`` (UCF-101's ``classInd.txt``) or just ``"ApplyEyeMakeup"`` / ``"apply eye
    makeup"``; CamelCase and underscores become lower-case words, which fill ``{class}`` in ``template``.
    """
    prompts = []
    for line in Path(path).read_text().splitlines():
        name = re.sub(r"^\s*\d+\s+", "", line).strip()
        if not name or name.startswith("#"):
            continue
        words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).replace("_", " ")
        prompts.append(template.replace("{class}", " ".join(words.lower().split())))
    return prompts


def caption_prompts(urls: str, limit: int | None = None) -> list[str]:
    """Distinct captions (``KEY.txt`` members) of WebDataset shards, in shard order: ``"data/images/val-*.tar"``."""
    from datamodules.decode import SampleError, decode_caption
    from datamodules.skips import SkipCounter
    from datamodules.tars import expand_urls, read_samples

    seen: dict[str, None] = {}
    for sample in read_samples(expand_urls(urls), SkipCounter()):
        try:
            caption = decode_caption(sample.get("txt"), required=False)
        except SampleError:
            continue
        if caption:
            seen.setdefault(caption)
        if limit is not None and len(seen) >= limit:
            break
    return list(seen)


def _is_shards(source: str) -> bool:
    return source.endswith(".tar") or any(c in source for c in "*?{") or "::" in source


def load_prompts(source: str | Path | None = None, *, data: str | Path = "data/shapes",
                 classes: str | Path | None = None, template: str = UCF_TEMPLATE, num_prompts: int | None = None,
                 seed: int = 0) -> list[str]:
    """The evaluation prompts.

    Args:
        source: a ``.txt`` file (one prompt per line), a ``.jsonl`` file (``{"prompt": ...}`` per line, as
            ``data/eval/prompts.jsonl``; ``caption``/``text`` also read), or caption shards (a ``.tar`` / glob /
            brace pattern). Default: ``<data>/eval/prompts.jsonl`` (the held-out Moving Shapes prompts).
        classes: a class list file instead: ``template`` per class (see :func:`class_prompts`).
        num_prompts: keep this many: a seeded random subset, in file order (the shapes prompts are ordered
            colour-major, so the first N would cover few colours and every k-th only one shape). ``seed`` is the
            subset's, apart from the generation seed: another generation seed scores the same prompts.
    """
    if classes is not None:
        prompts = class_prompts(classes, template)
    else:
        if source is None:
            jsonl = Path(data) / "eval" / "prompts.jsonl"
            source = jsonl if jsonl.is_file() else Path(data) / "eval" / "prompts.txt"
        text = str(source)
        if _is_shards(text):  # the first distinct captions: a random subset would mean reading every shard
            prompts = caption_prompts(text, limit=num_prompts)
        elif text.endswith(".jsonl"):
            rows = [json.loads(line) for line in Path(text).read_text().splitlines() if line.strip()]
            prompts = [str(next(r[k] for k in ("prompt", "caption", "text") if k in r)) for r in rows]
        else:
            prompts = [line.strip() for line in Path(text).read_text().splitlines()]
            prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {classes or source}")
    if num_prompts is not None and num_prompts < len(prompts):
        keep = sorted(random.Random(seed).sample(range(len(prompts)), num_prompts))
        prompts = [prompts[i] for i in keep]
    return prompts


def is_shapes_prompt(prompt: str) -> bool:
    """Whether the Moving Shapes metrics can score ``prompt`` (it names a palette colour and a shape)."""
    try:
        parse_prompt(prompt)
    except ValueError:
        return False
    return True


# ============================================================================================== 2. the chain
@dataclass
class Chain:
    """The loaded networks: the pipeline (C_x, P, D_t and the optional ↑F, SR_t, SR_h), SR_l (scored only),
    ``missing``: stage -> why it is skipped, ``checkpoints``: stage -> path (what the samples depend on)."""

    pipe: MakeAVideoPipeline
    sr_l: SuperResStage | None = None
    missing: dict[str, str] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)


def _load_sr_l(path: Path, device: torch.device) -> SuperResStage:
    """SR_l is no link of the sampled chain (SR_t replaces it), so the pipeline does not load it; for SR PSNR only."""
    ckpt = load_checkpoint(path, hint="train SR_l with `lightning fit --config experiments/sr_l.yaml`")
    params = inspect.signature(SuperResStage.__init__).parameters
    kwargs = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k in params}
    module = SuperResStage(**{**kwargs, "init_from": None})
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: not an SR_l checkpoint: {str(e).splitlines()[0]}") from e
    return module.to(device).eval().requires_grad_(False)


def load_chain(runs: str | Path = "runs", *, device: torch.device | str | None = None,
               dtype: torch.dtype | str | None = None) -> Chain:
    """The networks under ``runs/<stage>/checkpoints/last.ckpt``; P and D_t are required, the rest optional.

    Raises:
        CheckpointError: P or D_t missing (the message names the command that trains it), or a wrong checkpoint.
    """
    paths: dict[str, Path | None] = {}
    missing: dict[str, str] = {}
    for stage in CHAIN:
        path = default_checkpoint(runs, stage)
        if path.is_file():
            paths[stage] = path
        else:
            paths[stage] = None
            if stage in ("up_F", "SR_t", "SR_h"):
                missing[stage] = f"not trained: no {path} (`{train_command(stage)}`)"
    for required in ("P", "D_t"):
        if paths[required] is None:
            raise CheckpointError(f"checkpoint not found: {default_checkpoint(runs, required)} — train {required} "
                                  f"with `{train_command(required)}`")
    as_str = {k: None if v is None else str(v) for k, v in paths.items()}
    pipe = MakeAVideoPipeline.from_checkpoints(
        clip=as_str["clip"], prior=as_str["P"], decoder=as_str["D_t"], interpolation=as_str["up_F"],
        sr_t=as_str["SR_t"], sr_h=as_str["SR_h"], device=device, dtype=dtype)
    sr_l_path = Path(runs) / "sr_l" / "checkpoints" / "last.ckpt"
    sr_l = _load_sr_l(sr_l_path, pipe.device) if sr_l_path.is_file() else None
    if sr_l is None:
        missing["SR_l"] = f"not trained: no {sr_l_path} (`lightning fit --config experiments/sr_l.yaml`)"
    checkpoints = {k: v for k, v in as_str.items() if v is not None}
    if sr_l is not None:
        checkpoints["SR_l"] = str(sr_l_path)
    return Chain(pipe=pipe, sr_l=sr_l, missing=missing, checkpoints=checkpoints)


# ============================================================================================== 3. generating
@dataclass(frozen=True)
class GenerationSettings:
    """What a sample depends on besides its prompt, seed and the checkpoints (see ``MakeAVideoPipeline.__call__``)."""

    num_frames: int = 16
    fps: float = 6.0
    skip: int = 5
    steps: PerStage = None
    guidance: PerStage = None
    stop_after: str | None = None

    def __post_init__(self) -> None:
        if self.num_frames < 3:
            raise ValueError(f"num_frames must be >= 3 (temporal coherence needs 3 frames), got {self.num_frames}")


@dataclass
class Generated:
    """One batch of samples: ``frames[name]`` ``[B, 3, F, H, W]`` in [-1, 1] for ``"D_t"``, ``"D_per_frame"``,
    ``"up_F"`` (when it ran) and the last stage that ran (``final``, e.g. ``"SR_h"``); ``fps`` of the final frames."""

    frames: dict[str, Tensor]
    final: str
    fps: float


def stages_run(pipe: MakeAVideoPipeline, stop_after: str | None) -> list[str]:
    """The pipeline's stages that a call with ``stop_after`` runs, in order."""
    last = stop_index(stop_after)
    return [s for s in pipe.stages if STAGES.index(s) <= last]


def final_size(pipe: MakeAVideoPipeline, stop_after: str | None) -> int:
    """Side of the final frames: D_t's, times the factor of every super-resolution stage that runs."""
    size = pipe.D_t.image_size
    for stage in stages_run(pipe, stop_after):
        if stage in ("SR_t", "SR_h"):
            size *= getattr(pipe, stage).factor
    return size


@contextmanager
def record_stages(pipe: MakeAVideoPipeline) -> Iterator[dict[str, Tensor]]:
    """Record what ``P.sample`` (``"y_e"``), ``D_t.sample`` and ``up_F.interpolate`` return while the pipeline runs.

    The pipeline returns only its last stage's frames; the metrics also need D_t's and ↑F's. Wrapping the stage
    methods of these instances (for the duration of the block) keeps the final frames exactly what ``mav generate``
    makes with the same seed, instead of re-implementing the chain here. (A ``return_intermediates`` option on
    the pipeline would make this unnecessary.)
    """
    record: dict[str, Tensor] = {}
    targets = [("y_e", pipe.P, "sample"), ("D_t", pipe.D_t, "sample"), ("up_F", pipe.up_F, "interpolate")]
    wrapped = []
    for name, module, method in targets:
        if module is None:
            continue
        original = getattr(module, method)

        def wrapper(*args: Any, _original=original, _name=name, **kwargs: Any) -> Tensor:
            out = _original(*args, **kwargs)
            record[_name] = out
            return out

        object.__setattr__(module, method, wrapper)  # an instance attribute shadows the class's method
        wrapped.append((module, method))
    try:
        yield record
    finally:
        for module, method in wrapped:
            object.__delattr__(module, method)


@torch.no_grad()
def sample_per_frame(pipe: MakeAVideoPipeline, image_embed: Tensor, *, num_frames: int, seed: int,
                     steps: PerStage = None, guidance: PerStage = None, noise: Tensor | None = None) -> Tensor:
    """The ablation: D applied frame by frame. ``y_e [B, D]`` -> ``[B, 3, F, H, W]`` in [-1, 1].

    D_t's U-Net with ``time=False`` (its temporal convolutions and attention skipped) and no fps term: its spatial
    layers, i.e. D, on every frame independently. The initial noise is D_t's (the same stage generator), so the
    comparison with D_t differs only in the temporal layers. ``noise`` ``[B, 3, F, H, W]`` overrides it.
    """
    D_t = pipe.D_t
    image_embed = F.normalize(image_embed.float().to(D_t.device), dim=-1)
    size = D_t.image_size
    with pipe.autocast():
        video = D_t.diffusion.sample(
            D_t.model_fn(image_embed, fps=None, time=False), (image_embed.shape[0], 3, num_frames, size, size),
            steps=int(per_stage(steps, "D_t", D_t.sample_steps)), sampler=D_t.sampler,
            guidance_scale=float(per_stage(guidance, "D_t", D_t.guidance_scale)),
            generator=stage_generator(seed, "D_t"), noise=noise, device=D_t.device)
    return video.float().clamp(-1, 1).cpu()


@torch.no_grad()
def generate_batch(pipe: MakeAVideoPipeline, prompts: list[str], *, seed: int,
                   settings: GenerationSettings) -> Generated:
    """One pipeline call for ``prompts`` (seeded), with D_t's and ↑F's frames and the per-frame ablation."""
    with record_stages(pipe) as record:
        final = pipe(prompts, num_frames=settings.num_frames, fps=settings.fps, skip=settings.skip,
                     steps=settings.steps, guidance=settings.guidance, seed=seed, stop_after=settings.stop_after,
                     progress=False)
    frames = {name: record[name].float().clamp(-1, 1).cpu() for name in ("D_t", "up_F") if name in record}
    last = stages_run(pipe, settings.stop_after)[-1]
    frames[last] = rearrange(final, "b f c h w -> b c f h w")
    frames["D_per_frame"] = sample_per_frame(pipe, record["y_e"], num_frames=settings.num_frames, seed=seed,
                                             steps=settings.steps, guidance=settings.guidance)
    return Generated(frames=frames, final=last, fps=float(pipe.last_fps))


# ============================================================================================== 4. samples on disk
def to_uint8(video: Tensor) -> Tensor:
    """``[3, F, H, W]`` in [-1, 1] -> uint8 ``[F, 3, H, W]``: what every lossless image format would store."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).transpose(0, 1).contiguous()


def from_uint8(frames: Tensor) -> Tensor:
    """uint8 ``[F, 3, H, W]`` -> ``[3, F, H, W]`` in [-1, 1]."""
    return (frames.float() / 127.5 - 1).transpose(0, 1)


@dataclass(frozen=True)
class SampleSpec:
    """Sample ``index`` (prompt ``index // videos_per_prompt``) at ``position`` of a batch generated with ``seed``."""

    index: int
    prompt: str
    seed: int
    position: int


def plan_samples(prompts: Sequence[str], videos_per_prompt: int, batch_size: int, seed: int) -> list[list[SampleSpec]]:
    """Batches of samples, ``videos_per_prompt`` per prompt, each batch seeded ``seed + its first index``.

    A sample depends on its whole batch (the pipeline draws one noise tensor per batch), so batching is fixed by
    the plan and part of every sample's key: the same plan regenerates the same samples.
    """
    flat = [(i * videos_per_prompt + k, p) for i, p in enumerate(prompts) for k in range(videos_per_prompt)]
    batches = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        batch_seed = seed + chunk[0][0]
        batches.append([SampleSpec(index, prompt, batch_seed, pos) for pos, (index, prompt) in enumerate(chunk)])
    return batches


def _fingerprint(path: str) -> list[Any]:
    stat = Path(path).stat()
    return [path, stat.st_size, stat.st_mtime_ns]  # a retrained stage (new last.ckpt) invalidates its samples


def sample_key(batch: Sequence[SampleSpec], position: int, settings: GenerationSettings,
               checkpoints: dict[str, str], dtype: torch.dtype = torch.float32) -> str:
    """Hash of everything a sample depends on: its batch's prompts and seed, its position, settings, checkpoints
    and the pipeline's compute dtype."""
    what = {"prompts": [s.prompt for s in batch], "seed": batch[0].seed, "position": position,
            "settings": asdict(settings), "checkpoints": {k: _fingerprint(v) for k, v in sorted(checkpoints.items())},
            "dtype": str(dtype)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"


def sample_name(index: int, prompt: str) -> str:
    """File stem of a sample's media: ``00003-a-small-red-circle-moving``."""
    return f"{index:05d}-{_slug(prompt)}"


def load_sample(path: Path, key: str | None = None) -> dict[str, Any] | None:
    """A stored sample (``{"key", "prompt", "seed", "final", "fps", "frames": {name: uint8 [F,3,H,W]}}``), or
    None when it is missing, unreadable (an interrupted write) or was made with another ``key``."""
    if not path.is_file():
        return None
    try:
        sample = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a broken file is simply regenerated
        return None
    return sample if key is None or sample.get("key") == key else None


def save_sample(path: Path, sample: dict[str, Any]) -> None:
    """Write atomically: an interrupted run never leaves a half-written sample under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(sample, tmp)
    tmp.replace(path)


def write_media(sample: dict[str, Any], out: Path, name: str, *, overwrite: bool) -> dict[str, Any]:
    """mp4 + gif of the final frames, a contact sheet of them, and one of D_t next to D per frame (the ablation)."""
    frames = sample["frames"]
    final = frames[sample["final"]].float() / 127.5 - 1  # [F, 3, H, W]
    mp4, gif = out / "videos" / f"{name}.mp4", out / "videos" / f"{name}.gif"
    sheet, ablation = out / "sheets" / f"{name}.png", out / "sheets" / f"{name}-D_t-vs-D_per_frame.png"
    if overwrite or not mp4.is_file():
        write_mp4(final, mp4, fps=sample["fps"])
    if overwrite or not gif.is_file():
        write_gif(final, gif, fps=sample["fps"])
    if overwrite or not sheet.is_file():
        save_png(contact_sheet(final.transpose(0, 1)[None]), sheet)
    if overwrite or not ablation.is_file():
        rows = torch.stack([from_uint8(frames["D_t"]), from_uint8(frames["D_per_frame"])])  # [2, 3, F, h, w]
        save_png(contact_sheet(rows), ablation)
    return {"prompt": sample["prompt"], "files": [str(mp4), str(gif)], "sheet": str(sheet),
            "ablation_sheet": str(ablation)}


def generate_samples(chain: Chain, plan: list[list[SampleSpec]], out: Path, settings: GenerationSettings, *,
                     progress: bool = True) -> tuple[list[Path], set[Path]]:
    """Generate every planned sample that ``out/samples`` does not already hold (same key) and save it.

    A batch is generated whole (its samples depend on each other's presence), and only if one of its samples is
    missing or stale. Returns the sample files in index order and the set of those generated by this call.
    """
    total = sum(len(b) for b in plan)
    bar = tqdm(total=total, desc="generating", unit="video", dynamic_ncols=True, disable=not progress)
    paths: list[Path] = []
    fresh: set[Path] = set()
    for batch in plan:
        keys = [sample_key(batch, s.position, settings, chain.checkpoints, chain.pipe.dtype) for s in batch]
        files = [out / "samples" / f"{s.index:05d}.pt" for s in batch]
        done = all(load_sample(f, k) is not None for f, k in zip(files, keys))
        if not done:
            made = generate_batch(chain.pipe, [s.prompt for s in batch], seed=batch[0].seed, settings=settings)
            for spec, key, file in zip(batch, keys, files):
                sample = {"key": key, "prompt": spec.prompt, "seed": spec.seed, "final": made.final, "fps": made.fps,
                          "frames": {n: to_uint8(v[spec.position]) for n, v in made.frames.items()}}
                save_sample(file, sample)
            fresh.update(files)
        paths.extend(files)
        bar.update(len(batch))
        bar.set_postfix(generated=len(fresh), reused=len(paths) - len(fresh))
    bar.close()
    return paths, fresh


# ============================================================================================== 5. the scores
_COHERENCE = ("D_t", "up_F", "D_per_frame")
_PSNR = ("up_F", "SR_l", "SR_t", "SR_h")


class EvalMetrics(nn.Module):
    """Every score of an evaluation run, as torchmetrics (summed states: exact under DDP through their sync).

    Args:
        clip: the suite's CLIP (``pipe.C_x``) for CLIPSIM.
        i3d: local I3D weights for FVD (a path, or a feature network); None: no FVD.
        fvd_samples: FVD's videos per side (2048, the usual protocol; None counts all).

    ``update_generated(Generated-like frames, prompts)``, ``update_fvd_real(videos)``, ``update_real_motion(videos)``,
    ``update_psnr(stage, scores, n)``; :meth:`results` -> ``{name: {"value": float | str, "about": str}}``.
    """

    def __init__(self, clip: nn.Module, *, i3d: str | Path | nn.Module | None = None,
                 fvd_samples: int | None = 2048) -> None:
        super().__init__()
        self.faithfulness = ShapesFaithfulness()
        self.faithfulness_per_frame = ShapesFaithfulness()  # the ablation's: is a miss D's (text->image) or D_t's?
        self.coherence = nn.ModuleDict({name: TemporalCoherence() for name in _COHERENCE})
        self.coherence_real = TemporalCoherence()  # real clips at D_t's fps and size: the reference for motion
        self.not_shapes = SumMetric()  # prompts the shapes metrics cannot score
        self.clipsim = CLIPSIM(clip)
        self.clip_name = str(getattr(clip, "model_name", type(clip).__name__))
        self.fvd = None if i3d is None else FrechetVideoDistance(i3d, max_samples=fvd_samples)
        self.psnr = nn.ModuleDict({stage: nn.ModuleDict({"ours": MeanMetric(), "baseline": MeanMetric()})
                                   for stage in _PSNR})

    # ------------------------------------------------------------------ updates
    def update_generated(self, frames: dict[str, Tensor], prompts: Sequence[str], *, final: str,
                         skip: int = 5) -> None:
        """Score a batch of generated samples: ``frames[name]`` ``[B, 3, F, H, W]`` in [-1, 1] (see ``Generated``)."""
        shapes = [is_shapes_prompt(p) for p in prompts]
        self.not_shapes.update(float(len(shapes) - sum(shapes)))
        if all(shapes):
            self.faithfulness.update(frames["D_t"], prompts)
            if "D_per_frame" in frames:
                self.faithfulness_per_frame.update(frames["D_per_frame"], prompts)
            for name in _COHERENCE:
                if name in frames:
                    self.coherence[name].update(frames[name])
        self.clipsim.update(frames[final], prompts)
        if self.fvd is not None:
            self.fvd.update(fvd_frames(frames[final], skip if "up_F" in frames else 1), real=False)

    def update_fvd_real(self, videos: Tensor) -> None:
        """Real clips ``[B, 3, F, H, W]`` for FVD's reference side."""
        if self.fvd is not None:
            self.fvd.update(videos.to(self.fvd.device), real=True)  # I3D runs where the metric lives

    def update_real_motion(self, videos: Tensor) -> None:
        """Real clips ``[B, 3, F, H, W]`` at D_t's frame count, fps and size: coherence and speed of real objects."""
        self.coherence_real.update(videos)

    def update_psnr(self, stage: str, scores: dict[str, Tensor], n: int) -> None:
        """One batch's ``interpolation_psnr`` / ``sr_psnr`` result, weighted by its ``n`` items."""
        self.psnr[stage]["ours"].update(scores["psnr"].float(), weight=n)
        self.psnr[stage]["baseline"].update(scores["baseline_psnr"].float(), weight=n)

    # ------------------------------------------------------------------ results
    def results(self, skipped: dict[str, str] | None = None) -> dict[str, dict[str, float | str]]:
        """``{name: {"value", "about"}}``; ``skipped`` maps ``"up_F"``/``"SR_t"``/... to why they have no score.

        Every rank must call this (the computes synchronise); which metrics are computed depends only on
        ``skipped`` and on synchronised counts, so all ranks take the same path.
        """
        skipped = dict(skipped or {})
        out: dict[str, dict[str, float | str]] = {}

        def put(name: str, value: Any, about: str, reason: str | None = None) -> None:
            if reason is None and value is not None and not math.isfinite(float(value)):
                reason = "not computed: no samples"
            out[name] = {"value": reason if reason is not None else float(value), "about": about}

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            not_shapes = int(self.not_shapes.compute())
            shapes_reason = (f"not computed: {not_shapes} prompt(s) are not Moving Shapes prompts" if not_shapes
                             else None)
            faith = self.faithfulness.compute()
            where = "of D_t's frames (before ↑F and SR)"
            for key, about in (("color", f"fraction {where} whose object has the prompt's colour (chance 1/8)"),
                               ("shape", f"fraction {where} whose object has the prompt's shape (chance 1/3)"),
                               ("size", f"fraction {where} whose object has the prompt's size (chance 1/3)"),
                               ("all", f"fraction {where} with colour, shape and size all right")):
                put(f"shapes/{key}", faith[key], about, shapes_reason)
            faith_d = self.faithfulness_per_frame.compute()
            for key in ("color", "shape", "size"):
                put(f"shapes/D_per_frame/{key}", faith_d[key],
                    f"ablation: shapes/{key} of D per frame (same prompts, y_e and noise): where D_t's frames lose "
                    f"the prompt's {key}, D (text -> image) or the temporal fine-tuning", shapes_reason)
            coherence = {name: self.coherence[name].compute() for name in _COHERENCE}
            put("coherence/D_t", coherence["D_t"]["coherence"],
                "temporal coherence of D_t's frames, 0-1: one object, stable colour and area, smooth path, moving, "
                "steady background", shapes_reason)
            put("coherence/D_t/smoothness", coherence["D_t"]["smoothness"],
                "fraction of D_t's inner frames whose object path has no jump", shapes_reason)
            put("coherence/D_t/background", coherence["D_t"]["background_stability"],
                "fraction of D_t's frames whose background matches the video's (no switch or fade between the "
                "data's black, gray and white)", shapes_reason)
            put("coherence/D_per_frame", coherence["D_per_frame"]["coherence"],
                "ablation: D per frame (D_t's U-Net, time=False; same prompts, y_e and noise) scored like D_t",
                shapes_reason)
            put("coherence/D_per_frame/smoothness", coherence["D_per_frame"]["smoothness"],
                "ablation: smoothness of D per frame (an image model redraws the position every frame)",
                shapes_reason)
            put("coherence/gain", coherence["D_t"]["coherence"] - coherence["D_per_frame"]["coherence"],
                "coherence of D_t minus D per frame: what the temporal layers add (the paper's claim: > 0)",
                shapes_reason)
            put("coherence/up_F", coherence["up_F"]["coherence"],
                "temporal coherence of ↑F's interpolated frames (before SR)", skipped.get("up_F") or shapes_reason)
            real_reason = shapes_reason or skipped.get("real")
            real = None if real_reason else self.coherence_real.compute()
            put("coherence/real", None if real is None else real["coherence"],
                "temporal coherence of real validation clips (D_t's frame count, fps and size): the ceiling on this data",
                real_reason)
            speed = "median step of the object's centroid between frames (fraction of the frame side)"
            put("motion/D_t/speed", coherence["D_t"]["speed"], f"{speed} in D_t's frames", shapes_reason)
            put("motion/real/speed", None if real is None else real["speed"],
                f"{speed} in real validation clips at the same fps", real_reason)
            put("motion/speed_ratio", None if real is None else coherence["D_t"]["speed"] / real["speed"],
                "motion/D_t/speed over motion/real/speed: 1 when D_t's objects move as fast as real ones, < 1 slower",
                real_reason)

            clip_about = (f"CLIPSIM (mean cosine of frame and prompt) of the final frames with the suite's own CLIP "
                          f"({self.clip_name}, the C_x P was trained with) - not ViT-B/32, not the paper's scale")
            try:
                put("clipsim/suite_clip", self.clipsim.compute(), clip_about)
            except RuntimeError:
                put("clipsim/suite_clip", None, clip_about, "not computed: no samples")

            fvd_about = "FVD of the final videos (D_t's frame times) against real validation clips; lower is better"
            if self.fvd is None:
                put("fvd", None, fvd_about, skipped.get("fvd", NO_I3D))
            else:
                try:
                    report = self.fvd.report()
                    put("fvd", report["fvd"], f"{fvd_about}; I3D {report['weights_source']} "
                                              f"({report['num_real']} real, {report['num_fake']} generated)")
                    put("fvd/num_real", report["num_real"], "real videos in FVD")
                    put("fvd/num_generated", report["num_fake"], "generated videos in FVD")
                except RuntimeError as e:
                    put("fvd", None, fvd_about, skipped.get("fvd") or f"not computed: {e}")

            names = {"up_F": ("interp", "↑F on held-out frames of real clips", "linear blend of the kept frames"),
                     "SR_l": ("sr/SR_l", "SR_l on real validation images", "bicubic upsampling"),
                     "SR_t": ("sr/SR_t", "SR_t on real validation clips", "bicubic upsampling"),
                     "SR_h": ("sr/SR_h", "SR_h on real validation images", "bicubic upsampling")}
            for stage, (prefix, what, baseline) in names.items():
                reason = skipped.get(stage) or skipped.get(f"{stage}/data")
                ours = None if reason else self.psnr[stage]["ours"].compute()
                base = None if reason else self.psnr[stage]["baseline"].compute()
                base_name = "linear_blend_psnr" if stage == "up_F" else "bicubic_psnr"
                put(f"{prefix}/psnr", ours, f"PSNR (dB) of {what}", reason)
                put(f"{prefix}/{base_name}", base, f"PSNR (dB) of the {baseline} on the same frames", reason)
                put(f"{prefix}/gain", None if reason else ours - base,
                    f"{prefix}/psnr minus {prefix}/{base_name} (dB): > 0 when {stage} beats the {baseline}", reason)
        return out


def fvd_frames(video: Tensor, skip: int) -> Tensor:
    """The final frames at D_t's frame times (every ``skip``-th after ↑F): FVD's usual 16 frames, not 76."""
    return video[:, :, ::skip]


# ============================================================================================== 6. real data
def real_batches(urls: str, kind: str, *, size: int, limit: int, batch_size: int = 4, num_frames: int = 16,
                 fps: float = 6.0) -> Iterator[tuple[Tensor, Tensor | None, list[str]]]:
    """Up to ``limit`` real items of validation shards, this rank's share under DDP, centre-cropped to ``size``.

    ``kind="videos"``: ``(clips [B, 3, F, S, S], fps [B], keys)`` with ``num_frames`` frames at ``fps`` (or the
    nearest rate the native one allows); ``kind="images"``: ``(images [B, 3, S, S], None, keys)``. Values in
    [-1, 1]; ``keys`` are the samples' shard keys.
    """
    from datamodules.shards import ShardStream, resolve_rank
    from datamodules.tars import expand_urls
    from datamodules.text_image import TextImageCodec
    from datamodules.video import VideoCodec

    rank, world = resolve_rank()
    share = limit // world + int(rank < limit % world)
    codec = VideoCodec(num_frames, size, fps, fps) if kind == "videos" else TextImageCodec(size)
    stream = ShardStream(expand_urls(urls), codec, batch_size=batch_size, train=False, seed=0, rank=rank,
                         world_size=world)
    seen = 0
    for batch in stream:
        keep = batch["valid"].bool()
        x = batch["video" if kind == "videos" else "image"][keep][: share - seen]
        keys = [key for key, k in zip(batch["key"], keep.tolist()) if k][: len(x)]
        if len(x):
            seen += len(x)
            if kind == "videos":
                yield rearrange(x, "b f c h w -> b c f h w"), batch["fps"][keep][: len(x)].float(), keys
            else:
                yield x, None, keys
        if seen >= share:
            return


def _shards_reason(urls: str, what: str) -> str | None:
    """None when ``urls`` names shards, else why the scores that need them are not computed."""
    from datamodules.tars import expand_urls

    try:
        expand_urls(urls)
    except (ValueError, FileNotFoundError):
        return f"not computed: no {what} at {urls}"
    return None


@dataclass(frozen=True)
class RealData:
    """Where the real validation data is and how much of it to score."""

    videos: str
    images: str
    clips: int = 16  # real clips / images per PSNR score (↑F, SR_l, SR_t, SR_h) and for the motion reference
    fvd_videos: int = 2048  # real clips for FVD (at most; the shards may hold fewer)
    batch_size: int = 4


def item_noise(keys: Sequence[str], shape: Sequence[int], *, seed: int, stream: str,
               diffusion: Diffusion | None = None) -> Tensor:
    """Gaussian noise ``[len(keys), *shape]``, each item's drawn from a generator of its own key: a real clip gets
    the same noise whatever batch or DDP rank it lands in, so DDP reproduces the single-process scores. With
    ``diffusion``, drawn as that stage draws it (e.g. ↑F's noise shared across frames, ``frame_noise_share``)."""
    def draw(key: str) -> Tensor:
        generator = stage_generator(seed, f"{stream}/{key}")
        if diffusion is None:
            return torch.randn(tuple(shape), generator=generator)
        return diffusion.noise((1, *shape), generator=generator)[0]
    return torch.stack([draw(key) for key in keys])


@torch.no_grad()
def score_interpolation(pipe: MakeAVideoPipeline, metrics: EvalMetrics, real: RealData,
                        settings: GenerationSettings, seed: int) -> None:
    """↑F on real clips with every ``skip``-th frame kept: PSNR of the frames it fills in vs a linear blend."""
    up_F, k = pipe.up_F, settings.skip
    # the longest clip one window of ↑F covers: keyframes every k frames, k - 1 held-out frames between them
    length = (up_F.num_frames - 1) // k * k + 1
    clips = real_batches(real.videos, "videos", size=up_F.image_size, limit=real.clips, batch_size=real.batch_size,
                         num_frames=length, fps=settings.fps * k)  # at ↑F's output rate, as in the pipeline
    for target, fps, keys in clips:
        # one window per clip: its shape; drawn as ↑F was trained (frames may share part of their noise)
        noise = item_noise(keys, target.shape[1:], seed=seed, stream="up_F", diffusion=up_F.diffusion)
        with pipe.autocast():
            pred = up_F.interpolate(target[:, :, ::k], k, fps=fps / k,
                                    steps=int(per_stage(settings.steps, "up_F", up_F.sample_steps)),
                                    guidance_scale=float(per_stage(settings.guidance, "up_F", up_F.guidance_scale)),
                                    noise=noise.to(pipe.device), generator=stage_generator(seed, "up_F"))
        metrics.update_psnr("up_F", interpolation_psnr(pred.float().cpu(), target, k), len(target))


@torch.no_grad()
def score_super_resolution(stage: str, module: SuperResStage, pipe: MakeAVideoPipeline, metrics: EvalMetrics,
                           real: RealData, settings: GenerationSettings, seed: int) -> None:
    """An SR stage on downsampled real data (clips for SR_t, images for SR_l / SR_h): PSNR vs bicubic."""
    kind = "videos" if module.unet.temporal else "images"
    items = real_batches(real.videos if kind == "videos" else real.images, kind, size=module.highres_size,
                         limit=real.clips, batch_size=real.batch_size, num_frames=settings.num_frames,
                         fps=settings.fps)
    for target, _, keys in items:
        lowres = module.lowres_of(target)  # what a perfect stage below would hand it
        noise = item_noise(keys, target.shape[1:], seed=seed, stream=stage, diffusion=module.diffusion)
        noise = noise.to(pipe.device)
        lowres_noise = item_noise(keys, lowres.shape[1:], seed=seed, stream=f"{stage}/lowres").to(pipe.device)
        with pipe.autocast():
            pred = module.sample(lowres, steps=int(per_stage(settings.steps, stage, module.sample_steps)),
                                 noise=noise, lowres_noise=lowres_noise, generator=stage_generator(seed, stage))
        metrics.update_psnr(stage, sr_psnr(pred.float().cpu(), target, lowres), len(target))


def score_real_data(chain: Chain, metrics: EvalMetrics, real: RealData, settings: GenerationSettings, *,
                    seed: int) -> dict[str, str]:
    """FVD's real side, real motion, ↑F PSNR and SR PSNR on real validation data; returns why any of them was not
    computed."""
    pipe, skipped = chain.pipe, {}
    no_videos = _shards_reason(real.videos, "validation video shards")
    no_images = _shards_reason(real.images, "validation image shards")
    if no_videos:
        skipped["real"] = no_videos
    else:  # the clips D_t's frames are compared with: same frame count, fps and size
        for clips, _, _ in real_batches(real.videos, "videos", size=pipe.D_t.image_size, limit=real.clips,
                                        batch_size=real.batch_size, num_frames=settings.num_frames, fps=settings.fps):
            metrics.update_real_motion(clips)
    if metrics.fvd is not None:
        if no_videos:
            skipped["fvd"] = no_videos
        else:
            for clips, _, _ in real_batches(real.videos, "videos", size=final_size(pipe, settings.stop_after),
                                         limit=real.fvd_videos, batch_size=real.batch_size,
                                         num_frames=settings.num_frames, fps=settings.fps):
                metrics.update_fvd_real(clips)
    if pipe.up_F is not None:
        if no_videos:
            skipped["up_F/data"] = no_videos
        elif pipe.up_F.num_frames <= settings.skip:
            skipped["up_F/data"] = f"not computed: ↑F's {pipe.up_F.num_frames}-frame window < skip + 1"
        else:
            score_interpolation(pipe, metrics, real, settings, seed)
    for stage, module in (("SR_l", chain.sr_l), ("SR_t", pipe.SR_t), ("SR_h", pipe.SR_h)):
        if module is not None:
            reason = no_videos if module.unet.temporal else no_images
            if reason:
                skipped[f"{stage}/data"] = reason
            else:
                score_super_resolution(stage, module, pipe, metrics, real, settings, seed)
    return skipped


# ============================================================================================== 7. evaluate()
def write_tensorboard(metrics: dict[str, dict[str, Any]], log_dir: Path, step: int = 0) -> None:
    """Scores as TensorBoard scalars (and the skipped ones' reasons as text) under ``log_dir``."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for name, entry in metrics.items():
            if isinstance(entry["value"], float):
                writer.add_scalar(name, entry["value"], step)
            else:
                writer.add_text(name, str(entry["value"]), step)


def evaluate(
    runs: str | Path = "runs",
    data: str | Path = "data/shapes",
    out: str | Path = "runs/eval",
    *,
    prompts: str | Path | None = None,
    classes: str | Path | None = None,
    template: str = UCF_TEMPLATE,
    num_prompts: int | None = None,
    videos_per_prompt: int = 1,
    i3d: str | Path | None = None,
    real_videos: str | None = None,
    real_images: str | None = None,
    num_frames: int = 16,
    fps: float = 6.0,
    skip: int = 5,
    steps: PerStage = None,
    guidance: PerStage = None,
    stop_after: str | None = None,
    seed: int = 0,
    batch_size: int = 4,
    eval_clips: int = 16,
    fvd_videos: int = 2048,
    quick: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate videos for the prompts with the trained chain under ``runs`` and score them; see the module docs.

    Args:
        runs: run folders holding ``<stage>/checkpoints/last.ckpt`` (``clip``, ``prior``, ``dt``; optional
            ``interp``, ``sr_t``, ``sr_h``, ``sr_l``).
        data: Moving Shapes root: default prompts (``eval/prompts.jsonl``) and real validation shards.
        out: ``samples/``, ``videos/``, ``sheets/``, ``tb/`` and ``metrics.json`` land here.
        prompts, classes, template, num_prompts: see :func:`load_prompts`.
        videos_per_prompt: samples per prompt (different noise).
        i3d: local I3D weights for FVD (pytorch-i3d state dict or StyleGAN-V TorchScript); None: no FVD.
        real_videos, real_images: validation shards (default ``<data>/videos/val-*.tar``, ``<data>/images/val-*.tar``).
        num_frames, fps, skip, steps, guidance, stop_after, seed: the pipeline's options.
        batch_size: prompts per pipeline call (part of every sample's key).
        eval_clips: real clips / images per PSNR score and for the real motion reference; fvd_videos: real clips
            for FVD at most.
        quick: 2 sampling steps (unless ``steps``), at most 2 prompts, 2 clips per PSNR score (checks plumbing).
        device, dtype: the pipeline's (``dtype`` "auto": bf16 on Ampere+ GPUs and CPUs with AMX or AVX512-BF16;
            part of every sample's key).

    Returns:
        ``{"metrics": {name: {"value": float | str, "about": str}}, "videos": [{"prompt", "files": [mp4, gif],
        "sheet", "ablation_sheet"}], "run": {...}}``, also written to ``out/metrics.json``.
    """
    out = Path(out)
    settings = GenerationSettings(num_frames, fps, skip, steps, guidance, stop_after)
    if quick:
        settings = replace(settings, steps=2 if steps is None else steps)
        num_prompts = min(num_prompts or 2, 2)
        eval_clips, fvd_videos = min(eval_clips, 2), min(fvd_videos, 8)
    # first: a missing checkpoint is the likeliest error, say it at once
    chain = load_chain(runs, device=device, dtype=dtype)
    prompt_list = load_prompts(prompts, data=data, classes=classes, template=template, num_prompts=num_prompts)
    plan = plan_samples(prompt_list, videos_per_prompt, batch_size, seed)
    t0 = time.perf_counter()
    files, fresh = generate_samples(chain, plan, out, settings, progress=progress)
    t1 = time.perf_counter()

    metrics = EvalMetrics(chain.pipe.C_x, i3d=i3d, fvd_samples=None).to(chain.pipe.device)
    samples = list(zip((spec for batch in plan for spec in batch), files))
    videos = []
    for start in range(0, len(samples), batch_size):  # scored from the stored frames: reused == freshly made
        chunk = [(spec, load_sample(file), file in fresh) for spec, file in samples[start:start + batch_size]]
        for spec, sample, regenerated in chunk:  # a regenerated sample rewrites its media, a reused one keeps them
            videos.append(write_media(sample, out, sample_name(spec.index, spec.prompt), overwrite=regenerated))
        stored = [sample for _, sample, _ in chunk]
        frames = {name: torch.stack([from_uint8(s["frames"][name]) for s in stored]).to(chain.pipe.device)
                  for name in stored[0]["frames"]}
        metrics.update_generated(frames, [s["prompt"] for s in stored], final=stored[0]["final"], skip=skip)

    real = RealData(videos=real_videos or str(Path(data) / "videos" / "val-*.tar"),
                    images=real_images or str(Path(data) / "images" / "val-*.tar"),
                    clips=eval_clips, fvd_videos=fvd_videos, batch_size=batch_size)
    skipped = {**chain.missing, **score_real_data(chain, metrics, real, settings, seed=seed)}
    scores = metrics.results(skipped)
    seconds = {"generation": round(t1 - t0, 1), "scoring": round(time.perf_counter() - t1, 1)}

    ran = stages_run(chain.pipe, settings.stop_after)
    result = {"metrics": scores, "videos": videos, "run": {
        "generated": len(fresh), "reused": len(files) - len(fresh), "prompts": len(prompt_list),
        "videos_per_prompt": videos_per_prompt, "stages": ran, "settings": asdict(settings), "seed": seed,
        "checkpoints": chain.checkpoints, "dtype": str(chain.pipe.dtype).removeprefix("torch."), "seconds": seconds,
        "scored_frames": {"shapes/*, coherence/D_t, coherence/D_per_frame": "D_t's output (and the ablation's)",
                          "coherence/up_F": "↑F's output (before SR)", "clipsim, fvd": f"the final output ({ran[-1]})"},
    }}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    write_tensorboard(scores, out / "tb")
    return result


# ============================================================================================== 8. Lightning
def prompt_items(prompts: Sequence[str], videos_per_prompt: int = 1, world_size: int = 1) -> list[dict[str, Any]]:
    """``{"prompt", "index", "valid"}`` per sample, padded with ``valid=False`` items to a multiple of
    ``world_size``, so that Lightning's ``DistributedSampler`` splits them evenly without repeating real samples
    (a repeated sample would be counted twice by the metrics)."""
    items = [{"prompt": p, "index": i * videos_per_prompt + k, "valid": True}
             for i, p in enumerate(prompts) for k in range(videos_per_prompt)]
    while len(items) % max(world_size, 1):
        items.append({"prompt": items[0]["prompt"] if items else "", "index": -1, "valid": False})
    return items


class _Items(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class PromptDataModule(pl.LightningDataModule):
    """Prompts -> test batches ``{"prompt": list[str], "index": LongTensor[B], "valid": BoolTensor[B]}``.

    Args: see :func:`load_prompts` (``prompts`` is its ``source``) and :func:`evaluate`.
    """

    def __init__(self, prompts: str | None = None, data: str = "data/shapes", classes: str | None = None,
                 template: str = UCF_TEMPLATE, num_prompts: int | None = None, videos_per_prompt: int = 1,
                 batch_size: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.items: list[dict[str, Any]] = []

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        prompts = load_prompts(hp.prompts, data=hp.data, classes=hp.classes, template=hp.template,
                               num_prompts=hp.num_prompts)
        world = self.trainer.world_size if self.trainer is not None else 1
        self.items = prompt_items(prompts, hp.videos_per_prompt, world)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_Items(self.items), batch_size=self.hparams.batch_size, shuffle=False)


class EvaluationModule(pl.LightningModule):
    """The evaluation as ``lightning test``: ``test_step`` generates a batch of prompts and updates the metrics
    (:class:`EvalMetrics`); at the end the real-data scores are added and everything is logged (TensorBoard via
    the trainer's logger) and written to ``<log_dir>/metrics.json``. Under DDP each rank generates its share
    of the prompts and scores its share of the real data; torchmetrics' sync makes the totals exact. The real-data
    scores equal the single-process ones (each clip's noise comes from its key); the generated videos do too when
    every rank sees the same prompt batches (``data.batch_size: 1``), since the pipeline draws noise per batch.

    Args: see :func:`evaluate`. ``save_media``: write each sample's mp4 / gif / contact sheet under
    ``<log_dir>/videos`` and ``<log_dir>/sheets``.
    """

    def __init__(self, runs: str = "runs", data: str = "data/shapes", i3d: str | None = None,
                 real_videos: str | None = None, real_images: str | None = None, num_frames: int = 16,
                 fps: float = 6.0, skip: int = 5, steps: int | dict[str, int] | None = None,
                 guidance: float | dict[str, float] | None = None, stop_after: str | None = None, seed: int = 0,
                 eval_clips: int = 16, fvd_videos: int = 2048, real_batch_size: int = 4,
                 save_media: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.settings = GenerationSettings(num_frames, fps, skip, steps, guidance, stop_after)
        self.real = RealData(videos=real_videos or str(Path(data) / "videos" / "val-*.tar"),
                             images=real_images or str(Path(data) / "images" / "val-*.tar"),
                             clips=eval_clips, fvd_videos=fvd_videos, batch_size=real_batch_size)
        self.chain: Chain | None = None

    def setup(self, stage: str) -> None:
        if self.chain is None:  # before Lightning moves the module, so the metric states follow it
            device = self.trainer.strategy.root_device if self._trainer is not None else None
            self.chain = load_chain(self.hparams.runs, device=device)
            self.metrics = EvalMetrics(self.chain.pipe.C_x, i3d=self.hparams.i3d,
                                       fvd_samples=self.hparams.fvd_videos)

    def on_test_start(self) -> None:
        # Once, on every rank: under DDP `trainer.log_dir` is a broadcast, so asking for it in test_step (which
        # only the ranks with samples reach) or on rank 0 alone would deadlock.
        self.out = Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        keep = [bool(v) for v in batch["valid"]]
        prompts = [p for p, k in zip(batch["prompt"], keep) if k]
        indices = [int(i) for i, k in zip(batch["index"], keep) if k]
        if not prompts:
            return  # padding only (DDP): nothing to generate
        made = generate_batch(self.chain.pipe, prompts, seed=self.hparams.seed + indices[0], settings=self.settings)
        # the same uint8 round trip as mav evaluate's stored samples, so both paths score identical frames
        stored = {n: torch.stack([to_uint8(v) for v in x]) for n, x in made.frames.items()}  # [B, F, 3, H, W]
        frames = {n: rearrange(x.float() / 127.5 - 1, "b f c h w -> b c f h w").to(self.device)
                  for n, x in stored.items()}
        self.metrics.update_generated(frames, prompts, final=made.final, skip=self.settings.skip)
        if self.hparams.save_media:
            for j, (index, prompt) in enumerate(zip(indices, prompts)):
                sample = {"prompt": prompt, "final": made.final, "fps": made.fps,
                          "frames": {n: x[j] for n, x in stored.items()}}
                write_media(sample, self.out, sample_name(index, prompt), overwrite=True)

    def on_test_epoch_end(self) -> None:
        skipped = {**self.chain.missing, **score_real_data(self.chain, self.metrics, self.real, self.settings,
                                                           seed=self.hparams.seed)}
        scores = self.metrics.results(skipped)
        for name, entry in scores.items():
            if isinstance(entry["value"], float):  # already synchronised: every rank holds the same value
                self.log(name, entry["value"], sync_dist=False)
        if self.trainer.is_global_zero:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.json").write_text(json.dumps({"metrics": scores}, indent=1, ensure_ascii=False) + "\n")


# ============================================================================================== 9. mav evaluate
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mav evaluate", description="Generate videos with the trained chain and "
                                                                 "score them: metrics.json + TensorBoard.")
    p.add_argument("--runs", default="runs", help="run folders holding <stage>/checkpoints/last.ckpt")
    p.add_argument("--data", default="data/shapes", help="Moving Shapes root (default prompts, real val shards)")
    p.add_argument("--out", default="runs/eval", help="samples, videos, sheets, tb/ and metrics.json")
    p.add_argument("--prompts", help="prompt file (.txt / .jsonl) or caption shards (.tar pattern); "
                                     "default DATA/eval/prompts.jsonl")
    p.add_argument("--classes", help="class list file (UCF-101 classInd.txt style): one prompt per class")
    p.add_argument("--template", default=UCF_TEMPLATE, help="prompt template for --classes")
    p.add_argument("--num-prompts", type=int, default=None, help="a seeded subset of the prompts")
    p.add_argument("--videos-per-prompt", type=int, default=1)
    p.add_argument("--i3d", help="local I3D weights for FVD (pytorch-i3d state dict or StyleGAN-V TorchScript)")
    p.add_argument("--real-videos", help="real video shards for FVD, ↑F and SR_t (default DATA/videos/val-*.tar)")
    p.add_argument("--real-images", help="real image shards for SR_l / SR_h (default DATA/images/val-*.tar)")
    p.add_argument("--steps", help="sampling steps: N, or STAGE=N,... (e.g. 'D_t=50,SR_h=20')")
    p.add_argument("--guidance", help="guidance scale: G, or STAGE=G,...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--fps", type=float, default=6.0)
    p.add_argument("--skip", type=int, default=5, help="↑F frame-rate factor")
    p.add_argument("--stop-after", choices=["D_t", "up_F", "SR_t", "SR_h", "dt", "interp", "sr_t", "sr_h"])
    p.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call")
    p.add_argument("--eval-clips", type=int, default=16,
                   help="real clips / images per PSNR score and for the real motion reference")
    p.add_argument("--fvd-videos", type=int, default=2048, help="real clips for FVD (at most)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    p.add_argument("--quick", action="store_true", help="2 steps, 2 prompts (checks the plumbing only)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``mav evaluate [--runs runs] [--data data/shapes] [--out runs/eval] ...``; prints the scores."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        steps, guidance = parse_per_stage(args.steps, int), parse_per_stage(args.guidance, float)
    except ValueError as e:
        parser.error(f"--steps/--guidance: {e}")  # one line and exit status 2, like any bad argument
    try:
        result = evaluate(
            args.runs, args.data, args.out, prompts=args.prompts, classes=args.classes, template=args.template,
            num_prompts=args.num_prompts, videos_per_prompt=args.videos_per_prompt, i3d=args.i3d,
            real_videos=args.real_videos, real_images=args.real_images, num_frames=args.num_frames, fps=args.fps,
            skip=args.skip, steps=steps, guidance=guidance, stop_after=args.stop_after, seed=args.seed,
            batch_size=args.batch_size, eval_clips=args.eval_clips, fvd_videos=args.fvd_videos, quick=args.quick,
            device=args.device, dtype=args.dtype, progress=not args.no_progress)
    except (CheckpointError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {str(e).splitlines()[0]}\n")
        raise SystemExit(2) from None
    width = max(len(n) for n in result["metrics"])
    for name, entry in result["metrics"].items():
        value = entry["value"]
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{name:<{width}}  {shown}")  # noqa: T201
    print(Path(args.out) / "metrics.json")  # noqa: T201
    return result


if __name__ == "__main__":
    main()
