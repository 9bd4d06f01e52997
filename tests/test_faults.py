"""Faults: a run killed in the middle of its final save, two runs into one folder, a full disk. Each ends in a
folder that holds the old model, the new one, or nothing that loads, and in one line naming the problem."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from rmt_kd_hf.checkpoint import OutputFolderBusyError, check_checkpoint, load_checkpoint, save_compressed

from .conftest import cli_compress, make_trainer, save_tiny_teacher, tiny_bert_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Saves a new model over a finished one (as RMTKDTrainer's final save does: merged into the existing folder) and
# SIGKILLs itself before the KILL_AT-th file operation of the merge; prints the number of operations otherwise.
KILL_DURING_FINAL_SAVE = """
import os, signal, sys
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification
from rmt_kd_hf import checkpoint
from tests.conftest import tiny_bert_config

output_dir, kill_at = sys.argv[1], int(sys.argv[2])
torch.manual_seed(1)
model = BertForSequenceClassification(tiny_bert_config(num_labels=2))
operations = []

def counted(function):
    def wrapper(*args, **kwargs):
        if len(operations) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        operations.append(args[0])
        return function(*args, **kwargs)
    return wrapper

merge = checkpoint._merge_files
def killable_merge(source, destination):
    os.remove, os.replace = counted(os.remove), counted(os.replace)
    merge(source, destination)
checkpoint._merge_files = killable_merge
checkpoint.save_compressed(model, output_dir, merge_into_existing=True, json_files={"run.json": {"run": "new"}})
print(len(operations))
"""


def run_python(script: str, *args: str, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def state_of(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_a_kill_at_any_step_of_the_final_save_leaves_the_old_model_the_new_one_or_an_incomplete_folder(tmp_path):
    torch.manual_seed(0)
    old_model = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    finished = save_compressed(old_model, tmp_path / "finished", json_files={"run.json": {"run": "old"}})
    torch.manual_seed(1)
    new_state = state_of(BertForSequenceClassification(tiny_bert_config(num_labels=2)))
    old_state = state_of(old_model)

    complete = run_python(KILL_DURING_FINAL_SAVE, shutil.copytree(finished, tmp_path / "complete"), "1000")
    assert complete.returncode == 0, complete.stderr[-3000:]
    num_operations = int(complete.stdout.split()[-1])
    outcomes = []
    for kill_at in range(num_operations):
        folder = shutil.copytree(finished, tmp_path / f"killed-{kill_at}")
        killed = run_python(KILL_DURING_FINAL_SAVE, folder, str(kill_at))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        try:
            loaded = state_of(load_checkpoint(BertForSequenceClassification, folder))
        except ValueError as error:
            assert "has no config.json: it is incomplete" in str(error)
            outcomes.append("incomplete")
            continue
        run = json.loads((folder / "run.json").read_text())["run"]
        expected = new_state if run == "new" else old_state
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[name], expected[name]) for name in expected), f"mixed folder at {kill_at}"
        outcomes.append(run)
    assert outcomes[0] == "old" and "incomplete" in outcomes, outcomes  # every step was reached
    assert outcomes[-1] in ("incomplete", "new"), outcomes


HOLD_THE_LOCK = """
import sys, time
from rmt_kd_hf.checkpoint import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


@pytest.fixture
def csv_paths(tmp_path):
    text = "sentence,label\n" + "w5 w6 w7,1\nw8 w9,0\nw10 w11,1\nw12,0\n" * 4
    (tmp_path / "data.csv").write_text(text)
    return {"train": tmp_path / "data.csv", "validation": tmp_path / "data.csv"}


def test_a_second_run_into_a_folder_in_use_refuses_and_the_lock_dies_with_its_holder(tmp_path, csv_paths, capsys):
    output_dir = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(output_dir)],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        teacher = save_tiny_teacher(tmp_path / "teacher")
        capsys.readouterr()
        assert cli_compress(teacher, csv_paths, output_dir) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]  # after the data loading's progress bars
        assert error.startswith("rmt-kd compress: error: Another run is writing into")
        assert "choose another output_dir" in error
        trainer = make_trainer(tmp_path, output_dir=str(output_dir), stage_max_steps=1)
        with pytest.raises(OutputFolderBusyError):
            trainer.compress()
        assert sorted(os.listdir(output_dir)) == [".rmt_kd.lock"]  # nothing else was written
    finally:
        holder.send_signal(signal.SIGKILL)  # however the holder dies, the kernel releases its lock
        holder.wait()
    assert cli_compress(teacher, csv_paths, output_dir) == 0
    assert (output_dir / "config.json").exists() and not (output_dir / ".rmt_kd.lock").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 200 kB tmpfs where the test may mount one (root in a container that allows it), else ``None``."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = (
        os.geteuid() == 0
        and shutil.which("mount") is not None
        and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount_point)]).returncode == 0
    )
    yield mount_point if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def assert_nothing_half_written(root, output_dir):
    assert not (output_dir / "config.json").exists(), "the output folder looks like a complete model"
    assert not list(root.rglob("*.partial-*")), "a staging folder was left behind"


def test_a_full_disk_is_one_line_and_nothing_half_written(tmp_path, csv_paths, small_disk, capsys):
    if small_disk is None:
        pytest.skip("cannot mount a tmpfs here; the simulated full disk below covers the final save")
    teacher = save_tiny_teacher(tmp_path / "teacher")
    capsys.readouterr()
    assert cli_compress(teacher, csv_paths, small_disk / "out") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("rmt-kd compress: error: no space left on the disk") and "free some space" in error
    # where the disk filled (a stage checkpoint, the model, its model card) depends on the sizes; whatever was
    # written is whole: no staging folder, and a config.json only beside a model that loads, without a half card
    assert not list(small_disk.rglob("*.partial-*")) and not list(small_disk.rglob(".model-card-*"))
    for config in small_disk.rglob("config.json"):
        load_checkpoint(AutoModelForSequenceClassification, config.parent)
    assert not list(small_disk.rglob("spectra"))


def test_a_disk_that_fills_at_the_final_save_is_one_line_and_nothing_half_written(
    tmp_path, csv_paths, capsys, monkeypatch
):
    import transformers.modeling_utils

    save = transformers.modeling_utils.safe_save_file
    saves = []

    def fills_at_the_second_save(*args, **kwargs):  # the stage checkpoint fits; the final save does not
        saves.append(args[1])
        if len(saves) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save(*args, **kwargs)

    teacher = save_tiny_teacher(tmp_path / "teacher")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fills_at_the_second_save)
    capsys.readouterr()
    assert cli_compress(teacher, csv_paths, tmp_path / "out") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("rmt-kd compress: error: no space left on the disk while writing")
    assert len(saves) == 2 and "checkpoint-stage-0" in saves[0]
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-stage-0"]  # the stage checkpoint, complete
    check_checkpoint(tmp_path / "out" / "checkpoint-stage-0")
    assert_nothing_half_written(tmp_path, tmp_path / "out")
