"""`mav demo --quick` end to end (slow: every stage of the chain at the demo's sizes, a few steps each)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

from lightning_mav.media import read_video


@pytest.mark.slow
def test_quick_demo_trains_the_chain_and_writes_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_mav.demo import demo_precision, run_demo
    from lightning_mav.networks import NETWORKS

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mav", "demo", "--quick"])  # as from the command line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_demo(data=Path("data/shapes"), quick=True, num_prompts=1, videos_per_prompt=1, fps_pair_prompts=1)
    # the stages' arguments are the demo's own: no LightningCLI warning about sys.argv per stage
    assert not [w for w in caught if "args parameter" in str(w.message)]
    for stage in (n.run for n in NETWORKS):
        assert (tmp_path / "runs" / stage / "checkpoints" / "last.ckpt").is_file(), stage
        assert (tmp_path / "runs" / stage / "DONE").is_file(), stage
    text = report.read_text()
    assert "## Metrics" in text and "shapes/color" in text and "coherence/D_t" in text
    assert "objects/final/one_object" in text and "interp/blend_ghost_rate" in text and "sr/SR_h/sharpness" in text
    assert "## fps conditioning" in text
    assert len(list((tmp_path / "runs" / "demo" / "sheets").glob("fps-pair-*.png"))) == 1
    precision = demo_precision()  # auto: bf16-mixed on CPUs with bf16 instructions, else 32-true
    assert text.count(f"| {precision} |") == len(NETWORKS)  # every stage trained in it
    assert f"Videos sampled in {'bfloat16' if precision == 'bf16-mixed' else 'float32'}: 1 held-out prompts x 1" in text
    assert "## Extension (↑F extrapolation)" in text and "extend/centroid_error_px" in text
    (mp4,) = (tmp_path / "runs" / "demo" / "videos").glob("*.mp4")
    frames, fps = read_video(mp4)
    assert frames.shape[0] == 76 and fps > 0
    # a second run skips every finished stage
    assert run_demo(data=Path("data/shapes"), quick=True, num_prompts=1, videos_per_prompt=1,
                    fps_pair_prompts=1) == report


def test_demo_evaluates_every_stage_with_its_own_sampling_steps(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The report must score the chain as its YAMLs sample it: an override such as ``{"*": 8}`` once ran the
    one-step ↑F with 8 steps."""
    import json

    import lightning_mav.evaluation as evaluation
    from datamodules import shapes
    from lightning_mav.demo import run_demo
    from lightning_mav.networks import NETWORKS

    for stage in (n.run for n in NETWORKS):  # every stage done earlier: the demo goes straight to evaluation
        (tmp_path / "runs" / stage).mkdir(parents=True)
        (tmp_path / "runs" / stage / "DONE").write_text(json.dumps(
            {"stage": stage, "steps": 1, "seconds": 1.0, "precision": "32-true", "metrics": {}}))
    monkeypatch.setattr(shapes, "is_complete", lambda root: True)
    seen = []

    class Evaluated(Exception):
        pass

    def evaluate(options: evaluation.EvalOptions) -> None:
        seen.append(options)
        raise Evaluated

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    with pytest.raises(Evaluated):
        run_demo(data=tmp_path / "data", runs=tmp_path / "runs", precision="32-true")
    (options,) = seen
    assert options.steps is None and options.num_prompts == 24 and options.videos_per_prompt == 2
