"""GLUE metric as a local `evaluate` module: same keys and values as the hub's `glue`, no network, no scikit-learn.

`evaluate.load` copies this file into its modules cache and imports it on its own, so it must stay
self-contained: only numpy, scipy, datasets and evaluate imports, and no relative imports.
The pure functions below are also imported by `rmt_kd_hf.metrics` and can be called without `evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr

MCC_TASKS: tuple[str, ...] = ("cola",)
F1_TASKS: tuple[str, ...] = ("mrpc", "qqp")
CORRELATION_TASKS: tuple[str, ...] = ("stsb", "regression")
ACCURACY_TASKS: tuple[str, ...] = (
    "sst2",
    "mnli",
    "mnli_mismatched",
    "mnli_matched",
    "qnli",
    "rte",
    "wnli",
    "hans",
    "accuracy",
)
GLUE_TASKS: tuple[str, ...] = MCC_TASKS + F1_TASKS + CORRELATION_TASKS + ACCURACY_TASKS

_DESCRIPTION = """\
Offline GLUE metric (same outputs as https://huggingface.co/spaces/evaluate-metric/glue):
cola -> matthews_correlation; mrpc, qqp -> accuracy and f1 (positive label 1);
stsb -> pearson and spearmanr; sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans -> accuracy.
Extra configs: "accuracy" (any classification dataset) and "regression" (any float-label dataset).
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: shape (num_examples,): class ids (float scores for stsb/regression).
    references: shape (num_examples,): gold class ids (float scores for stsb/regression).
Returns:
    dict of Python floats, keys depending on the config (see the description).
"""


def check_task(task_name: str) -> str:
    """Return `task_name` if it is one of `GLUE_TASKS`, else raise a ValueError listing the valid names."""
    if task_name not in GLUE_TASKS:
        raise ValueError(
            f"Unknown GLUE task {task_name!r}. Choose one of: {', '.join(GLUE_TASKS)} "
            "('accuracy' for any local classification dataset, 'regression' for float labels)."
        )
    return task_name


def _integer_ids(name: str, array: np.ndarray, task_name: str) -> np.ndarray:
    """Cast a 1-D array of class ids to int64; floats are accepted only when they hold whole numbers."""
    if array.dtype.kind in "biu":
        return array.astype(np.int64)
    if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        return array.astype(np.int64)
    raise ValueError(
        f"{name} for task {task_name!r} must be integer class ids, got dtype {array.dtype} "
        f"(first values: {array[:3].tolist()}). Pass class ids, or use task 'stsb'/'regression' for float scores."
    )


def _as_vector(name: str, values: Sequence | np.ndarray, task_name: str) -> np.ndarray:
    """Validate one input and return it as a 1-D array: int64 ids, or float64 for correlation tasks."""
    array = np.asarray(values)
    if array.ndim != 1:
        hint = " Got per-class scores? Pass logits.argmax(-1)." if array.ndim == 2 else ""
        raise ValueError(f"{name} must have shape (num_examples,), got shape {array.shape}.{hint}")
    if array.size == 0:
        raise ValueError(
            f"{name} is empty: the {task_name!r} metric needs at least one example. "
            "Check that the evaluation split is not empty."
        )
    if task_name in CORRELATION_TASKS:
        if array.dtype.kind not in "biuf":
            raise ValueError(f"{name} for task {task_name!r} must be numbers, got dtype {array.dtype}.")
        return array.astype(np.float64)
    return _integer_ids(name, array, task_name)


def _paired(predictions: Sequence | np.ndarray, references: Sequence | np.ndarray, task_name: str):
    """Validate both inputs and check they have the same length; returns (predictions, references) arrays."""
    preds = _as_vector("predictions", predictions, task_name)
    refs = _as_vector("references", references, task_name)
    if preds.shape != refs.shape:
        raise ValueError(
            f"predictions and references must have the same length, got {preds.size} and {refs.size}. "
            "Pass one prediction per reference."
        )
    return preds, refs


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """Fraction of exact matches; inputs shape (num_examples,)."""
    return float(np.mean(predictions == references))


def binary_f1(predictions: np.ndarray, references: np.ndarray) -> float:
    """F1 of the positive class 1 (labels must be 0/1); 0.0 when there is no positive at all, like scikit-learn."""
    for name, array in (("predictions", predictions), ("references", references)):
        bad = np.setdiff1d(array, [0, 1])
        if bad.size:
            raise ValueError(
                f"F1 needs binary 0/1 labels, but {name} contain {bad[:5].tolist()}. "
                "Use task 'accuracy' for multi-class datasets."
            )
    true_pos = int(np.sum((predictions == 1) & (references == 1)))
    false_pos = int(np.sum((predictions == 1) & (references == 0)))
    false_neg = int(np.sum((predictions == 0) & (references == 1)))
    denominator = 2 * true_pos + false_pos + false_neg
    return 0.0 if denominator == 0 else float(2 * true_pos / denominator)


def matthews_correlation(predictions: np.ndarray, references: np.ndarray) -> float:
    """Multi-class Matthews correlation (scikit-learn's formula); 0.0 instead of NaN when a side is constant.

    Inputs shape (num_examples,) of class ids.
    """
    _, codes = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    num_classes = int(codes.max()) + 1
    true_codes, pred_codes = codes[: references.size], codes[references.size :]
    confusion = np.bincount(true_codes * num_classes + pred_codes, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes).astype(np.float64)
    true_sum, pred_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    num_samples = pred_sum.sum()
    cov_true_pred = np.trace(confusion) * num_samples - true_sum @ pred_sum
    cov_pred_pred = num_samples**2 - pred_sum @ pred_sum
    cov_true_true = num_samples**2 - true_sum @ true_sum
    product = cov_pred_pred * cov_true_true
    return 0.0 if product == 0 else float(cov_true_pred / np.sqrt(product))


def pearson_and_spearman(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlations of float arrays shape (num_examples,), num_examples >= 2.

    Like the hub metric, a constant input gives NaN (scipy warns with ConstantInputWarning).
    """
    if predictions.size < 2:
        raise ValueError(
            f"pearson/spearmanr need at least 2 examples, got {predictions.size}. Evaluate on more examples."
        )
    return {
        "pearson": float(pearsonr(predictions, references)[0]),
        "spearmanr": float(spearmanr(predictions, references)[0]),
    }


def compute_glue_metrics(
    task_name: str, predictions: Sequence | np.ndarray, references: Sequence | np.ndarray
) -> dict[str, float]:
    """GLUE metrics of one task, as the hub's `glue` metric computes them.

    Args:
        task_name: one of `GLUE_TASKS`.
        predictions: shape (num_examples,): class ids, or float scores for "stsb"/"regression".
        references: shape (num_examples,): gold labels of the same kind.

    Returns:
        {"matthews_correlation"} for cola, {"accuracy", "f1"} for mrpc/qqp, {"pearson", "spearmanr"} for
        stsb/regression, {"accuracy"} otherwise; values are Python floats.
    """
    task = check_task(task_name)
    preds, refs = _paired(predictions, references, task)
    if task in CORRELATION_TASKS:
        return pearson_and_spearman(preds, refs)
    if task in MCC_TASKS:
        return {"matthews_correlation": matthews_correlation(preds, refs)}
    if task in F1_TASKS:
        return {"accuracy": accuracy(preds, refs), "f1": binary_f1(preds, refs)}
    return {"accuracy": accuracy(preds, refs)}


class GlueOffline(evaluate.Metric):
    """`evaluate` wrapper around `compute_glue_metrics`; the config name is the task name."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name == "default":
            raise ValueError(f"Pass the task as config_name to evaluate.load, one of: {', '.join(GLUE_TASKS)}.")
        task = check_task(self.config_name)
        dtype = "float32" if task in CORRELATION_TASKS else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            codebase_urls=[],
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/glue"],
            format="numpy",
        )

    def _compute(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        return compute_glue_metrics(self.config_name, predictions, references)
