"""The two public benchmarks Make-A-Video reports, as inputs for ``mav evaluate``: what the paper's numbers are, which
prompts to generate from, and which real clips / captions to score against.

1. ``PAPER_RESULTS``: the numbers to compare with.
2. UCF-101 (FVD, IS): ``ucf101_prompts`` (one prompt and class per generated video), ``ucf101_real_clips`` (real
   clips straight from the dataset's ``.avi`` folders) and ``ucf101_sampling_description`` (a cache key for the real
   statistics).
3. MSR-VTT (CLIPSIM): ``msrvtt_captions``.

Sources, read for each choice below (nothing here copies their code):

- Make-A-Video (Singer et al., 2022), as quoted by others: one hand-written template sentence per UCF-101 class
  (LaVie, Wang et al. 2023, sec. 5.4: "Make-A-Video, which manually designs a template sentence for each class");
  the sentences were not released.
- LaVie (sec. 5.4) and Video LDM (Blattmann et al., 2023): the class name as the prompt, 100 videos per class.
- VideoPoet (Kondratyuk et al., 2023, appendix A.5.5, which writes the settings down because "some details are missing
  in previous papers"): UCF-101 zero-shot follows VDM (Ho et al., 2022): 10,000 videos whose classes are those of
  test-set videos; real FVD statistics from 10K training videos (TGANv2), the central 16 frames of each, no
  temporal subsampling (25 fps); I3D (Kinetics-400) for FVD, C3D (UCF-101) for IS. MSR-VTT: CLIP score over all
  59,794 test captions.
- StyleGAN-V (``src/metrics/frechet_video_distance.py``, ``src/training/dataset.py``): real clips of 16
  consecutive frames at a uniformly random offset, videos shorter than that discarded.
- TATS (``scripts/sample_vqgan_transformer_short_videos.py``, ``tats/data.py``): class-conditional samples spread
  evenly over the classes; real clips of 16 consecutive frames, short side resized and centre-cropped.
- CLIP4Clip-style MSR-VTT loaders: ``MSRVTT_data.json`` / ``test_videodatainfo.json`` hold
  ``{"videos": [{"video_id", "split", ...}], "sentences": [{"video_id", "caption", ...}]}``.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from datamodules.decode import ClipPlan, SampleError, decode_planned_clip, to_float
from datamodules.skips import SkipCounter
from lightning_mav.evaluation.prompts import UCF101_TEMPLATE, class_prompts, load_prompts


# ------------------------------------------------------------------------------------------------ paper results
@dataclass(frozen=True)
class PaperResult:
    """One number the paper reports, with what it was measured on."""

    dataset: str  # "ucf101" | "msrvtt"
    setting: str  # "zero-shot" | "fine-tuned"
    metric: str  # "fvd" | "is" | "clipsim"
    value: float
    higher_is_better: bool
    num_samples: int  # generated videos (UCF-101) / captions (MSR-VTT) behind the number
    model: str  # the network that scores the videos
    resolution: int | None  # side of the generated frames that were scored, where a source states it


# The seed summary (/work/shared/make-a-video-seed.md) covers the method only, not the evaluation, and the paper's
# own evaluation text could not be read here; the counts are the protocols' as later papers write them down.
# UCF-101: 10K generated videos (VDM's protocol, Ho et al. 2022, restated by VideoPoet A.5.5 and LaVie sec. 5.4);
# the scoring networks are the ones that protocol names (I3D for FVD, C3D for IS). MSR-VTT: all 59,794 test
# captions, one video each (VideoPoet A.5.5, "all 59,794 captions from the MSR-VTT test set"). 256 px: what LaVie's
# Table 1 and paperswithcode list for the UCF-101 rows.
PAPER_RESULTS: dict[str, PaperResult] = {
    r.dataset + "/" + r.setting + "/" + r.metric: r for r in (
        PaperResult("ucf101", "zero-shot", "fvd", 367.23, False, 10_000, "I3D (Kinetics-400)", 256),
        PaperResult("ucf101", "zero-shot", "is", 33.00, True, 10_000, "C3D (UCF-101)", 256),
        PaperResult("ucf101", "fine-tuned", "fvd", 81.25, False, 10_000, "I3D (Kinetics-400)", 256),
        PaperResult("ucf101", "fine-tuned", "is", 82.55, True, 10_000, "C3D (UCF-101)", 256),
        PaperResult("msrvtt", "zero-shot", "clipsim", 0.3049, True, 59_794, "CLIP ViT-B/32", None),
    )
}


# ----------------------------------------------------------------------------------------------------- UCF-101
UCF101_NUM_VIDEOS = 10_000  # generated videos per score (VDM / Make-A-Video); FVD and IS both use them

ClipOffset = Literal["random", "center", "first"]
SPLIT_LINE = "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"  # a line of trainlist01.txt (testlist: no number)


def _norm_class(name: str) -> str:
    """Class names compared without case, spaces or punctuation (UCF-101 spells "HandstandPushups" in classInd.txt
    and "HandStandPushups" in its file names)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _split_classes(split_list: Path, names: list[str]) -> list[int]:
    """The 0-based class index (classInd order) of every video in a UCF-101 split list.

    ``trainlist0N.txt`` lines carry the 1-based class number (``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1``);
    ``testlist0N.txt`` lines do not, so their folder name is matched against ``names``.
    """
    lookup = {_norm_class(n): i for i, n in enumerate(names)}
    classes = []
    for lineno, line in enumerate(split_list.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 1 and fields[1].isdigit():
            number = int(fields[1])
            if not 1 <= number <= len(names):
                raise ValueError(f"{split_list}:{lineno}: class number {number} outside 1..{len(names)}")
            classes.append(number - 1)
        else:
            folder = fields[0].replace("\\", "/").split("/")[0]
            if _norm_class(folder) not in lookup:
                raise ValueError(f"{split_list}:{lineno}: class {folder!r} is not in the class list")
            classes.append(lookup[_norm_class(folder)])
    if not classes:
        raise ValueError(f"{split_list}: no videos; expected lines like '{SPLIT_LINE}'")
    return classes


def _apportion(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights``: floors, then one more to the largest remainders (ties to the
    lower index), so the counts add up to ``total`` exactly (Hamilton's method)."""
    whole = sum(weights)
    quotas = [total * w / whole for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def ucf101_prompts(class_ind: str | Path, num_videos: int = UCF101_NUM_VIDEOS, template: str = UCF101_TEMPLATE, *,
                   trainlist: str | Path | None = None) -> list[tuple[str, int]]:
    """``(prompt, class index)`` for each of ``num_videos`` videos to generate; the index is 0-based in classInd order.

    How many videos each class gets:

    - without ``trainlist``: evenly, the first ``num_videos % C`` classes one more (TATS's class-conditional
      sampling; Video LDM and LaVie generate 100 per class);
    - with ``trainlist`` (a UCF-101 split list, e.g. ``trainlist01.txt``): in proportion to that list's class
      frequencies, rounded by largest remainder. Make-A-Video is recalled as generating "samples that follow the
      same class distribution as the training set" (its text could not be checked here); VDM / VideoPoet draw the
      classes of 10K test-set videos, which ``testlist01.txt`` gives in expectation.

    The list is interleaved rather than class by class: class ``c``'s ``k``-th video sits at ``(k + 0.5) / n_c`` of
    the way through, so any prefix (a partial run, a quick check) keeps the same distribution.

    Args:
        class_ind: UCF-101's ``classInd.txt`` (``"1 ApplyEyeMakeup"`` lines); read by ``prompts.class_prompts``,
            which splits CamelCase into lower-case words for ``{class}``.
        num_videos: videos in all (Make-A-Video: 10K).
        template: the prompt, with ``{class}`` where the class name goes.
        trainlist: a split list whose class frequencies to follow.
    """
    class_ind = Path(class_ind)
    if not class_ind.is_file():
        raise FileNotFoundError(f"{class_ind}: no such file; expected UCF-101's classInd.txt ('1 ApplyEyeMakeup')")
    if "{class}" not in template:
        raise ValueError(f"template {template!r} has no {{class}} placeholder")
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    names, prompts = class_prompts(class_ind, "{class}"), class_prompts(class_ind, template)
    if not names:
        raise ValueError(f"{class_ind}: no class names; expected lines like '1 ApplyEyeMakeup'")
    if trainlist is None:
        weights = [1] * len(names)
    else:
        trainlist = Path(trainlist)
        if not trainlist.is_file():
            raise FileNotFoundError(f"{trainlist}: no such file; expected a UCF-101 split list (trainlist01.txt)")
        per_video = _split_classes(trainlist, names)
        weights = [per_video.count(c) for c in range(len(names))]
    counts = _apportion(num_videos, weights)
    order = sorted(((k + 0.5) / n, c) for c, n in enumerate(counts) for k in range(n))
    return [(prompts[c], c) for _, c in order]


def ucf101_videos(root: str | Path, split_list: str | Path | None = None) -> list[Path]:
    """The ``.avi`` files of a UCF-101 folder: ``root/<ClassName>/v_<ClassName>_gXX_cYY.avi``.

    Without ``split_list`` every ``.avi`` one folder down, sorted by path; with one (``trainlist01.txt``,
    ``testlist01.txt``), the files it lists, in its order. Listed files that are missing are kept here (the reader
    skips and counts them); a list none of whose files exist means a wrong ``root`` and raises.
    """
    root = Path(root)
    expected = "expected UCF-101's folder: <ClassName>/v_<ClassName>_gXX_cYY.avi"
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory; {expected}")
    if split_list is None:
        videos = sorted((p for p in root.glob("*/*") if p.suffix.lower() == ".avi" and p.is_file()),
                        key=lambda p: p.relative_to(root).as_posix())
        if not videos:
            raise ValueError(f"{root}: no .avi files in its class folders; {expected}")
    else:
        split_list = Path(split_list)
        if not split_list.is_file():
            raise FileNotFoundError(f"{split_list}: no such file; expected a UCF-101 split list (trainlist01.txt)")
        videos = [root / line.split()[0].replace("\\", "/") for line in split_list.read_text().splitlines()
                  if line.strip()]
        if not videos:
            raise ValueError(f"{split_list}: no videos; expected lines like '{SPLIT_LINE}'")
        if not any(p.is_file() for p in videos):
            raise FileNotFoundError(f"{root}: none of the {len(videos)} videos in {split_list} is there; {expected}")
    seen: dict[str, Path] = {}
    for p in videos:  # keys (file stems) seed each clip and tell the DDP shares apart: they must be unique
        if p.stem in seen:
            raise ValueError(f"{root}: video {p.stem!r} twice ({seen[p.stem]} and {p}); keys must be unique")
        seen[p.stem] = p
    return videos


def ucf101_clip_start(key: str, num_native: int, num_frames: int = 16, *, seed: int = 0,
                      offset: ClipOffset = "random") -> int:
    """The first native frame of a real clip of ``num_frames`` consecutive frames from a ``num_native``-frame video.

    ``"random"``: uniform over ``0 .. num_native - num_frames`` (StyleGAN-V's random offset; TATS draws among all
    clips), drawn from a generator seeded by ``seed`` and the file's ``key`` alone, so a video gets the same clip
    whatever batch, rank or world size reads it. ``"center"``: ``(num_native - num_frames) // 2`` (VideoPoet's
    central 16 frames). ``"first"``: 0. Raises ``SampleError("too_short_video")`` when the video is shorter than the
    clip (StyleGAN-V discards those).
    """
    if num_native < num_frames:
        raise SampleError("too_short_video", f"{num_native} frames < {num_frames}")
    if offset == "random":
        return random.Random(f"ucf101/{seed}/{key}").randint(0, num_native - num_frames)
    if offset == "center":
        return (num_native - num_frames) // 2
    if offset == "first":
        return 0
    raise ValueError(f"offset must be 'random', 'center' or 'first', got {offset!r}")


def _subset(videos: list[Path], limit: int | None, seed: int) -> list[Path]:
    """``limit`` videos, a seeded random subset kept in file order: the sorted listing is class by class, so the first
    N would cover only the first classes (TGANv2 / VideoPoet sample their 10K real videos)."""
    if limit is None or limit >= len(videos):
        return videos
    if limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    keep = sorted(random.Random(f"ucf101-subset/{seed}").sample(range(len(videos)), limit))
    return [videos[i] for i in keep]


def ucf101_sampling_description(*, num_frames: int = 16, size: int, limit: int | None,
                                split_list: str | Path | None = None, seed: int = 0,
                                offset: ClipOffset = "random") -> str:
    """One line saying exactly which real clips ``ucf101_real_clips`` reads with these arguments, for a cache of real
    statistics to key on (a changed split list changes it through its hash; the root's path does not enter)."""
    if split_list is None:
        videos = "every .avi under <ClassName>/"
    else:
        digest = hashlib.sha1(Path(split_list).read_bytes()).hexdigest()[:12]
        videos = f"the videos of {Path(split_list).name} (sha1 {digest})"
    subset = "all of them" if limit is None else f"a random subset of {limit} (seed {seed})"
    start = {"random": f"a uniformly random start per file (seed {seed}, keyed by file name)",
             "center": "the central start", "first": "the first frame"}[offset]
    return (f"ucf101-real v1: {videos}, {subset}; {num_frames} consecutive native frames (no temporal subsampling) "
            f"from {start}; short side resized to {size} (area when shrinking, bicubic when enlarging), "
            f"centre crop {size}x{size}; values in [-1, 1]")


def ucf101_real_clips(root: str | Path, *, num_frames: int = 16, size: int, limit: int | None,
                      split_list: str | Path | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                      batch_size: int = 8, offset: ClipOffset = "random",
                      skips: SkipCounter | None = None) -> Iterator[tuple[Tensor, list[str]]]:
    """Real UCF-101 clips for FVD, decoded from the dataset's ``.avi`` files: ``(clips [B, 3, F, S, S], keys)``.

    Which videos: ``ucf101_videos(root, split_list)`` (TGANv2 / VideoPoet take the real statistics from the
    training videos: pass ``trainlist01.txt``), then ``limit`` of them (a seeded subset, see ``_subset``), then this
    rank's share: every ``world_size``-th from ``rank``. Which frames: ``num_frames`` consecutive native frames
    (25 fps in UCF-101) from ``ucf101_clip_start``. Each frame: short side resized to ``size``, centre crop; values
    in [-1, 1]. ``keys`` are the file names without extension (``v_ApplyEyeMakeup_g08_c01``). The union of the
    ranks' keys is the single process's, each key once, with the same clip.

    Unreadable or too short videos, and listed ones that are missing, are skipped and counted in ``skips`` by reason
    (``corrupt_video``, ``too_short_video``, ``missing_video``); the count is this rank's. Errors about the folder
    itself (missing, empty, bad split list) are raised here, before the first clip.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if batch_size < 1 or num_frames < 1 or size < 1:
        raise ValueError(f"batch_size, num_frames and size must be >= 1, got {batch_size}, {num_frames}, {size}")
    if offset not in ("random", "center", "first"):
        raise ValueError(f"offset must be 'random', 'center' or 'first', got {offset!r}")
    mine = _subset(ucf101_videos(root, split_list), limit, seed)[rank::world_size]
    counter = skips if skips is not None else SkipCounter()

    def clip_of(path: Path) -> Tensor:
        def plan(num_native: int, native_fps: float) -> ClipPlan:
            start = ucf101_clip_start(path.stem, num_native, num_frames, seed=seed, offset=offset)
            return ClipPlan(start=start, stride=1, num_frames=num_frames, fps=native_fps)
        return to_float(decode_planned_clip(path, plan, size=size).frames)  # [F, 3, S, S]

    def stack(clips: list[Tensor]) -> Tensor:
        return torch.stack(clips).transpose(1, 2).contiguous()  # [B, F, 3, S, S] -> [B, 3, F, S, S]

    def batches() -> Iterator[tuple[Tensor, list[str]]]:
        clips: list[Tensor] = []
        keys: list[str] = []
        for path in mine:
            if not path.is_file():
                counter.add("missing_video", str(path))
                continue
            try:
                clips.append(clip_of(path))
            except SampleError as exn:
                counter.add(exn.reason, f"{path}: {exn}")
                continue
            keys.append(path.stem)
            if len(clips) == batch_size:
                yield stack(clips), keys
                clips, keys = [], []
        if clips:
            yield stack(clips), keys

    return batches()


# ----------------------------------------------------------------------------------------------------- MSR-VTT
def _msrvtt_json(path: Path, split: str) -> list[str]:
    """Every caption of ``split``'s videos, in the file's order, from MSR-VTT's json layout."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path}: not valid JSON ({exn.msg}, line {exn.lineno})") from None
    layout = "expected MSR-VTT's {\"videos\": [...], \"sentences\": [...]} (MSRVTT_data.json, test_videodatainfo.json)"
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level is a {type(data).__name__}; {layout}")
    for key in ("videos", "sentences"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing key {key!r}; {layout}")
    for i, video in enumerate(data["videos"]):
        for key in ("video_id", "split"):
            if not isinstance(video, dict) or key not in video:
                raise ValueError(f"{path}: videos[{i}] has no {key!r}")
    ids = {v["video_id"] for v in data["videos"] if v["split"] == split}
    if not ids:
        splits = ", ".join(sorted({str(v["split"]) for v in data["videos"]})) or "none"
        raise ValueError(f"{path}: no videos with split {split!r} (splits in the file: {splits})")
    captions = []
    for i, sentence in enumerate(data["sentences"]):
        for key in ("video_id", "caption"):
            if not isinstance(sentence, dict) or key not in sentence:
                raise ValueError(f"{path}: sentences[{i}] has no {key!r}")
        if sentence["video_id"] in ids:
            captions.append(str(sentence["caption"]).strip())
    return captions


def msrvtt_captions(path: str | Path, *, split: str = "test", limit: int | None = None) -> list[str]:
    """MSR-VTT captions to generate one video each from, for CLIPSIM.

    - ``.json`` (``MSRVTT_data.json`` with ``"train"`` / ``"validate"`` / ``"test"`` splits, or
      ``test_videodatainfo.json``): every caption of ``split``'s videos, in the file's order, duplicates and all.
      Make-A-Video (and VideoPoet after it) used all 59,794 test captions, about 20 per test video;
    - ``.txt``: one caption per line (blank lines and ``#`` lines skipped); ``.jsonl``: one object per line with
      ``caption``, ``prompt`` or ``text``. These are taken as already one split; ``split`` is not used.

    ``limit``: the first ``limit`` captions. A prefix rather than a seeded subset: it is what VideoPoet did for its
    FVD subset ("the first 40,960 captions"), it needs no seed to reproduce, and the file's sentence order is not
    grouped by video, so a prefix spreads over the split's videos.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected MSR-VTT's test_videodatainfo.json, a .txt or a .jsonl")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if path.suffix.lower() == ".json":
        captions = _msrvtt_json(path, split)
        if not captions:
            raise ValueError(f"{path}: no captions")
    elif path.suffix.lower() in (".txt", ".jsonl"):
        captions = load_prompts(path)
    else:
        raise ValueError(f"{path}: unknown caption file type {path.suffix!r}; expected .json, .jsonl or .txt")
    return captions if limit is None else captions[:limit]
