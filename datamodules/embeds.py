"""Precomputed CLIP embeddings: companion shards written by ``mav embed``, read next to the user's shards.

For each shard ``…/NAME.tar`` the companion is ``<embeds>/NAME.tar``: one sample per key of the original, same keys in
the same order, holding (``B`` batch, ``D`` CLIP embedding size, ``L`` context length, ``W`` text width,
``N`` native frames of a video)::

    KEY.image_embed.npy   float [D]        image shards: CLIP image embedding, raw (not L2-normalised)
    KEY.text_embed.npy    float [D]        image shards with --text: e_x of the caption, raw
    KEY.text_hidden.npy   float [L, W]     ... its text hidden states
    KEY.text_mask.npy     bool  [L]        ... True = real token
    KEY.frame_embed.npy   float [N, D]     video shards: the embedding of every native frame
    KEY.error.txt         skip reason      a sample ``mav embed`` could not decode (the DataModule skips it too)

Embeddings are what the live path computes: the image decoded as the DataModule decodes it (short side to
``size``, centre crop) and encoded with ``CLIP.encode_image(normalize=False)``; the stages normalise for
``embed_space: unit``. ``<embeds>/embeds.json`` records how they were made (``EmbedInfo``).

Reading: ``zip_companion`` attaches each companion sample to its original by key; a sample whose companion is
missing, unreadable or keyed differently is skipped as ``missing_embed`` by the codecs (``decode_embeds``).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

import numpy as np
import torch

from datamodules.decode import SampleError
from datamodules.skips import SkipCounter
from datamodules.tars import Sample, _is_local, _local_path, iter_tar, open_shard

INFO_NAME = "embeds.json"
IMAGE_FIELDS = ("image_embed",)
TEXT_FIELDS = ("text_embed", "text_hidden", "text_mask")
VIDEO_FIELDS = ("frame_embed",)
ERROR_KEY = "__embed_error__"  # set on an original sample whose companion could not be matched


@dataclass(frozen=True)
class EmbedInfo:
    """How a folder of companion shards was made (``embeds.json``): which CLIP, which data layout, which size."""

    kind: str  # "images" or "videos"
    clip: str
    clip_model: str | None
    size: int  # the DataModule's image_size / video_size the images were decoded at
    embed_dim: int
    text: bool = False
    context_length: int = 0
    text_width: int = 0
    dtype: str = "float32"

    @property
    def fields(self) -> tuple[str, ...]:
        if self.kind == "videos":
            return VIDEO_FIELDS
        return IMAGE_FIELDS + (TEXT_FIELDS if self.text else ())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, embeds: str) -> EmbedInfo:
        """``<embeds>/embeds.json``; ``FileNotFoundError`` / ``ValueError`` naming the file when it is absent or
        not an ``EmbedInfo``."""
        path = companion_url("embeds.json", embeds)
        try:
            with open_shard(path) as f:
                data = json.loads(f.read().decode("utf-8"))
            return cls(**data)
        except (FileNotFoundError, OSError) as e:
            raise FileNotFoundError(f"embeds: {path} not found ({type(e).__name__}): write the companion shards "
                                    f"with `mav embed --urls ... --out {embeds}`") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"embeds: {path} is not an `mav embed` description: {e}") from None


def companion_url(url: str, embeds: str) -> str:
    """The companion of shard ``url`` in folder ``embeds`` (local or remote prefix): ``<embeds>/<basename>``."""
    return posixpath.join(embeds.rstrip("/"), posixpath.basename(url.rstrip("/")))


def check_companions(urls: Sequence[str], embeds: str, info: EmbedInfo, *, kind: str, size: int) -> None:
    """Set-up checks, one-line errors: the folder was made for this layout and size, every local companion exists,
    and the first local one holds the same keys, in order, as its shard (a folder written for other shards)."""
    if info.kind != kind or info.size != size:
        raise ValueError(f"embeds: {companion_url(INFO_NAME, embeds)} holds {info.kind} embedded at size {info.size}, "
                         f"but this DataModule reads {kind} at size {size}: rerun `mav embed --size {size}`")
    local = [u for u in urls if _is_local(u) and _is_local(embeds)]
    for url in local:
        if not _exists(companion_url(url, embeds)):
            raise FileNotFoundError(f"embeds: no companion {companion_url(url, embeds)} for shard {url}: run "
                                    f"`mav embed` over it (complete shards are skipped)")
    if local:
        ours, theirs = shard_keys(local[0]), shard_keys(companion_url(local[0], embeds))
        if ours != theirs:
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise ValueError(f"embeds: companion {companion_url(local[0], embeds)} does not match shard {local[0]}: "
                             f"{len(theirs)} vs {len(ours)} keys, first difference at sample {first}")


def _exists(path: str) -> bool:
    return os.path.isfile(_local_path(path))


def shard_keys(url: str) -> list[str]:
    """The sample keys of a shard, in order (headers and the members they group; a damaged shard: what is readable)."""
    return [s["__key__"] for s in iter_tar(url, SkipCounter())]


def zip_companion(samples: Iterator[Sample], companion: Iterator[Sample]) -> Iterator[Sample]:
    """Each original sample with its companion's members added (same key, read in step). A companion that ends
    early or whose key differs (written for another shard, truncated) marks the sample ``missing_embed``; after a
    key mismatch the rest of the shard is marked too (the two streams no longer line up)."""
    aligned = True
    for sample in samples:
        other = next(companion, None) if aligned else None
        if other is not None and other["__key__"] == sample["__key__"]:
            sample.update({k: v for k, v in other.items() if not k.startswith("__")})
        else:
            if other is not None:
                aligned = False  # a key mismatch: the two streams no longer line up, read no further
            sample[ERROR_KEY] = "missing_embed"
        yield sample


def read_with_companion(url: str, embeds: str, counter: SkipCounter,
                        opener: Callable[[str], IO[bytes]] = open_shard) -> Iterator[Sample]:
    """Samples of shard ``url`` with their companion's members (``zip_companion``); companion read errors are
    counted once as ``embed_open_error`` / ``embed_tar_error`` and its samples then skip as ``missing_embed``."""
    side = SkipCounter()
    companion = iter_tar(companion_url(url, embeds), side, opener)
    yield from zip_companion(iter_tar(url, counter, opener), companion)
    for reason, n in side.snapshot()["counts"].items():
        for _ in range(n):
            counter.add(f"embed_{reason}", companion_url(url, embeds))


def load_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` member (no pickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def to_npy(array: np.ndarray) -> bytes:
    """``array`` as ``.npy`` bytes."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_embeds(sample: Sample, fields: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{field: tensor}`` for the companion ``fields`` of a sample (float32, ``text_mask`` bool). Raises
    ``SampleError``: ``missing_embed`` (no companion), the reason ``mav embed`` recorded for a sample it could not
    decode, or ``corrupt_embed``."""
    if ERROR_KEY in sample:
        raise SampleError(sample[ERROR_KEY])
    if "error.txt" in sample:
        raise SampleError(sample["error.txt"].decode("utf-8", "replace").strip() or "corrupt_embed", "(mav embed)")
    out: dict[str, torch.Tensor] = {}
    for name in fields:
        data = sample.get(f"{name}.npy")
        if data is None:
            raise SampleError("missing_embed", f"no {name}.npy")
        try:
            array = load_npy(data)
        except Exception as e:  # ValueError, EOFError, OSError for damaged bytes
            raise SampleError("corrupt_embed", f"{name}.npy: {e!r}") from None
        out[name] = torch.from_numpy(array.astype(bool if name == "text_mask" else np.float32, copy=True))
    return out


def blank_embeds(info: EmbedInfo, num_frames: int = 0) -> dict[str, torch.Tensor]:
    """Zero tensors of the shapes ``decode_embeds`` gives (the ``frame_embed`` of a clip: ``[num_frames, D]``)."""
    shapes: dict[str, Any] = {"image_embed": (info.embed_dim,), "text_embed": (info.embed_dim,),
                              "text_hidden": (info.context_length, info.text_width),
                              "text_mask": (info.context_length,), "frame_embed": (num_frames, info.embed_dim)}
    return {k: torch.zeros(shapes[k], dtype=torch.bool if k == "text_mask" else torch.float32) for k in info.fields}
