"""What several test files share: tiny model configs, the quiet CPU Trainer, the whole tiny chain, the 2-process
gloo launcher, one intra-op thread, and small file / event helpers. Plain functions and constants; the fixtures that
wrap them live in conftest.py. Import as ``from tests.helpers import ...`` (also in DDP worker processes)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from pytorch_lightning.strategies import FSDPStrategy
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


# ------------------------------------------------------------------------------------------------ tiny configs
def tiny_clip_cfg(*, embed_dim: int = 16, image_size: int = 16, context_length: int = 12, text_layers: int = 1,
                  custom_text: bool = False) -> dict[str, Any]:
    """An open_clip config that builds and runs in milliseconds (same BPE vocabulary as every open_clip CLIP)."""
    cfg: dict[str, Any] = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": text_layers},
    }
    if custom_text:
        cfg["custom_text"] = True  # -> open_clip.CustomTextCLIP (text tower under .text)
    return cfg


# The whole-chain CLIP (pipeline, evaluation): 16 px images, 12 tokens, 16-d embeddings.
TINY_CLIP = tiny_clip_cfg()
# A CLIP on the 32 px shapes images: 16 tokens, 32-d embeddings.
TINY_CLIP_32 = tiny_clip_cfg(embed_dim=32, image_size=32, context_length=16)
# The whole-chain prior P (also the CLI's tiny prior).
TINY_PRIOR = {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16}
# The whole-chain U-Net (D, SR): two levels, attention on the second.
TINY_UNET = {"dim": 16, "dim_mults": (1, 2), "num_res_blocks": 1, "attn_levels": (1,), "heads": 2, "dim_head": 8}
# Smaller U-Nets for CLI runs (lists, as JSON / YAML give them): with attention on the second level, and without.
TINY_UNET_8 = {"dim": 8, "dim_mults": [1, 2], "num_res_blocks": 1, "attn_levels": [1], "heads": 2, "dim_head": 8,
               "norm_groups": 4}
TINY_UNET_8_NO_ATTN = {"dim": 8, "dim_mults": [1, 2], "num_res_blocks": 1, "attn_levels": [], "mid_attn": False,
                       "norm_groups": 4}

VIDEO_DATA = ["--data.init_args.num_frames", "4", "--data.init_args.video_size", "32"]
# What shrinks each stage YAML (and its paper overlay) to a few seconds on a CPU: `--model.init_args` / `--data.init_args`
# overrides (the architecture of dt / interp / sr_t comes from the parent)
TINY: dict[str, list[str]] = {
    "clip": ["--model.init_args.model_cfg", json.dumps(TINY_CLIP_32)],
    "prior": [*(a for k, v in TINY_PRIOR.items() for a in (f"--model.init_args.{k}", str(v))),
              "--model.init_args.sample_steps", "2"],
    "decoder": ["--model.init_args.unet", json.dumps(TINY_UNET_8), "--model.init_args.sample_steps", "2"],
    "sr_l": ["--model.init_args.unet", json.dumps(TINY_UNET_8_NO_ATTN), "--model.init_args.lowres_size", "16",
             "--model.init_args.highres_size", "32", "--data.init_args.image_size", "32",
             "--model.init_args.sample_steps", "2"],
    "sr_h": ["--model.init_args.unet", json.dumps(TINY_UNET_8_NO_ATTN), "--model.init_args.lowres_size", "8",
             "--model.init_args.highres_size", "32", "--model.init_args.crop_size", "16",
             "--data.init_args.image_size", "32", "--model.init_args.sample_steps", "2"],
    "dt": ["--model.init_args.sample_steps", "2", *VIDEO_DATA],
    "interp": ["--model.init_args.sample_steps", "2", "--model.init_args.num_frames", "4",
               "--model.init_args.skips", "[2, 3]", *VIDEO_DATA],
    "sr_t": ["--model.init_args.lowres_size", "16", "--model.init_args.highres_size", "32",
             "--model.init_args.sample_steps", "2", *VIDEO_DATA],
}

SHAPE_CAPTIONS = [f"a {size} {color} {shape}" for size, color, shape in
                  zip(["small", "large"] * 4, ["red", "green", "blue", "yellow"] * 2,
                      ["circle"] * 3 + ["square"] * 3 + ["triangle"] * 2)]


def caption_batch() -> dict[str, Any]:
    """A text-image batch: 8 random images ``[8, 3, 32, 32]`` in [-1, 1] (global RNG), SHAPE_CAPTIONS, keys."""
    return {"image": torch.rand(8, 3, 32, 32) * 2 - 1, "caption": list(SHAPE_CAPTIONS),
            "key": [str(i) for i in range(8)]}


def save_tiny_clip(path: Path, cfg: dict[str, Any]) -> str:
    """A random CLIP of config ``cfg`` saved at ``path`` in the CLIPStage checkpoint format (what
    ``CLIP.from_checkpoint`` reads); the path as a string."""
    from lightning_mav.nn.clip import CLIP

    clip = CLIP("tiny", model_cfg=cfg)
    torch.save({"state_dict": {f"clip.{k}": v for k, v in clip.state_dict().items()},
                "hyper_parameters": {"model_name": "tiny", "model_cfg": cfg}}, path)
    return str(path)


# ------------------------------------------------------------------------------------------------ threads
@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread inside the block (the previous count restored after): on the shared 2-core machine
    OpenMP's spin-waiting threads make these tiny ops ~20-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ Lightning
def cpu_trainer(**overrides: Any) -> pl.Trainer:
    """A quiet one-CPU Trainer: no logger, checkpointing, progress bar or model summary; ``overrides`` win."""
    kwargs: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                              "enable_progress_bar": False, "enable_model_summary": False}
    return pl.Trainer(**{**kwargs, **overrides})


def fit(module: pl.LightningModule, data: pl.LightningDataModule | DataLoader | None = None, *, steps: int,
        val: DataLoader | None = None, ckpt_path: str | None = None, **trainer_overrides: Any) -> pl.Trainer:
    """``module`` fitted for ``steps`` steps (-1: the epochs decide) by a ``cpu_trainer`` on a datamodule or a train
    DataLoader (and ``val``); the trainer."""
    trainer = cpu_trainer(max_steps=steps, **trainer_overrides)
    if isinstance(data, pl.LightningDataModule):
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    else:
        trainer.fit(module, train_dataloaders=data, val_dataloaders=val, ckpt_path=ckpt_path)
    return trainer


def fit_batches(module: pl.LightningModule, batches: list[dict[str, Any]], *, steps: int,
                **trainer_overrides: Any) -> pl.Trainer:
    """``fit`` on already-batched dicts, validating (one batch, no sanity check) on the same batches; the trainer."""
    loader = DataLoader(batches, batch_size=None)  # batch_size=None: items are already batches
    return fit(module, loader, val=loader, steps=steps, limit_val_batches=1, num_sanity_val_steps=0,
               **trainer_overrides)


def train_tiny_chain(shapes_root: Path, root: Path, *, steps: int, interp_frames: int, sr_h: bool) -> Path:
    """``root/<stage>/checkpoints/last.ckpt`` for clip, prior, decoder -> dt -> interp, sr_l -> sr_t (and sr_h),
    each from ``steps`` real Lightning steps on ``shapes_root``: where ``mav generate`` / ``mav evaluate`` look.

    Sizes: D_t makes 8 px frames, ↑F interpolates them to ``interp_frames``, SR_t takes them to 16 px, SR_h to 32.
    """
    from datamodules.text_image import TextImageDataModule
    from datamodules.video import VideoDataModule
    from lightning_mav.stages.clip import CLIPStage
    from lightning_mav.stages.decoder import DecoderStage
    from lightning_mav.stages.interpolation import InterpolationStage
    from lightning_mav.stages.prior import PriorStage
    from lightning_mav.stages.superres import SuperResStage

    fast = {"sample_steps": 2, "warmup_steps": 0, "lr": 1e-3}
    pl.seed_everything(0, verbose=False)

    def stage_fit(stage: pl.LightningModule, data: pl.LightningDataModule, name: str) -> str:
        trainer = fit(stage, data, steps=steps, limit_val_batches=0)
        path = root / name / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(path)
        return str(path)

    def images(size: int) -> TextImageDataModule:
        return TextImageDataModule(root=str(shapes_root), image_size=size, batch_size=4)

    def videos(size: int, frames: int) -> VideoDataModule:
        return VideoDataModule(root=str(shapes_root), num_frames=frames, video_size=size, fps_min=8, fps_max=24,
                               batch_size=2)

    clip = stage_fit(CLIPStage("tiny", model_cfg=TINY_CLIP, warmup_steps=0), images(16), "clip")
    stage_fit(PriorStage(clip, **TINY_PRIOR, **fast), images(16), "prior")
    d = stage_fit(DecoderStage(unet=TINY_UNET, clip_ckpt=clip, image_size=8, **fast), images(8), "decoder")
    dt = stage_fit(DecoderStage(unet={"temporal": True, "fps_cond": True}, clip_ckpt=clip, init_from=d, image_size=8,
                                **fast), videos(8, 4), "dt")
    stage_fit(InterpolationStage(clip_ckpt=clip, init_from=dt, image_size=8, num_frames=interp_frames, **fast),
              videos(8, interp_frames), "interp")
    sr_l = stage_fit(SuperResStage(unet=TINY_UNET, lowres_size=8, highres_size=16, **fast), images(16), "sr_l")
    stage_fit(SuperResStage(unet={"temporal": True}, init_from=sr_l, lowres_size=8, highres_size=16, **fast),
              videos(16, 4), "sr_t")
    if sr_h:
        stage_fit(SuperResStage(unet=TINY_UNET, lowres_size=16, highres_size=32, **fast), images(32), "sr_h")
    return root


# ------------------------------------------------------------------------------------------------ DDP
# DDP tests run 2 CPU processes over gloo. "fork" rather than "spawn" by default: spawned children re-import torch,
# torchmetrics and open_clip (~15-40 s on the shared 2-core machine), forked ones start at once. Safe here
# because each child sets one intra-op thread before any op (OpenMP pools do not survive a fork).
DDP_START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _ddp_rank(rank: int, worker: Callable[..., Any], world_size: int, tmp: str, threads: int | None,
              timeout_s: float | None, args: tuple[Any, ...]) -> None:
    """One rank of ``run_ddp``: join the gloo group, run ``worker``, save what it returned to ``tmp/<rank>.pt``."""
    if threads is not None:
        torch.set_num_threads(threads)
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size, **timeout)
    try:
        result = worker(rank, world_size, *args)
        torch.save(result, f"{tmp}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ddp(worker: Callable[..., Any], *args: Any, world_size: int = 2, start_method: str = DDP_START_METHOD,
            threads: int | None = 1, timeout_s: float | None = None) -> list[Any]:
    """``worker(rank, world_size, *args)`` in ``world_size`` processes joined in a gloo group (a file store under
    a fresh temporary folder); what each rank returned, by rank (plain values: they come back through
    ``torch.load(weights_only=True)``). ``threads``: intra-op threads per rank (None: leave the default);
    ``timeout_s``: the collectives' timeout (None: torch's default). A failed rank raises a RuntimeError naming it."""
    with tempfile.TemporaryDirectory(prefix="ddp-") as tmp:
        try:
            mp.start_processes(_ddp_rank, args=(worker, world_size, tmp, threads, timeout_s, args),
                               nprocs=world_size, start_method=start_method)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise RuntimeError(f"DDP rank {e.error_index} of {world_size} ({worker.__name__}) failed:\n{e}") from e
        results = []
        for rank in range(world_size):
            path = Path(tmp) / f"{rank}.pt"
            if not path.exists():
                raise RuntimeError(f"DDP rank {rank} of {world_size} ({worker.__name__}) exited without a result")
            results.append(torch.load(path, weights_only=True))
    return results


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` on CPU processes (gloo), for tests only: Lightning refuses ``fsdp`` without a GPU
    (its check tests the class exactly, so a subclass passes it) and passes FSDP ``device_id=None`` on a CPU, which
    torch's FSDP refuses; torch's FSDP itself runs on gloo with ``device_id=cpu``. Everything else is Lightning's:
    the stage's wrap policy and ignored CLIP, the sharded optimizer, the full-state-dict checkpoint."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                        mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                        **self.kwargs)


# ------------------------------------------------------------------------------------------------ CLI runs
def cli_env(*front: Path) -> dict[str, str]:
    """The environment for a ``python -m lightning_mav`` subprocess: one OpenMP thread, PYTHONPATH = ``front``,
    then the current PYTHONPATH, then the repository."""
    path = [*map(str, front), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), str(REPO)]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}


def every_n_steps_overlay(path: Path, n: int, *, keep: bool = False, media: int | None = None) -> Path:
    """base.yaml's callbacks with periodic checkpoints and media every ``n`` steps (``media``: media every so many
    steps instead, 0: none): a list can only be replaced whole, so it is copied from base.yaml (not restated here) and
    changed. ``keep``: every periodic checkpoint stays, as ``step=<N>.ckpt`` beside ``last.ckpt``. Name it like the
    stage (``sr_l.yaml``): the run folder is runs/<stem of the first --config>, so an overlay after it keeps it."""
    callbacks = yaml.safe_load((EXPERIMENTS / "base.yaml").read_text())["trainer"]["callbacks"]
    for cb in callbacks:
        if cb["class_path"].endswith(".ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = n
        elif cb["class_path"].endswith(".MediaLogger"):
            cb["init_args"]["every_n_steps"] = n if media is None else media
            if media == 0:  # none at all, not even at the end
                cb["init_args"]["on_train_end"] = False
        if keep and cb["class_path"] == "lightning_mav.callbacks.ModelCheckpoint":
            cb["init_args"].update(save_top_k=-1, filename="{step}")
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


# The paper overlays' stages: which read videos, which name a CLIP (P and D; D_t and ↑F inherit it through init_from),
# which have a parent (init_from in the overlays), and which generate frames of `image_size`.
PAPER_STAGES = ("prior", "decoder", "dt", "interp", "sr_l", "sr_t")
VIDEO_STAGES = ("dt", "interp", "sr_t")
PAPER_PARENT = {"dt": "decoder", "interp": "dt", "sr_t": "sr_l"}


def paper_fit_args(stage: str, shapes_root: Path, *extra: str, clip_weights: Path | None = None) -> list[str]:
    """``fit`` of ``experiments/<stage>.yaml`` + ``experiments/paper/<stage>.yaml`` on the shapes fixture, shrunk to
    a CPU by one set of overrides (docs/scale-out.md#checked-on-a-cpu): ``TINY``'s widths, 32 px, 4
    frames, batch 2, no loader workers, the fixture's train and val shards for the overlay's ``???`` URLs, and for P
    and D the open_clip weights file ``clip_weights`` as the ``mav-tiny`` architecture; then ``extra``. Everything
    else (bf16-mixed, learning rates, the paper's D_t settings) is the overlay's."""
    kind = "videos" if stage in VIDEO_STAGES else "images"
    args = ["fit", "--config", str(EXPERIMENTS / f"{stage}.yaml"),
            "--config", str(EXPERIMENTS / "paper" / f"{stage}.yaml"),
            "--data.init_args.urls", str(shapes_root / kind / "train-*.tar"),
            "--data.init_args.val_urls", str(shapes_root / kind / "val-*.tar"),
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
            "--data.init_args.shuffle_buffer", "8", "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "1", "--trainer.enable_model_summary", "false", *TINY[stage]]
    if kind == "videos":
        args += ["--data.init_args.video_size", "32", "--data.init_args.fps_min", "4", "--data.init_args.fps_max", "24"]
    else:
        args += ["--data.init_args.image_size", "32"]
    if stage in ("decoder", "dt", "interp"):
        args += ["--model.init_args.image_size", "32"]
    if stage in ("prior", "decoder"):
        if clip_weights is None:
            raise ValueError(f"paper_fit_args: the {stage} overlay asks for a CLIP (clip_weights)")
        args += ["--model.init_args.clip_ckpt", str(clip_weights), "--model.init_args.clip_model", "mav-tiny"]
    return [*args, *extra]


def shard_with_a_corrupt_sample(shapes_root: Path, out: Path, shards: int = 1) -> Path:
    """An image shard at ``out``: a sample whose PNG is garbage, then the fixture's first ``shards`` train shards."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as dst:
        for name, data in (("corrupt0.png", b"\x89PNG\r\n\x1a\n not an image"), ("corrupt0.txt", b"a red circle")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
        for i in range(shards):
            with tarfile.open(shapes_root / "images" / f"train-{i:06d}.tar") as src:
                for member in src:
                    dst.addfile(member, src.extractfile(member))
    return out


def read_events(path: Path) -> EventAccumulator:
    """The TensorBoard events at ``path`` (an event file, or a run folder holding exactly one), every scalar and
    image loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if path.is_dir():
        (path,) = path.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


# ------------------------------------------------------------------ a UCF-101-style folder of .avi files
CLASSES = ["RedCircle", "BlueSquare", "GreenTriangle"]  # Moving Shapes colour x shape, in UCF-101 CamelCase
H, W = 48, 64  # frames wider than tall: a 48 px clip is the centre 48 columns, 8..56, with no resizing
# (class, file name, frames): 6 videos of different lengths, so random starts differ between them
VIDEOS = [("RedCircle", "v_RedCircle_g01_c01", 30), ("RedCircle", "v_RedCircle_g01_c02", 24),
          ("RedCircle", "v_RedCircle_g02_c01", 27), ("BlueSquare", "v_BlueSquare_g01_c01", 20),
          ("BlueSquare", "v_BlueSquare_g02_c01", 29), ("GreenTriangle", "v_GreenTriangle_g01_c01", 25)]


def synthetic_frames(num: int, variant: int) -> np.ndarray:
    """uint8 ``[num, H, W, 3]``: a background brightening 6 levels a frame and a 12 px square moving 1 px a frame to
    the right, at a height that depends on ``variant`` (each video its own): every frame differs from its
    neighbours by far more than the codec's error, so a decoded frame tells which native frame it was."""
    frames = np.empty((num, H, W, 3), np.uint8)
    for t in range(num):
        frames[t] = 40 + 6 * t
        top = 4 + 4 * variant
        frames[t, top:top + 12, 4 + t:16 + t] = (230, 40, 40)
    return frames


def write_avi(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    """An MPEG-4 Part 2 .avi tagged XVID, as UCF-101 ships (25 fps), a keyframe every 12 frames so clips that start
    later are reached by seeking; the finest fixed quantiser keeps the codec's error ~2 levels (~6 without)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.codec_tag = "XVID"
        stream.options = {"g": "12", "flags": "+qscale", "global_quality": "118"}  # fixed quantiser 1 (118 = 1 qp)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_ucf101(root: Path) -> dict[str, np.ndarray]:
    """A UCF-101-style folder ``root/<ClassName>/v_<ClassName>_gXX_cYY.avi`` of :data:`VIDEOS`; each key's frames."""
    frames = {}
    for variant, (cls, name, num) in enumerate(VIDEOS):
        frames[name] = synthetic_frames(num, variant)
        write_avi(root / cls / f"{name}.avi", frames[name])
    return frames


def save_torchscript(module: torch.nn.Module, path: Path) -> Path:
    """``module`` scripted and saved as TorchScript, the file format of StyleGAN-V's I3D and C3D detectors."""
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated, but the detectors' format is TorchScript
        torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


# ------------------------------------------------------------------------------------------------ pretrained
def write_tiny_karlo(root: Path, *, embed_dim: int = 128, context_length: int = 32) -> Path:
    """A random-init Karlo (kakaobrain/karlo-v1-alpha's structure and block types, tiny widths) written by diffusers'
    ``save_pretrained`` in its layout under ``root``: prior/, text_proj/, decoder/ (16 px), super_res_first/ and
    super_res_last/ (16 -> 64 px), and the three UnCLIPScheduler configs. The CLIP widths default to ``mav-tiny``'s
    (as in Karlo, the CLIP's text width is its embedding width)."""
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(0)
    PriorTransformer(num_attention_heads=2, attention_head_dim=16, num_layers=1, embedding_dim=embed_dim,
                     num_embeddings=context_length, additional_embeddings=4).save_pretrained(root / "prior")
    time_dim, cross_dim = 64, 32
    text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=embed_dim,
                                    time_embed_dim=time_dim, cross_attention_dim=cross_dim)
    with torch.no_grad():  # zero-initialised in diffusers: random, so that a wrong mapping shows
        text_proj.learned_classifier_free_guidance_embeddings.normal_()
    text_proj.save_pretrained(root / "text_proj")
    UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", in_channels=3, out_channels=6,
        cross_attention_dim=cross_dim, class_embed_type="identity", attention_head_dim=8,
        resnet_time_scale_shift="scale_shift").save_pretrained(root / "decoder")
    for part in ("super_res_first", "super_res_last"):
        UNet2DModel(sample_size=64, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
                    down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2,
                    in_channels=6, out_channels=3, add_attention=False).save_pretrained(root / part)
    UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                    clip_sample_range=5.0).save_pretrained(root / "prior_scheduler")
    UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon",
                    num_train_timesteps=1000).save_pretrained(root / "decoder_scheduler")
    UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon",
                    num_train_timesteps=1000).save_pretrained(root / "super_res_scheduler")
    return root


def save_open_clip_weights(path: Path, model_name: str = "mav-tiny") -> Path:
    """A random-init open_clip model of ``model_name`` saved in open_clip's own file format (the bare state dict)."""
    from lightning_mav.nn.clip import CLIP

    torch.save(CLIP(model_name).model.state_dict(), path)
    return path
