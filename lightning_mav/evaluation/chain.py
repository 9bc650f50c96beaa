"""The trained networks an evaluation samples and scores: the pipeline from ``runs/<stage>/``, and SR_l."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_mav.checkpoints import CheckpointError
from lightning_mav.networks import LOADED, OPTIONAL, default_checkpoint, train_command
from lightning_mav.pipeline import MakeAVideoPipeline, load_stage
from lightning_mav.stages.superres import SuperResStage


@dataclass
class Chain:
    """The loaded networks: the pipeline (C_x, P, D_t and the optional ↑F, SR_t, SR_h), SR_l (scored only),
    ``missing``: stage -> why it is skipped, ``checkpoints``: stage -> path (what the samples depend on)."""

    pipe: MakeAVideoPipeline
    sr_l: SuperResStage | None = None
    missing: dict[str, str] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)


def load_chain(runs: str | Path = "runs", *, device: torch.device | str | None = None,
               dtype: torch.dtype | str | None = None) -> Chain:
    """The networks under ``runs/<stage>/checkpoints/last.ckpt``; P and D_t are required, the rest optional.

    SR_l is no link of the sampled chain (SR_t replaces it), so the pipeline does not load it; it is loaded here for
    its PSNR only.

    Raises:
        CheckpointError: P or D_t missing (the message names the command that trains it), or a wrong checkpoint.
    """
    paths: dict[str, str | None] = {}
    missing: dict[str, str] = {}
    for key in (*LOADED, "SR_l"):
        path = default_checkpoint(runs, key)
        paths[key] = str(path) if path.is_file() else None
        if paths[key] is None and key in (*OPTIONAL, "SR_l"):
            missing[key] = f"not trained: no {path} (`{train_command(key)}`)"
    for required in ("P", "D_t"):
        if paths[required] is None:
            raise CheckpointError(f"checkpoint not found: {default_checkpoint(runs, required)} — train {required} "
                                  f"with `{train_command(required)}`")
    pipe = MakeAVideoPipeline.from_checkpoints(
        clip=paths["clip"], prior=paths["P"], decoder=paths["D_t"], interpolation=paths["up_F"],
        sr_t=paths["SR_t"], sr_h=paths["SR_h"], device=device, dtype=dtype)
    sr_l = None if paths["SR_l"] is None else load_stage(SuperResStage, paths["SR_l"], stage="SR_l").to(pipe.device)
    checkpoints = {k: v for k, v in paths.items() if v is not None}
    return Chain(pipe=pipe, sr_l=sr_l, missing=missing, checkpoints=checkpoints)
