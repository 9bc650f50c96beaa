"""MakeAVideoPipeline: text -> video, ``ŷ_t = SR_h ∘ SR_t ∘ ↑F ∘ D_t ∘ P(x̂, C_x(x))`` (behind ``mav generate``).

    prompts ──C_x, x̂──> P ──y_e [B,D]──> D_t ──[B,3,16,h,h]──> ↑F ──[B,3,76,h,h]──> SR_t ──[B,3,76,m,m]──> SR_h
                                                                                        (per frame, same noise)

Every network is one stage checkpoint (``runs/<stage>/checkpoints/last.ckpt`` by default: ``clip``, ``prior``,
``dt``, ``interp``, ``sr_t``, ``sr_h``). ↑F, SR_t and SR_h are optional: a missing one is skipped and
``stop_after`` ends the chain early. Randomness: one generator per stage, derived from ``seed`` and the stage's
name, so changing one stage's steps or dropping a later stage does not change what the earlier stages draw.

SR_h is the paper's per-frame super-resolution with the *same* initial noise for every frame (the detail it
hallucinates then stays put from frame to frame): :func:`frame_shared_noise` draws ``[B, 3, 1, H, W]`` and
expands it over the frames, the low-resolution augmentation noise likewise, and the sampler is deterministic
(DDIM), so those two draws are all the randomness SR_h sees.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from einops import rearrange
from torch import Tensor, nn

from lightning_mav.checkpoints import CheckpointError, load_checkpoint
from lightning_mav.media import write_gif, write_mp4
from lightning_mav.networks import SAMPLED, stage_name, train_command
from lightning_mav.nn.mixed_precision import native_bf16
from lightning_mav.stages.base import StageBase
from lightning_mav.stages.decoder import DecoderStage
from lightning_mav.stages.interpolation import InterpolationStage
from lightning_mav.stages.prior import PriorStage
from lightning_mav.stages.superres import SuperResStage

PerStage = int | float | dict[str, int | float] | None
#: where ``extend`` adds frames: after the end, before the start, or on both sides
EXTEND_DIRECTIONS = ("forward", "backward", "both")
#: SR_h frames per network call on the CPU: with the heap allocator the commands set (lightning_mav.malloc) 4 frames
#: per call is as fast as all 76 at once and bounds memory (docs/choices.md#allocator-mav_malloc).
CPU_FRAME_BATCH = 4
#: SR_h output pixels per network call on an accelerator: 8 frames at 768² (one 768² frame of the paper-width SR_h
#: peaks near 2.9 GiB in bf16, all 76 at once near 217 GiB: benchmarks/RESULTS.md, SR at paper size); every frame of
#: the demo's small videos still goes in one call.
GPU_FRAME_PIXELS = 8 * 768 * 768


def sr_h_frame_batch(device: torch.device, height: int, width: int) -> int:
    """SR_h's default frames per call on ``device`` for output frames of ``height x width``."""
    if device.type == "cpu":
        return CPU_FRAME_BATCH
    return max(1, GPU_FRAME_PIXELS // (height * width))


def stop_index(stop_after: str | None) -> int:
    """Index in ``SAMPLED`` of the last network a run with ``stop_after`` samples (all of them for None)."""
    if stop_after is None:
        return len(SAMPLED) - 1
    stage = stage_name(stop_after)
    if stage not in SAMPLED[SAMPLED.index("D_t"):]:
        raise ValueError(f"stop_after {stop_after!r}: must be one of {', '.join(SAMPLED[1:])} (P alone makes "
                         "embeddings, not frames; SR_l is not sampled by the chain)")
    return SAMPLED.index(stage)


@dataclass(frozen=True)
class GenerationSettings:
    """What a video depends on besides its prompts, seed and checkpoints: the options of
    :meth:`MakeAVideoPipeline.__call__` that ``mav generate``, ``mav evaluate`` and the evaluation module share.
    Each field's ``help`` is the command-line help of its flag."""

    num_frames: int = field(default=16, metadata={"help": "frames D_t generates (16 in the paper)"})
    fps: float = field(default=6.0, metadata={"help": "frame rate D_t is conditioned on"})
    skip: int = field(default=5, metadata={"help": "↑F's frame-rate factor: (num_frames - 1) * skip + 1 frames"})
    steps: PerStage = field(default=None, metadata={
        "help": "sampling steps: N, or STAGE=N,... (e.g. 'D_t=50,SR_h=20'); default each checkpoint's", "kind": int})
    guidance: PerStage = field(default=None, metadata={
        "help": "classifier-free guidance scale of P, D_t, up_F: G, or STAGE=G,..."})
    stop_after: str | None = field(default=None, metadata={
        "help": "last network to run", "choices": ("D_t", "up_F", "SR_t", "SR_h", "dt", "interp", "sr_t", "sr_h")})
    extend: int = field(default=0, metadata={
        "help": "↑F extrapolates K more frames at the output frame rate after interpolating (before SR_t / SR_h); "
                "needs ↑F"})
    extend_direction: str = field(default="forward", metadata={
        "help": "where --extend adds its frames: after the end, before the start, or both (K on each side)",
        "choices": EXTEND_DIRECTIONS})

    def __post_init__(self) -> None:
        if self.num_frames < 3:
            raise ValueError(f"num_frames must be >= 3 (temporal coherence needs 3 frames), got {self.num_frames}")
        last = stop_index(self.stop_after)  # an unknown stage fails here, not after the checkpoints are loaded
        if self.extend < 0:
            raise ValueError(f"extend: frames to add must be >= 0, got {self.extend}")
        if self.extend_direction not in EXTEND_DIRECTIONS:
            raise ValueError(f"extend_direction: expected one of {', '.join(EXTEND_DIRECTIONS)}, "
                             f"got {self.extend_direction!r}")
        if self.extend and last < SAMPLED.index("up_F"):
            raise ValueError(f"extend: ↑F extends the video, but stop_after {self.stop_after!r} ends the chain "
                             "before it")


def extend_both_ways(up_F: InterpolationStage, video: Tensor, n: int, direction: str,
                     **kwargs: Any) -> Tensor:
    """↑F's :meth:`~InterpolationStage.extend` of ``video [B, 3, F, H, W]`` by ``n`` frames ``"forward"``,
    ``"backward"``, or ``"both"`` (``n`` after, then ``n`` before: ``[B, 3, F + 2n, H, W]``); ``kwargs`` go to
    ``extend`` (``image_embed``, ``fps``, ``steps``, ``generator``, ...)."""
    if n <= 0:
        return video
    for way in (("forward", "backward") if direction == "both" else (direction,)):
        video = up_F.extend(video, n, way, **kwargs)
    return video


def frame_shared_noise(shape: Sequence[int], *, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Gaussian noise ``[B, C, F, H, W]`` identical for every frame: one ``[B, C, 1, H, W]`` draw, expanded (a view)."""
    b, c, f, h, w = shape
    return randn_tensor((b, c, 1, h, w), generator=generator, device=torch.device(device or "cpu"),
                        dtype=dtype).expand(b, c, f, h, w)


def stage_generator(seed: int, stage: str) -> torch.Generator:
    """A CPU generator for one stage of one seed (CPU: the same seed gives the same video on any device)."""
    digest = hashlib.blake2b(f"{seed}/{stage}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def per_stage(value: PerStage, stage: str, default: Any) -> Any:
    """Resolve an int/float for every stage, or a dict ``{stage: value, "*": fallback}``, for ``stage``."""
    if value is None:
        return default
    if not isinstance(value, dict):
        return value
    by_stage = {("*" if k == "*" else stage_name(k)): v for k, v in value.items()}
    return by_stage.get(stage, by_stage.get("*", default))


@contextmanager
def stage_progress(network: nn.Module, desc: str, total: int | None, enabled: bool = True) -> Iterator[None]:
    """A tqdm bar for one stage, ticked by every forward call of its ``network`` (one call per sampling step;
    ``total`` None: a count without a total)."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def tick(*_: Any) -> None:  # returns None: whatever a forward hook returns replaces the module's output, and
        bar.update(1)           # tqdm's update returns True whenever it redraws the bar

    handle = network.register_forward_hook(tick)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


# ---------------------------------------------------------------------------------------------- loading stages
def load_stage(cls: type[StageBase], path: str | Path, *, stage: str, clip_ckpt: str | None = None,
               clip_model: str | None = None, image_embed_dim: int | None = None) -> StageBase:
    """Rebuild a trained stage from its Lightning checkpoint for inference (eval mode, no gradients).

    The architecture comes from the checkpoint's hyperparameters and the weights from its ``state_dict`` (the EMA
    weights when they were averaged). ``init_from`` is not followed (the weights are here already). The frozen CLIP
    is not re-loaded per stage: P loads ``clip_ckpt`` (it becomes the pipeline's ``C_x``; ``clip_model`` names the
    open_clip architecture of a weights file given instead of the one P recorded) and the decoders only get
    ``image_embed_dim``, the width that CLIP would have given their U-Net.
    """
    ckpt = load_checkpoint(path, hint=f"train {stage} with `{train_command(stage)}`")
    params = cls.option_names()
    kwargs = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k in params}
    if "init_from" in params:
        kwargs["init_from"] = None
    for tower in ("clip_image_tower", "clip_text_tower"):  # trained on precomputed embeddings: sampling needs them
        kwargs.pop(tower, None)
    if cls is PriorStage:
        if clip_ckpt:  # another file than P recorded: its own architecture (None: a suite CLIP run)
            kwargs["clip_model"] = clip_model
        kwargs["clip_ckpt"] = clip_ckpt = clip_ckpt or kwargs.get("clip_ckpt")
        if not clip_ckpt or not Path(clip_ckpt).expanduser().is_file():
            raise CheckpointError(f"{path}: the CLIP checkpoint P was trained with ({clip_ckpt}) is missing — pass "
                                  f"clip= (--clip) or train it with `{train_command('clip')}`")
    elif "clip_ckpt" in params:
        # D_t / ↑F record the resolved image_embed_dim; this covers checkpoints that left it to their CLIP
        if kwargs.get("clip_ckpt") and image_embed_dim is not None:
            kwargs["unet"] = {"image_embed_dim": image_embed_dim, **(kwargs.get("unet") or {})}
        kwargs["clip_ckpt"] = None
    try:
        module = cls(**kwargs)
        module.on_load_checkpoint(ckpt)  # as Lightning's loaders do: options an older checkpoint was saved without
        state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("clip.")}
        missing, unexpected = module.load_state_dict(state, strict=False)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: not a {stage} checkpoint ({cls.__name__}): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    missing = [k for k in missing if not k.startswith("clip.")]
    if missing or unexpected:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:3]) + (f" (+{len(xs) - 3} more)" if len(xs) > 3 else "")
        raise CheckpointError(f"{path}: not a {stage} checkpoint ({cls.__name__}): missing {len(missing)} "
                              f"[{few(missing)}], unexpected {len(unexpected)} [{few(unexpected)}]")
    module.eval().requires_grad_(False)
    return module


_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                "fp32": torch.float32, "float32": torch.float32}
DTYPES = ("auto", *_DTYPE_NAMES)  # what --dtype accepts
DTYPE_HELP = "auto (bf16 on Ampere+ GPUs and CPUs with AMX or AVX512-BF16), bf16, fp16 or fp32"
DEVICE_HELP = "default: CUDA when available, else the CPU"


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)} or 'auto', got {dtype!r}")
    return _DTYPE_NAMES[dtype]


# ---------------------------------------------------------------------------------------------- the pipeline
class MakeAVideoPipeline:
    """The trained networks of Make-A-Video chained for inference.

    Attributes (paper names): ``C_x`` (CLIP text/image encoder, frozen), ``P`` (prior), ``D_t`` (spatiotemporal
    decoder), ``up_F`` (↑F, frame interpolation), ``SR_t`` (spatiotemporal super-resolution), ``SR_h`` (per-frame
    super-resolution); the last three may be None (skipped).

    Args:
        device: default CUDA when available.
        dtype: compute dtype; ``None``/"auto" = bfloat16 autocast where the device computes it natively (an Ampere or
            later GPU, a CPU with AMX or AVX512-BF16: faster sampling, docs/choices.md#bf16-on-cpus), float32 elsewhere.
            Weights stay float32 (the samplers' arithmetic with them); only the networks' matmuls/convs run in
            ``dtype``.
    """

    def __init__(self, C_x: nn.Module, P: PriorStage, D_t: DecoderStage, up_F: InterpolationStage | None = None,
                 SR_t: SuperResStage | None = None, SR_h: SuperResStage | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _resolve_dtype(dtype, self.device)
        self.C_x, self.P, self.D_t, self.up_F, self.SR_t, self.SR_h = C_x, P, D_t, up_F, SR_t, SR_h
        for network in (C_x, *self.stages.values()):
            network.to(self.device).eval()
        self.last_fps: float | None = None  # frame rate of the frames the last call returned (what save() uses)

    @classmethod
    def from_checkpoints(
        cls,
        *,
        clip: str | Path | None = None,
        clip_model: str | None = None,
        prior: str | Path,
        decoder: str | Path,
        interpolation: str | Path | None = None,
        sr_t: str | Path | None = None,
        sr_h: str | Path | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> MakeAVideoPipeline:
        """Load each network from its stage checkpoint (a path; None skips an optional stage).

        ``clip`` defaults to the CLIP recorded in P's hyperparameters (a CLIPStage run, or an open_clip weights file
        and its ``clip_model``); an open_clip file given here needs its ``clip_model``. ``decoder`` is a D_t checkpoint
        (``runs/dt``). Every path is checked before anything is loaded, so a missing one fails at once with the
        command that makes it.
        """
        given = {"clip": clip, "P": prior, "D_t": decoder, "up_F": interpolation, "SR_t": sr_t, "SR_h": sr_h}
        for stage, path in given.items():
            if path is not None and not Path(path).expanduser().is_file():
                raise CheckpointError(f"checkpoint not found: {path} — train {stage} with `{train_command(stage)}`")
        P = load_stage(PriorStage, prior, stage="P", clip_ckpt=None if clip is None else str(clip),
                       clip_model=clip_model)
        C_x = P.clip  # the frozen CLIP P was trained with: C_x(x) and x̂ for P, and its embed width for D_t / ↑F
        embed_dim = C_x.embed_dim
        D_t = load_stage(DecoderStage, decoder, stage="D_t", image_embed_dim=embed_dim)
        if not D_t.unet.temporal:
            raise CheckpointError(f"{decoder}: a D (image decoder) checkpoint, not D_t: it has no temporal layers — "
                                  f"train D_t from it with `{train_command('D_t')}`")
        if D_t.unet.extra_in_channels:
            raise CheckpointError(f"{decoder}: an ↑F checkpoint (extra input channels), not D_t — give it as "
                                  "interpolation= (--interp)")
        up_F = None if interpolation is None else load_stage(InterpolationStage, interpolation, stage="up_F",
                                                             image_embed_dim=embed_dim)
        SR_t = None if sr_t is None else load_stage(SuperResStage, sr_t, stage="SR_t")
        if SR_t is not None and not SR_t.unet.temporal:
            raise CheckpointError(f"{sr_t}: an image super-resolution checkpoint (SR_l / SR_h), not SR_t: it has no "
                                  f"temporal layers — train SR_t with `{train_command('SR_t')}`")
        SR_h = None if sr_h is None else load_stage(SuperResStage, sr_h, stage="SR_h")
        for stage in (D_t, up_F):
            if stage is not None:
                stage.clip = C_x  # shared, so ↑F can embed frames on its own (interpolate without y_e)
        return cls(C_x, P, D_t, up_F, SR_t, SR_h, device=device, dtype=dtype)

    @property
    def stages(self) -> dict[str, StageBase]:
        """The loaded networks by paper name, in the order of the chain."""
        return {name: getattr(self, name) for name in SAMPLED if getattr(self, name) is not None}

    def stages_run(self, stop_after: str | None = None) -> list[str]:
        """The loaded networks a call with ``stop_after`` runs, in order."""
        last = stop_index(stop_after)
        return [s for s in self.stages if SAMPLED.index(s) <= last]

    def autocast(self):
        """``dtype`` autocast on the pipeline's device; nothing in float32."""
        if self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return nullcontext()

    # ------------------------------------------------------------------ the chain
    @torch.no_grad()
    def __call__(
        self,
        prompts: str | list[str],
        *,
        num_frames: int = 16,
        fps: float = 6.0,
        skip: int = 5,
        steps: PerStage = None,
        guidance: PerStage = None,
        seed: int = 0,
        output_fps: float | None = None,
        stop_after: str | None = None,
        extend: int = 0,
        extend_direction: str = "forward",
        frame_batch: int | None = None,
        sr_t_chunk: int | None = None,
        sr_t_overlap: int | None = None,
        progress: bool = True,
        on_stage_end: Callable[[str, Tensor], None] | None = None,
    ) -> Tensor:
        """Generate one video per prompt: frames ``[B, F', 3, H, W]`` in [-1, 1] (on the CPU, float32).

        Args:
            num_frames: frames D_t generates (16 in the paper).
            fps: frame rate D_t is conditioned on; ↑F's output has ``fps · skip``.
            skip: ↑F's frame-rate factor: ``F' = (num_frames - 1) · skip + 1`` (16 -> 76 at skip 5).
            steps: sampling steps, one int for every stage or ``{"D_t": 50, "SR_h": 20, "*": 30}``
                (paper or run-folder names); unset stages use their checkpoint's ``sample_steps``.
            guidance: classifier-free guidance scale(s) of P, D_t and ↑F, same forms as ``steps``.
            seed: same seed, same video.
            output_fps: frame rate recorded for :meth:`save` (default: the frames' own rate).
            stop_after: last stage to run (``"D_t"``, ``"up_F"``, ``"SR_t"``; default all loaded ones).
            extend: after interpolating, ↑F extrapolates this many more frames at the output rate ``fps · skip``
                (:meth:`InterpolationStage.extend`, from a generator of its own, so the interpolated frames are those
                of a call without ``extend``); SR_t and SR_h then run on the longer video. Needs ↑F.
            extend_direction: ``"forward"`` (after the end), ``"backward"`` (before the start) or ``"both"``
                (``extend`` frames on each side).
            frame_batch: SR_h frames per network call (default :func:`sr_h_frame_batch`: ``CPU_FRAME_BATCH`` on the
                CPU, ``GPU_FRAME_PIXELS`` worth of output frames on an accelerator); the noise stays shared, so the
                frames do not depend on it.
            sr_t_chunk, sr_t_overlap: SR_t's network calls on windows of ``sr_t_chunk`` frames overlapping by
                ``sr_t_overlap``, cross-faded (bounds SR_t's memory; an approximation of the whole-clip call, see
                :mod:`lightning_mav.stages.superres`); default: the SR_t checkpoint's ``frame_chunk`` (all frames).
            progress: a progress bar per stage.
            on_stage_end: called as ``on_stage_end(name, output)`` after each network: ``("P", y_e [B, D])``, then
                ``("D_t" | "up_F" | "SR_t" | "SR_h", frames [B, 3, F, H, W])`` as that network returned them
                (what evaluation scores besides the final frames).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ran = self.stages_run(stop_after)
        if extend and "up_F" not in ran:
            raise ValueError(f"extend: ↑F extends the video, but this run has no ↑F (no checkpoint loaded, or "
                             f"stop_after {stop_after!r}): give --interp CKPT")
        if extend_direction not in EXTEND_DIRECTIONS:
            raise ValueError(f"extend_direction: expected one of {', '.join(EXTEND_DIRECTIONS)}, "
                             f"got {extend_direction!r}")
        done = on_stage_end or (lambda name, output: None)

        def run(stage: str) -> bool:
            return stage in ran

        def n_steps(stage: str) -> int:
            return int(per_stage(steps, stage, getattr(self, stage).sample_steps))

        def scale(stage: str) -> float:
            return float(per_stage(guidance, stage, getattr(self, stage).guidance_scale))

        with self.autocast():
            # x̂ = BPE(x), e_x = C_x(x)  ->  y_e = P(e_x, x̂)
            with stage_progress(self.P.prior, "P", n_steps("P"), progress):
                y_e = self.P.sample(prompts, steps=n_steps("P"), guidance_scale=scale("P"),
                                    generator=stage_generator(seed, "P"))
            done("P", y_e)
            # D_t: y_e -> num_frames low-resolution frames at `fps`
            with stage_progress(self.D_t.unet, "D_t", n_steps("D_t"), progress):
                video = self.D_t.sample(y_e, num_frames=num_frames, fps=fps, steps=n_steps("D_t"),
                                        guidance_scale=scale("D_t"), generator=stage_generator(seed, "D_t"))
            done("D_t", video)
            rate = float(fps)
            if run("up_F"):  # ↑F: skip - 1 new frames between every pair
                with stage_progress(self.up_F.unet, "↑F", n_steps("up_F"), progress):
                    video = self.up_F.interpolate(video, skip, image_embed=y_e, fps=fps, steps=n_steps("up_F"),
                                                  guidance_scale=scale("up_F"),
                                                  generator=stage_generator(seed, "up_F"))
                rate *= skip
                if extend:  # ↑F's extrapolation at the output rate; the frames ↑F made so far stay as they are
                    with stage_progress(self.up_F.unet, "↑F extend", None, progress):
                        video = extend_both_ways(self.up_F, video, extend, extend_direction, image_embed=y_e,
                                                 fps=rate, steps=n_steps("up_F"), guidance_scale=scale("up_F"),
                                                 generator=stage_generator(seed, "up_F/extend"))
                done("up_F", video)
            if run("SR_t"):  # SR_t: all frames at once, temporal layers on
                with stage_progress(self.SR_t.unet, "SR_t", n_steps("SR_t"), progress):
                    video = self.SR_t.sample(video, steps=n_steps("SR_t"), generator=stage_generator(seed, "SR_t"),
                                             frame_chunk=sr_t_chunk, chunk_overlap=sr_t_overlap)
                done("SR_t", video)
            if run("SR_h"):  # SR_h: frame by frame, the same noise for every frame
                video = self.super_resolve_frames(video, steps=n_steps("SR_h"), seed=seed, frame_batch=frame_batch,
                                                  progress=progress)
                done("SR_h", video)
        self.last_fps = float(output_fps or rate)
        return rearrange(video.float().clamp(-1, 1), "b c f h w -> b f c h w").cpu()

    @torch.no_grad()
    def super_resolve_frames(self, video: Tensor, *, steps: int | None = None, seed: int = 0,
                             frame_batch: int | None = None, progress: bool = False) -> Tensor:
        """SR_h on every frame of ``video [B, 3, F, h, w]`` -> ``[B, 3, F, k·h, k·w]``, one noise for all frames.

        Both the initial noise of the high-res sample and the low-res augmentation noise come from
        :func:`frame_shared_noise`; the sampler is deterministic (DDIM unless the stage's is DPM-Solver++), so
        the frames differ only where their low-resolution inputs do.
        """
        sr, (b, c, f, h, w) = self.SR_h, video.shape
        generator = stage_generator(seed, "SR_h")
        noise = frame_shared_noise((b, c, f, h * sr.factor, w * sr.factor), generator=generator, device=self.device)
        lowres_noise = frame_shared_noise((b, c, f, h, w), generator=generator, device=self.device)
        frames, noise, lowres_noise = (rearrange(x, "b c f h w -> (b f) c h w") for x in (video, noise, lowres_noise))
        sampler = sr.sampler if sr.sampler in ("ddim", "dpm++") else "ddim"
        chunk = frame_batch or sr_h_frame_batch(self.device, h * sr.factor, w * sr.factor)
        n_steps = steps or sr.sample_steps
        outs = []
        with stage_progress(sr.unet, "SR_h", n_steps * -(-frames.shape[0] // chunk), progress):
            for i in range(0, frames.shape[0], chunk):
                outs.append(sr.sample(frames[i:i + chunk], noise=noise[i:i + chunk],
                                      lowres_noise=lowres_noise[i:i + chunk], steps=n_steps, sampler=sampler))
        return rearrange(torch.cat(outs), "(b f) c h w -> b c f h w", b=b)

    # ------------------------------------------------------------------ output
    def save(self, frames: Tensor, out_path: str | Path, fps: float | None = None, gif: bool = True) -> list[Path]:
        """Write ``frames [B, F, 3, H, W]`` (or ``[F, 3, H, W]``) as mp4 (H.264) and gif.

        One prompt: ``out.mp4`` + ``out.gif``; several: ``out-0.mp4``, ``out-0.gif``, ``out-1.mp4``, ...
        ``fps`` defaults to the rate of the last call's frames. Returns the written paths.
        """
        fps = float(fps or self.last_fps or 8.0)
        frames = frames[None] if frames.dim() == 4 else frames
        out, paths = Path(out_path), []
        for i, video in enumerate(frames):
            mp4 = out.with_suffix(".mp4") if len(frames) == 1 else out.with_name(f"{out.stem}-{i}.mp4")
            paths.append(write_mp4(video, mp4, fps=fps))
            if gif:
                paths.append(write_gif(video, mp4.with_suffix(".gif"), fps=fps))
        return paths
