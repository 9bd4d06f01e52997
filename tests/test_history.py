"""The run history as typed records: JSON round trips, files written by earlier versions, unknown keys kept."""

import copy
import json

import numpy as np
import pytest

from rmt_kd_hf.filenames import HISTORY_FILENAME
from rmt_kd_hf.history import RunHistory, StageStatus, TeacherRecord

SITE = {
    "dim": 384,
    "num_samples": 900,
    "kept_width": 160,
    "sigma_quantile": 0.5,
    "sigma2": 0.01,
    "lambda_plus": 0.03,
    "refined": False,
}

# as the trainer of the previous release wrote it (status strings, eval_<metric> keys, no fingerprint yet)
EARLIER_HISTORY = {
    "teacher": {"num_parameters": 1000, "eval_f1": 0.9, "cpu_latency_seconds": 0.02},
    "config": {"compression_metric": "f1", "max_metric_drop": 0.01, "sigma_quantile": 0.5},
    "stages": [
        {
            "stage": 0,
            "sigma_quantile": 0.25,
            "sites": {"residual.0": SITE},
            "num_parameters": 600,
            "eval_f1": 0.895,
            "kept_step": 300,
            "parameter_ratio": 0.6,
            "latency_ratio": 0.7,
            "status": "accepted",
            "seconds": 12.5,
            "tries": [
                {"sigma_quantile": 0.5, "num_parameters": 400, "eval_f1": 0.7, "status": "rolled back: f1 0.7 < 0.89"},
                {"sigma_quantile": 0.25, "num_parameters": 600, "eval_f1": 0.895, "status": "accepted"},
                {"sigma_quantile": 0.125, "status": "skipped: nothing above λ+ left to cut"},
            ],
        },
        {"stage": 1, "sigma_quantile": 0.5, "sites": {}, "status": "skipped: nothing above λ+ left to cut"},
    ],
    "calibration": {"num_rows": 100, "row_ids_sha256": "ab"},
    "vocabulary": {"teacher_size": 30522, "kept_size": 13207},
    "final": {"num_parameters": 600, "widths": {"boundary_sizes": [160]}, "eval_f1": 0.893},
    "latency": {"sequence_length": 128, "threads": 2, "batch_1": {"teacher": 0.02, "compressed": 0.01}},
    "a_key_from_a_newer_version": {"kept": True},
}


def test_an_earlier_history_reads_into_types_and_writes_back_unchanged():
    history = RunHistory.from_dict(copy.deepcopy(EARLIER_HISTORY))
    assert history.metric_name == "f1" and history.teacher.metric == 0.9 and history.teacher.fingerprint is None
    first, second = history.stages
    assert first.status is StageStatus.ACCEPTED and first.metric == 0.895 and first.kept_step == 300
    assert first.sites["residual.0"].kept_width == 160
    assert [entry.status for entry in first.tries] == [
        StageStatus.ROLLED_BACK,
        StageStatus.ACCEPTED,
        StageStatus.SKIPPED,
    ]
    assert first.tries[0].reason == "f1 0.7 < 0.89"
    assert second.status is StageStatus.SKIPPED and second.reason == "nothing above λ+ left to cut"
    assert [stage.stage for stage in history.accepted_stages] == [0]
    assert history.final_metric() == 0.893  # the saved folder's, where recorded
    assert history.floor == pytest.approx(0.89)
    assert history.to_dict() == EARLIER_HISTORY


def test_final_metric_falls_back_to_the_last_accepted_stage_then_the_teacher():
    data = copy.deepcopy(EARLIER_HISTORY)
    del data["final"]["eval_f1"]
    assert RunHistory.from_dict(data).final_metric() == 0.895
    data["stages"][0]["status"] = "rolled back: f1 0.8 < floor 0.89"
    assert RunHistory.from_dict(data).final_metric() == 0.9


def test_a_broken_history_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="Run compress\\(\\) first"):
        RunHistory.load(tmp_path)
    (tmp_path / HISTORY_FILENAME).write_text(json.dumps({"config": {}, "stages": []}))
    with pytest.raises(ValueError, match="not a readable RMT-KD history"):
        RunHistory.load(tmp_path)
    bad_status = copy.deepcopy(EARLIER_HISTORY)
    bad_status["stages"][1]["status"] = "exploded"
    (tmp_path / HISTORY_FILENAME).write_text(json.dumps(bad_status))
    with pytest.raises(ValueError, match="Unknown stage status 'exploded'"):
        RunHistory.load(tmp_path)


@pytest.mark.parametrize("num_rows", [1, 7, 8, 1913])
def test_the_teachers_correct_rows_survive_the_json_round_trip(num_rows):
    rows = np.random.default_rng(num_rows).random(num_rows) < 0.8
    teacher = TeacherRecord(num_parameters=10, metric=float(rows.mean()), validation_correct=rows)
    data = json.loads(json.dumps(teacher.to_dict("accuracy")))
    assert data["validation_correct"]["num_rows"] == num_rows
    assert TeacherRecord.from_dict(data, "accuracy").validation_correct.tolist() == rows.tolist()
