"""``MAVCLI``: Lightning's ``LightningCLI`` with the suite's defaults, behind ``mav fit / validate / test / predict``.

Model and data are picked by import path in the YAML (``class_path``), ``experiments/base.yaml`` supplies the
defaults, OmegaConf ``${…}`` interpolation works, ``--print_config`` prints the merged config and the run folder gets
``config.yaml``. ``mav demo`` runs every stage through it too (``lightning_mav.demo``).

A bad config (unknown key, wrong type, ``???`` left unset, a checkpoint path that does not exist, a constructor that
refuses its arguments) stops before anything trains with one line, ``error: <key>: <reason>``; set
``MAV_TRACEBACK=1`` to see the traceback of a constructor's error instead. A fresh ``fit`` starts from scratch;
``--ckpt_path last`` resumes ``runs/<stage>/checkpoints/last.ckpt`` (see ``callbacks.ExceptionCheckpoint``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
BASE_CONFIG = EXPERIMENTS / "base.yaml"
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def one_line(message: str) -> str:
    """Reduce jsonargparse's nested, multi-line errors to ``full.key: reason`` on one line."""
    unknown = re.search(r"does not accept option '([^']+)'|unrecognized arguments: --?([^\s=]+)", message)
    if unknown:  # a key no parser knows (in a YAML / on the command line): "trainer.max_stepz: unknown key"
        return f"{unknown.group(1) or unknown.group(2)}: unknown key"
    message = re.sub(r"<class '([\w.]+)'>", r"\1", message)  # "<class 'int'>" -> "int"
    message = re.sub(r"Expected a (\S+?)\. Got value: ", r"expected \1, got ", message)
    keys = re.findall(r'Parser key "([^"]+)"', message)
    nested = "class_path '" in message  # keys below a class_path live under init_args
    key = ".".join([keys[0]] + [f"init_args.{k}" if nested else k for k in keys[1:]]) if keys else ""
    option = re.search(r"Option '([^']+)' is not accepted", message)
    klass = re.search(r"class_path '([^']+)'", message)
    if option:
        key = f"{key}.init_args.{option.group(1)}" if key else option.group(1)
        return f"{key}: unknown key" + (f" (not a parameter of {klass.group(1)})" if klass else "")
    generic = ("Does not validate", "Subtypes:", "Errors:", "Given value", "<class 'NoneType'>", "class_path '",
               "Not a valid subclass")
    lines = (re.sub(r'^\s*-?\s*Parser key "[^"]+":\s*', "", ln).strip(" -") for ln in message.splitlines())
    details = [ln for ln in lines if ln and not any(g in ln for g in generic)]
    reason = details[0] if details else "invalid value"
    return f"{key}: {reason}" if key else reason


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted.key, value)`` of every leaf of a parsed config (jsonargparse Namespaces, dicts, lists)."""
    items = vars(node).items() if hasattr(node, "__dict__") and not isinstance(node, type) else \
        node.items() if isinstance(node, dict) else None
    if items is None:
        if isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                yield from _leaves(v, f"{prefix}[{i}]")
        else:
            yield prefix, node
        return
    for k, v in items:
        if not str(k).startswith("__"):
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))


def _missing_values(cfg: Any) -> Iterator[str]:
    """Keys still holding OmegaConf's mandatory-value marker ``???``."""
    return (key for key, value in _leaves(cfg) if value == "???")


def _dict_nulls(node: dict[str, Any]) -> None:
    """Turn the text ``"None"`` back into null inside a dict argument, in place. jsonargparse reads a null given on
    the command line for one key of a dict under ``init_args`` (``--model.init_args.diffusion.min_snr_gamma null``)
    as that text; no option of these dicts (``unet``, ``diffusion``, ``model_cfg``) takes it."""
    for key, value in node.items():
        if isinstance(value, dict):
            _dict_nulls(value)
        elif value == "None":
            node[key] = None


def config_error(error: BaseException, cfg: Any) -> str:
    """``key: reason`` for an error raised while building the classes of ``cfg`` (one line).

    The reason is the innermost error (jsonargparse wraps a constructor's exception in a list of Union attempts);
    the key is the config entry the error talks about: an unknown keyword names a dict key, otherwise a value
    (a path...) quoted in the message names its key, or the option the message starts with ("clip_sample must
    be ..."); else the section (``model``/``data``/``trainer``).
    """
    root, seen = error, set()
    while (root.__cause__ or root.__context__) is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__ or root.__context__
    reason = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    parent = re.search(r"not found: \S*?runs/(\w+)/checkpoints/\S+", reason)
    if parent and "` first" not in reason:  # a chain parent (e.g. the CLIP) that was never trained
        reason += f" — run `lightning fit --config experiments/{parent.group(1)}.yaml` first"
    leaves = [(k, v) for k, v in _leaves(cfg) if not k.startswith("config")]
    unknown = re.search(r"unexpected keyword argument '([^']+)'", reason)
    if unknown:
        for key, _ in leaves:
            if key.rsplit(".", 1)[-1] == unknown.group(1):
                return f"{key}: unknown key ({reason})"
    # a value the message names as a whole token ("got 'abc'", "not found: runs/x.ckpt"), not inside a longer word
    # (the "min" of ModelCheckpoint's mode is inside "min_snr_gamma")
    quoted = [(k, v) for k, v in leaves if isinstance(v, str) and len(v) >= 3
              and re.search(rf"(?<![\w/.-]){re.escape(v)}(?![\w/-])", reason)]
    if quoted:
        key = max(quoted, key=lambda kv: len(kv[1]))[0]  # the most specific value mentioned
        return f"{key}: {reason}"
    subject = re.match(r"\w+", reason)  # "clip_sample must be positive ...": the option the message is about
    named = [k for k, _ in leaves if subject and k.rsplit(".", 1)[-1] == subject.group()]
    if len(named) == 1:
        return f"{named[0]}: {reason}"
    section = next((s for s in ("model", "data", "trainer") if f"'{s}'" in str(error) or s in str(error)[:200]), "")
    return f"{section}: {reason}" if section else reason


class _Parser(LightningArgumentParser):
    def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
        if not self.exit_on_error:  # a nested parser (subclass init_args): let the parent add the key path
            super().error(message, ex)
        sys.stderr.write(f"error: {one_line(message)}\n")
        raise SystemExit(2)


class MAVCLI(LightningCLI):
    """``LightningCLI`` with the suite's defaults: any LightningModule / (optional) LightningDataModule by import path,
    ``experiments/base.yaml`` as default config, OmegaConf interpolation, ``config.yaml`` overwritten on resume."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        import pytorch_lightning as pl

        defaults = [str(BASE_CONFIG)] if BASE_CONFIG.is_file() else []
        with warnings.catch_warnings():  # args come from mav's dispatcher or the demo, as LightningCLI fears
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().__init__(
                pl.LightningModule,
                None,  # any LightningDataModule by class_path, and optional: the evaluation brings its own prompts
                subclass_mode_model=True,
                subclass_mode_data=True,
                parser_class=_Parser,
                # per subcommand: defaults given to the root parser would be read "before subcommand" and refused;
                # without one (run=False: the classes are built, nothing runs) the root parser is the only parser
                parser_kwargs={sub: {"default_config_files": defaults, "parser_mode": "omegaconf"}
                               for sub in TRAINER_COMMANDS} if run else
                {"default_config_files": defaults, "parser_mode": "omegaconf"},
                save_config_kwargs={"overwrite": True},
                args=args,
                run=run,
                **kwargs,
            )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        missing = list(_missing_values(cfg))
        if missing:  # OmegaConf leaves `???` as a string: refuse it before anything is built
            _fail(f"{', '.join(missing)}: missing required value{'s' if len(missing) > 1 else ''} (`???` in the "
                  f"config; set {'them' if len(missing) > 1 else 'it'} in a YAML or with "
                  + " ".join(f"--{k} …" for k in missing) + ")")
        for section in ("model", "data"):
            init_args = (cfg.get(section) or {}).get("init_args")
            for value in vars(init_args).values() if init_args is not None else ():
                if isinstance(value, dict):
                    _dict_nulls(value)
        trainer_cfg = cfg.get("trainer") or {}
        if trainer_cfg.get("fast_dev_run"):
            # Lightning 2.6's ModelCheckpoint still writes last.ckpt at the end of a fast_dev_run, into
            # ./checkpoints (no logger, no run folder): a smoke test must leave no checkpoint behind.
            trainer_cfg["callbacks"] = [cb for cb in trainer_cfg.get("callbacks") or []
                                        if not str(cb.get("class_path", "")).endswith(".ModelCheckpoint")]
            trainer_cfg["enable_checkpointing"] = False
        # Runs land in runs/<stage>/ where <stage> is the first --config file's name (dt.yaml -> runs/dt; overlays
        # given after it, like paper/dt.yaml or my.yaml, keep the stage's folder), so the chain's
        # `init_from: runs/<parent>/checkpoints/last.ckpt` paths hold without repeating a logger per YAML.
        logger = cfg.get("trainer", {}).get("logger")
        configs = [str(c) for c in (cfg.get("config") or []) if c is not None]
        if logger and not isinstance(logger, bool) and "init_args" in logger and configs:
            if logger["init_args"].get("name") in (None, "", "default"):
                logger["init_args"]["name"] = Path(configs[0]).stem

    def instantiate_classes(self) -> None:
        # A model/data/trainer constructor that refuses its arguments (a checkpoint path that does not exist, an
        # unknown U-Net option) is a config error too: one line naming the key, before any training starts.
        try:
            super().instantiate_classes()
        except Exception as e:
            if os.environ.get("MAV_TRACEBACK"):
                raise
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            _fail(config_error(e, cfg))


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def quiet_known_noise() -> None:
    """Drop two lines every stage would print that say nothing about the run: Lightning's advert for its cloud
    logger, and the deprecation torch 2.14 raises inside Lightning's own pytree helper
    (``pytorch_lightning/utilities/_pytree.py``: ``isinstance(treespec, LeafSpec)``). Nothing else is filtered."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _not_an_advert not in logger.filters:
            logger.addFilter(_not_an_advert)
