"""Evaluation of the trained chain: ``mav evaluate``, ``lightning test --config experiments/eval.yaml``, and the
Python API ``evaluate(EvalOptions(...))``.

One module per concept: ``options`` (every option, defined once), ``prompts``, ``chain`` (loading the networks),
``generation`` (pipeline calls and the per-frame ablation), ``samples`` (samples and media on disk), ``scores``
(``EvalMetrics``), ``real_data`` (scores on real validation data), ``run`` (``evaluate()``), ``lightning``
(``EvaluationModule``). What each score means: docs/evaluation.md.
"""
from lightning_mav.evaluation.chain import Chain, load_chain
from lightning_mav.evaluation.generation import Generated, generate_batch, sample_per_frame
from lightning_mav.evaluation.lightning import EvaluationModule, prompt_items
from lightning_mav.evaluation.options import EvalOptions
from lightning_mav.evaluation.prompts import UCF101_TEMPLATE, class_prompts, load_prompts
from lightning_mav.evaluation.run import evaluate
from lightning_mav.evaluation.scores import EvalMetrics

__all__ = ["UCF101_TEMPLATE", "Chain", "EvalMetrics", "EvalOptions", "EvaluationModule", "Generated", "class_prompts",
           "evaluate", "generate_batch", "load_chain", "load_prompts", "prompt_items", "sample_per_frame"]
