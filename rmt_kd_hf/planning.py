"""Stage planning as pure functions of numbers: the σ² quantile that meets a parameter budget, the budget of each
stage, the milder cuts tried after a rollback, and the stop rules. Nothing here knows a model."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from .history import StageRecord, StageStatus

Plan = TypeVar("Plan")

QUANTILE_SEARCH_RANGE = (0.01, 0.99)
QUANTILE_SEARCH_STEPS = 12


@dataclass
class BudgetSearch(Generic[Plan]):
    """The outcome of :func:`mildest_quantile_within`: the quantile found, its plan and parameter count, and the count
    at the strongest quantile searched (above ``target``: the target cannot be met)."""

    quantile: float
    plan: Plan
    num_parameters: int
    strongest_num_parameters: int


def mildest_quantile_within(
    parameters_at: Callable[[float], tuple[int, Plan]],
    target: float,
    search_range: tuple[float, float] = QUANTILE_SEARCH_RANGE,
    steps: int = QUANTILE_SEARCH_STEPS,
) -> BudgetSearch[Plan]:
    """The mildest σ² quantile whose plan keeps at most ``target`` parameters, by bisection.

    Widths grow as the quantile falls (a lower σ² start puts λ+ lower), so the parameter count falls as the quantile
    rises. ``parameters_at(quantile)`` returns ``(parameter count, plan)``. When no quantile searched meets
    ``target``, the strongest plan is returned (its count above ``target``).
    """
    low, high = search_range
    count, plan = parameters_at(high)
    best = BudgetSearch(high, plan, count, strongest_num_parameters=count)
    for _ in range(steps):
        middle = (low + high) / 2
        count, plan = parameters_at(middle)
        if count <= target:
            high, best = middle, BudgetSearch(middle, plan, count, best.strongest_num_parameters)
        else:
            low = middle
    return best


def stage_parameter_target(current: int, final_target: float, remaining_stages: int) -> float:
    """This stage's parameter budget: the cut still to make, ``current − final_target``, spread evenly over the
    remaining stages (this one included)."""
    return current - (current - final_target) / max(remaining_stages, 1)


@dataclass
class CutSearch:
    """The quantiles tried for a stage after its first cut: bisection between the strongest cut that passed (at
    first none: quantile 0 keeps every direction) and the mildest that failed (at first none: quantile 1 keeps
    nothing). After a rollback the next try is milder; after a pass it is stronger, which only the accuracy-targeted
    mode asks for."""

    passed: float = 0.0
    failed: float = 1.0
    resolution: float = 1 / 64  # a bracket this narrow holds no cut worth another distillation

    def next_quantile(self) -> float:
        return (self.passed + self.failed) / 2

    def record(self, quantile: float, accepted: bool) -> None:
        """What the cut at ``quantile`` gave; a quantile with nothing to cut counts as passed (try stronger)."""
        if accepted:
            self.passed = max(self.passed, quantile)
        else:
            self.failed = min(self.failed, quantile)

    @property
    def settled(self) -> bool:
        return self.failed - self.passed < self.resolution


def paired_standard_error(candidate_correct: np.ndarray | None, teacher_correct: np.ndarray | None) -> float | None:
    """Standard error of (candidate accuracy - teacher accuracy) on the same rows: ``std(c_i - t_i) / sqrt(n)`` over
    the per-row correctness ``c_i``, ``t_i`` in {0, 1} (both ``(rows,)`` bool, in the same row order). ``None`` when
    either is missing or they do not cover the same rows (at least two)."""
    if candidate_correct is None or teacher_correct is None or len(candidate_correct) != len(teacher_correct):
        return None
    if len(teacher_correct) < 2:
        return None
    differences = np.asarray(candidate_correct, dtype=float) - np.asarray(teacher_correct, dtype=float)
    return float(differences.std(ddof=1) / math.sqrt(len(differences)))


def judge_cut(metric: float, floor: float, metric_name: str, non_finite_weights: str = "") -> tuple[StageStatus, str]:
    """The verdict on a distilled cut and its reason: rolled back when its weights (``non_finite_weights``: their
    names) or its validation ``metric`` are not finite, whatever the floor, or when ``metric`` is below ``floor``."""
    if non_finite_weights:
        return StageStatus.ROLLED_BACK, f"non-finite weights ({non_finite_weights}) after distillation"
    if not math.isfinite(metric):
        return StageStatus.ROLLED_BACK, "non-finite metric after distillation"
    if metric < floor:
        return StageStatus.ROLLED_BACK, f"{metric_name} {metric:.4f} < floor {floor:.4f}"
    return StageStatus.ACCEPTED, ""


def target_met(
    stage: StageRecord, target_parameter_ratio: float | None = None, target_latency_ratio: float | None = None
) -> bool:
    """Whether an accepted ``stage`` reached the parameter or the latency target."""
    if target_parameter_ratio is not None and stage.parameter_ratio <= target_parameter_ratio:
        return True
    return target_latency_ratio is not None and stage.latency_ratio <= target_latency_ratio


def stop_rule_fired(
    stages: Sequence[StageRecord],
    max_stages: int | None,
    target_parameter_ratio: float | None = None,
    target_latency_ratio: float | None = None,
) -> bool:
    """Whether no further stage should run: a stage was rolled back, the target is met by the last accepted stage,
    or ``max_stages`` stages were accepted."""
    if any(stage.status is StageStatus.ROLLED_BACK for stage in stages):
        return True
    accepted = [stage for stage in stages if stage.accepted]
    if not accepted:
        return False
    return target_met(accepted[-1], target_parameter_ratio, target_latency_ratio) or len(accepted) == max_stages


__all__ = [
    "BudgetSearch",
    "CutSearch",
    "judge_cut",
    "mildest_quantile_within",
    "stage_parameter_target",
    "stop_rule_fired",
    "target_met",
]
