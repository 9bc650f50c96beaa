"""Karlo's diffusers folders -> the suite's ``P``, ``D`` and ``SR_l`` runs (behind ``mav import karlo``).

Karlo (kakaobrain/karlo-v1-alpha, an unCLIP reproduction) is distributed in diffusers' layout, one folder per
network with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``, or a sharded index):

    prior/            PriorTransformer              -> RUNS/prior   (PriorStage, the paper's P)
    text_proj/        UnCLIPTextProjModel           -> RUNS/decoder (folded into D's U-Net: its conditioning)
    decoder/          UNet2DConditionModel          -> RUNS/decoder (DecoderStage, D)
    super_res_first/  UNet2DModel                   -> RUNS/sr_l    (SuperResStage, SR_l: every step but the last)
    super_res_last/   UNet2DModel                   -> RUNS/sr_l    (its ``unet_last``: the final step)
    prior_scheduler/, decoder_scheduler/, super_res_scheduler/   UnCLIPScheduler configs -> each stage's diffusion

Each run is what a trained run leaves: ``checkpoints/last.ckpt`` (the stage's ``state_dict`` and
``hyper_parameters``, so ``init_from``, ``load_stage``, ``mav generate`` and ``mav evaluate`` use it like any other),
``config.yaml`` (the stage's class and options) and ``DONE`` (where it came from). Everything is read, converted
and checked before the first file is written; each run is written into a temporary folder and renamed into place.
The CLIP Karlo was trained with is OpenAI's ViT-L/14 (open_clip ``ViT-L-14``, pretrained ``openai``): with
``clip`` its weights file is recorded in the runs (and its widths are checked against Karlo's networks).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from lightning_mav.karlo.prior import prior_kwargs_from_diffusers, prior_state_from_diffusers
from lightning_mav.karlo.unet import unet_kwargs_from_diffusers, unet_state_from_diffusers
from lightning_mav.networks import BY_KEY

#: Karlo's sampling defaults (diffusers' UnCLIPPipeline): steps and guidance per network
KARLO_SAMPLING = {"P": {"sample_steps": 25, "guidance_scale": 4.0},
                  "D": {"sample_steps": 25, "guidance_scale": 8.0},
                  "SR_l": {"sample_steps": 7}}
KARLO_CLIP_MODEL = "ViT-L-14"
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_PREDICTION = {"epsilon": "eps", "sample": "x0"}


class KarloImportError(ValueError):
    """Karlo's folders cannot be imported as asked; the message is one line naming the file."""


@dataclass
class ImportedRun:
    """One run to write: ``RUNS/<run>/`` with the stage class and its checkpoint."""

    key: str                      # network key (``P``, ``D``, ``SR_l``)
    hparams: dict[str, Any]       # the stage's options
    state_dict: dict[str, Tensor]  # the stage's tensors (``prior.*``, ``unet.*``, ``unet_last.*``)
    sources: list[str]            # the files it was made from
    clip_widths: dict[str, int] = field(default_factory=dict)  # what it reads of its CLIP (P: checked, not saved)

    @property
    def run(self) -> str:
        return BY_KEY[self.key].run


# ------------------------------------------------------------------------------------------------ reading
def read_config(folder: Path) -> tuple[dict[str, Any], Path]:
    """``folder/config.json`` (or a scheduler's ``scheduler_config.json``) as a dict, and its path."""
    if not folder.is_dir():
        raise KarloImportError(f"{folder}: missing folder, expected Karlo's diffusers layout (prior/, text_proj/, "
                               "decoder/, super_res_first/, super_res_last/, *_scheduler/)")
    for name in ("config.json", "scheduler_config.json"):
        path = folder / name
        if path.is_file():
            try:
                return json.loads(path.read_text()), path
            except json.JSONDecodeError as e:
                raise KarloImportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    raise KarloImportError(f"{folder}: no config.json")


def read_weights(folder: Path) -> dict[str, Tensor]:
    """The tensors of a diffusers model folder: ``.safetensors``, ``.bin`` (``weights_only``) or a sharded index."""
    from safetensors.torch import load_file

    for name in _WEIGHTS:
        path = folder / name
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(_load_one(folder / shard, load_file))
            return state
        if path.is_file():
            return _load_one(path, load_file)
    raise KarloImportError(f"{folder}: no weights, expected {' or '.join(_WEIGHTS)}")


def _load_one(path: Path, load_file: Any) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle that needs code
        raise KarloImportError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(state, dict):
        raise KarloImportError(f"{path}: holds a {type(state).__name__}, expected a dict of tensors")
    return state


def _expect_class(config: dict[str, Any], path: Path, expected: str) -> None:
    found = config.get("_class_name")
    if found != expected:
        raise KarloImportError(f"{path}: _class_name is {found!r}, expected {expected!r} (Karlo's diffusers layout)")


def diffusion_from_scheduler(config: dict[str, Any], path: Path, *, learned_variance: bool) -> dict[str, Any]:
    """A stage's ``diffusion`` options from Karlo's UnCLIPScheduler config (sampled with ``sampler: unclip``)."""
    _expect_class(config, path, "UnCLIPScheduler")
    variance = config.get("variance_type", "fixed_small_log")
    expected_variance = "learned_range" if learned_variance else "fixed_small_log"
    if variance != expected_variance:
        raise KarloImportError(f"{path}: variance_type is {variance!r}, expected {expected_variance!r}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTION:
        raise KarloImportError(f"{path}: prediction_type is {prediction!r}, expected 'epsilon' or 'sample'")
    schedule = config.get("beta_schedule", "squaredcos_cap_v2")
    if schedule != "squaredcos_cap_v2":
        raise KarloImportError(f"{path}: beta_schedule is {schedule!r}, expected 'squaredcos_cap_v2'")
    clip = config.get("clip_sample", True)
    return {"timesteps": int(config.get("num_train_timesteps", 1000)), "schedule": "cosine",
            "objective": _PREDICTION[prediction],
            "clip_sample": float(config.get("clip_sample_range", 1.0)) if clip else None,
            **({"learned_variance": True} if learned_variance else {})}


# ------------------------------------------------------------------------------------------------ converting
def convert(src: str | os.PathLike, *, clip: str | None = None, clip_model: str = KARLO_CLIP_MODEL
            ) -> list[ImportedRun]:
    """Read and convert Karlo's folders under ``src`` into the three runs (nothing written)."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise KarloImportError(f"{src}: no such folder (Karlo's diffusers download, e.g. karlo-v1-alpha/)")
    clip_fields = {"clip_ckpt": None if clip is None else str(Path(clip).expanduser()), "clip_model": clip_model}
    try:
        runs = [_prior(src, clip_fields), _decoder(src, clip_fields), _super_res(src)]
    except KarloImportError:
        raise
    except ValueError as e:  # the converters' one-line errors (they name the config or weights file)
        raise KarloImportError(str(e)) from e
    if clip is not None:
        check_clip(runs, clip_fields["clip_ckpt"], clip_model)
    return runs


def _prior(src: Path, clip_fields: dict[str, Any]) -> ImportedRun:
    config, config_path = read_config(src / "prior")
    _expect_class(config, config_path, "PriorTransformer")
    kwargs = prior_kwargs_from_diffusers(config, source=str(config_path))
    if kwargs.get("mlp_ratio", 4.0) != 4.0:
        raise KarloImportError(f"{config_path}: the feed-forward width is {kwargs['mlp_ratio']}x, expected 4x")
    state = prior_state_from_diffusers(read_weights(src / "prior"), kwargs, source=str(src / "prior"))
    sched, sched_path = read_config(src / "prior_scheduler")
    diffusion = diffusion_from_scheduler(sched, sched_path, learned_variance=False)
    hparams = {**clip_fields, "dim": kwargs["dim"], "depth": kwargs["depth"], "heads": kwargs["heads"],
               "dim_head": kwargs["dim_head"], "dropout": kwargs.get("dropout", 0.0), "qkv_bias": kwargs["qkv_bias"],
               "text_null": kwargs["text_null"], "embed_space": "raw", "timesteps": diffusion["timesteps"],
               "schedule": "cosine", "objective": diffusion["objective"], "clip_sample": diffusion["clip_sample"],
               "sampler": "unclip", **KARLO_SAMPLING["P"]}
    # the widths PriorStage takes from its CLIP: kept to check a CLIP against (not stage options)
    widths = {"embed_dim": kwargs["embed_dim"], "text_width": kwargs["text_width"],
              "max_text_len": kwargs["max_text_len"]}
    return ImportedRun("P", hparams, {f"prior.{k}": v for k, v in state.items()},
                       [str(config_path), str(sched_path)], clip_widths=widths)


def _decoder(src: Path, clip_fields: dict[str, Any]) -> ImportedRun:
    config, config_path = read_config(src / "decoder")
    _expect_class(config, config_path, "UNet2DConditionModel")
    proj_config, proj_path = read_config(src / "text_proj")
    _expect_class(proj_config, proj_path, "UnCLIPTextProjModel")
    kwargs = unet_kwargs_from_diffusers(config, proj_config, source=str(config_path))
    state = unet_state_from_diffusers(read_weights(src / "decoder"), kwargs, read_weights(src / "text_proj"),
                                      source=str(src / "decoder"))
    sched, sched_path = read_config(src / "decoder_scheduler")
    diffusion = diffusion_from_scheduler(sched, sched_path, learned_variance=True)
    hparams = {"unet": kwargs, "diffusion": {**diffusion, "min_snr_gamma": None}, **clip_fields,
               "embed_space": "raw", "image_size": int(config.get("sample_size") or 64), "cond_drop_prob": 0.1,
               "sampler": "unclip", **KARLO_SAMPLING["D"]}
    return ImportedRun("D", hparams, {f"unet.{k}": v for k, v in state.items()},
                       [str(config_path), str(proj_path), str(sched_path)])


def _super_res(src: Path) -> ImportedRun:
    kwargs_by_part, state, sources = {}, {}, []
    for part, prefix in (("super_res_first", "unet."), ("super_res_last", "unet_last.")):
        config, config_path = read_config(src / part)
        _expect_class(config, config_path, "UNet2DModel")
        kwargs = unet_kwargs_from_diffusers(config, source=str(config_path))
        kwargs_by_part[part] = kwargs
        converted = unet_state_from_diffusers(read_weights(src / part), kwargs, source=str(src / part))
        state.update({f"{prefix}{k}": v for k, v in converted.items()})
        sources.append(str(config_path))
    first, last = kwargs_by_part["super_res_first"], kwargs_by_part["super_res_last"]
    if first != last:
        changed = sorted(k for k in {**first, **last} if first.get(k) != last.get(k))
        raise KarloImportError(f"{src / 'super_res_last' / 'config.json'}: differs from super_res_first in "
                               f"{', '.join(changed)}; expected the same architecture")
    sched, sched_path = read_config(src / "super_res_scheduler")
    diffusion = diffusion_from_scheduler(sched, sched_path, learned_variance=False)
    config, _ = read_config(src / "super_res_first")
    highres = int(config.get("sample_size") or 256)
    hparams = {"unet": first, "diffusion": {**diffusion, "min_snr_gamma": None},
               "lowres_size": highres // 4, "highres_size": highres, "lowres_noise_max": 0.0,
               "lowres_noise_sample": 0.0, "residual": False, "sampler": "unclip", "last_step_unet": True,
               **KARLO_SAMPLING["SR_l"]}
    return ImportedRun("SR_l", hparams, state, [*sources, str(sched_path)])


def check_clip(runs: list[ImportedRun], clip: str, clip_model: str) -> None:
    """Fail in one line unless the CLIP's widths are the ones Karlo's networks read."""
    from lightning_mav.nn.clip import CLIP

    try:
        model = CLIP.from_checkpoint(clip, model_name=clip_model)
    except Exception as e:
        raise KarloImportError(f"{clip}: cannot load as open_clip {clip_model} "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    by_key = {r.key: r for r in runs}
    widths = by_key["P"].clip_widths
    unet = by_key["D"].hparams["unet"]
    found = {"image embedding": model.embed_dim, "text width": model.text_width,
             "context length": model.context_length}
    expected = {"image embedding": {widths["embed_dim"], unet.get("image_embed_dim"), unet.get("text_embed_dim")},
                "text width": {widths["text_width"], unet.get("text_dim")},
                "context length": {widths["max_text_len"]}}
    for what, want in expected.items():
        want.discard(None)
        if want and found[what] not in want:
            raise KarloImportError(f"{clip}: CLIP {clip_model} has {what} {found[what]}, Karlo's networks expect "
                                   f"{min(want)} (OpenAI ViT-L/14: open_clip ViT-L-14, pretrained openai)")


# ------------------------------------------------------------------------------------------------ writing
def write_runs(runs: list[ImportedRun], runs_dir: str | os.PathLike, *, src: str | os.PathLike,
               force: bool = False) -> list[Path]:
    """Write each run to ``runs_dir/<run>/`` (refusing to replace one unless ``force``); returns the checkpoints."""
    import pytorch_lightning as pl

    from lightning_mav.networks import default_checkpoint

    root = Path(runs_dir).expanduser()
    for r in runs:
        if (root / r.run).exists() and not force:
            raise KarloImportError(f"{root / r.run}: exists; pass --force to replace it")
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for r in runs:
        # plain lists and dicts (YAML-safe, as a LightningCLI config would give them)
        hparams = json.loads(json.dumps(r.hparams))
        tmp = Path(tempfile.mkdtemp(prefix=f".{r.run}.", dir=root))
        try:
            ckpt = tmp / "checkpoints" / "last.ckpt"
            ckpt.parent.mkdir()
            torch.save({"state_dict": r.state_dict, "hyper_parameters": hparams, "epoch": 0, "global_step": 0,
                        "pytorch-lightning_version": pl.__version__, "imported_from": r.sources}, ckpt)
            network = BY_KEY[r.key]
            (tmp / "config.yaml").write_text(
                f"# imported from {Path(src).expanduser()} by `mav import karlo`\n"
                + yaml.safe_dump({"model": {"class_path": network.module, "init_args": hparams}}, sort_keys=False))
            (tmp / "DONE").write_text(json.dumps({"stage": r.run, "steps": 0, "imported_from": str(src),
                                                  "sources": r.sources}, indent=1) + "\n")
            target = root / r.run
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        written.append(default_checkpoint(root, r.key))
    return written


def import_karlo(src: str | os.PathLike, runs_dir: str | os.PathLike, *, clip: str | None = None,
                 clip_model: str = KARLO_CLIP_MODEL, force: bool = False) -> list[Path]:
    """Convert Karlo's folders under ``src`` and write ``runs_dir/prior``, ``/decoder`` and ``/sr_l``."""
    return write_runs(convert(src, clip=clip, clip_model=clip_model), runs_dir, src=src, force=force)
