"""Stage checkpoints, kill-and-resume, determinism."""

import argparse
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rmt_kd_hf.filenames import HISTORY_FILENAME, RESUME_STATE_FILENAME

from .compress_run import build_trainer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.compress_run", *arguments],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def in_process_run(output_dir, **overrides):
    arguments = dict(output_dir=str(output_dir), schedule="per_layer", stage_max_steps=4, kill_stage=None)
    arguments.update(overrides)
    trainer = build_trainer(argparse.Namespace(**arguments, kill_step=None))
    trainer.compress()
    return trainer


def final_state(directory):
    with open(os.path.join(directory, HISTORY_FILENAME)) as file:
        history = json.load(file)
    return history, load_file(os.path.join(directory, "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted") / "out"
    in_process_run(directory)
    return final_state(directory)


def test_killed_run_resumes_to_the_same_widths_and_weights(uninterrupted, tmp_path):
    output_dir = str(tmp_path / "out")
    killed = run_script("--output_dir", output_dir, "--kill_stage", "1", "--kill_step", "2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # stage 0 was checkpointed; the final model was not written, so the directory does not look complete. The
    # killed run's lock file stays, released by the kernel: the resumed run takes it
    assert sorted(os.listdir(output_dir)) == [".rmt_kd.lock", "checkpoint-stage-0"]
    with open(os.path.join(output_dir, "checkpoint-stage-0", RESUME_STATE_FILENAME)) as file:
        assert json.load(file)["next_stage"] == 1
    with open(os.path.join(output_dir, "checkpoint-stage-0", HISTORY_FILENAME)) as file:
        stage_0_record = json.load(file)["stages"][0]

    resumed = run_script("--output_dir", output_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history, weights = final_state(output_dir)
    assert history["stages"][0] == stage_0_record  # taken from the checkpoint, not run again
    reference_history, reference_weights = uninterrupted
    assert history["final"]["widths"] == reference_history["final"]["widths"]
    assert [stage["status"] for stage in history["stages"]] == ["accepted"] * 3
    assert weights.keys() == reference_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference_weights[name]), name


def test_same_seed_gives_the_same_widths_and_weights(uninterrupted, tmp_path):
    in_process_run(tmp_path / "again")
    history, weights = final_state(tmp_path / "again")
    reference_history, reference_weights = uninterrupted
    assert history["final"]["widths"] == reference_history["final"]["widths"]
    assert all(torch.equal(weights[name], reference_weights[name]) for name in weights)
    assert [stage["num_parameters"] for stage in history["stages"]] == [
        stage["num_parameters"] for stage in reference_history["stages"]
    ]


def test_a_stage_checkpoint_is_written_after_every_kept_stage(tmp_path):
    trainer = in_process_run(tmp_path / "out", stage_max_steps=1)
    checkpoints = sorted(name for name in os.listdir(tmp_path / "out") if name.startswith("checkpoint-stage-"))
    assert checkpoints == ["checkpoint-stage-0", "checkpoint-stage-1", "checkpoint-stage-2"]
    stage_1 = tmp_path / "out" / "checkpoint-stage-1"
    assert {"config.json", "model.safetensors", HISTORY_FILENAME, RESUME_STATE_FILENAME} <= set(os.listdir(stage_1))
    assert not [name for name in os.listdir(stage_1) if name.endswith((".bin", ".pt", ".pth"))]
    with open(stage_1 / HISTORY_FILENAME) as file:
        assert len(json.load(file)["stages"]) == 2
    # resuming a finished run from its last checkpoint has nothing left to do and gives the same model
    weights = load_file(tmp_path / "out" / "model.safetensors")
    trainer.args.resume_from_checkpoint = str(tmp_path / "out" / "checkpoint-stage-2")
    trainer.model = build_trainer(
        argparse.Namespace(output_dir="unused", schedule="per_layer", stage_max_steps=1, kill_stage=None)
    ).model
    trainer.compress()
    again = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(weights[name], again[name]) for name in weights)
