import json
import re

import torch
from transformers import BertForSequenceClassification

from rmt_kd_hf import compress_model
from rmt_kd_hf.checkpoint import save_compressed
from rmt_kd_hf.cli import main

from .conftest import tiny_bert_config


def test_bench_compares_teacher_and_compressed_in_one_run(batches, tmp_path, capsys):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    student, _ = compress_model(teacher, batches, sigma_quantile=0.75, progress=False)
    save_compressed(student, tmp_path / "compressed")
    output = tmp_path / "bench.json"
    argv = ["bench", str(tmp_path / "teacher"), str(tmp_path / "compressed"), "--batch_sizes", "1", "4"]
    status = main([*argv, "--sequence_length", "16", "--repeats", "2", "--output", str(output)])
    assert status == 0
    result = json.loads(output.read_text())
    assert result["teacher"]["total"] == sum(p.numel() for p in teacher.parameters())
    assert result["compressed"]["total"] == sum(p.numel() for p in student.parameters())
    assert result["parameter_ratio"] < 1 and set(result["speedup"]) == {"1", "4"}
    assert result["compressed"]["safetensors_mb"] < result["teacher"]["safetensors_mb"]
    assert "compressed:" in capsys.readouterr().out


def test_bench_errors_are_one_line(tmp_path, capsys):
    status = main(["bench", str(tmp_path / "missing"), str(tmp_path / "missing"), "--auto_class", "NotAClass"])
    assert status == 2
    assert "is not a transformers AutoModel class" in capsys.readouterr().err


def test_compress_help_lists_every_option_with_its_default(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (
        ("--sigma_quantile", "0.5"),
        ("--compression_schedule", "one_shot"),
        ("--stage_max_steps", "300"),
        ("--distillation_alpha", "0.7"),
        ("--max_seq_length", "128"),
        ("--resume_from_checkpoint", "None"),
    ):
        # the option's own help entry (not the usage line, nor a longer option it prefixes), up to its default
        entry = re.search(rf"(?<![\[\w]){re.escape(option)} \S+ [^\[]*?\(default: ([^)]*)\)", text)
        assert entry is not None and entry.group(1) == default, option
