"""Skip counting for the WebDataset streams.

``SkipCounter`` (one per dataset copy, i.e. per worker process) counts every skipped or repaired sample by
reason; each batch carries a snapshot under ``batch["data_skipped"]``; ``SkipTally`` sums the latest snapshot
of every worker into totals (``data/skipped/<reason>``). Errors are never handled with webdataset's
``warn_and_continue`` (it sleeps 0.5 s per error).
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

log = logging.getLogger(__name__)

SKIP_KEY = "data_skipped"


class SkipCounter:
    """Cumulative counts of skipped (and repaired, ``repaired_*``) samples in *this process*, by reason.

    A dataset holds one; each DataLoader worker works on its own copy. When the copy lands in a new process
    (fork or spawn) the counts restart from zero under a fresh ``source`` id, so ``SkipTally`` can add the
    workers up without counting the parent's numbers twice.
    """

    def __init__(self) -> None:
        self._pid: int | None = None
        self._source = ""
        self._counts: dict[str, int] = {}

    def _claim(self) -> None:
        if self._pid != os.getpid():
            self._pid, self._source, self._counts = os.getpid(), f"{os.getpid()}-{uuid.uuid4().hex[:8]}", {}

    def add(self, reason: str, detail: str = "") -> None:
        """Count one event; the first of each reason in a process is logged with its detail."""
        self._claim()
        if reason not in self._counts:
            what = "repaired a sample" if reason.startswith("repaired_") else "skipped"
            log.warning("data: %s (%s) %s; further ones are only counted", what, reason, detail[:300])
        self._counts[reason] = self._counts.get(reason, 0) + 1

    def total(self) -> int:
        self._claim()
        return sum(self._counts.values())

    def snapshot(self) -> dict[str, Any]:
        """``{"source": str, "counts": {reason: int}}`` — what a batch carries under ``SKIP_KEY``."""
        self._claim()
        return {"source": self._source, "counts": dict(self._counts)}


class SkipTally:
    """Totals of skip counts across the workers whose batches this process has seen.

    ``SkipTally().update(batch) -> {reason: total}``: batches carry their worker's *cumulative* counts, so the
    tally keeps the latest snapshot per worker and sums them (nothing is counted twice, nothing lost when a
    worker is replaced by a new one at the next epoch). Per rank; sum across ranks when logging.
    """

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, int]] = {}

    def update(self, batch: dict[str, Any]) -> dict[str, int]:
        info = batch.get(SKIP_KEY) if isinstance(batch, dict) else None
        if info:
            self._latest[info["source"]] = dict(info["counts"])
        return self.totals()

    def totals(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for counts in self._latest.values():
            for reason, n in counts.items():
                totals[reason] = totals.get(reason, 0) + int(n)
        return dict(sorted(totals.items()))
