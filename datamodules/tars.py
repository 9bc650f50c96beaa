"""Tar shards: finding them (URLs) and reading them into samples.

Read top to bottom:

1. **URLs** — ``expand_urls``: brace patterns, ``::``-separated lists, Python lists, local files,
   directories and globs, remote URLs (``https://``, ``gs://`` through webdataset's ``gopen``; ``s3://`` and
   any other fsspec scheme through fsspec). ``pipe:`` URLs run shell commands and are refused unless
   ``allow_pipe=True``.
2. **Reading** — ``read_samples``: tar members grouped into samples (``{"__key__", "__url__", ext: bytes}``),
   a truncated or unreadable shard counted once (``datamodules.skips``) and the stream moved on.
"""

from __future__ import annotations

import glob
import os
import posixpath
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any
from urllib.parse import urlparse

import braceexpand
from webdataset.gopen import gopen, gopen_schemes

from datamodules.skips import SkipCounter

Sample = dict[str, Any]


# ------------------------------------------------------------------------------------------------- 1. URLs
_GLOB_CHARS = set("*?[")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def expand_urls(urls: str | Sequence[str], *, allow_pipe: bool = False) -> list[str]:
    """Expand shard specs into a flat list of shard URLs (order kept, as written or sorted for globs).

    ``urls``: ``"a/{000000..000009}.tar"``, ``"x.tar::y.tar"``, a list of such strings, a local directory (its
    ``*.tar`` files; img2dataset's ``.parquet`` / ``_stats.json`` side files are ignored), a local glob, or
    remote URLs (``https://``, ``gs://``, ``s3://``...). Raises ``ValueError`` for ``pipe:`` URLs unless
    ``allow_pipe`` and when nothing is found; ``FileNotFoundError`` for a local shard that does not exist.
    """
    specs = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for spec in specs:
        for part in str(spec).split("::"):
            for url in braceexpand.braceexpand(part.strip()):
                out.extend(_expand_one(url, allow_pipe=allow_pipe))
    if not out:
        raise ValueError(f"no shards found for urls={urls!r}")
    return out


def _expand_one(url: str, *, allow_pipe: bool) -> list[str]:
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ValueError(f"refusing shard URL {url!r}: 'pipe:' URLs run shell commands; set "
                             f"`allow_pipe: true` in the data config if you really want that")
        return [url]
    if not _is_local(url):
        return [url]
    path = os.path.expanduser(_local_path(url))
    if os.path.isdir(path):
        found = sorted(p for p in glob.glob(os.path.join(path, "*")) if p.endswith(TAR_SUFFIXES))
        if not found:
            raise FileNotFoundError(f"no .tar shards in directory {path!r}")
        return found
    if _GLOB_CHARS & set(path):
        found = sorted(p for p in glob.glob(path) if p.endswith(TAR_SUFFIXES))
        if not found:
            raise FileNotFoundError(f"no .tar shards match {path!r}")
        return found
    if not os.path.exists(path):
        raise FileNotFoundError(f"shard not found: {path!r}")
    return [path]


def open_shard(url: str) -> IO[bytes]:
    """A readable binary stream for one shard: local files and webdataset's schemes via ``wds.gopen``
    (``https://`` uses curl, ``gs://`` gsutil), other schemes (``s3://``, ``az://``...) via fsspec."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in gopen_schemes:
        return gopen(_local_path(url) if scheme == "file" else url, "rb")
    import fsspec  # only needed for object stores; s3:// needs s3fs installed

    return fsspec.open(url, "rb").open()


# ---------------------------------------------------------------------------------------------- 2. reading
def _split_name(name: str) -> tuple[str, str] | None:
    """``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``): webdataset's rule, the key ends at the first dot."""
    directory, base = posixpath.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return posixpath.join(directory, stem), ext.lower()


def iter_tar(url: str, counter: SkipCounter, opener: Callable[[str], IO[bytes]] = open_shard) -> Iterator[Sample]:
    """Samples of one shard: ``{"__key__", "__url__", ext: bytes}`` for consecutive members sharing a key.

    A shard that cannot be opened counts ``open_error``; one that ends mid-member counts ``truncated_tar``
    (the sample being read is dropped); other tar damage counts ``tar_error``. Either way iteration just ends.
    A member name repeated within a sample marks it ``__duplicate__`` (the decoder skips it).
    """
    try:
        stream = opener(url)
    except Exception as exn:
        counter.add("open_error", f"{url}: {exn!r}")
        return
    current: Sample | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                parts = _split_name(member.name)
                if parts is None or posixpath.basename(parts[0]).startswith("__"):
                    continue  # no extension, or webdataset metadata (__*__)
                key, ext = parts
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current  # complete: a new key starts (before reading on, which may fail)
                    current = {"__key__": key, "__url__": url}
                fileobj = tar.extractfile(member)
                data = fileobj.read() if fileobj is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                if ext in current:
                    current["__duplicate__"] = True
                current[ext] = data
        if current is not None:
            yield current
    except Exception as exn:  # tarfile.ReadError, EOFError, zlib/gzip errors, network errors from the stream
        message = str(exn).lower()
        truncated = isinstance(exn, EOFError) or "unexpected end" in message or "truncated" in message
        counter.add("truncated_tar" if truncated else "tar_error", f"{url}: {exn!r}")
    finally:
        try:
            stream.close()
        except Exception:  # a curl pipe reports its exit status on close; the shard was already counted
            pass


def read_samples(urls: Iterable[str], counter: SkipCounter, *, max_empty_shards: int | None = None,
                 opener: Callable[[str], IO[bytes]] = open_shard,
                 reader: Callable[[str], Iterator[Sample]] | None = None) -> Iterator[Sample]:
    """Samples of every shard in ``urls`` in order. With ``max_empty_shards``, raise once that many
    consecutive shards gave nothing (an infinite resampled stream over dead shards must not spin forever).
    ``reader(url)`` replaces ``iter_tar`` (``datamodules.embeds.read_with_companion`` adds companion shards)."""
    empty = 0
    for url in urls:
        produced = False
        for sample in (iter_tar(url, counter, opener) if reader is None else reader(url)):
            produced = True
            yield sample
        empty = 0 if produced else empty + 1
        if max_empty_shards is not None and empty >= max_empty_shards:
            raise RuntimeError(f"{empty} consecutive shards gave no samples (last: {url}); skip counts: "
                               f"{counter.snapshot()['counts']}")


def count_samples(url: str, required: Sequence[str], opener: Callable[[str], IO[bytes]] = open_shard) -> int:
    """How many keys in a shard have a member with one of the ``required`` extensions (headers only for
    local files; a remote shard is streamed). Damaged shards count what is readable."""
    keys: set[str] = set()
    try:
        if _is_local(url):
            tar = tarfile.open(_local_path(url), mode="r:*")  # random access: reads headers, seeks over data
            stream = None
        else:
            stream = opener(url)
            tar = tarfile.open(fileobj=stream, mode="r|*")
        with tar:
            for member in tar:
                parts = _split_name(member.name) if member.isreg() else None
                if parts is not None and parts[1] in required:
                    keys.add(parts[0])
        if stream is not None:
            stream.close()
    except Exception:  # counted as skips when the shard is actually read; padding covers the difference
        pass
    return len(keys)
