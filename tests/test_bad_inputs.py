"""Bad input: each case fails with a message that names the problem and its fix, and writes nothing."""

import json
import os
import re
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForMaskedLM, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from rmt_kd_hf.checkpoint import (
    MANIFEST_FILENAME,
    check_checkpoint,
    load_checkpoint,
    non_finite_tensors,
    save_compressed,
)
from rmt_kd_hf.cli import main as cli_main

from .conftest import cli_compress, make_trainer, save_tiny_teacher, tiny_bert_config


def snapshot(root) -> set[str]:
    return {os.path.relpath(os.path.join(folder, name), root) for folder, _, names in os.walk(root) for name in names}


@pytest.fixture
def untouched(tmp_path):
    """Asserts, after the test, that no file appeared under tmp_path other than the ones the test set up."""
    before = {"value": None}

    def freeze():
        before["value"] = snapshot(tmp_path)

    yield freeze
    assert snapshot(tmp_path) == before["value"], "a failed run wrote files"


def test_unsupported_architectures(tmp_path, untouched):
    untouched()
    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, num_labels=2))
    with pytest.raises(
        ValueError, match=r"no surgery for GPT2ForSequenceClassification\. Supported: the encoders BERT, RoBERTa"
    ):
        make_trainer(tmp_path, model=gpt2)
    with pytest.raises(ValueError, match="no surgery for BertForMaskedLM"):
        make_trainer(tmp_path, model=BertForMaskedLM(tiny_bert_config()))


def test_empty_calibration_set(tmp_path, untouched):
    untouched()
    trainer = make_trainer(tmp_path)
    trainer.train_dataset = trainer.train_dataset.select([])
    with pytest.raises(ValueError, match="train_dataset is empty: calibration and distillation need training rows"):
        trainer.compress()


def test_too_small_calibration_set_warns(tmp_path, caplog):
    trainer = make_trainer(tmp_path, calibration_max_samples=2, stage_max_steps=1, max_metric_drop=1.0)
    with caplog.at_level("WARNING"):
        trainer.compress()
    assert "24 calibration samples for 48 dimensions (n < d)" in caplog.text


def test_nan_activations(tmp_path, untouched):
    untouched()
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    with torch.no_grad():  # finite weights (non-finite ones are refused earlier) whose products overflow to inf
        model.bert.encoder.layer[0].intermediate.dense.weight[0, 0] = 3e38
    trainer = make_trainer(tmp_path, model=model)
    with pytest.raises(ValueError, match=r"non-finite activations in .*NaN/inf; check the model/inputs"):
        trainer.compress()


def test_every_direction_below_the_edge(tmp_path, untouched):
    untouched()
    trainer = make_trainer(tmp_path, sigma_quantile=0.999, mp_refine=False)
    with pytest.raises(ValueError, match=r"No eigenvalue lies above the Marchenko–Pastur edge at .*k = 0.*lower "):
        trainer.compress()


def test_unreachable_target(tmp_path, untouched):
    untouched()
    trainer = make_trainer(tmp_path, target_parameter_ratio=0.01)
    with pytest.raises(ValueError, match="target_parameter_ratio=0.01 cannot be met.*Raise the target"):
        trainer.compress()


def test_mismatched_tokenizer(tmp_path, untouched):
    untouched()

    class BertBaseSizedTokenizer:
        def __len__(self):
            return 30522

    trainer = make_trainer(tmp_path)
    trainer.processing_class = BertBaseSizedTokenizer()
    with pytest.raises(ValueError, match="not the model's tokenizer. Pass the tokenizer saved with the teacher"):
        trainer.compress()


def test_labels_outside_the_head(tmp_path, untouched):
    untouched()
    trainer = make_trainer(tmp_path)
    trainer.train_dataset = trainer.train_dataset.map(lambda row: {"labels": 5})
    with pytest.raises(ValueError, match=r"labels span 5..5 but the classification head has 2 outputs: map"):
        trainer.compress()


def test_unwritable_output_directory(tmp_path, untouched):
    (tmp_path / "a_file").write_text("")
    untouched()
    trainer = make_trainer(tmp_path)
    trainer.args.output_dir = str(tmp_path / "a_file" / "out")
    with pytest.raises(PermissionError, match="Cannot write into output_dir=.*choose a writable one"):
        trainer.compress()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed one-stage run: its stage checkpoint is the raw material of the damaged-checkpoint cases."""
    tmp_path = tmp_path_factory.mktemp("finished")
    trainer = make_trainer(tmp_path, stage_max_steps=1, max_metric_drop=1.0)
    trainer.compress()
    return tmp_path / "out" / "checkpoint-stage-0"


def resume_from(tmp_path, checkpoint, **overrides):
    trainer = make_trainer(tmp_path, stage_max_steps=1, max_metric_drop=1.0, **overrides)
    trainer.compress(resume_from_checkpoint=str(checkpoint))


def test_truncated_checkpoint(finished_run, tmp_path, untouched):
    damaged = shutil.copytree(finished_run, tmp_path / "damaged")
    with open(damaged / "model.safetensors", "r+b") as file:
        file.truncate(os.path.getsize(damaged / "model.safetensors") // 2)
    untouched()
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupted.*resume from an earlier"):
        resume_from(tmp_path, damaged)


def test_checkpoint_from_a_newer_format_version(finished_run, tmp_path, untouched):
    newer = shutil.copytree(finished_run, tmp_path / "newer")
    config = json.loads((newer / "config.json").read_text())
    config["rmt_kd_format_version"] = 99
    (newer / "config.json").write_text(json.dumps(config))
    untouched()
    with pytest.raises(ValueError, match=r"format version 99, newer than .*upgrade rmt-kd-hf"):
        resume_from(tmp_path, newer)


def test_resume_with_other_settings_or_another_teacher(finished_run, tmp_path, untouched):
    untouched()
    with pytest.raises(ValueError, match=r"different settings \(sigma_quantile: 0.5 -> 0.3\).*fresh output_dir"):
        resume_from(tmp_path, finished_run, sigma_quantile=0.3)
    other_teacher = BertForSequenceClassification(tiny_bert_config(num_labels=2, hidden_act="relu"))
    with pytest.raises(ValueError, match="different teacher.*pass the teacher the run started from"):
        resume_from(tmp_path, finished_run, model=other_teacher)
    with pytest.raises(ValueError, match="is not an RMT-KD stage checkpoint.*or True for the latest"):
        resume_from(tmp_path, tmp_path)


@pytest.fixture
def csv_files(tmp_path):
    rows = pd.DataFrame({"sentence": ["good film", "bad film", "fine", "awful"] * 4, "label": [1, 0, 1, 0] * 4})
    paths = {split: tmp_path / f"{split}.csv" for split in ("train", "validation")}
    for path in paths.values():
        rows.to_csv(path, index=False)
    return paths


def test_cli_refuses_a_truncated_teacher(finished_run, csv_files, tmp_path, capsys, untouched):
    teacher = tmp_path / "teacher"
    BertForSequenceClassification(tiny_bert_config(num_labels=2)).save_pretrained(teacher)
    with open(teacher / "model.safetensors", "r+b") as file:
        file.truncate(1000)
    untouched()
    assert cli_compress(teacher, csv_files, tmp_path / "out") == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("rmt-kd compress: error: ") and "is truncated or corrupted" in last_line


def test_cli_never_unpickles_a_teacher(csv_files, tmp_path, capsys, untouched):
    teacher = tmp_path / "pickled"
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    model.config.save_pretrained(teacher)
    torch.save(model.state_dict(), teacher / "pytorch_model.bin")
    untouched()
    assert cli_compress(teacher, csv_files, tmp_path / "out") == 2
    assert "found pytorch_model.bin: pickle files, which rmt-kd never loads" in capsys.readouterr().err


# Out-of-range options: (field, value, what the message says). RMTKDConfig checks them before any work.
BAD_CONFIG_VALUES = [
    ("sigma_quantile", 0.0, "sigma_quantile must be in (0, 1)"),
    ("sigma_quantile", 1.0, "sigma_quantile must be in (0, 1)"),
    ("sigma_quantile", float("nan"), "sigma_quantile must be in (0, 1)"),
    ("calibration_fraction", 0.0, "calibration_fraction must be in (0, 1]"),
    ("calibration_max_samples", 0, "calibration_max_samples must be >= 1 or None"),
    ("distillation_temperature", float("inf"), "distillation_temperature must be finite and > 0"),
    ("distillation_temperature", 0.0, "distillation_temperature must be finite and > 0"),
    ("hidden_distillation_weight", float("inf"), "hidden_distillation_weight must be finite and >= 0"),
    ("hidden_distillation_weight", -1.0, "hidden_distillation_weight must be finite and >= 0"),
    ("teacher_output_cache_mb", -1.0, "teacher_output_cache_mb must be finite and >= 0"),
    ("teacher_output_cache_mb", float("inf"), "teacher_output_cache_mb must be finite and >= 0"),
    ("max_metric_drop", float("inf"), "max_metric_drop must be finite and >= 0"),
    ("max_metric_drop", -0.1, "max_metric_drop must be finite and >= 0"),
    ("max_stages", 0, "max_stages must be >= 1 or None"),
    ("stage_max_steps", -1, "stage_max_steps must be >= 0"),
    ("stage_retries", -1, "stage_retries must be >= 0"),
    ("target_metric_drop", -0.01, "target_metric_drop must be finite and >= 0, or None"),
    ("target_metric_drop", float("inf"), "target_metric_drop must be finite and >= 0, or None"),
    ("screening_fraction", 1.0, "screening_fraction must be in [0, 1)"),
    ("screening_fraction", -0.1, "screening_fraction must be in [0, 1)"),
    ("screening_margin", -0.05, "screening_margin must be finite and >= 0"),
    ("min_width", 0, "min_width must be >= 1"),
    ("width_multiple", 0, "width_multiple must be >= 1"),
    ("target_parameter_ratio", 1.0, "target_parameter_ratio must be in (0, 1) or None"),
    ("target_latency_ratio", 0.0, "target_latency_ratio must be in (0, 1) or None"),
    ("latency_batch_size", 0, "latency_batch_size must be >= 1"),
    ("latency_sequence_length", 0, "latency_sequence_length must be >= 1"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_CONFIG_VALUES, ids=lambda v: str(v)[:24])
def test_out_of_range_options_are_refused_before_any_work(tmp_path, untouched, field, value, message):
    from rmt_kd_hf import RMTKDConfig

    untouched()
    with pytest.raises(ValueError, match=re.escape(message) + f".*got {re.escape(repr(value))}"):
        RMTKDConfig(output_dir=str(tmp_path / "out"), **{field: value})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sigma_quantile": 2}, "sigma_quantile must be in (0, 1), got 2"),
        ({"sigma_quantile": -1}, "sigma_quantile must be in (0, 1), got -1"),
        ({"sigma_quantile": 0}, "sigma_quantile must be in (0, 1), got 0"),
        ({"sigma_quantile": 1}, "sigma_quantile must be in (0, 1), got 1"),
        ({"min_width": -1}, "min_width must be an integer >= 0, got -1"),
        ({"max_batches": 0}, "max_batches must be >= 1 or None, got 0"),
        ({"quantile_shifts": {"ffn": 1.5}}, "quantile_shifts['ffn'] must be in (-1, 1), got 1.5"),
        ({"sigma_quantile": 0.999, "refine": False}, "No eigenvalue lies above the Marchenko–Pastur edge at"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_compress_model_refuses_out_of_range_arguments(batches, arguments, message):
    from rmt_kd_hf import compress_model

    torch.manual_seed(0)  # a fixed teacher: an unseeded one sometimes keeps an eigenvalue above λ+ at q = 0.999
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    reference = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(message)):
        compress_model(teacher, batches, progress=False, **arguments)
    assert all(torch.equal(tensor, reference[name]) for name, tensor in teacher.state_dict().items())


def folder_digest(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(snapshot(folder))}


@pytest.mark.parametrize("where", ["the teacher's folder", "inside it"])
def test_trainer_never_writes_over_the_teacher(tmp_path, where):
    teacher_dir = tmp_path / "teacher"
    BertForSequenceClassification(tiny_bert_config(num_labels=2)).save_pretrained(teacher_dir)
    before = folder_digest(teacher_dir)
    output_dir = teacher_dir if where == "the teacher's folder" else teacher_dir / "compressed"
    teacher = BertForSequenceClassification.from_pretrained(teacher_dir)
    relation = "is" if where == "the teacher's folder" else "lies inside"
    with pytest.raises(ValueError, match=rf"{relation} the teacher's folder .*Choose an output_dir outside it"):
        make_trainer(tmp_path, model=teacher, output_dir=str(output_dir), stage_max_steps=1)
    assert folder_digest(teacher_dir) == before
    trainer = make_trainer(tmp_path, model=teacher, stage_max_steps=1)
    trainer.args.output_dir = str(output_dir)  # changed after construction: compress() checks again
    with pytest.raises(ValueError, match=rf"{relation} the teacher's folder"):
        trainer.compress()
    assert folder_digest(teacher_dir) == before


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_cli_never_writes_over_the_teacher(csv_files, tmp_path, capsys, where):
    teacher_dir = tmp_path / "models" / "teacher"
    BertForSequenceClassification(tiny_bert_config(num_labels=2)).save_pretrained(teacher_dir)
    before = folder_digest(teacher_dir)
    output_dir = {"same": teacher_dir, "inside": teacher_dir / "out", "contains": tmp_path / "models"}[where]
    capsys.readouterr()  # the setup's progress bars
    assert cli_compress(teacher_dir, csv_files, output_dir) == 2
    relation = {"same": "is", "inside": "lies inside", "contains": "contains"}[where]
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{relation} the teacher's folder" in error[0]
    assert folder_digest(teacher_dir) == before
    assert sorted(os.listdir(tmp_path / "models")) == ["teacher"]


def test_a_teacher_with_non_finite_weights_is_refused(tmp_path, untouched):
    teacher = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    with torch.no_grad():
        teacher.bert.encoder.layer[1].intermediate.dense.weight[0, 0] = float("nan")
    trainer = make_trainer(tmp_path, model=teacher, stage_max_steps=1)
    untouched()
    with pytest.raises(ValueError, match=r"non-finite weights \(bert\.encoder\.layer\.1\.intermediate\.dense\.weight"):
        trainer.compress()


def test_a_stage_that_diverges_is_rolled_back_whatever_the_floor(tmp_path):
    trainer = make_trainer(tmp_path, stage_max_steps=3, max_metric_drop=1.0, learning_rate=1e30)
    model = trainer.compress()
    status = trainer.compression_history["stages"][0]["status"]
    assert status.startswith("rolled back: non-finite weights"), status
    assert non_finite_tensors(model) == []  # the model before the stage, saved


# -- the checked loader: every checkpoint the project reads --------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A classifier saved by save_compressed (so with its SHA-256 manifest)."""
    torch.manual_seed(0)
    return save_compressed(BertForSequenceClassification(tiny_bert_config(num_labels=2)), tmp_path / "saved")


def test_one_flipped_bit_is_refused(saved):
    path = os.path.join(saved, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-7] ^= 0x40  # an exponent bit of the last weight: loads today as a huge value
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its SHA-256 in rmt_kd_manifest\.json"):
        load_checkpoint(BertForSequenceClassification, saved)


def test_a_weights_file_missing_or_foreign_to_the_manifest_is_refused(saved):
    manifest_path = os.path.join(saved, MANIFEST_FILENAME)
    manifest = json.loads(open(manifest_path).read())
    manifest["files"]["model-00002-of-00002.safetensors"] = {"bytes": 1, "sha256": "0"}
    open(manifest_path, "w").write(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors missing .*Copy the whole folder"):
        check_checkpoint(saved)
    del manifest["files"]["model-00002-of-00002.safetensors"]
    open(manifest_path, "w").write(json.dumps(manifest))
    shutil.copy(os.path.join(saved, "model.safetensors"), os.path.join(saved, "extra.safetensors"))
    with pytest.raises(ValueError, match=r"extra\.safetensors not part of the save"):
        check_checkpoint(saved)


def test_a_missing_tensor_is_refused_not_initialised_at_random(saved):
    path = os.path.join(saved, "model.safetensors")
    tensors = load_file(path)
    del tensors["bert.encoder.layer.0.attention.self.query.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    os.remove(os.path.join(saved, MANIFEST_FILENAME))  # as a folder copied by hand would be
    with pytest.raises(ValueError, match=r"lacks 1 tensors .*query\.weight\): they would be random"):
        load_checkpoint(BertForSequenceClassification, saved)


def test_a_missing_classifier_passes_only_where_a_new_head_is_the_point(saved):
    path = os.path.join(saved, "model.safetensors")
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("classifier")}, path)
    os.remove(os.path.join(saved, MANIFEST_FILENAME))
    with pytest.raises(ValueError, match=r"lacks 2 tensors .*classifier\.bias, classifier\.weight"):
        load_checkpoint(BertForSequenceClassification, saved)
    _, initialised = load_checkpoint(
        BertForSequenceClassification, saved, allow_new_head=True, output_loading_info=True
    )
    assert initialised == ["classifier.bias", "classifier.weight"]


def test_widths_in_the_config_that_differ_from_the_tensors_are_refused(saved):
    config_path = os.path.join(saved, "config.json")
    config = json.loads(open(config_path).read())
    config["intermediate_size"] = 64
    open(config_path, "w").write(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensors do not have the shapes its config\.json gives .*intermediate"):
        load_checkpoint(BertForSequenceClassification, saved)


@pytest.mark.parametrize("command", ["bench", "report"])
def test_bench_and_report_never_unpickle(tmp_path, capsys, command):
    pickled = tmp_path / "pickled"
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    argv = {"bench": ["bench", str(pickled), str(pickled)], "report": ["report", str(pickled), "--data", "x.csv"]}
    (tmp_path / "x.csv").write_text("sentence\nw5 w6\n")
    assert cli_main(argv[command]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "found pytorch_model.bin: pickle files, which rmt-kd never loads" in error[0]


# -- output folders ---------------------------------------------------------------------------------------------


def test_a_finished_model_in_output_dir_is_refused_unless_overwritten(tmp_path):
    first = make_trainer(tmp_path, stage_max_steps=1, max_metric_drop=1.0, measure_latency=False)
    first.compress()
    before = folder_digest(tmp_path / "out")
    second = make_trainer(tmp_path, stage_max_steps=1, max_metric_drop=1.0, measure_latency=False)
    with pytest.raises(ValueError, match=r"already holds a saved model: choose a new output_dir, or pass overwrite"):
        second.compress()
    assert folder_digest(tmp_path / "out") == before
    again = make_trainer(tmp_path, stage_max_steps=1, max_metric_drop=1.0, overwrite_output_dir=True)
    again.compress()  # replaces it, and resuming the finished run is allowed too
    make_trainer(tmp_path, stage_max_steps=1, max_metric_drop=1.0, measure_latency=False).compress(
        resume_from_checkpoint=True
    )


def test_a_multi_label_teacher_is_refused(tmp_path, untouched):
    teacher = BertForSequenceClassification(tiny_bert_config(num_labels=2, problem_type="multi_label_classification"))
    trainer = make_trainer(tmp_path, model=teacher)
    untouched()
    with pytest.raises(ValueError, match="multi-label classifier .*not support yet: compress a single-label"):
        trainer.compress()


def test_cli_refuses_a_teacher_folder_without_its_tokenizer(csv_files, tmp_path, capsys):
    teacher = save_tiny_teacher(tmp_path / "teacher", tokenizer=False)
    (tmp_path / "train.csv").write_text("sentence,label\n" + "w5 w6 w7,1\nw8 w9,0\n" * 8)
    paths = {"train": tmp_path / "train.csv", "validation": tmp_path / "train.csv"}
    capsys.readouterr()
    assert cli_compress(teacher, paths, tmp_path / "out") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "of the training tokens are the unknown token" in error and "--tokenizer_name" in error
    assert not (tmp_path / "out" / "config.json").exists()


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["export", str(tmp_path / "missing"), "--output", str(tmp_path / "onnx")]
    assert cli_main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is not a directory" in error and "Traceback" not in error
    assert cli_main([*argv, "--debug"]) == 2
    error = capsys.readouterr().err
    assert "Traceback (most recent call last)" in error and error.strip().splitlines()[-1].startswith("rmt-kd export")


def test_cli_output_dir_that_cannot_be_created_is_one_line(csv_files, tmp_path, capsys):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    (tmp_path / "a_file").write_text("")
    capsys.readouterr()
    assert cli_compress(teacher, csv_files, tmp_path / "a_file" / "out") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("rmt-kd compress: error: ") and "a_file" in error and "Traceback" not in error


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--teacher_max_epochs=0", "teacher_max_epochs must be finite and > 0"),
        ("--teacher_early_stopping_patience=-1", "teacher_early_stopping_patience must be >= 0"),
    ],
)
def test_out_of_range_teacher_options_are_refused(tmp_path, option, message):
    from rmt_kd_hf.text_classification import parse_arguments

    with pytest.raises(ValueError, match=message):
        parse_arguments([f"--output_dir={tmp_path / 'out'}", option])
    assert not (tmp_path / "out").exists()
