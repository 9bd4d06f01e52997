"""``benchmarks/small_data_probes.py`` on a tiny BERT and the tables of ``benchmarks/small_data.py``."""

import json
import os
import sys

import pytest
import torch
from transformers import BertForSequenceClassification

from .conftest import save_tiny_teacher, tiny_csv_files

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import small_data  # noqa: E402
import small_data_probes  # noqa: E402


def test_every_probe_runs_and_the_probes_that_keep_everything_match_the_teacher(tmp_path, monkeypatch):
    save_tiny_teacher(tmp_path / "teacher")
    teacher = BertForSequenceClassification.from_pretrained(tmp_path / "teacher")
    with torch.no_grad():  # a random classifier's logits barely move: make them read the pooled features
        teacher.classifier.weight.mul_(100)
        teacher.classifier.bias.zero_()
    teacher.save_pretrained(tmp_path / "teacher")
    files = tiny_csv_files(tmp_path)
    monkeypatch.setattr(small_data_probes, "RESULTS", str(tmp_path / "probes.json"))
    result = small_data_probes.main(
        [
            f"--teacher={tmp_path / 'teacher'}",
            f"--train_file={files['train']}",
            f"--validation_file={files['validation']}",
            "--quantile=0.25",
            "--embedding_widths=8",
            "--first_ids",
            "0",
            "1000",  # more ids than the vocabulary: nothing is dropped
            "--ranks=48",  # the table's full width: the SVD gives the table back
        ]
    )
    assert json.loads((tmp_path / "probes.json").read_text())["rows"] == result["rows"]
    assert [row["probe"] for row in result["rows"]] == ["sites"] * 5 + ["embedding"] + ["vocabulary"] * 4 + ["rank"]
    assert 0 < result["teacher_validation_accuracy"] < 1  # the teacher's predictions differ between rows
    for row in [row for row in result["rows"] if row.get("first_ids") == 1000 or row["probe"] == "rank"]:
        assert row["difference_pt"] == pytest.approx(0.0, abs=1e-9)
    width = 48  # the tiny BERT's hidden size
    assert [row["num_parameters"] for row in result["rows"] if row.get("first_ids") == 1000] == [
        result["teacher_parameters"]
    ] * 2
    rank = next(row for row in result["rows"] if row["probe"] == "rank")
    assert rank["num_parameters"] == result["teacher_parameters"] + width * width  # (V + W) r - V W at r = W
    trimmed = [row for row in result["rows"] if row.get("first_ids") == 0]
    assert all(row["kept_tokens"] < 120 and row["num_parameters"] < result["teacher_parameters"] for row in trimmed)


def test_the_small_data_tables_list_every_try_with_its_verdict(tmp_path, monkeypatch):
    monkeypatch.setattr(small_data, "RESULTS_DIR", str(tmp_path))
    run = {
        "train_rows": 600,
        "seed": 0,
        "param_reduction": 0.379,
        "teacher_validation_accuracy": 0.7731,
        "validation_accuracy": 0.7658,
        "teacher_test_accuracy": 0.7637,
        "test_accuracy": 0.7763,
        "wall_seconds": 2226.0,
        "teacher_cached": True,
        "teacher_train_seconds": 792.0,
        "stage_max_steps": 1800,
        "vocabulary": {"teacher_size": 30522, "kept_size": 3882, "undone": "accuracy 0.7 < floor 0.76"},
        "tries": [
            {
                "sigma_quantile": 0.5,
                "status": "rolled back: screened out after 180 of 1800 steps: accuracy 0.6000 < floor 0.7631 - margin",
                "num_parameters": 7813526,
                "eval_accuracy": 0.6,
                "screened_eval_accuracy": 0.6,
            },
            {
                "sigma_quantile": 0.25,
                "status": "accepted",
                "num_parameters": 14096358,
                "eval_accuracy": 0.7658,
                "paired_standard_error": 0.0069,
                "screened_eval_accuracy": 0.7475,
            },
        ],
    }
    small_data.write_tables({"runs": [run]})
    table = (tmp_path / "small_data.md").read_text()
    assert (
        "| 600 | 0 | 1,800 | undone | 37.9% | 77.31 | 76.58 | -0.73 | 76.37 | 77.63 | +1.26 | 2 | 37.1 (13.2, cached) |"
        in table
    )
    kept = {**run, "seed": 1, "stage_max_steps": 6000, "vocabulary": {"teacher_size": 30522, "kept_size": 7539}}
    small_data.write_tables({"runs": [run, kept]})
    table = (tmp_path / "small_data.md").read_text()
    assert "| 600 | 1 | 6,000 | 7,539 of 30,522 tokens | 37.9% |" in table
    assert "600 rows: mean 37.9% of the parameters removed over 2 seeds (mixed: 1,800 and 6,000 steps a cut)." in table
    assert "| 600 | 0 | 0.5 | 7,813,526 | 60.00 | — | — | screened out |" in table
    assert "| 600 | 0 | 0.25 | 14,096,358 | 74.75 | 76.58 | -0.73 ± 0.69 | accepted |" in table


def test_a_run_that_loaded_its_teacher_is_collected_without_the_teachers_train_results(tmp_path):
    history = {
        "teacher": {"num_parameters": 100, "eval_accuracy": 0.8},
        "final": {"num_parameters": 40},
        "stages": [{"status": "accepted", "sigma_quantile": 0.375, "paired_standard_error": 0.007}],
        "config": {"stage_max_steps": 1800},
    }
    (tmp_path / small_data.HISTORY_FILENAME).write_text(json.dumps(history))
    for name, results in {
        "eval_results.json": {"eval_accuracy": 0.79},
        "test_results.json": {"test_accuracy": 0.81},
        "teacher_test_results.json": {"teacher_test_accuracy": 0.8},
    }.items():
        (tmp_path / name).write_text(json.dumps(results))
    run = small_data.collect_run(str(tmp_path), 600, 0, ["rmt-kd", "compress"], 1596.0, teacher_cached=True)
    assert run["param_reduction"] == 0.6 and run["validation_accuracy"] == 0.79 and run["test_accuracy"] == 0.81
    assert run["teacher_train_seconds"] is None and small_data._teacher_minutes(run) == "cached"
