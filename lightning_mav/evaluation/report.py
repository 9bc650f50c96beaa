"""The evaluation's report: ``out/report.md`` with the paper's numbers beside ours (for ``--protocol`` runs), every
score with what it means, and the same comparison table for ``metrics.json`` and TensorBoard."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_mav.evaluation.extension import extension_section
from lightning_mav.evaluation.options import EvalOptions
from lightning_mav.evaluation.protocols import PAPER_RESULTS
from lightning_mav.metrics.intervals import format_interval


def _ours(metric: str, options: EvalOptions) -> tuple[str, str]:
    """The name of our score for a paper metric, and what scored it."""
    if metric == "fvd":
        return "fvd", f"I3D {Path(options.i3d).name}" if options.i3d else "no I3D weights"
    if metric == "is":
        return "is", f"C3D {Path(options.c3d).name}" if options.c3d else "no C3D weights"
    if options.clipsim_model:
        weights = Path(options.clipsim_weights).name
        return f"clipsim/{options.clipsim_model}", f"CLIP {options.clipsim_model} ({weights})"
    return "clipsim/suite_clip", "the suite's own CLIP (not the paper's scale)"


def paper_rows(options: EvalOptions, metrics: dict[str, dict[str, Any]], num_videos: int) -> list[dict[str, Any]]:
    """One row per number the paper reports for ``options.protocol`` (none without a protocol): the paper's value,
    sample count and scoring network next to ours."""
    rows = []
    for paper in PAPER_RESULTS.values():
        if paper.dataset != options.protocol:
            continue
        name, scored_by = _ours(paper.metric, options)
        rows.append({"metric": paper.metric, "setting": paper.setting, "ours": metrics.get(name, {}).get("value"),
                     "our_name": name, "our_videos": num_videos, "our_scorer": scored_by, "paper": paper.value,
                     "paper_videos": paper.num_samples, "paper_scorer": paper.model,
                     "better": "higher" if paper.higher_is_better else "lower"})
    return rows


def paper_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (what report.md and TensorBoard show)."""
    lines = ["| metric | paper setting | ours | paper | better | our videos | paper videos | ours scored by | "
             "paper scored by |", "|---|---|---:|---:|---|---:|---:|---|---|"]
    for r in rows:
        ours = f"{r['ours']:.4g}" if isinstance(r["ours"], float) else str(r["ours"])
        lines.append(f"| {r['metric']} | {r['setting']} | {ours} | {r['paper']:g} | {r['better']} | "
                     f"{r['our_videos']} | {r['paper_videos']} | {r['our_scorer']} | {r['paper_scorer']} |")
    return "\n".join(lines)


def metrics_table(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines of the scores table: each value with its 95% interval where it has one (``0.44 [0.30,
    0.58]``), and what it means."""
    lines = ["| metric | value [95% interval] | what it means |", "|---|---:|---|"]
    for name, entry in metrics.items():
        lines.append(f"| {name} | {format_interval(entry['value'], entry.get('interval'))} | {entry.get('about', '')} |")
    return lines


def fps_pair_section(out: Path, result: dict[str, Any]) -> list[str]:
    """The fps check's sheets (first row fps 4, second fps 24, same prompt and noise), when the run made them."""
    if not result.get("fps_pair"):
        return []
    lines = ["", "## fps conditioning: the same prompt and noise at fps 4 (top) and fps 24 (bottom)", ""]
    for pair in result["fps_pair"]:
        lines += [f"**{pair['prompt']}** — speed {pair['speed_low']:.3f} vs {pair['speed_high']:.3f} of the side "
                  "per frame", "", f"![{pair['prompt']}]({Path(pair['sheet']).relative_to(out)})", ""]
    return lines


def write_report(out: Path, result: dict[str, Any]) -> Path:
    """``out/report.md``: the comparison with the paper (when there is one), then every score."""
    lines = ["# Evaluation", "", f"{result['run']['prompts']} prompts x {result['run']['videos_per_prompt']} videos, "
             f"stages {' → '.join(result['run']['stages'])}, sampled in {result['run']['dtype']}.", ""]
    if result.get("paper"):
        lines += ["## Against the paper", "", paper_table(result["paper"]), ""]
    lines += ["## Scores", "", *metrics_table(result["metrics"])]
    lines += fps_pair_section(out, result)
    extension = extension_section(result, out)  # ↑F extending a real clip, when the run scored it
    if extension:
        lines += ["", *extension]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
