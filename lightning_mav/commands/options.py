"""Command-line options shared by the commands: flags made from a dataclass's fields (its ``help`` metadata is the
flag's help, so an option is defined once for the Python API and the command), per-stage values, device and dtype."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, NoReturn

from lightning_mav.networks import stage_name
from lightning_mav.pipeline import DEVICE_HELP, DTYPE_HELP, DTYPES, PerStage


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2: how every command reports bad input."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def parse_per_stage(text: str | None, kind: type = int) -> PerStage:
    """``"30"`` -> 30; ``"D_t=50,sr_h=20"`` -> ``{"D_t": 50, "SR_h": 20}``; ``"30,SR_h=10"`` -> with ``"*": 30``."""
    if text is None:
        return None
    if "=" not in text:
        return kind(text)
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, is_pair, value = item.partition("=")
        if is_pair:
            out[stage_name(key.strip())] = kind(value.strip())
        else:
            out["*"] = kind(key.strip())
    return out


def _per_stage_type(kind: type):
    def parse(text: str) -> PerStage:
        try:
            return parse_per_stage(text, kind)
        except ValueError as e:  # argparse prints it as "argument --steps: <reason>"
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "per-stage"
    return parse


def _optional_text(text: str) -> str | None:
    return None if text.lower() in ("none", "null") else text


def _scalar(hint: Any) -> Any:
    """``int | None`` -> int; a union of several types (PerStage) is returned as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def flag(name: str) -> str:
    """``num_prompts`` -> ``--num-prompts``."""
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass ``cls`` (``--num-prompts``), typed, defaulted and helped by the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint, about = _scalar(hints[f.name]), f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if hint is bool:
            if default:
                parser.add_argument(flag(f"no_{f.name}"), dest=f.name, action="store_false", help=about)
            else:
                parser.add_argument(flag(f.name), dest=f.name, action="store_true", help=about)
            continue
        if hint == PerStage or "kind" in f.metadata:
            kind = _per_stage_type(f.metadata.get("kind", float))
        elif hint in (int, float):
            kind = hint
        else:  # a path or name; "none" unsets an optional one (e.g. --stats-cache none)
            kind = _optional_text if type(None) in typing.get_args(hints[f.name]) else str
        parser.add_argument(flag(f.name), dest=f.name, type=kind, default=default, help=about,
                            choices=f.metadata.get("choices"))


def dataclass_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The dataclass of the parsed flags (fields left out of the parser keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **extra})


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` of the commands that sample."""
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
