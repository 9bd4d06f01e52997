"""Stage planning on numbers: budget bisection, per-stage budgets, milder-cut bisection, verdicts, stop rules."""

import math

import numpy as np
import pytest

from rmt_kd_hf.history import StageRecord, StageStatus
from rmt_kd_hf.planning import (
    CutSearch,
    judge_cut,
    mildest_quantile_within,
    paired_standard_error,
    stage_parameter_target,
    stop_rule_fired,
    target_met,
)


def parameters_falling_with(quantile: float) -> tuple[int, str]:
    """A model of 1,000 parameters at quantile 0 that loses 1,000·q of them (rounded to tens, as widths round)."""
    return 1000 - 10 * int(100 * quantile), f"plan at {quantile:.4f}"


def test_the_mildest_quantile_within_the_budget_is_found():
    search = mildest_quantile_within(parameters_falling_with, target=700)
    assert search.num_parameters <= 700 and search.strongest_num_parameters == 10
    assert 0.30 <= search.quantile < 0.31  # the mildest quantile with 1,000 - 10·⌊100q⌋ <= 700
    assert search.plan == f"plan at {search.quantile:.4f}"
    milder_count, _ = parameters_falling_with(search.quantile - 0.005)
    assert milder_count > 700


def test_an_unreachable_budget_returns_the_strongest_plan():
    search = mildest_quantile_within(parameters_falling_with, target=5)
    assert search.quantile == 0.99 and search.num_parameters == search.strongest_num_parameters == 10 > 5


def test_each_stage_gets_an_even_share_of_the_remaining_cut():
    assert stage_parameter_target(current=1000, final_target=400, remaining_stages=3) == 800
    assert stage_parameter_target(current=800, final_target=400, remaining_stages=2) == 600
    assert stage_parameter_target(current=600, final_target=400, remaining_stages=1) == 400
    assert stage_parameter_target(current=600, final_target=400, remaining_stages=0) == 400


def test_milder_cuts_bisect_between_the_last_pass_and_the_last_failure():
    search = CutSearch()
    search.record(0.5, accepted=False)
    assert search.next_quantile() == 0.25
    search.record(0.25, accepted=False)
    assert search.next_quantile() == 0.125
    search.record(0.125, accepted=True)
    assert search.next_quantile() == 0.1875
    search.record(0.1875, accepted=True)
    assert (search.passed, search.failed) == (0.1875, 0.25) and not search.settled


def test_after_a_pass_the_search_goes_stronger_and_settles():
    search = CutSearch()
    search.record(0.5, accepted=True)
    assert search.next_quantile() == 0.75  # between the pass and quantile 1, which keeps nothing
    for _ in range(5):
        search.record(search.next_quantile(), accepted=False)
    assert search.failed - search.passed == 0.5 / 32 and not search.settled
    search.record(search.next_quantile(), accepted=True)
    assert search.settled  # a bracket under 1/64 holds no cut worth another distillation


@pytest.mark.parametrize(
    ("metric", "broken", "status", "reason"),
    [
        (0.80, "", StageStatus.ACCEPTED, ""),
        (0.79, "", StageStatus.ACCEPTED, ""),
        (0.78, "", StageStatus.ROLLED_BACK, "accuracy 0.7800 < floor 0.7900"),
        (math.nan, "", StageStatus.ROLLED_BACK, "non-finite metric after distillation"),
        (0.95, "bert.pooler.dense.weight", StageStatus.ROLLED_BACK, "non-finite weights (bert.pooler.dense.weight)"),
    ],
)
def test_a_cut_is_judged_against_the_floor_and_finiteness(metric, broken, status, reason):
    verdict, why = judge_cut(metric, floor=0.79, metric_name="accuracy", non_finite_weights=broken)
    assert verdict is status and why.startswith(reason)


def stage(status=StageStatus.ACCEPTED, parameter_ratio=0.5, latency_ratio=None) -> StageRecord:
    return StageRecord(status, parameter_ratio=parameter_ratio, latency_ratio=latency_ratio)


def test_stop_rules():
    assert not stop_rule_fired([], max_stages=3, target_parameter_ratio=0.3)
    assert not stop_rule_fired([stage(parameter_ratio=0.5)], max_stages=3, target_parameter_ratio=0.3)
    assert stop_rule_fired([stage(parameter_ratio=0.3)], max_stages=3, target_parameter_ratio=0.3)
    assert stop_rule_fired([stage(), stage(), stage()], max_stages=3)
    assert stop_rule_fired([stage(), stage(StageStatus.ROLLED_BACK)], max_stages=None)
    assert not stop_rule_fired([stage(StageStatus.SKIPPED)], max_stages=1)
    assert target_met(stage(latency_ratio=0.4), target_latency_ratio=0.5)
    assert not target_met(stage(latency_ratio=0.6), target_latency_ratio=0.5)


def test_the_paired_standard_error_is_that_of_the_per_row_differences():
    teacher = np.array([1, 1, 0, 1, 0, 1, 1, 0], dtype=bool)
    student = np.array([1, 0, 0, 1, 1, 1, 0, 0], dtype=bool)
    differences = student.astype(float) - teacher.astype(float)  # 0 -1 0 0 1 0 -1 0: mean -1/8
    variance = ((differences + 1 / 8) ** 2).sum() / 7
    assert paired_standard_error(student, teacher) == pytest.approx((variance / 8) ** 0.5)
    assert paired_standard_error(teacher, teacher) == 0.0
    assert paired_standard_error(student[:4], teacher) is None  # not the same rows
    assert paired_standard_error(None, teacher) is None
