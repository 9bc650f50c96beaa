"""Samples on disk: each generated video's frames (D_t's, ↑F's, the final ones and the ablation's) stored lossless
as uint8 under ``out/samples/NNNNN.pt``, keyed by everything they depend on, so a rerun reuses them; and their
media (mp4, gif, contact sheets)."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_mav.evaluation.chain import Chain
from lightning_mav.evaluation.generation import generate_batch
from lightning_mav.media import contact_sheet, save_png, write_gif, write_mp4
from lightning_mav.pipeline import GenerationSettings


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


def sample_file(out: Path, spec: SampleSpec) -> Path:
    """Where a sample is stored: ``out/samples/NNNNN.pt``."""
    return out / "samples" / f"{spec.index:05d}.pt"


def generate_samples(chain: Chain, plan: list[list[SampleSpec]], out: Path, settings: GenerationSettings, *,
                     progress: bool = True, share: tuple[int, int] = (0, 1)) -> tuple[list[Path], set[Path]]:
    """Generate every planned sample that ``out/samples`` does not already hold (same key) and save it.

    A batch is generated whole (its samples depend on each other's presence), and only if one of its samples is
    missing or stale. ``share=(i, n)``: only every n-th batch from the i-th (one of n processes; a batch's samples
    depend on its seed and prompts only, so any split of the plan makes the same files). Returns the sample files
    of the share in index order and the set of those generated by this call.
    """
    rank, world = share
    plan = plan[rank::world]
    total = sum(len(b) for b in plan)
    bar = tqdm(total=total, desc="generating" if world == 1 else f"generating {rank + 1}/{world}", unit="video",
               dynamic_ncols=True, disable=not progress, position=rank)
    paths: list[Path] = []
    fresh: set[Path] = set()
    for batch in plan:
        keys = [sample_key(batch, s.position, settings, chain.checkpoints, chain.pipe.dtype) for s in batch]
        files = [sample_file(out, s) for s in batch]
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
