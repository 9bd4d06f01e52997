import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from rmt_kd_hf import compress_model
from rmt_kd_hf.checkpoint import REPORT_FILENAME, save_compressed

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
