"""``evaluate()``: generate videos for the prompts with the trained chain, score them, write the results.

    prompts ──MakeAVideoPipeline (seeded)──> samples/NNNNN.pt   D_t's frames, ↑F's, the final ones, and the ablation
                                                                 (D per frame), lossless uint8; reused when rerun
            ──> videos/NNNNN-<prompt>.mp4 + .gif, sheets/NNNNN-<prompt>.png
            ──> scores ──> metrics.json + TensorBoard scalars (out/tb)

What each score means: :class:`lightning_mav.evaluation.scores.EvalMetrics` and docs/evaluation.md.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from lightning_mav.evaluation.chain import Chain, load_chain
from lightning_mav.evaluation.fps_pair import fps_pair
from lightning_mav.evaluation.extension import write_extension_media
from lightning_mav.evaluation.options import EvalOptions
from lightning_mav.evaluation.prompts import load_prompts
from lightning_mav.evaluation.protocols import msrvtt_captions, ucf101_prompts
from lightning_mav.evaluation.real_data import score_real_data
from lightning_mav.evaluation.report import paper_rows, paper_table, write_report
from lightning_mav.evaluation.samples import (
    from_uint8,
    generate_samples,
    load_sample,
    SampleSpec,
    plan_samples,
    sample_file,
    sample_name,
    write_media,
)
from lightning_mav.evaluation.scores import EvalMetrics


def write_tensorboard(metrics: dict[str, dict[str, Any]], log_dir: Path, step: int = 0,
                      paper: list[dict[str, Any]] | None = None) -> None:
    """Scores as TensorBoard scalars (and the skipped ones' reasons as text) under ``log_dir``; the comparison with
    the paper's numbers as a text table ``paper``."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for name, entry in metrics.items():
            if isinstance(entry["value"], float):
                writer.add_scalar(name, entry["value"], step)
            else:
                writer.add_text(name, str(entry["value"]), step)
        if paper:
            writer.add_text("paper", paper_table(paper), step)


def prompt_list(options: EvalOptions) -> list[str]:
    """The prompts ``options`` names: the protocol's (UCF-101: one per video to generate, spread over the classes;
    MSR-VTT: the test captions), else :func:`lightning_mav.evaluation.prompts.load_prompts`'s."""
    if options.protocol == "ucf101":
        count = min(options.num_videos, 2) if options.quick else options.num_videos
        return [prompt for prompt, _ in ucf101_prompts(options.classes, count, options.template,
                                                       trainlist=options.class_split)]
    if options.protocol == "msrvtt":
        return msrvtt_captions(options.prompts, limit=options.prompt_count)
    return load_prompts(options.prompts, data=options.data, classes=options.classes, template=options.template,
                        num_prompts=options.prompt_count)


def make_metrics(options: EvalOptions, chain: Chain, fvd_samples: int | None) -> EvalMetrics:
    """The run's metrics on the chain's device: FVD with ``i3d``, IS with ``c3d``, CLIPSIM with the suite's CLIP and,
    given ``clipsim_model``, the protocol's own CLIP (loaded from its local weights file)."""
    protocol_clip = None
    if options.clipsim_model is not None:
        from lightning_mav.nn.clip import CLIP

        protocol_clip = CLIP.from_checkpoint(options.clipsim_weights, model_name=options.clipsim_model)
    metrics = EvalMetrics(chain.pipe.C_x, i3d=options.i3d, fvd_samples=fvd_samples, c3d=options.c3d,
                          is_splits=options.is_splits, protocol_clip=protocol_clip)
    return metrics.to(chain.pipe.device)


def _share_device(device: str | None, rank: int) -> str | None:
    """Generation process ``rank``'s device: its own GPU when generating on CUDA, else the same device."""
    if device is None and torch.cuda.is_available():
        device = "cuda"
    return f"cuda:{rank}" if device in ("cuda", "cuda:0") else device


def _generate_share(options: EvalOptions, rank: int, world: int, threads: int) -> list[str]:
    """One spawned generation process: loads the chain and makes its share of the planned batches."""
    torch.set_num_threads(threads)
    chain = load_chain(options.runs, device=_share_device(options.device, rank), dtype=options.dtype)
    plan = plan_samples(prompt_list(options), options.videos_per_prompt, options.batch_size, options.seed)
    _, fresh = generate_samples(chain, plan, Path(options.out), options.settings, progress=options.progress,
                                share=(rank, world))
    return [str(f) for f in fresh]


def generate_all(chain: Chain, plan: list[list[SampleSpec]], options: EvalOptions) -> tuple[list[Path], set[Path]]:
    """Every planned sample on disk, made by ``options.processes`` processes (this one and spawned ones, each
    with every n-th batch; on the CPU they split the threads). Returns the sample files in index order and the set
    of those generated now (the others were reused)."""
    out, world = Path(options.out), max(int(options.processes), 1)
    if world == 1:
        return generate_samples(chain, plan, out, options.settings, progress=options.progress)
    threads = torch.get_num_threads()
    share = max(threads // world, 1) if chain.pipe.device.type == "cpu" else threads
    torch.set_num_threads(share)
    try:
        with ProcessPoolExecutor(world - 1, mp_context=get_context("spawn")) as pool:
            spawned = [pool.submit(_generate_share, options, rank, world, share) for rank in range(1, world)]
            _, fresh = generate_samples(chain, plan, out, options.settings, progress=options.progress,
                                        share=(0, world))
            for job in spawned:
                fresh |= {Path(f) for f in job.result()}
    finally:
        torch.set_num_threads(threads)
    return [sample_file(out, spec) for batch in plan for spec in batch], fresh


def evaluate(options: EvalOptions | None = None, /, **overrides: Any) -> dict[str, Any]:
    """Generate videos for the prompts with the trained chain under ``options.runs`` and score them.

    ``evaluate(EvalOptions(num_prompts=24))`` or ``evaluate(num_prompts=24)``: keywords override fields of
    ``options`` (see :class:`EvalOptions` for every option).

    Returns:
        ``{"metrics": {name: {"value": float | str, "about": str}}, "videos": [{"prompt", "files": [mp4, gif],
        "sheet", "ablation_sheet"}], "run": {...}}``, also written to ``out/metrics.json``.
    """
    options = replace(options or EvalOptions(), **overrides)
    out, settings, real = Path(options.out), options.settings, options.real
    # first: a missing checkpoint is the likeliest error, say it at once
    chain = load_chain(options.runs, device=options.device, dtype=options.dtype)
    prompts = prompt_list(options)
    plan = plan_samples(prompts, options.videos_per_prompt, options.batch_size, options.seed)
    t0 = time.perf_counter()
    files, fresh = generate_all(chain, plan, options)
    t1 = time.perf_counter()

    metrics = make_metrics(options, chain, fvd_samples=None)
    samples = list(zip((spec for batch in plan for spec in batch), files))
    videos = []
    for start in range(0, len(samples), options.batch_size):  # scored from the stored frames: reused == fresh
        chunk = [(spec, load_sample(file), file in fresh) for spec, file in samples[start:start + options.batch_size]]
        for spec, sample, regenerated in chunk:  # a regenerated sample rewrites its media, a reused one keeps them
            videos.append(write_media(sample, out, sample_name(spec.index, spec.prompt), overwrite=regenerated))
        stored = [sample for _, sample, _ in chunk]
        frames = {name: torch.stack([from_uint8(s["frames"][name]) for s in stored]).to(chain.pipe.device)
                  for name in stored[0]["frames"]}
        metrics.update_generated(frames, [s["prompt"] for s in stored], final=stored[0]["final"], skip=options.skip)

    skipped = {**chain.missing, **score_real_data(chain, metrics, real, settings, seed=options.seed)}
    scores = metrics.results(skipped)
    seconds = {"generation": round(t1 - t0, 1), "scoring": round(time.perf_counter() - t1, 1)}
    pair = None
    if options.fps_pair_prompts > 0:
        t2 = time.perf_counter()
        pair = fps_pair(chain.pipe, prompts[:options.fps_pair_prompts], settings, out, seed=options.seed)
        scores.update(pair["metrics"])
        seconds["fps_pair"] = round(time.perf_counter() - t2, 1)

    ran = chain.pipe.stages_run(settings.stop_after)
    result = {"metrics": scores, "videos": videos, "run": {
        "generated": len(fresh), "reused": len(files) - len(fresh), "prompts": len(prompts),
        "videos_per_prompt": options.videos_per_prompt, "stages": ran, "settings": asdict(settings),
        "seed": options.seed, "checkpoints": chain.checkpoints,
        "dtype": str(chain.pipe.dtype).removeprefix("torch."), "seconds": seconds,
        "scored_frames": {"shapes/*, coherence/D_t, coherence/D_per_frame": "D_t's output (and the ablation's)",
                          "coherence/up_F": "↑F's output (before SR)", "clipsim, fvd": f"the final output ({ran[-1]})"},
    }}
    if pair is not None:
        result["fps_pair"] = pair["sheets"]
    result["paper"] = paper_rows(options, scores, num_videos=len(files))
    out.mkdir(parents=True, exist_ok=True)
    if metrics.extension_example is not None:  # one real clip extended by ↑F, for the report
        result["extension"] = write_extension_media(out, metrics.extension_example)
    (out / "metrics.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    write_tensorboard(scores, out / "tb", paper=result["paper"])
    write_report(out, result)
    return result
