"""Offline GLUE metrics for the example scripts: a local `evaluate` module plus a pure numpy/scipy implementation.

Usage, in place of `evaluate.load("glue", task)`::

    metric = load_glue_metric("mrpc")
    metric.compute(predictions=logits.argmax(-1), references=labels)  # {"accuracy": ..., "f1": ...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import evaluate

from .glue_offline.glue_offline import GLUE_TASKS, check_task, compute_glue_metrics

GLUE_METRIC_PATH: str = str(Path(__file__).resolve().parent / "glue_offline" / "glue_offline.py")
"""Absolute path of the module script; `evaluate.load` never goes to the Hub for an absolute path to a file."""


def load_glue_metric(task_name: str | None = None, **load_kwargs: Any) -> evaluate.EvaluationModule:
    """Load the offline GLUE metric of one task (no network, works with HF_HUB_OFFLINE=1 and an empty cache).

    Args:
        task_name: one of `GLUE_TASKS`; None means "accuracy" (a local classification dataset).
        **load_kwargs: passed to `evaluate.load` (e.g. `keep_in_memory`, `experiment_id`, `num_process`).

    Returns:
        An `evaluate.EvaluationModule`; `.compute(predictions=..., references=...)` takes arrays shape
        (num_examples,) and returns the same dict of floats as `compute_glue_metrics`.
    """
    task = "accuracy" if task_name is None else check_task(task_name)
    return evaluate.load(GLUE_METRIC_PATH, config_name=task, **load_kwargs)


__all__ = ["GLUE_METRIC_PATH", "GLUE_TASKS", "compute_glue_metrics", "load_glue_metric"]
