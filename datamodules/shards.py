"""Shared WebDataset machinery: rank/worker splitting, the streams and loaders.

Shards are found and read into samples in ``datamodules.tars`` (URLs, tar reading); skipped samples are
counted in ``datamodules.skips`` (``SkipCounter``, ``SkipTally``). Read top to bottom:

1. **Splitting** — ``Slot`` (rank, world size, worker, workers). Rank and world size come from
   ``torch.distributed`` when it is initialised, else from the trainer, else from ``RANK``/``WORLD_SIZE``.
2. **Streams** — ``ShardStream`` yields whole batches from inside the worker:

   - *training*: shards resampled with replacement (webdataset's ``resampled=True`` semantics), split by node,
     samples shuffled in a buffer; every random choice comes from ``Random(seed, rank, worker, epoch)``, so
     ranks and workers differ and a run is reproducible from ``seed``. Infinite; the loader's
     ``with_epoch(batches_per_rank)`` cuts epochs.
   - *evaluation*: finite. Shards are split by node then by worker, so each sample is read exactly once
     across ranks x workers (an error when there are fewer shards than ranks x workers). Every rank yields
     the *same number of batches* (or DDP would hang in a collective): the per-shard sample counts are read
     at set-up and every worker pads its last batches up to its planned count with padding samples marked
     ``batch["valid"] == False``. Nothing is trimmed, except samples beyond the set-up count (a shard that grew,
     or a remote one whose count broke off), which are counted as ``eval_overflow``.
3. **Loader** — ``ShardLoader``: webdataset's ``WebLoader`` that also advances the stream's epoch, and a
   ``ShardDataModule`` base with Lightning's ``prepare_data`` / ``setup`` contract.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import IO, Any, Protocol

import pytorch_lightning as pl
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from datamodules.embeds import EmbedInfo, check_companions, read_with_companion
from datamodules.skips import SKIP_KEY, SkipCounter
from datamodules.tars import Sample, count_samples, expand_urls, open_shard, read_samples

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- 1. splitting
@dataclass(frozen=True)
class Slot:
    """Where a stream runs: ``rank`` of ``world_size`` processes, DataLoader ``worker`` of ``num_workers``."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @classmethod
    def current(cls, rank: int, world_size: int) -> Slot:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return cls(rank, world_size, worker, num_workers)


def resolve_rank(trainer: pl.Trainer | None = None) -> tuple[int, int]:
    """(rank, world size): ``torch.distributed`` when initialised, else the trainer, else RANK/WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def split_by_node(items: Iterable[Any], slot: Slot) -> Iterator[Any]:
    """Every ``world_size``-th item starting at ``rank`` (``wds.split_by_node``, with our rank resolution)."""
    return islice(items, slot.rank, None, slot.world_size)


def split_by_worker(items: Iterable[Any], slot: Slot) -> Iterator[Any]:
    """Every ``num_workers``-th item starting at ``worker`` (``wds.split_by_worker``)."""
    return islice(items, slot.worker, None, slot.num_workers)


def shards_for(urls: Sequence[str], slot: Slot) -> list[str]:
    """The finite shard list of one (rank, worker): node split, then worker split."""
    return list(split_by_worker(split_by_node(urls, slot), slot))


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from ints and strings, stable across processes (``hash(str)`` is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def resampled(urls: Sequence[str], rng: random.Random) -> Iterator[str]:
    """Shards drawn with replacement forever (webdataset's ``resampled=True``), from a seeded ``rng``."""
    while True:
        yield urls[rng.randrange(len(urls))]


@dataclass(frozen=True)
class EvalPlan:
    """Batches each (rank, worker) yields in evaluation so that every rank yields ``batches_per_rank``.

    ``batches[rank][worker] = ceil(samples / batch_size)`` plus, for ranks with fewer, extra batches spread
    over their workers; a worker pads with invalid samples up to its count.
    """

    batches: tuple[tuple[int, ...], ...]
    batches_per_rank: int

    @classmethod
    def build(cls, counts: Sequence[int], world_size: int, num_workers: int, batch_size: int) -> EvalPlan:
        index = list(range(len(counts)))
        table = []
        for rank in range(world_size):
            row = []
            for worker in range(num_workers):
                shards = shards_for(index, Slot(rank, world_size, worker, num_workers))
                row.append(math.ceil(sum(counts[i] for i in shards) / batch_size))
            table.append(row)
        target = max(sum(row) for row in table)
        for row in table:
            for extra in range(target - sum(row)):
                row[extra % num_workers] += 1
        return cls(tuple(tuple(row) for row in table), target)


# ----------------------------------------------------------------------------------------------- 2. streams
class SampleCodec(Protocol):
    """What a DataModule plugs into ``ShardStream``: decode one raw sample, make padding, name its files."""

    required: tuple[str, ...]  # extensions of the member that makes a sample (for counting shards)

    def decode(self, sample: Sample, rng: random.Random, counter: SkipCounter) -> Sample | None:
        """Decoded sample (tensors, ``caption``, ``key``) or None after counting the skip reason."""

    def blank(self) -> Sample:
        """A padding sample of the right shapes (used when a worker has no real sample to copy)."""


def collate(samples: Sequence[Sample]) -> dict[str, Any]:
    """Stack a list of decoded samples: tensors -> stacked ``[B, ...]``, floats -> float32 ``[B]``,
    bools -> bool ``[B]``, strings -> ``list[str]``."""
    batch: dict[str, Any] = {}
    for name, first in samples[0].items():
        values = [s[name] for s in samples]
        if isinstance(first, torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(first, bool):
            batch[name] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, (int, float)):
            batch[name] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[name] = values
    return batch


class ShardStream(IterableDataset):
    """Batches (dicts, see ``collate``) streamed from tar shards, for one rank; runs inside the workers.

    Args:
        urls: expanded shard URLs (``expand_urls``).
        codec: turns raw samples into tensors (``SampleCodec``).
        batch_size: samples per batch.
        train: infinite resampled + shuffled stream if True; finite exactly-once evaluation stream if False.
        seed: base seed of every random choice (shards, shuffle, crops, fps, clip starts).
        rank, world_size: this process among the data-parallel ones (``resolve_rank``).
        num_workers: DataLoader workers per rank (evaluation plans per worker; must match the loader).
        shuffle_buffer: samples held for shuffling in training.
        max_empty_shards: training aborts after this many consecutive shards give nothing.
        embeds: folder of ``mav embed`` companion shards read next to ``urls`` (``datamodules.embeds``).
    """

    def __init__(self, urls: Sequence[str], codec: SampleCodec, *, batch_size: int, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 1000,
                 max_empty_shards: int = 100, opener: Callable[[str], IO[bytes]] = open_shard,
                 embeds: str | None = None) -> None:
        super().__init__()
        self.urls, self.codec, self.batch_size, self.train = list(urls), codec, batch_size, train
        self.embeds = embeds
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = max(1, num_workers)
        self.shuffle_buffer, self.max_empty_shards, self.opener = shuffle_buffer, max_empty_shards, opener
        self.counter = SkipCounter()
        self.epoch = 0  # advanced by ShardLoader in the main process before workers start
        # Persistent workers keep the copy of the stream made at their start and never see `epoch` advance: they
        # count their own iterations since the epoch they last saw (see `_logical_epoch`).
        self._epoch_seen: int | None = None
        self._iterations_since = 0
        self.plan: EvalPlan | None = None
        if not train:
            slots = world_size * self.num_workers
            if len(self.urls) < slots:
                raise ValueError(f"evaluation needs at least one shard per rank x worker: {len(self.urls)} shards "
                                 f"< {world_size} ranks x {self.num_workers} workers; write more (smaller) "
                                 f"shards or use fewer evaluation workers (val_num_workers)")
            counts = [count_samples(u, codec.required, opener) for u in self.urls]
            self.plan = EvalPlan.build(counts, world_size, self.num_workers, batch_size)
            if self.plan.batches_per_rank == 0:
                raise ValueError(f"evaluation shards hold no samples with {codec.required}: {self.urls[:3]}...")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot = Slot.current(self.rank, self.world_size)
        return self._train_batches(slot, self._logical_epoch()) if self.train else self._eval_batches(slot)

    def _logical_epoch(self) -> int:
        """The loader's epoch count, wherever this copy of the stream runs: the main process (``num_workers=0``)
        and fresh workers see ``epoch`` itself; a persistent worker adds the iterations it ran since its start.
        A resumed run sets ``epoch`` and gets the same number, hence the same shards, shuffles and crops."""
        if self.epoch != self._epoch_seen:
            self._epoch_seen, self._iterations_since = self.epoch, 0
        self._iterations_since += 1
        return self.epoch + self._iterations_since - 1

    def _train_batches(self, slot: Slot, epoch: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(mix_seed(self.seed, slot.rank, slot.worker, epoch))
        urls = split_by_node(resampled(self.urls, rng), slot)
        samples = read_samples(urls, self.counter, max_empty_shards=self.max_empty_shards, opener=self.opener,
                               reader=self._reader())
        samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2, rng=rng)(samples)
        decoded = (d for d in (self.codec.decode(s, rng, self.counter) for s in samples) if d is not None)
        while True:
            group = list(islice(decoded, self.batch_size))
            if len(group) < self.batch_size:
                return  # only if the shard stream ended, which resampling never does
            yield self._finish(group)

    def _eval_batches(self, slot: Slot) -> Iterator[dict[str, Any]]:
        assert self.plan is not None
        if slot.num_workers != self.num_workers:
            raise RuntimeError(f"evaluation stream planned for {self.num_workers} workers per rank but runs in "
                               f"{slot.num_workers}: build it with the DataLoader's num_workers")
        budget = self.plan.batches[slot.rank][slot.worker]
        samples = read_samples(shards_for(self.urls, slot), self.counter, opener=self.opener, reader=self._reader())
        decoded = (self.codec.decode(s, random.Random(mix_seed(self.seed, s["__key__"])), self.counter)
                   for s in samples)  # per-key rng: a sample decodes the same whatever slot reads it
        real = (d for d in decoded if d is not None)
        example: Sample | None = None
        for index in range(budget):
            group = list(islice(real, self.batch_size))
            if group and example is None:
                example = group[0]
            while len(group) < self.batch_size:
                group.append(self._padding(example))
            if index == budget - 1:  # before the last batch leaves, so its skip counts include any overflow
                for _ in real:  # only if a shard grew since set-up or could not be counted in full
                    self.counter.add("eval_overflow")
            yield self._finish(group)

    def _reader(self) -> Callable[[str], Iterator[Sample]] | None:
        """Shard url -> samples with their companion's members (``embeds``), or None: plain ``iter_tar``."""
        if self.embeds is None:
            return None
        return partial(read_with_companion, embeds=self.embeds, counter=self.counter, opener=self.opener)

    def _padding(self, example: Sample | None) -> Sample:
        pad = dict(example) if example is not None else self.codec.blank()
        pad.update(valid=False, key="", caption="")
        return pad

    def _finish(self, group: list[Sample]) -> dict[str, Any]:
        batch = collate(group)
        batch[SKIP_KEY] = self.counter.snapshot()
        return batch


# ------------------------------------------------------------------------------------------------ 3. loader
class ShardLoader(wds.WebLoader):
    """webdataset's ``WebLoader`` around a ``ShardStream`` (batching happens in the workers: ``batch_size=None``).

    Each ``iter()`` advances the stream's epoch *before* workers are started, so non-persistent workers
    (fresh dataset copies every epoch) still draw new shards and shuffles every epoch.
    """

    def __init__(self, dataset: ShardStream, *, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, prefetch_factor: int | None = None) -> None:
        if not dataset.train and max(1, num_workers) != dataset.num_workers:
            raise ValueError(f"the evaluation stream was planned for {dataset.num_workers} workers, not {num_workers}")
        extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers and num_workers > 0, **extra)
        self.stream = dataset
        self._skip = 0

    def resume(self, epoch: int, batches: int) -> None:
        """Continue where a checkpoint left off: the next iteration is epoch ``epoch`` (this loader's count, as in
        ``stream.epoch``) without its first ``batches`` batches. Those are still drawn and dropped (the stream's
        random choices run in sequence), so the batches that follow are exactly the uninterrupted run's."""
        self.stream.epoch = epoch - 1  # __iter__ advances it
        self._skip = batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A generator, so the epoch advances when iteration starts, not when Lightning merely probes iter().
        self.stream.epoch += 1
        skip, self._skip = self._skip, 0
        batches = super().__iter__()  # with_epoch's islice counts the skipped batches: the epoch ends on time
        yield from islice(batches, skip, None) if skip else batches


class ShardDataModule(pl.LightningDataModule):
    """Base for the WebDataset DataModules: URL handling, default data, rank resolution and the loaders.

    Subclasses set ``kind`` (the Moving Shapes subdirectory, ``"images"`` or ``"videos"``) and implement
    ``make_codec(train)``. ``prepare_data`` (rank 0) generates Moving Shapes under ``root`` when default URLs
    are used and ``root/DONE`` is missing; ``setup`` (every rank) expands URLs, resolves rank / world size and
    builds the streams for the stage.
    """

    kind = "images"

    def __init__(self, urls: str | Sequence[str] | None = None, val_urls: str | Sequence[str] | None = None,
                 test_urls: str | Sequence[str] | None = None, *, root: str = "data/shapes", batch_size: int = 32,
                 val_batch_size: int | None = None, num_workers: int = 0, val_num_workers: int | None = None,
                 seed: int = 0, batches_per_epoch: int = 1000, shuffle_buffer: int = 1000, allow_pipe: bool = False,
                 pin_memory: bool = False, persistent_workers: bool = False,
                 shapes_kwargs: dict[str, Any] | None = None, embeds: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embeds = embeds
        self.embed_info: EmbedInfo | None = None
        self.urls, self.val_urls, self.test_urls = urls, val_urls, test_urls
        self.root = root
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        # Evaluation needs a shard per rank x worker; its worker count can be set apart from training's.
        self.val_num_workers = num_workers if val_num_workers is None else val_num_workers
        self.batches_per_epoch, self.shuffle_buffer = batches_per_epoch, shuffle_buffer
        self.allow_pipe, self.pin_memory, self.persistent_workers = allow_pipe, pin_memory, persistent_workers
        self.shapes_kwargs = dict(shapes_kwargs or {})
        self.streams: dict[str, ShardStream] = {}
        self.rank, self.world_size = 0, 1
        self._resume: dict[str, int] | None = None

    # -- subclass hooks
    def make_codec(self, train: bool) -> SampleCodec:
        raise NotImplementedError

    def data_size(self) -> int:
        """The side images / frames are decoded at (what ``mav embed --size`` must have used)."""
        raise NotImplementedError

    # -- Lightning contract
    def _uses_defaults(self) -> bool:
        return self.urls is None  # validation falls back to Moving Shapes only together with training

    def prepare_data(self) -> None:
        """Generate Moving Shapes under ``root`` if default URLs are used and it is missing (rank 0 only)."""
        from datamodules import shapes

        if self._uses_defaults() and not shapes.is_complete(self.root):
            log.warning("data: generating the Moving Shapes dataset under %s", self.root)
            shapes.generate(self.root, **self.shapes_kwargs)

    def default_urls(self, split: str) -> str:
        return str(Path(self.root) / self.kind / f"{split}-*.tar")

    def setup(self, stage: str | None = None) -> None:
        """Build the streams a stage needs: fit -> train + val, validate -> val, test -> test."""
        self.rank, self.world_size = resolve_rank(self.trainer)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}
        for split in wanted.get(stage or "fit", ("train", "val")):
            if split not in self.streams and self.split_urls(split) is not None:
                self.streams[split] = self.build_stream(split)

    def split_urls(self, split: str) -> str | Sequence[str] | None:
        """The URLs of ``split``; None when there is none (own data without ``val_urls``: no validation).

        Defaults: Moving Shapes train / val shards under ``root``; ``test`` falls back to ``val``.
        """
        if split == "train":
            return self.urls if self.urls is not None else self.default_urls("train")
        given = self.test_urls if split == "test" and self.test_urls is not None else self.val_urls
        if given is not None:
            return given
        return self.default_urls("val") if self.urls is None else None

    def build_stream(self, split: str) -> ShardStream:
        train = split == "train"
        urls = expand_urls(self.split_urls(split), allow_pipe=self.allow_pipe)
        if self.embeds is not None:
            self.embed_info = self.embed_info or EmbedInfo.read(self.embeds)
            check_companions(urls, self.embeds, self.embed_info, kind=self.kind, size=self.data_size())
        return ShardStream(
            urls, self.make_codec(train),
            batch_size=self.batch_size if train else self.val_batch_size, train=train,
            seed=mix_seed(self.seed, split), rank=self.rank, world_size=self.world_size,
            num_workers=self._workers(split), shuffle_buffer=self.shuffle_buffer, embeds=self.embeds)

    def _workers(self, split: str) -> int:
        return self.num_workers if split == "train" else self.val_num_workers

    def _loader(self, split: str) -> ShardLoader | list:
        if split not in self.streams:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        if split not in self.streams:
            return []  # Lightning skips a loop whose loader is an empty list
        return ShardLoader(self.streams[split], num_workers=self._workers(split), pin_memory=self.pin_memory,
                           persistent_workers=self.persistent_workers)

    def train_dataloader(self) -> ShardLoader:
        """Infinite resampled stream cut into epochs of ``batches_per_epoch`` batches per rank."""
        loader = self._loader("train")
        if self._resume:
            loader.resume(self._resume["train_epoch"], self._resume["train_batches"])
            self._resume = None
        return loader.with_epoch(self.batches_per_epoch)

    # -- resume: Lightning stores this in every checkpoint and hands it back before train_dataloader()
    def state_dict(self) -> dict[str, Any]:
        """The training stream's position: the loader's epoch and how many of its batches were trained on.

        The count is Lightning's (``processed`` batches of the epoch), not the loader's: Lightning fetches one
        batch ahead, so the loader has always handed out one more than was trained on when a checkpoint is saved.
        """
        stream, trainer = self.streams.get("train"), self.trainer
        if stream is None or trainer is None or trainer.state.fn != "fit":
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_epoch": int(stream.epoch), "train_batches": int(done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict) if state_dict else None

    def val_dataloader(self) -> ShardLoader | list:
        """Finite: every sample once across ranks x workers, equal batch counts per rank (see ``valid``);
        ``[]`` (no validation) for own training data given without ``val_urls``."""
        return self._loader("val")

    def test_dataloader(self) -> ShardLoader | list:
        """Like ``val_dataloader`` over ``test_urls`` (falling back to the validation shards)."""
        return self._loader("test")
