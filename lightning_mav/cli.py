"""Command line: ``lightning`` / ``mav`` / ``python -m lightning_mav``.

Trainer commands (``fit / validate / test / predict --config …``) are Lightning's own ``LightningCLI``: model and data
are picked by import path in the YAML (``class_path``), ``experiments/base.yaml`` supplies the defaults, OmegaConf
``${…}`` interpolation works, ``--print_config`` prints the merged config and the run folder gets ``config.yaml``.
``mav`` also carries the commands that are not training: ``generate``, ``demo``, ``data``, ``evaluate``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
BASE_CONFIG = EXPERIMENTS / "base.yaml"
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def one_line(message: str) -> str:
    """Reduce jsonargparse's nested, multi-line errors to ``full.key: reason`` on one line."""
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


class _Parser(LightningArgumentParser):
    def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
        if not self.exit_on_error:  # a nested parser (subclass init_args): let the parent add the key path
            super().error(message, ex)
        sys.stderr.write(f"error: {one_line(message)}\n")
        raise SystemExit(2)


class MAVCLI(LightningCLI):
    """``LightningCLI`` with the suite's defaults: any LightningModule / LightningDataModule by import path,
    ``experiments/base.yaml`` as default config, OmegaConf interpolation, ``config.yaml`` overwritten on resume."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        import pytorch_lightning as pl

        defaults = [str(BASE_CONFIG)] if BASE_CONFIG.is_file() else []
        super().__init__(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=_Parser,
            # per subcommand: defaults given to the root parser would be read "before subcommand" and refused
            parser_kwargs={sub: {"default_config_files": defaults, "parser_mode": "omegaconf"}
                           for sub in TRAINER_COMMANDS},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )

    def before_instantiate_classes(self) -> None:
        # Runs land in runs/<stage>/ where <stage> is the last --config file's name (dt.yaml -> runs/dt), so the
        # chain's `init_from: runs/<parent>/checkpoints/last.ckpt` paths hold without repeating a logger per YAML.
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        logger = cfg.get("trainer", {}).get("logger")
        configs = [str(c) for c in (cfg.get("config") or []) if c is not None]
        if logger and not isinstance(logger, bool) and "init_args" in logger and configs:
            if logger["init_args"].get("name") in (None, "", "default"):
                logger["init_args"]["name"] = Path(configs[-1]).stem
            run_dir = Path(logger["init_args"].get("save_dir") or ".") / logger["init_args"]["name"]
            for cb in cfg.get("trainer", {}).get("callbacks") or []:
                # OnExceptionCheckpoint needs a folder; `auto` puts it beside the stage's other checkpoints.
                if str(cb.get("class_path", "")).endswith("OnExceptionCheckpoint") and \
                        cb.get("init_args", {}).get("dirpath") == "auto":
                    cb["init_args"]["dirpath"] = str(run_dir / "checkpoints")


def _command(name: str):  # imported lazily: `mav fit` must not pay for the pipeline's imports
    if name == "generate":
        from lightning_mav.pipeline import main as fn
    elif name == "demo":
        from lightning_mav.demo import main as fn
    elif name == "data":
        from datamodules.shapes import main as fn
    elif name == "evaluate":
        from lightning_mav.evaluate import main as fn
    else:
        raise KeyError(name)
    return fn


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``mav`` and ``lightning``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("generate", "demo", "data", "evaluate"):
        _command(args[0])(args[1:])
        return
    try:
        MAVCLI(args=argv)  # None: LightningCLI reads sys.argv itself
    except Exception as e:
        from omegaconf.errors import MissingMandatoryValue

        if isinstance(e, MissingMandatoryValue):  # `???` left in a config (paper overlays' data.urls)
            key = getattr(e, "full_key", "") or "value"
            sys.stderr.write(f"error: {key}: missing required value (`???` in the config; set it in a YAML or as "
                             f"--{key} …)\n")
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
