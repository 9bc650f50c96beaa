"""The evaluation as a Lightning test run: ``lightning test --config experiments/eval.yaml`` (DDP-safe metrics)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
import torch
from einops import rearrange
from torch.utils.data import DataLoader

from lightning_mav.evaluation.chain import Chain, load_chain
from lightning_mav.evaluation.extension import write_extension_media
from lightning_mav.evaluation.generation import generate_batch
from lightning_mav.evaluation.options import EvalOptions
from lightning_mav.evaluation.real_data import score_real_data
from lightning_mav.evaluation.report import paper_rows, paper_table, write_report
from lightning_mav.evaluation.run import make_metrics, prompt_list
from lightning_mav.evaluation.samples import sample_name, to_uint8, write_media


def prompt_items(prompts: Sequence[str], videos_per_prompt: int = 1, world_size: int = 1) -> list[dict[str, Any]]:
    """``{"prompt", "index", "valid"}`` per sample, padded with ``valid=False`` items to a multiple of
    ``world_size``, so that Lightning's ``DistributedSampler`` splits them evenly without repeating real samples
    (a repeated sample would be counted twice by the metrics)."""
    items = [{"prompt": p, "index": i * videos_per_prompt + k, "valid": True}
             for i, p in enumerate(prompts) for k in range(videos_per_prompt)]
    while len(items) % max(world_size, 1):
        items.append({"prompt": items[0]["prompt"] if items else "", "index": -1, "valid": False})
    return items


class EvaluationModule(pl.LightningModule):
    """The evaluation as ``lightning test``: its own test data are the prompts (batches ``{"prompt": list[str],
    "index": LongTensor[B], "valid": BoolTensor[B]}``); ``test_step`` generates a batch of prompts and updates the
    metrics (:class:`EvalMetrics`); at the end the real-data scores are added and everything is logged (TensorBoard
    via the trainer's logger) and written to ``<log_dir>/metrics.json``. Under DDP each rank generates its share of
    the prompts and scores its share of the real data; torchmetrics' sync makes the totals exact. The real-data
    scores equal the single-process ones (each clip's noise comes from its key); the generated videos do too when
    every rank sees the same prompt batches (``options.batch_size: 1``), since the pipeline draws noise per batch.

    Args:
        options: :class:`EvalOptions` (the same as ``mav evaluate``'s; ``out``, ``device``, ``dtype`` and
            ``progress`` are the trainer's business here: results go to its log dir).
        save_media: write each sample's mp4 / gif / contact sheet under ``<log_dir>/videos`` and ``<log_dir>/sheets``.
    """

    def __init__(self, options: EvalOptions | None = None, save_media: bool = True) -> None:
        super().__init__()
        self.options = options or EvalOptions()
        self.save_hyperparameters()
        self.settings, self.real = self.options.settings, self.options.real
        self.chain: Chain | None = None

    def setup(self, stage: str) -> None:
        if self.chain is None:  # before Lightning moves the module, so the metric states follow it
            device = self.trainer.strategy.root_device if self._trainer is not None else None
            self.chain = load_chain(self.options.runs, device=device)
            self.metrics = make_metrics(self.options, self.chain, fvd_samples=self.real.fvd_videos)

    def test_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self._trainer is not None else 1
        items = prompt_items(prompt_list(self.options), self.options.videos_per_prompt, world)
        return DataLoader(items, batch_size=self.options.batch_size, shuffle=False)  # type: ignore[arg-type]

    def on_test_start(self) -> None:
        # Once, on every rank: under DDP `trainer.log_dir` is a broadcast, so asking for it in test_step (which
        # only the ranks with samples reach) or on rank 0 alone would deadlock.
        self.out = Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        keep = [bool(v) for v in batch["valid"]]
        prompts = [p for p, k in zip(batch["prompt"], keep) if k]
        indices = [int(i) for i, k in zip(batch["index"], keep) if k]
        if not prompts:
            return  # padding only (DDP): nothing to generate
        made = generate_batch(self.chain.pipe, prompts, seed=self.options.seed + indices[0], settings=self.settings)
        # the same uint8 round trip as mav evaluate's stored samples, so both paths score identical frames
        stored = {n: torch.stack([to_uint8(v) for v in x]) for n, x in made.frames.items()}  # [B, F, 3, H, W]
        frames = {n: rearrange(x.float() / 127.5 - 1, "b f c h w -> b c f h w").to(self.device)
                  for n, x in stored.items()}
        self.metrics.update_generated(frames, prompts, final=made.final, skip=self.settings.skip)
        if self.hparams.save_media:
            for j, (index, prompt) in enumerate(zip(indices, prompts)):
                sample = {"prompt": prompt, "final": made.final, "fps": made.fps,
                          "frames": {n: x[j] for n, x in stored.items()}}
                write_media(sample, self.out, sample_name(index, prompt), overwrite=True)

    def on_test_epoch_end(self) -> None:
        skipped = {**self.chain.missing, **score_real_data(self.chain, self.metrics, self.real, self.settings,
                                                           seed=self.options.seed)}
        scores = self.metrics.results(skipped)
        for name, entry in scores.items():
            if isinstance(entry["value"], float):  # already synchronised: every rank holds the same value
                self.log(name, entry["value"], sync_dist=False)
        if self.trainer.is_global_zero:
            self.out.mkdir(parents=True, exist_ok=True)
            prompts = prompt_list(self.options)
            videos = len(prompts) * self.options.videos_per_prompt
            run = {"prompts": len(prompts), "videos_per_prompt": self.options.videos_per_prompt,
                   "stages": self.chain.pipe.stages_run(self.settings.stop_after),
                   "dtype": str(self.chain.pipe.dtype).removeprefix("torch.")}
            result = {"metrics": scores, "paper": paper_rows(self.options, scores, videos), "run": run}
            if self.metrics.extension_example is not None:  # one real clip extended by ↑F, for the report
                result["extension"] = write_extension_media(self.out, self.metrics.extension_example)
            (self.out / "metrics.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
            write_report(self.out, result)
            if result["paper"] and isinstance(self.logger, TensorBoardLogger):
                self.logger.experiment.add_text("paper", paper_table(result["paper"]))
