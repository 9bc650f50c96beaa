"""The registry of the paper's networks: one row per network, used by the pipeline, the demo, evaluation and docs.

    ŷ_t = SR_h ∘ SR_t ∘ ↑F ∘ D_t ∘ P(x̂, C_x(x))

Each network has a key (its paper name as a Python identifier: ``up_F`` for ↑F, ``clip`` for C_x), the run folder
and experiment YAML that train it (``runs/<run>/``, ``experiments/<run>.yaml``), its LightningModule and the
network it starts from (``init_from``). :data:`NETWORKS` lists them in training order (a parent before its
children); :data:`SAMPLED` is the order the pipeline applies them in.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Network:
    """One network of the paper.

    Attributes:
        key: canonical name (``"D_t"``, ``"up_F"``): attribute of the pipeline, key of per-stage options.
        paper: the paper's symbol (``"↑F"``, ``"C_x"``).
        run: run folder / experiment YAML name (``runs/dt``, ``experiments/dt.yaml``).
        module: import path of its LightningModule.
        parent: key of the network its weights start from (``init_from``), None for a network trained from scratch.
        what: what it learns, one line.
        trained_on: its training data.
    """

    key: str
    paper: str
    run: str
    module: str
    parent: str | None
    what: str
    trained_on: str


_STAGES = "lightning_mav.stages"

#: every network, in training order (a parent before its children)
NETWORKS: tuple[Network, ...] = (
    Network("clip", "C_x", "clip", f"{_STAGES}.clip.CLIPStage", None,
            "CLIP text/image encoder on captioned images", "text-image pairs"),
    Network("P", "P", "prior", f"{_STAGES}.prior.PriorStage", None,
            "text embedding -> image embedding", "text-image pairs"),
    Network("D", "D", "decoder", f"{_STAGES}.decoder.DecoderStage", None,
            "image embedding -> image", "images"),
    Network("SR_l", "SR_l", "sr_l", f"{_STAGES}.superres.SuperResStage", None,
            "image super-resolution", "images"),
    Network("SR_h", "SR_h", "sr_h", f"{_STAGES}.superres.SuperResStage", None,
            "per-frame super-resolution (crops)", "image crops"),
    Network("D_t", "D_t", "dt", f"{_STAGES}.decoder.DecoderStage", "D",
            "D + temporal layers on unlabeled video", "unlabeled video"),
    Network("up_F", "↑F", "interp", f"{_STAGES}.interpolation.InterpolationStage", "D_t",
            "masked frame interpolation", "unlabeled video"),
    Network("SR_t", "SR_t", "sr_t", f"{_STAGES}.superres.SuperResStage", "SR_l",
            "SR_l + temporal layers on video", "unlabeled video"),
)
BY_KEY: dict[str, Network] = {n.key: n for n in NETWORKS}

#: the networks the pipeline samples, in the order it applies them (C_x is a frozen encoder, D and SR_l are only
#: the parents of D_t and SR_t)
SAMPLED: tuple[str, ...] = ("P", "D_t", "up_F", "SR_t", "SR_h")
#: the checkpoints ``mav generate`` loads: C_x and the sampled networks
LOADED: tuple[str, ...] = ("clip", *SAMPLED)
#: the sampled networks a run may skip (a missing checkpoint, ``none`` on the command line)
OPTIONAL: tuple[str, ...] = ("up_F", "SR_t", "SR_h")

_ALIASES: dict[str, str] = {
    **{n.run: n.key for n in NETWORKS}, **{n.key.lower(): n.key for n in NETWORKS},
    **{n.paper.lower(): n.key for n in NETWORKS}, "interpolation": "up_F",
}


def network(name: str) -> Network:
    """The network of a key, paper symbol or run-folder name (``"D_t"``, ``"dt"``, ``"↑F"``, ``"interp"``, ...)."""
    key = name if name in BY_KEY else _ALIASES.get(name.lower())
    if key is None:
        raise ValueError(f"unknown stage {name!r}: use one of {', '.join(BY_KEY)} "
                         f"(or {', '.join(n.run for n in NETWORKS)})")
    return BY_KEY[key]


def stage_name(name: str) -> str:
    """Canonical key (``"D_t"``) of a paper or run-folder name (``"dt"``, ``"interp"``, ``"↑F"``, ...)."""
    return network(name).key


def train_command(name: str) -> str:
    """The command that trains a network and writes its default checkpoint."""
    return f"lightning fit --config experiments/{network(name).run}.yaml"


def default_checkpoint(runs: str | Path, name: str) -> Path:
    """``runs/<run>/checkpoints/last.ckpt``: where a network's training run leaves the weights its children use."""
    return Path(runs) / network(name).run / "checkpoints" / "last.ckpt"
