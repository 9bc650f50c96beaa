"""How the metrics split a global sample budget between DDP ranks.

A metric that counts at most ``max_samples`` videos under DDP lets each rank count its share, so that the total is
``max_samples`` and the counted videos are the first ``max_samples`` of the interleaved order a
``DistributedSampler`` (without shuffling) hands out: video ``i`` goes to rank ``i % world_size``.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["rank_share"]


def rank_share(total: int | None, process_group: Any = None) -> int | None:
    """This rank's share of ``total`` (all of it without DDP; ``None`` stays ``None``).

    ``total // world_size``, plus one on the first ``total % world_size`` ranks: exactly how many of videos
    ``0 .. total - 1`` fall on this rank when video ``i`` goes to rank ``i % world_size``.
    """
    if total is None:
        return None
    world, rank = 1, 0
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    return total // world + int(rank < total % world)
