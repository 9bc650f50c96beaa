"""``mav embed --clip FILE --urls SHARDS --out DIR``: the frozen CLIP's embeddings of a set of shards, precomputed.

Writes one companion shard per input shard, ``DIR/<shard name>``, with the same keys in the same order (layout in
``datamodules.embeds``), and ``DIR/embeds.json`` (which CLIP, layout, size). The DataModules read them next to the
shards with ``data.init_args.embeds: DIR``; the stages then train without the CLIP image tower
(``model.init_args.clip_image_tower: false``). The user's shards are never written.

- Image shards: ``image_embed`` of each image, decoded as the DataModule decodes it (short side to ``--size``,
  centre crop), raw (not normalised); with ``--text`` also the caption's ``text_embed``, ``text_hidden`` and
  ``text_mask`` (what P reads), so P trains without any CLIP tower.
- Video shards: ``frame_embed [N, D]``, every native frame's embedding, so D_t / ↑F keep drawing clips (fps, start,
  ``cond_frame``) at random and find the embedding of whichever frame conditions them.

Each companion is written to a temporary file and renamed when complete: a killed run leaves no half shard, and the
next run skips the shards already written (resume). ``--rank R --world-size N`` (or torchrun's ``RANK`` /
``WORLD_SIZE``) processes every N-th shard from the R-th, so N processes share the work.
"""
from __future__ import annotations

import argparse
import io
import os
import posixpath
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.decode import (
    IMAGE_EXTENSIONS, ClipPlan, SampleError, decode_caption, decode_image, decode_planned_clip, to_float,
)
from datamodules.embeds import INFO_NAME, EmbedInfo, to_npy
from datamodules.skips import SkipCounter
from datamodules.tars import Sample, _is_local, _local_path, count_samples, expand_urls, iter_tar
from lightning_mav.commands.options import fail

DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class EmbedReport:
    """What a run did: shards ``written`` and ``skipped`` (already complete), samples embedded, and samples recorded
    as skips (``errors`` by reason: the DataModule skips them too)."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    samples: int = 0
    errors: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- encoding
class Embedder:
    """Turns the samples of one shard into companion members, batching the CLIP forwards.

    Args:
        clip: the frozen :class:`lightning_mav.nn.clip.CLIP` (on ``device``).
        info: what to write (``kind``, ``size``, ``text``, ``dtype``).
        batch_size: images (or video frames) per CLIP forward.
    """

    def __init__(self, clip: Any, info: EmbedInfo, batch_size: int) -> None:
        self.clip, self.info, self.batch_size = clip, info, batch_size
        self.dtype = DTYPES[info.dtype]
        self.device = clip.image_mean.device

    def images(self, pixels: list[torch.Tensor]) -> np.ndarray:
        """uint8 ``[3, S, S]`` each -> raw ``y_e [N, D]`` (float32), in forwards of ``batch_size``."""
        out = []
        for i in range(0, len(pixels), self.batch_size):
            x = to_float(torch.stack(pixels[i:i + self.batch_size])).to(self.device)
            out.append(self.clip.encode_image(x, normalize=False).float().cpu())
        return torch.cat(out).numpy()

    def texts(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Captions -> raw ``e_x [N, D]``, hidden states ``[N, L, W]``, mask ``[N, L]`` (bool)."""
        parts = [self.clip.encode_text_hidden(self.clip.tokenize(captions[i:i + self.batch_size]), normalize=False)
                 for i in range(0, len(captions), self.batch_size)]
        e_x, hidden, mask = (torch.cat(list(p)).cpu() for p in zip(*parts))
        return e_x.float().numpy(), hidden.float().numpy(), mask.numpy()

    def decode(self, sample: Sample) -> dict[str, Any]:
        """What one sample needs encoded: ``{"pixels": [uint8 [3, S, S], ...], "caption": str}``; raises
        ``SampleError`` as the DataModule's codec would."""
        if sample.get("__duplicate__"):
            raise SampleError("duplicate_member")
        if self.info.kind == "videos":
            if not sample.get("mp4"):
                raise SampleError("missing_mp4" if "mp4" not in sample else "zero_byte_member")
            clip = decode_planned_clip(sample["mp4"], lambda count, fps: ClipPlan(0, 1, count, fps),
                                       size=self.info.size, crop="center", corrupt_reason="corrupt_mp4")
            return {"pixels": list(clip.frames)}
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise SampleError("missing_image")
        if len(sample[ext]) == 0:
            raise SampleError("zero_byte_member")
        caption = decode_caption(sample.get("txt"), required=True) if self.info.text else ""
        image, _ = decode_image(sample[ext], self.info.size, crop="center")
        return {"pixels": [image], "caption": caption}

    def members(self, decoded: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        """Companion arrays (``{field: array}``) of decoded samples, encoded together."""
        pixels = [p for d in decoded for p in d["pixels"]]
        y_e = self.images(pixels).astype(self.dtype) if pixels else np.zeros((0, self.info.embed_dim), self.dtype)
        out, start = [], 0
        for d in decoded:
            n = len(d["pixels"])
            out.append({"frame_embed": y_e[start:start + n]} if self.info.kind == "videos" else
                       {"image_embed": y_e[start]})
            start += n
        if self.info.text and decoded:
            e_x, hidden, mask = self.texts([d["caption"] for d in decoded])
            for i, arrays in enumerate(out):
                arrays.update(text_embed=e_x[i].astype(self.dtype), text_hidden=hidden[i].astype(self.dtype),
                              text_mask=mask[i])
        return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_companion(url: str, target: Path, embedder: Embedder, report: EmbedReport) -> None:
    """The companion of shard ``url`` at ``target``, via a temporary file renamed when complete. Samples are
    encoded in groups of at least ``batch_size`` images (frames) and written in the shard's order."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a killed run: never a complete shard
        stale.unlink(missing_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    counter = SkipCounter()
    pending: list[tuple[str, dict[str, Any] | str]] = []  # (key, decoded sample or skip reason), in shard order

    def flush(tar: tarfile.TarFile) -> None:
        decoded = [d for _, d in pending if not isinstance(d, str)]
        arrays = iter(embedder.members(decoded))
        for key, d in pending:
            if isinstance(d, str):
                _add(tar, f"{key}.error.txt", d.encode())
                report.errors[d] = report.errors.get(d, 0) + 1
            else:
                for name, array in next(arrays).items():
                    _add(tar, f"{key}.{name}.npy", to_npy(array))
                report.samples += 1
        pending.clear()

    try:
        with tarfile.open(tmp, "w") as tar:
            queued = 0
            for sample in iter_tar(url, counter):
                try:
                    entry: dict[str, Any] | str = embedder.decode(sample)
                    queued += len(entry["pixels"])
                except SampleError as e:
                    entry = e.reason
                pending.append((sample["__key__"], entry))
                if queued >= embedder.batch_size:
                    flush(tar)
                    queued = 0
            flush(tar)
        damage = counter.snapshot()["counts"]
        if damage:  # the shard could not be read to its end: the DataModule counts it too, the companion stays
            for reason, n in damage.items():
                report.errors[reason] = report.errors.get(reason, 0) + n
        os.replace(tmp, target)  # atomic: the companion appears complete or not at all
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------- the run
def embed_shards(urls: str | Sequence[str], out: str | Path, clip: Any, *, clip_path: str, clip_model: str | None,
                 size: int, kind: str = "auto", text: bool = False, batch_size: int = 64, dtype: str = "float32",
                 rank: int = 0, world_size: int = 1, progress: bool = True) -> EmbedReport:
    """Write the companion shards of ``urls`` (every ``world_size``-th from ``rank``) under ``out``; see the module
    docstring. Raises ``ValueError`` / ``FileNotFoundError`` with one-line messages for bad input."""
    shards = expand_urls(urls)
    names: dict[str, str] = {}
    for url in shards:
        name = posixpath.basename(url)
        if name in names:
            raise ValueError(f"two shards named {name!r} ({names[name]}, {url}): their companions would collide in "
                             f"one --out folder; embed them into separate folders")
        names[name] = url
    out = Path(out).expanduser()
    for url in shards:
        if _is_local(url) and (out / posixpath.basename(url)).resolve() == Path(_local_path(url)).resolve():
            raise ValueError(f"--out {out} is the folder of the shard {url}: the companions would overwrite the "
                             f"shards; choose another folder")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world size, got rank {rank} of {world_size}")
    if kind == "auto":  # from the first shard's member names (headers only, for a local shard)
        if count_samples(shards[0], ("mp4",)):
            kind = "videos"
        elif count_samples(shards[0], IMAGE_EXTENSIONS):
            kind = "images"
        else:
            raise ValueError(f"cannot tell images from videos: {shards[0]} holds no image or mp4 member (--kind)")
    if kind == "videos" and text:
        raise ValueError("--text: video shards are unlabeled here (D_t, ↑F read no captions); drop --text")
    info = EmbedInfo(kind=kind, clip=str(clip_path), clip_model=clip_model, size=size, embed_dim=clip.embed_dim,
                     text=text, context_length=clip.context_length if text else 0,
                     text_width=clip.text_width if text else 0, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / INFO_NAME
    if info_path.exists():
        old = EmbedInfo.read(str(out))
        if old != info:
            raise ValueError(f"{info_path} was written with other settings ({old}); use another --out for {info}")
    else:
        tmp = info_path.with_name(f".{INFO_NAME}.{os.getpid()}.tmp")
        tmp.write_text(info.to_json())
        os.replace(tmp, info_path)

    from tqdm.auto import tqdm

    mine = shards[rank::world_size]
    report = EmbedReport()
    embedder = Embedder(clip, info, batch_size)
    bar = tqdm(mine, desc=f"mav embed (rank {rank}/{world_size})" if world_size > 1 else "mav embed", unit="shard",
               disable=not progress, dynamic_ncols=True)
    with torch.inference_mode():
        for url in bar:
            target = out / posixpath.basename(url)
            if target.exists():  # complete: only finished companions are renamed into place
                report.skipped.append(str(target))
                continue
            write_companion(url, target, embedder, report)
            report.written.append(str(target))
            bar.set_postfix(samples=report.samples)
    return report


def _resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def main(argv: Sequence[str] | None = None) -> EmbedReport:
    parser = argparse.ArgumentParser(
        prog="mav embed", description="Precompute the frozen CLIP's embeddings of a set of shards into companion "
                                      "shards (data.init_args.embeds), so the stages train without the CLIP image "
                                      "tower. Resumable; --rank/--world-size split the shards.")
    parser.add_argument("--clip", required=True, help="the frozen CLIP: a CLIPStage .ckpt, or open_clip weights "
                                                      "with --clip-model")
    parser.add_argument("--clip-model", default=None, help="open_clip architecture of a weights file (ViT-H-14, ...)")
    parser.add_argument("--urls", required=True, help="the shards: brace pattern, '::' list, directory or glob")
    parser.add_argument("--out", required=True, type=Path, help="folder of the companion shards (not the shards')")
    parser.add_argument("--size", type=int, default=64, help="the DataModule's image_size / video_size (default 64)")
    parser.add_argument("--kind", default="auto", choices=("auto", "images", "videos"))
    parser.add_argument("--text", action="store_true", help="also the captions' CLIP text encodings (for P)")
    parser.add_argument("--batch-size", type=int, default=64, help="images / frames per CLIP forward")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="storage type of the embeddings")
    parser.add_argument("--device", default=None, help="default: CUDA (LOCAL_RANK's) when available, else the CPU")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    from lightning_mav.nn.clip import CLIP

    try:
        clip = CLIP.from_checkpoint(args.clip, model_name=args.clip_model, freeze=True)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
        fail(f"--clip {args.clip}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if not args.text:
        clip.drop_text_tower()
    clip.to(_resolve_device(args.device))
    try:
        report = embed_shards(args.urls, args.out, clip, clip_path=args.clip, clip_model=args.clip_model,
                              size=args.size, kind=args.kind, text=args.text, batch_size=args.batch_size,
                              dtype=args.dtype, rank=args.rank, world_size=args.world_size, progress=args.progress)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    skips = ", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())) or "none"
    summary = (f"mav embed: wrote {len(report.written)} companion shards ({report.samples} samples; skips: {skips}), "
               f"{len(report.skipped)} already complete, in {args.out}")
    print(summary)  # noqa: T201 - the command's output
    return report
