"""``rmt-kd compress`` leaves a folder that is the truth: the metrics it reports are those of the saved weights read
with the saved tokenizer, the model card is written beside them, and the tokenizer loads without a prompt."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmt_kd_hf.checkpoint import load_checkpoint

from .conftest import cli_compress, save_tiny_teacher

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finished_cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_run")
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(96):  # label 1 when w7 occurs; words the training set never shows (w100+) in validation only
        words = [f"w{index}" for index in rng.integers(8, 60, size=5)]
        label = int(rng.random() < 0.5)
        if label:
            words[int(rng.integers(0, 5))] = "w7"
        rows.append((" ".join(words), label))
    (root / "train.csv").write_text("sentence,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    validation = [(text.replace("w1", "w10"), label) for text, label in rows[:48]]
    (root / "validation.csv").write_text("sentence,label\n" + "".join(f"{t},{label}\n" for t, label in validation))
    teacher = save_tiny_teacher(root / "teacher")
    paths = {"train": root / "train.csv", "validation": root / "validation.csv"}
    output_dir = root / "out"
    assert cli_compress(teacher, paths, output_dir, "--do_eval", "--stage_max_steps=4") == 0
    return output_dir, validation


def test_the_reported_accuracy_is_the_saved_folders_with_its_saved_tokenizer(finished_cli_run):
    output_dir, validation = finished_cli_run
    reported = json.loads((output_dir / "eval_results.json").read_text())["eval_accuracy"]
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = load_checkpoint(AutoModelForSequenceClassification, output_dir).eval()
    texts, labels = zip(*validation, strict=True)
    with torch.no_grad():
        logits = model(**tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")).logits
    assert reported == pytest.approx(float((logits.argmax(-1) == torch.tensor(labels)).float().mean()), abs=1e-9)
    history = json.loads((output_dir / "rmt_kd_history.json").read_text())
    assert history["final"]["eval_accuracy"] == reported  # what the model card shows
    assert history["vocabulary"]["kept_size"] < history["vocabulary"]["teacher_size"]  # the tokenizer was trimmed


def test_the_folder_gets_its_model_card_with_the_spectra(finished_cli_run):
    output_dir, _ = finished_cli_run
    card = (output_dir / "README.md").read_text()
    assert "rmt-kd" in card and "spectra/overview.png" in card
    assert (output_dir / "spectra" / "overview.png").exists()


LOAD_TOKENIZER = """
import sys
if sys.argv[2] == "without the package":
    sys.modules["rmt_kd_hf"] = None  # not importable: only transformers reads the folder
    trust = dict(trust_remote_code=False)
else:
    import rmt_kd_hf  # noqa: F401
    trust = {}
from transformers import AutoTokenizer
print(len(AutoTokenizer.from_pretrained(sys.argv[1], **trust)))
"""


@pytest.mark.parametrize("where", ["with the package", "without the package"])
def test_the_saved_tokenizer_loads_without_a_prompt(finished_cli_run, where):
    output_dir, _ = finished_cli_run
    result = subprocess.run(
        [sys.executable, "-c", LOAD_TOKENIZER, str(output_dir), where],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        stdin=subprocess.DEVNULL,  # a prompt would print its [y/N] and read EOF
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[y/N]" not in result.stdout + result.stderr
    assert int(result.stdout.split()[-1]) == json.loads((output_dir / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize(
    ("rows", "steps", "fraction"),
    [(600, 1_800, 1.0), (200, 600, 1.0), (2_000, 6_000, 0.4), (9_000, 6_000, 0.1), (8, 30, 1.0)],
)
def test_the_command_lines_small_data_defaults_follow_the_training_rows(rows, steps, fraction, tmp_path):
    from rmt_kd_hf import RMTKDConfig
    from rmt_kd_hf.text_classification import apply_command_line_defaults

    args = RMTKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, use_cpu=True, report_to="none")
    apply_command_line_defaults(args, ["--train_file=x.csv"], rows)
    assert (args.target_metric_drop, args.stage_max_steps) == (0.01, steps)
    assert args.calibration_fraction == pytest.approx(fraction)
    given = RMTKDConfig(output_dir=str(tmp_path), calibration_fraction=0.2, stage_max_steps=7, max_metric_drop=0.02)
    apply_command_line_defaults(
        given, ["--calibration_fraction=0.2", "--stage_max_steps=7", "--max_metric_drop=0.02"], rows
    )
    assert (given.calibration_fraction, given.stage_max_steps, given.target_metric_drop) == (0.2, 7, None)
