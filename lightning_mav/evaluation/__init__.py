"""Evaluation of the trained chain: ``mav evaluate``, ``lightning test --config experiments/eval.yaml``, and the
Python API ``evaluate(EvalOptions(...))``.

One module per concept: ``options`` (every option, defined once), ``prompts``, ``protocols`` (UCF-101 and MSR-VTT
as the paper's numbers were measured), ``chain`` (loading the networks), ``generation`` (pipeline calls and the
per-frame ablation), ``samples`` (samples and media on disk), ``scores`` (``EvalMetrics``), ``real_data`` (scores on
real validation data), ``report`` (report.md, the paper's numbers beside ours), ``run`` (``evaluate()``),
``lightning`` (``EvaluationModule``). What each score means: docs/evaluation.md.
"""
from lightning_mav.evaluation.chain import Chain, load_chain
from lightning_mav.evaluation.generation import Generated, generate_batch, sample_per_frame
from lightning_mav.evaluation.lightning import EvaluationModule, prompt_items
from lightning_mav.evaluation.options import EvalOptions
from lightning_mav.evaluation.prompts import UCF101_TEMPLATE, class_prompts, load_prompts
from lightning_mav.evaluation.protocols import PAPER_RESULTS, msrvtt_captions, ucf101_prompts, ucf101_real_clips
from lightning_mav.evaluation.run import evaluate
from lightning_mav.evaluation.scores import EvalMetrics

__all__ = ["PAPER_RESULTS", "UCF101_TEMPLATE", "Chain", "EvalMetrics", "EvalOptions", "EvaluationModule", "Generated",
           "class_prompts", "evaluate", "generate_batch", "load_chain", "load_prompts", "msrvtt_captions",
           "prompt_items", "sample_per_frame", "ucf101_prompts", "ucf101_real_clips"]
