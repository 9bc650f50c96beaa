"""Shared shard machinery: URLs, remote openers, rank x worker splitting, seeding, skip tallies, DDP, Lightning."""

from __future__ import annotations

import functools
import http.server
import io
import pickle
import shutil
import threading
from pathlib import Path

import fsspec
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image

from datamodules.shards import EvalPlan, ShardLoader, ShardStream, Slot, mix_seed, resolve_rank
from datamodules.skips import SKIP_KEY, SkipCounter, SkipTally
from datamodules.tars import expand_urls, iter_tar
from datamodules.text_image import TextImageCodec, TextImageDataModule
from tests.helpers import fit, run_ddp

SHARD_SIZES = (5, 1, 3, 2, 4, 6)  # uneven on purpose: ranks and workers get different amounts
BAD_KEYS = {"s00000-0001", "s00004-0000"}  # undecodable images inside two of the shards


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(directory: Path, sizes: tuple[int, ...] = SHARD_SIZES) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard, size in enumerate(sizes):
        path = directory / f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(size):
                key = f"s{shard:05d}-{i:04d}"
                image = b"garbage" if key in BAD_KEYS else _png(10 * shard + i)
                sink.write({"__key__": key, "png": image, "txt": f"caption {key}".encode(), "json": b"{}"})
        urls.append(str(path))
    return urls


def _all_keys(sizes: tuple[int, ...] = SHARD_SIZES) -> list[str]:
    return [f"s{s:05d}-{i:04d}" for s, n in enumerate(sizes) for i in range(n)]


@pytest.fixture(scope="module")
def shard_urls(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return _write_shards(tmp_path_factory.mktemp("shards"))


def _eval_stream(urls: list[str], rank: int, world_size: int, num_workers: int, batch_size: int = 2) -> ShardStream:
    return ShardStream(urls, TextImageCodec(8), batch_size=batch_size, train=False, rank=rank,
                       world_size=world_size, num_workers=num_workers)


def _train_keys(urls: list[str], *, seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                batches: int = 4, epochs: int = 1, persistent: bool = False) -> list[list[list[str]]]:
    stream = ShardStream(urls, TextImageCodec(8), batch_size=3, train=True, seed=seed, rank=rank,
                         world_size=world_size, num_workers=num_workers, shuffle_buffer=6)
    loader = ShardLoader(stream, num_workers=num_workers, persistent_workers=persistent).with_epoch(batches)
    return [[batch["key"] for batch in loader] for _ in range(epochs)]


# ---------------------------------------------------------------------------------------------------- URLs
def test_expand_urls_forms(tmp_path: Path, shard_urls: list[str]) -> None:
    directory = str(Path(shard_urls[0]).parent)
    (Path(directory) / "shard-000000_stats.json").write_text("{}")  # img2dataset side files are not shards
    (Path(directory) / "shard-000000.parquet").write_bytes(b"PAR1")
    assert expand_urls(directory) == shard_urls
    assert expand_urls(f"{directory}/shard-{{000000..000002}}.tar") == shard_urls[:3]
    assert expand_urls(f"{directory}/shard-00000[45].tar") == shard_urls[4:]
    assert expand_urls([shard_urls[0], f"{directory}/shard-00000{{1,2}}.tar"]) == shard_urls[:3]
    assert expand_urls(f"{shard_urls[0]}::{shard_urls[1]}") == shard_urls[:2]
    assert expand_urls("s3://bucket/train-{00..02}.tar") == [f"s3://bucket/train-{i:02d}.tar" for i in range(3)]
    assert expand_urls(["gs://b/a.tar", "https://host/x/{a,b}.tar"]) == ["gs://b/a.tar", "https://host/x/a.tar",
                                                                       "https://host/x/b.tar"]
    with pytest.raises(FileNotFoundError, match="missing-000.tar"):
        expand_urls(str(tmp_path / "missing-000.tar"))
    with pytest.raises(FileNotFoundError):
        expand_urls(str(tmp_path / "nothing-*.tar"))


def test_pipe_urls_are_refused_unless_allowed(shapes_root: Path) -> None:
    url = "pipe:curl -s https://example.com/shard-{0..1}.tar"
    with pytest.raises(ValueError) as info:
        expand_urls(url)
    message = str(info.value)
    assert "pipe:curl -s https://example.com/shard-0.tar" in message and "allow_pipe: true" in message
    assert "\n" not in message  # one clear line
    assert expand_urls(url, allow_pipe=True) == ["pipe:curl -s https://example.com/shard-0.tar",
                                                 "pipe:curl -s https://example.com/shard-1.tar"]
    dm = TextImageDataModule(urls="pipe:cat x.tar", val_urls=str(shapes_root / "images"), root=str(shapes_root))
    with pytest.raises(ValueError, match="allow_pipe"):
        dm.setup("fit")


def test_pipe_url_runs_when_allowed(shard_urls: list[str]) -> None:
    stream = ShardStream(expand_urls(f"pipe:cat {shard_urls[2]}", allow_pipe=True), TextImageCodec(8),
                         batch_size=3, train=True, shuffle_buffer=1)
    batch = next(iter(ShardLoader(stream)))
    assert sorted(set(batch["key"])) <= ["s00002-0000", "s00002-0001", "s00002-0002"]


def test_fsspec_remote_urls(shard_urls: list[str]) -> None:
    """Object-store URLs go through fsspec (memory:// stands in for s3:// / gs:// here), finite mode included."""
    fs = fsspec.filesystem("memory")
    for i, url in enumerate(shard_urls[:4]):
        fs.pipe(f"/bucket/train-{i:02d}.tar", Path(url).read_bytes())
    stream = _eval_stream(expand_urls("memory://bucket/train-{00..03}.tar"), 0, 1, 0)
    keys = [k for b in ShardLoader(stream) for k, v in zip(b["key"], b["valid"]) if v]
    assert sorted(keys) == sorted(set(_all_keys(SHARD_SIZES[:4])) - BAD_KEYS)


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http(s) shards with curl")
def test_http_urls_through_webdataset_opener(shard_urls: list[str]) -> None:
    directory = str(Path(shard_urls[0]).parent)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        stream = _eval_stream(expand_urls(f"{base}/shard-{{000003..000004}}.tar"), 0, 1, 0)
        keys = [k for b in ShardLoader(stream) for k, v in zip(b["key"], b["valid"]) if v]
        assert sorted(keys) == sorted(set(_all_keys()[9:15]) - BAD_KEYS)
        counter = SkipCounter()
        assert list(iter_tar(f"{base}/does-not-exist.tar", counter)) == []  # counted, not raised
        assert counter.total() == 1
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------- evaluation
def test_two_ranks_two_workers_see_each_sample_once(shard_urls: list[str]) -> None:
    """Simulated ranks (the stream's rank/world size) x real DataLoader workers, uneven shards, bad samples."""
    seen: list[str] = []
    batches_per_rank = []
    tally = SkipTally()
    for rank in range(2):
        loader = ShardLoader(_eval_stream(shard_urls, rank, 2, 2), num_workers=2)
        batches = list(loader)
        batches_per_rank.append(len(batches))
        for batch in batches:
            tally.update(batch)
            assert batch["image"].shape == (2, 3, 8, 8)  # padding keeps batch shapes fixed
            seen += [k for k, v in zip(batch["key"], batch["valid"]) if v]
            assert all(k == "" for k, v in zip(batch["key"], batch["valid"]) if not v)
    assert sorted(seen) == sorted(set(_all_keys()) - BAD_KEYS)  # every good sample exactly once
    assert batches_per_rank[0] == batches_per_rank[1]  # no DDP hang
    assert tally.totals() == {"decode_error": len(BAD_KEYS)}  # counted by whichever worker read them
    plan = EvalPlan.build(list(SHARD_SIZES), 2, 2, 2)
    assert plan.batches == ((5, 2), (5, 2)) and plan.batches_per_rank == batches_per_rank[0] == 7


def test_eval_plan_pads_ranks_to_the_same_count() -> None:
    plan = EvalPlan.build([10, 0, 0, 0], world_size=2, num_workers=2, batch_size=3)
    assert plan.batches_per_rank == 4 and [sum(row) for row in plan.batches] == [4, 4]
    assert plan.batches[1] == (2, 2)  # rank 1 has nothing: its workers pad the whole way


def test_fewer_shards_than_ranks_times_workers_is_an_error(shard_urls: list[str]) -> None:
    with pytest.raises(ValueError, match=r"6 shards < 2 ranks x 4 workers"):
        _eval_stream(shard_urls, 0, 2, 4)
    with pytest.raises(ValueError, match="planned for 2 workers"):
        ShardLoader(_eval_stream(shard_urls, 0, 1, 2), num_workers=3)
    with pytest.raises(ValueError, match="val_num_workers"):
        TextImageDataModule(urls=shard_urls, val_urls=shard_urls, num_workers=8).setup("validate")
    dm = TextImageDataModule(urls=shard_urls, val_urls=shard_urls, num_workers=8, val_num_workers=2)
    dm.setup("validate")  # training keeps 8 workers, evaluation uses 2
    assert dm.streams["val"].num_workers == 2 and dm.val_dataloader().stream is dm.streams["val"]


# --------------------------------------------------------------------------------------------- training
def test_training_shuffle_is_seeded_per_rank_worker_and_epoch(shard_urls: list[str]) -> None:
    urls = shard_urls
    first = _train_keys(urls, num_workers=2, batches=4, epochs=2)
    assert first == _train_keys(urls, num_workers=2, batches=4, epochs=2)  # reproducible from the seed
    epoch0, epoch1 = first
    worker0, worker1 = epoch0[0::2], epoch0[1::2]  # the DataLoader alternates between its workers
    assert worker0 != worker1
    assert epoch0 != epoch1  # a new epoch draws new shards / order even with fresh workers
    assert _train_keys(urls, seed=1, num_workers=2) != [epoch0]
    assert _train_keys(urls, rank=1, world_size=2, num_workers=2) != _train_keys(urls, rank=0, world_size=2,
                                                                                 num_workers=2)
    assert all(k not in BAD_KEYS for batch in epoch0 for k in batch)
    persistent = _train_keys(urls, num_workers=2, batches=4, epochs=2, persistent=True)
    assert persistent == _train_keys(urls, num_workers=2, batches=4, epochs=2, persistent=True)
    assert persistent[0] != persistent[1]  # persistent workers never see the main process's epoch, still differ


def test_eval_overflow_is_counted_not_silent(tmp_path: Path) -> None:
    urls = _write_shards(tmp_path, (1, 3))
    stream = _eval_stream(urls, 0, 1, 0)  # plans 2 batches of 2
    _write_shards(tmp_path, (1, 4))  # a shard grows after set-up counted it
    batches = list(ShardLoader(stream))
    assert len(batches) == 2 and all(batches[i]["valid"].all() for i in range(2))
    assert batches[-1][SKIP_KEY]["counts"] == {"eval_overflow": 1}  # reaches SkipTally with the last batch


def test_training_over_dead_shards_fails_loudly(tmp_path: Path) -> None:
    dead = tmp_path / "dead.tar"
    dead.write_bytes(b"\x00" * 100)
    stream = ShardStream([str(dead)], TextImageCodec(8), batch_size=2, train=True, max_empty_shards=20)
    with pytest.raises(RuntimeError, match="20 consecutive shards gave no samples"):
        next(iter(ShardLoader(stream)))


def test_streams_pickle_for_spawned_workers(shard_urls: list[str]) -> None:
    stream = _eval_stream(shard_urls, 1, 2, 2)
    stream.counter.add("decode_error")
    copy = pickle.loads(pickle.dumps(stream))
    assert copy.plan == stream.plan and copy.urls == stream.urls
    assert copy.counter.snapshot()["counts"] == {"decode_error": 1}  # same process: same counts
    train = ShardStream(shard_urls, TextImageCodec(8), batch_size=2, train=True)
    assert pickle.loads(pickle.dumps(train)).train


def test_skip_tally_adds_workers_and_replacements() -> None:
    tally = SkipTally()
    assert tally.update({"data_skipped": {"source": "a", "counts": {"x": 1}}}) == {"x": 1}
    assert tally.update({"data_skipped": {"source": "a", "counts": {"x": 3}}}) == {"x": 3}  # cumulative
    assert tally.update({"data_skipped": {"source": "b", "counts": {"x": 1, "y": 2}}}) == {"x": 4, "y": 2}
    assert tally.update({"image": torch.zeros(1)}) == {"x": 4, "y": 2}
    assert mix_seed(1, "a") == mix_seed(1, "a") != mix_seed(1, "b")


def test_rank_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == (3, 4)

    class FakeTrainer:
        global_rank, world_size = 1, 2

    assert resolve_rank(FakeTrainer()) == (1, 2)  # the trainer wins over the environment
    assert Slot.current(1, 2) == Slot(1, 2, 0, 1)


# ---------------------------------------------------------------------------------- real 2-process gloo run
def _ddp_validation(rank: int, world_size: int, urls: list[str]) -> list[dict]:
    # Ranks are spawned; their DataLoader workers fork, as under Lightning's default `ddp` launcher (a spawned
    # rank would otherwise spawn its workers too, each re-importing torch: correct, see the pickle test, but slow).
    mp.set_start_method("fork", force=True)
    dm = TextImageDataModule(urls=urls, val_urls=urls, image_size=8, val_batch_size=2, num_workers=2)
    dm.setup("validate")  # no trainer: rank and world size come from torch.distributed
    keys, count = [], 0
    for batch in dm.val_dataloader():
        # a collective per batch, as `self.log(..., sync_dist=True)` does: unequal counts would hang here
        valid = torch.tensor([int(batch["valid"].sum())])
        dist.all_reduce(valid)
        keys += [k for k, v in zip(batch["key"], batch["valid"]) if v]
        count += 1
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, {"rank": dm.rank, "world": dm.world_size, "keys": keys, "batches": count})
    return gathered


def test_real_two_process_gloo_validation(shard_urls: list[str]) -> None:
    results = run_ddp(_ddp_validation, shard_urls, world_size=2, start_method="spawn", threads=None,
                      timeout_s=60)[0]  # rank 0's gathered view
    assert [r["rank"] for r in results] == [0, 1] and {r["world"] for r in results} == {2}
    assert results[0]["batches"] == results[1]["batches"] == 7
    keys = [k for r in results for k in r["keys"]]
    assert sorted(keys) == sorted(set(_all_keys()) - BAD_KEYS)  # exactly once across 2 ranks x 2 workers


# ---------------------------------------------------------------------------------------------- Lightning
class _Consumer(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.train_batches, self.val_batches, self.tally, self.sources = 0, [], SkipTally(), set()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.train_batches += 1
        self.tally.update(batch)
        self.sources.add(batch[SKIP_KEY]["source"])
        return self.layer(batch["image"].mean(dim=(2, 3))).pow(2).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_batches.append([k for k, v in zip(batch["key"], batch["valid"]) if v])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_streams_train_and_validation(shapes_root: Path) -> None:
    dm = TextImageDataModule(root=str(shapes_root), image_size=16, batch_size=4, val_batch_size=4,
                             batches_per_epoch=3, shuffle_buffer=8)
    model = _Consumer()
    fit(model, dm, steps=-1, max_epochs=2, num_sanity_val_steps=0)
    assert model.train_batches == 6  # with_epoch(batches_per_epoch) cuts the infinite stream into epochs
    per_epoch = len(model.val_batches) // 2
    first, second = sum(model.val_batches[:per_epoch], []), sum(model.val_batches[per_epoch:], [])
    assert per_epoch == 4 and len(first) == len(set(first)) == 16 and sorted(first) == sorted(second)
    assert len(model.sources) == 1 and model.tally.totals() == {}  # skip info survives Lightning's batch transfer
