"""Two CPU processes (torchrun, gloo) give the one-process covariances, widths and a DDP-trained model."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from rmt_kd_hf.filenames import HISTORY_FILENAME

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(output_dir: str, num_processes: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes)]
    command = [*(launcher if num_processes > 1 else [sys.executable]), "-m", "tests.compress_run"]
    command += ["--output_dir", output_dir, "--schedule", "one_shot", "--stage_max_steps", "3"]
    command += ["--covariances", os.path.join(output_dir, "covariances.safetensors")]
    os.makedirs(output_dir)
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_reduce_to_the_one_process_covariances(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    launch(one, 1)
    launch(two, 2)
    covariances_one = load_file(os.path.join(one, "covariances.safetensors"))
    covariances_two = load_file(os.path.join(two, "covariances.safetensors"))
    assert covariances_one.keys() == covariances_two.keys() and len(covariances_one) == 24
    for name, covariance in covariances_one.items():
        if name.endswith(".num_samples"):
            assert int(covariance) == int(covariances_two[name]) > 0, name  # no padded duplicate rows
        else:
            assert (covariance - covariances_two[name]).abs().max() <= 1e-6, name
    histories = []
    for directory in (one, two):
        with open(os.path.join(directory, HISTORY_FILENAME)) as file:
            histories.append(json.load(file))
    assert histories[0]["final"]["widths"] == histories[1]["final"]["widths"]
    assert histories[1]["stages"][0]["status"] == "accepted"
    # the DDP-trained model was written once, completely, and loads
    weights = load_file(os.path.join(two, "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not [name for name in os.listdir(two) if name.startswith(".")]
