"""Offline GLUE metric: hand-computed values per task, input errors, and `evaluate.load` from a clean offline cache."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from rmt_kd_hf.metrics import GLUE_METRIC_PATH, GLUE_TASKS, compute_glue_metrics, load_glue_metric

ACCURACY_TASKS = ["sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "hans", "accuracy"]
REPO_ROOT = Path(__file__).resolve().parents[2]

# Binary example: TP=3 (idx 0, 4, 7), FP=2 (idx 1, 6), FN=1 (idx 3), TN=2 (idx 2, 5).
BINARY_PREDS = [1, 1, 0, 0, 1, 0, 1, 1]
BINARY_REFS = [1, 0, 0, 1, 1, 0, 0, 1]
TP, FP, FN, TN = 3, 2, 1, 2

STS_PREDS = [0.5, 1.25, 2.0, 2.5, 4.75, 3.0]
STS_REFS = [0.0, 1.5, 1.75, 3.25, 5.0, 2.5]


def assert_python_floats(result: dict) -> None:
    assert all(type(value) is float for value in result.values()), {k: type(v) for k, v in result.items()}


def test_task_names_cover_glue_and_local_datasets():
    expected = {"cola", "mrpc", "qqp", "stsb", "regression", *ACCURACY_TASKS}
    assert set(GLUE_TASKS) == expected and len(GLUE_TASKS) == len(expected)


@pytest.mark.parametrize("task", ACCURACY_TASKS)
def test_accuracy_tasks(task):
    result = compute_glue_metrics(task, [0, 1, 2, 1, 0], [0, 1, 1, 1, 2])
    assert result == {"accuracy": 3 / 5}
    assert_python_floats(result)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1_of_positive_class(task):
    result = compute_glue_metrics(task, np.array(BINARY_PREDS), np.array(BINARY_REFS))
    assert result["accuracy"] == pytest.approx((TP + TN) / 8)
    assert result["f1"] == pytest.approx(2 * TP / (2 * TP + FP + FN))
    assert set(result) == {"accuracy", "f1"}
    assert_python_floats(result)


def test_cola_binary_mcc_matches_formula():
    result = compute_glue_metrics("cola", BINARY_PREDS, BINARY_REFS)
    expected = (TP * TN - FP * FN) / math.sqrt((TP + FP) * (TP + FN) * (TN + FP) * (TN + FN))
    assert result == {"matthews_correlation": pytest.approx(expected)}
    assert_python_floats(result)
    inverted = compute_glue_metrics("cola", [1 - p for p in BINARY_REFS], BINARY_REFS)
    assert inverted["matthews_correlation"] == pytest.approx(-1.0)


def test_mcc_multiclass_matches_hand_computed_confusion_matrix():
    # Confusion rows (true) 0: [1, 1, 0], 1: [0, 2, 0], 2: [1, 0, 1]: t=[2, 2, 2], p=[2, 3, 1], correct=4, n=6.
    result = compute_glue_metrics("cola", [0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2])
    cov_tp = 4 * 6 - (2 * 2 + 2 * 3 + 2 * 1)
    cov_pp = 6**2 - (2**2 + 3**2 + 1**2)
    cov_tt = 6**2 - 3 * 2**2
    assert result["matthews_correlation"] == pytest.approx(cov_tp / math.sqrt(cov_pp * cov_tt))


@pytest.mark.parametrize("task", ["stsb", "regression"])
def test_correlations_match_scipy(task):
    result = compute_glue_metrics(task, STS_PREDS, STS_REFS)
    assert result["pearson"] == pytest.approx(stats.pearsonr(STS_PREDS, STS_REFS)[0])
    assert result["spearmanr"] == pytest.approx(stats.spearmanr(STS_PREDS, STS_REFS)[0])
    assert_python_floats(result)
    monotone = compute_glue_metrics(task, [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 100.0])
    assert monotone["spearmanr"] == pytest.approx(1.0) and monotone["pearson"] < 0.95


@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [1, 1, 1, 1]])
def test_mcc_is_zero_not_nan_for_one_class(labels):
    assert compute_glue_metrics("cola", labels, labels) == {"matthews_correlation": 0.0}
    assert compute_glue_metrics("cola", labels, [0, 1, 0, 1]) == {"matthews_correlation": 0.0}


def test_f1_is_zero_without_any_positive():
    assert compute_glue_metrics("mrpc", [0, 0, 0], [0, 0, 0]) == {"accuracy": 1.0, "f1": 0.0}
    assert compute_glue_metrics("qqp", [0, 0, 0], [1, 0, 1])["f1"] == 0.0


def test_accepts_bools_and_whole_floats_as_class_ids():
    assert compute_glue_metrics("sst2", np.array([True, False]), np.array([1.0, 1.0])) == {"accuracy": 0.5}


@pytest.mark.parametrize(
    ("task", "predictions", "references", "match"),
    [
        ("cola", [], [], "predictions is empty"),
        ("stsb", np.array([]), np.array([]), "predictions is empty"),
        ("sst2", [0, 1], [0, 1, 1], "same length, got 2 and 3"),
        ("sst2", [[0.2, 0.8], [0.9, 0.1]], [1, 0], r"argmax"),
        ("sst2", [0.2, 0.8], [0, 1], "integer class ids"),
        ("mrpc", [0, 2], [0, 1], r"binary 0/1 labels, but predictions contain \[2\]"),
        ("stsb", [1.0], [1.0], "at least 2 examples"),
    ],
)
def test_bad_inputs_raise_clear_errors(task, predictions, references, match):
    with pytest.raises(ValueError, match=match):
        compute_glue_metrics(task, predictions, references)


@pytest.mark.parametrize("call", [compute_glue_metrics, load_glue_metric])
def test_unknown_task_lists_valid_names(call):
    args = ("sts-b", [1], [1]) if call is compute_glue_metrics else ("sts-b",)
    with pytest.raises(ValueError, match=r"Unknown GLUE task 'sts-b'.*cola.*stsb.*regression"):
        call(*args)


def test_module_script_is_named_after_its_folder():
    script = Path(GLUE_METRIC_PATH)
    assert script.is_absolute() and script.is_file() and script.stem == script.parent.name
    assert (script.parent / "__init__.py").is_file()  # so setuptools ships it as a package


# One fresh interpreter for every evaluate-based check (importing evaluate costs ~5 s): HF_HUB_OFFLINE=1,
# empty caches in tmp, and sockets that record and refuse any connection, so a silent Hub fallback would show.
_OFFLINE_SCRIPT = r"""
import inspect, json, socket, sys

attempts = []

def refuse(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network disabled by test")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse

from rmt_kd_hf.metrics import compute_glue_metrics, load_glue_metric

cases = json.loads(sys.argv[1])
out = {"evaluate": {}, "direct": {}, "module_files": [], "errors": {}}
for task, (preds, refs) in cases.items():
    metric = load_glue_metric(task)
    out["evaluate"][task] = metric.compute(predictions=preds, references=refs)
    out["direct"][task] = compute_glue_metrics(task, preds, refs)
    out["module_files"].append(inspect.getfile(type(metric)))
default = load_glue_metric()
out["default_config"] = default.config_name
half = len(cases["mrpc"][0]) // 2
for start, stop in ((0, half), (half, None)):
    default.add_batch(predictions=cases["mrpc"][0][start:stop], references=cases["mrpc"][1][start:stop])
out["batched"] = default.compute()
try:
    load_glue_metric("cola").compute(predictions=[], references=[])
except ValueError as error:
    out["errors"]["empty"] = str(error)
out["types"] = sorted({type(v).__name__ for r in out["evaluate"].values() for v in r.values()})
out["attempts"] = attempts
print("RESULT=" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(home),
        HF_EVALUATE_CACHE=str(home / "evaluate"),
        HF_MODULES_CACHE=str(home / "modules"),
        HF_METRICS_CACHE=str(home / "metrics"),
        HF_DATASETS_CACHE=str(home / "datasets"),
    )
    cases = {task: (BINARY_PREDS, BINARY_REFS) for task in GLUE_TASKS}
    cases["cola"] = ([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2])
    cases["stsb"] = cases["regression"] = (STS_PREDS, STS_REFS)  # float32-exact, so evaluate's cast changes nothing
    proc = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, json.dumps(cases)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT="))
    return home, cases, json.loads(line.removeprefix("RESULT="))


def test_evaluate_module_equals_pure_implementation_for_every_task(offline_run):
    _, cases, out = offline_run
    assert set(out["evaluate"]) == set(GLUE_TASKS)
    assert out["evaluate"] == out["direct"]
    assert out["types"] == ["float"]
    for task, (preds, refs) in cases.items():
        assert out["evaluate"][task] == compute_glue_metrics(task, preds, refs), task


def test_loads_offline_from_a_clean_cache(offline_run):
    home, _, out = offline_run
    assert out["attempts"] == []
    assert all(Path(path).is_relative_to(home / "modules") for path in out["module_files"])


def test_default_task_and_batched_compute(offline_run):
    _, _, out = offline_run
    assert out["default_config"] == "accuracy"
    assert out["batched"] == {"accuracy": (TP + TN) / 8}
    assert "predictions is empty" in out["errors"]["empty"]
