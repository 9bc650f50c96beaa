"""Evaluation prompts: a prompt file, caption shards, or one prompt per class of a class list (UCF-101 style)."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from lightning_mav.metrics import parse_prompt

UCF101_TEMPLATE = "{class}"
"""The class name itself ("ApplyEyeMakeup" -> "apply eye makeup"), as Video LDM and LaVie prompt for zero-shot
UCF-101. Make-A-Video wrote one sentence per class by hand and did not publish them (VideoPoet used PYoCo's, likewise
only in that paper); the class name is the published choice anyone can reproduce. Hand-written sentences still fit:
put one per line in classInd order (``1 A person applying eye makeup``) and keep this template."""


def class_prompts(path: str | Path, template: str = UCF101_TEMPLATE) -> list[str]:
    """UCF-101-style class templates: one prompt per class of a class list file.

    Lines are ``"1 ApplyEyeMakeup"`` (UCF-101's ``classInd.txt``) or just ``"ApplyEyeMakeup"`` / ``"apply eye
    makeup"``; CamelCase and underscores become lower-case words, which fill ``{class}`` in ``template``.
    """
    prompts = []
    for line in Path(path).read_text().splitlines():
        name = re.sub(r"^\s*\d+\s+", "", line).strip()
        if not name or name.startswith("#"):
            continue
        words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).replace("_", " ")
        prompts.append(template.replace("{class}", " ".join(words.lower().split())))
    return prompts


def caption_prompts(urls: str, limit: int | None = None) -> list[str]:
    """Distinct captions (``KEY.txt`` members) of WebDataset shards, in shard order: ``"data/images/val-*.tar"``."""
    from datamodules.decode import SampleError, decode_caption
    from datamodules.skips import SkipCounter
    from datamodules.tars import expand_urls, read_samples

    seen: dict[str, None] = {}
    for sample in read_samples(expand_urls(urls), SkipCounter()):
        try:
            caption = decode_caption(sample.get("txt"), required=False)
        except SampleError:
            continue
        if caption:
            seen.setdefault(caption)
        if limit is not None and len(seen) >= limit:
            break
    return list(seen)


def _is_shards(source: str) -> bool:
    return source.endswith(".tar") or any(c in source for c in "*?{") or "::" in source


def _jsonl_prompts(path: Path) -> list[str]:
    """The ``prompt`` (or ``caption`` / ``text``) of each line's object; a bad line is a one-line error."""
    prompts = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        key = next((k for k in ("prompt", "caption", "text") if isinstance(row, dict) and k in row), None)
        if key is None:
            raise ValueError(f"{path}:{lineno}: expected an object with 'prompt', 'caption' or 'text'")
        prompts.append(str(row[key]).strip())
    return prompts


def load_prompts(source: str | Path | None = None, *, data: str | Path = "data/shapes",
                 classes: str | Path | None = None, template: str = UCF101_TEMPLATE, num_prompts: int | None = None,
                 seed: int = 0) -> list[str]:
    """The evaluation prompts.

    Args:
        source: a ``.txt`` file (one prompt per line), a ``.jsonl`` file (``{"prompt": ...}`` per line, as
            ``data/eval/prompts.jsonl``; ``caption``/``text`` also read), or caption shards (a ``.tar`` / glob /
            brace pattern). Default: ``<data>/eval/prompts.jsonl`` (the held-out Moving Shapes prompts).
        classes: a class list file instead: ``template`` per class (see :func:`class_prompts`).
        num_prompts: keep this many: a seeded random subset, in file order (the shapes prompts are ordered
            colour-major, so the first N would cover few colours and every k-th only one shape). ``seed`` is the
            subset's, apart from the generation seed: another generation seed scores the same prompts.
    """
    if classes is not None:
        prompts = class_prompts(classes, template)
    else:
        if source is None:
            jsonl = Path(data) / "eval" / "prompts.jsonl"
            source = jsonl if jsonl.is_file() else Path(data) / "eval" / "prompts.txt"
        text = str(source)
        if _is_shards(text):  # the first distinct captions: a random subset would mean reading every shard
            prompts = caption_prompts(text, limit=num_prompts)
        elif text.endswith(".jsonl"):
            prompts = _jsonl_prompts(Path(text))
        else:
            prompts = [line.strip() for line in Path(text).read_text().splitlines()]
            prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {classes or source}")
    if num_prompts is not None and num_prompts < len(prompts):
        keep = sorted(random.Random(seed).sample(range(len(prompts)), num_prompts))
        prompts = [prompts[i] for i in keep]
    return prompts


def is_shapes_prompt(prompt: str) -> bool:
    """Whether the Moving Shapes metrics can score ``prompt`` (it names a palette colour and a shape)."""
    try:
        parse_prompt(prompt)
    except ValueError:
        return False
    return True
