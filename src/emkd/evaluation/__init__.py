"""Evaluation: ``emkd eval`` -- accuracy per category, vision tokens per image and time to first token.

* :mod:`emkd.evaluation.normalize`: answer normalisation, multiple-choice letter extraction, exact-match scoring.
* :mod:`emkd.evaluation.evaluate`: loading any supported checkpoint, prompt rendering (the training renderer plus the
  generation prompt), greedy generation, metrics, the console table and the command-line entry points.
"""

from emkd.evaluation.evaluate import (
    EvalResult,
    EvalSample,
    PairedDifference,
    Prediction,
    add_eval_arguments,
    evaluate,
    format_table,
    load_for_eval,
    paired_difference,
    read_eval_samples,
    render_prompt,
    run_eval,
)
from emkd.evaluation.normalize import extract_choice, is_correct, normalize_answer

__all__ = [
    "EvalResult",
    "EvalSample",
    "PairedDifference",
    "Prediction",
    "add_eval_arguments",
    "evaluate",
    "extract_choice",
    "format_table",
    "is_correct",
    "load_for_eval",
    "normalize_answer",
    "paired_difference",
    "read_eval_samples",
    "render_prompt",
    "run_eval",
]
