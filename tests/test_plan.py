"""``mav plan``: its memory estimate against the measured peak of real CPU training steps, its FLOPs against StageBase's
own count of a real Lightning step, placeholders and unbuilt parents, one-line config errors, the largest batch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import MiB, peak_allocated_mib
from lightning_mav.plan import GPU_MEMORY, Plan, Timeline, make_plan, measure_step, synthetic_batch
from lightning_mav.trainer_cli import MAVCLI
from tests.helpers import EXPERIMENTS, REPO, cli_env, cpu_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# the demo's D U-Net (dim 32, attention at 8 px) at 32 px, unconditional (no CLIP), fp32
DECODER = ["--config", str(EXPERIMENTS / "decoder.yaml"), "--model.init_args.clip_ckpt", "null",
           "--trainer.precision", "32-true"]


def real_stage(args: list[str]):
    """The stage ``lightning fit`` builds from ``args`` (real tensors), and the merged data config."""
    cli = MAVCLI(args=[*args, "--trainer.logger", "false"], run=False)
    return cli.model, cli.config.data.as_dict()


def measured_peak(args: list[str], batch: int, checkpointing: bool) -> float:
    """Bytes: the stage's weights + the peak of the tensor memory allocated during two real training steps
    (forward, backward, fused AdamW, zero_grad), from the profiler's allocation events."""
    stage, data = real_stage([*args, "--model.init_args.unet.checkpointing", str(checkpointing).lower()])
    stage.train()
    optimizer = stage.configure_optimizers()["optimizer"]
    inputs = synthetic_batch(data, batch)

    def steps() -> None:
        for _ in range(2):
            loss, _ = stage.compute_loss(inputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    weights = sum(t.numel() * t.element_size() for t in [*stage.parameters(), *stage.buffers()])
    return weights + peak_allocated_mib(steps) * MiB


@pytest.fixture(scope="module")
def decoder_plan() -> Plan:
    return make_plan(DECODER)


@pytest.mark.parametrize("batch", [4, 12])
def test_the_memory_estimate_is_within_20_percent_of_real_cpu_steps(decoder_plan: Plan, batch: int) -> None:
    plain, ckpt = (measured_peak(DECODER, batch, c) for c in (False, True))
    for setting, real in (("plain", plain), ("checkpointing", ckpt)):
        estimate = decoder_plan.estimate(batch, setting)
        assert abs(estimate - real) / real < 0.2, (setting, batch, estimate / MiB, real / MiB)
    assert ckpt < plain  # what checkpointing is for, measured
    assert decoder_plan.estimate(batch, "checkpointing") < decoder_plan.estimate(batch, "plain")


def test_flops_per_sample_equal_stagebase_count_of_a_lightning_step() -> None:
    batch = 6
    args = [*DECODER, "--data.init_args.batch_size", str(batch)]
    plan = make_plan(args)
    stage, data = real_stage(args)
    loader = torch.utils.data.DataLoader([synthetic_batch(data, batch)], batch_size=None)
    cpu_trainer(max_steps=1, limit_val_batches=0, num_sanity_val_steps=0).fit(stage, train_dataloaders=loader)
    counted = stage.flops_per_batch  # StageBase's FlopCounterMode on the first training batch
    assert counted > 0
    assert plan.flops_per_step("plain") == counted
    assert plan.to_dict()["derived"]["plain"]["flops_per_sample"] == counted / batch
    assert plan.flops_per_step("checkpointing") > counted  # the recomputed forward


def test_the_largest_batch_fits_and_grows_with_memory(decoder_plan: Plan) -> None:
    for setting in ("plain", "checkpointing"):
        for strategy in ("ddp", "fsdp"):
            sizes = [decoder_plan.max_batch(setting, strategy, memory=m * GiB) for m in (0.05, 0.1, 0.5, 1, 2, 8)]
            assert sizes == sorted(sizes) and sizes[-1] > sizes[0], (setting, strategy, sizes)
            budget = 2 * GiB * (1 - decoder_plan.headroom)
            b = decoder_plan.max_batch(setting, strategy, memory=2 * GiB)
            assert decoder_plan.memory(b, setting, strategy) <= budget < decoder_plan.memory(b + 1, setting, strategy)
    # checkpointing frees activations, so more fits; the 80 GB card holds far more than the demo's batch
    assert decoder_plan.max_batch("checkpointing") > decoder_plan.max_batch("plain") > 16
    assert decoder_plan.max_batch("plain", memory=GPU_MEMORY) == decoder_plan.max_batch("plain")


def test_unset_files_and_untrained_parents_do_not_block_a_plan(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """D_t's demo YAML with an overlay leaving the CLIP and shards `???`: no file is read; its parent D (init_from
    runs/decoder/…, not trained in this folder) is planned from decoder.yaml, the CLIP from clip_model."""
    monkeypatch.chdir(tmp_path)
    overlay = tmp_path / "paper" / "dt.yaml"
    overlay.parent.mkdir()
    overlay.write_text("model:\n  init_args:\n    clip_ckpt: ???\n    clip_model: mav-tiny\n"
                       "data:\n  init_args:\n    urls: ???\n    batch_size: 3\n")
    plan = make_plan(["--config", str(EXPERIMENTS / "dt.yaml"), "--config", str(overlay)])
    from lightning_mav.nn.clip import CLIP
    from lightning_mav.nn.unet import UNet

    clip = sum(p.numel() for p in CLIP("mav-tiny").parameters())
    assert plan.params_frozen > clip  # the CLIP and D's frozen spatial layers (dt.yaml: freeze_spatial)
    spatial = UNet(**{**__import__("yaml").safe_load((EXPERIMENTS / "decoder.yaml").read_text())["model"]["init_args"]
                      ["unet"], "image_embed_dim": 128})
    assert plan.params_frozen == clip + sum(p.numel() for p in spatial.parameters())
    assert plan.batch_size == 3 and plan.stage == "DecoderStage"
    notes = "\n".join(plan.notes)
    assert "model.init_args.clip_ckpt" in notes and "data.init_args.urls" in notes
    assert "runs/decoder/checkpoints/last.ckpt" in notes and "experiments/decoder.yaml" in notes
    assert not (tmp_path / "runs").exists()


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_mav", "plan", *args], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO, timeout=300)


def test_a_bad_config_key_fails_with_one_line() -> None:
    out = run_plan("--config", str(EXPERIMENTS / "sr_l.yaml"), "--model.init_args.unet.dimz", "3")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith("error: model.init_args.unet.dimz: unknown key")


def test_the_command_prints_markdown_and_json() -> None:
    common = ("--config", str(EXPERIMENTS / "sr_l.yaml"), "--data.init_args.batch_size", "4", "--gpus", "2")
    md = run_plan(*common, "--gpu", "H100")
    assert md.returncode == 0, md.stderr
    assert "| H100 | 40% |" in md.stdout and "| A100 |" not in md.stdout and "FSDP/2" in md.stdout
    js = run_plan(*common, "--json", "--mfu", "0.5")
    data = json.loads(js.stdout)
    assert data["batch_size"] == 4 and data["gpus"] == 2 and data["mfu"] == 0.5 and data["checkpointing"] is False
    derived = data["derived"]["plain"]
    assert derived["step_seconds"]["H100"] == pytest.approx(derived["flops_per_step"] / (0.5 * 989e12))
    assert derived["memory"]["ddp"] == pytest.approx(derived["memory"]["single"] + data["grads"])


GiB = 1024 ** 3


def test_sr_h_crops_and_the_linear_fallback_stay_within_20_percent() -> None:
    """SR_h crops every sample in a Python loop; a step whose allocations differ between batch 2 and 3 falls back to
    the peaks at batch 2 and 3 extended linearly (Timeline.linear): both within 20% of real steps."""
    args = ["--config", str(EXPERIMENTS / "sr_h.yaml")]
    plan = make_plan(args)
    real = measured_peak(args, 6, checkpointing=False)
    assert abs(plan.estimate(6, "plain") - real) / real < 0.2, (plan.estimate(6, "plain") / MiB, real / MiB)
    stage, data = real_stage(args)
    (t2, g2), (t3, g3) = (measure_step(stage, data, b, "32-true") for b in (2, 3))
    linear = Timeline.linear(t2, t3, g2, g3)
    assert linear.peak(2) == t2.peak() and linear.peak(3) == t3.peak()
    assert linear.peak(3, gradients=False) == t3.peak(without=g3)
    weights_and_adam = plan.weights + plan.adamw
    assert abs(weights_and_adam + linear.peak(6) - real) / real < 0.2
