import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from rmt_kd_hf import compress_model
from rmt_kd_hf.checkpoint import save_compressed
from rmt_kd_hf.filenames import REPORT_FILENAME

from .conftest import logits_of, tiny_bert_config


class ExplodingTokenizer:
    def save_pretrained(self, directory):
        with open(os.path.join(directory, "tokenizer.json"), "w") as file:
            file.write("{")  # half-written
        raise OSError("disk full")


@pytest.fixture
def student_and_report(batches):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    return compress_model(teacher, batches, progress=False)


def test_save_compressed_writes_model_and_report(student_and_report, batches, tmp_path):
    student, report = student_and_report
    output_dir = save_compressed(student, tmp_path / "out", report=report)
    assert {"config.json", "model.safetensors", REPORT_FILENAME} <= set(os.listdir(output_dir))
    reloaded = AutoModelForSequenceClassification.from_pretrained(output_dir)
    assert torch.equal(logits_of(reloaded, batches[0]), logits_of(student, batches[0]))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no staging left behind


def test_a_failed_save_leaves_nothing_behind(student_and_report, tmp_path):
    student, report = student_and_report
    with pytest.raises(OSError, match="disk full"):
        save_compressed(student, tmp_path / "out", tokenizer=ExplodingTokenizer(), report=report)
    assert os.listdir(tmp_path) == []


def test_existing_directories_are_not_clobbered(student_and_report, tmp_path):
    student, _ = student_and_report
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_compressed(student, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_optimizer_and_rng_states_round_trip_without_pickles(tmp_path):
    import random

    import numpy as np

    from rmt_kd_hf.checkpoint import load_rng_state, load_state_dict_file, save_rng_state, save_state_dict_file

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    save_state_dict_file(optimizer.state_dict(), tmp_path, "optimizer")
    restored = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=0.5)
    restored.load_state_dict(load_state_dict_file(tmp_path, "optimizer"))
    assert restored.param_groups[0]["lr"] == 1e-3 and tuple(restored.param_groups[0]["betas"]) == (0.8, 0.99)
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(restored.state_dict()["state"][index][key], value)

    save_rng_state(tmp_path / "rng.safetensors")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    load_rng_state(tmp_path / "rng.safetensors")
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert sorted(os.listdir(tmp_path)) == ["optimizer.json", "optimizer.safetensors", "rng.safetensors"]


def test_damaged_checkpoints_fail_with_a_clear_message(student_and_report, tmp_path):
    from rmt_kd_hf.checkpoint import check_checkpoint, load_checkpoint

    student, _ = student_and_report
    good = save_compressed(student, tmp_path / "good")
    assert check_checkpoint(good) == ["model.safetensors"]

    truncated = save_compressed(student, tmp_path / "truncated")
    weights = os.path.join(truncated, "model.safetensors")
    with open(weights, "r+b") as file:
        file.truncate(os.path.getsize(weights) - 100)
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupted.*Re-download"):
        load_checkpoint(AutoModelForSequenceClassification, truncated)

    garbage = save_compressed(student, tmp_path / "garbage")
    with open(os.path.join(garbage, "model.safetensors"), "wb") as file:
        file.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        check_checkpoint(garbage)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(open(os.path.join(good, "config.json")).read())
    torch.save(student.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights \(found pytorch_model\.bin: pickle"):
        load_checkpoint(AutoModelForSequenceClassification, pickled)

    half_written = save_compressed(student, tmp_path / "half")
    os.remove(os.path.join(half_written, "config.json"))
    with pytest.raises(ValueError, match="no config.json: it is incomplete"):
        check_checkpoint(half_written)
