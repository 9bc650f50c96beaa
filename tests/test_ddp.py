"""Scale-out without changes: one tiny stage with 2 DDP processes (gloo on CPU), launched the way users launch it
(`python -m lightning_mav fit … --trainer.strategy ddp --trainer.devices 2`), runs to completion.

The shards hold a corrupt sample that only some ranks meet, and media are sampled on rank 0 mid-run: the two places
where rank-dependent code paths could issue different collectives on different ranks and hang the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import EXPERIMENTS, TINY_UNET_8_NO_ATTN, cli_env, read_events, shard_with_a_corrupt_sample


def test_two_process_ddp_runs_a_stage_to_completion(shapes_root: Path, tmp_path: Path) -> None:
    # one shard, the corrupt sample first and 16 good ones, no shuffle buffer: each rank meets it exactly once in 3
    # steps of 2 whatever its shard-order seed
    corrupt = shard_with_a_corrupt_sample(shapes_root, tmp_path / "corrupt.tar", shards=2)
    args = ["fit", "--config", str(EXPERIMENTS / "sr_l.yaml"),
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
            "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--data.init_args.urls", str(corrupt), "--data.init_args.val_urls",
            str(shapes_root / "images" / "val-{000000..000007}.tar"), "--data.init_args.batch_size", "2",
            "--data.init_args.shuffle_buffer", "1", "--data.init_args.image_size", "32",
            "--model.init_args.unet", json.dumps(TINY_UNET_8_NO_ATTN), "--model.init_args.lowres_size", "16",
            "--model.init_args.highres_size", "32", "--model.init_args.sample_steps", "2"]
    proc = subprocess.run([sys.executable, "-m", "lightning_mav", *args], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr + proc.stdout
    run = tmp_path / "runs" / "sr_l"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    acc = read_events(run)  # its one event file: rank 0 only writes
    assert len(acc.Scalars("train/loss")) == 3 and len(acc.Scalars("val/loss")) == 1
    assert acc.Scalars("data/skipped/decode_error")[-1].value == 2  # summed over the ranks (rank 0 alone: 1)
    assert acc.Scalars("train/samples")[-1].value == 6  # ThroughputMonitor: 3 steps x 2 samples (rank 0)
    # MediaLogger samples on rank 0 after the first validation (step 3), while rank 1 waits: nobody hung
    assert list((run / "media").glob("samples_step0000003.png"))
