"""ModernBERT (pre-LayerNorm, GeGLU, RoPE, local and global attention) on a tiny random model built from
transformers' ``ModernBertConfig``: exact conversion, compression, re-compression, save/load, ``trust_remote_code``
without the package, ONNX, and the trainer end to end."""

import json

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification

from rmt_kd_hf import compress_model
from rmt_kd_hf.checkpoint import save_compressed
from rmt_kd_hf.export import export_onnx, ort_feed, ort_session
from rmt_kd_hf.surgery import ModernBertSurgery, get_surgery

from ..conftest import (
    cli_compress,
    logits_of,
    logits_without_the_package,
    make_batches,
    make_trainer,
    save_cli_teacher,
    tiny_csv_files,
)

HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "Model")


def modernbert_teacher(head: str = "ForSequenceClassification", num_labels: int = 3, seed: int = 0):
    """A tiny random ``ModernBert<head>``: 3 layers (local, local, global attention with a window of 8 tokens),
    LayerNorms without bias as ModernBERT ships them; weights moved off their initial values."""
    config = transformers.ModernBertConfig(
        vocab_size=120,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        local_attention=8,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        cls_token_id=2,
        sep_token_id=3,
        num_labels=2 if head == "ForQuestionAnswering" else num_labels,
    )
    torch.manual_seed(seed)
    teacher = getattr(transformers, f"ModernBert{head}")(config).eval()
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return teacher


def outputs_of(model, batch) -> torch.Tensor:
    if isinstance(model, transformers.ModernBertModel):  # the stream comes back rotated: compare the head inputs
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return logits_of(model, batch)


@pytest.mark.parametrize("head", HEADS)
def test_keeping_every_direction_reproduces_the_teacher(head, batches):
    teacher = modernbert_teacher(head)
    student, report = compress_model(teacher, batches, keep_all=True, progress=False)
    assert type(student).__name__ == f"RMTModernBert{head}"
    assert set(report.kept_widths) == {"embeddings", "residual", "ffn.0", "ffn.1", "ffn.2"}
    for batch in batches[:3]:  # final_norm lifts the stream back: even the base model's output is the teacher's
        torch.testing.assert_close(outputs_of(student, batch), outputs_of(teacher, batch), atol=1e-5, rtol=0)


def test_compression_cuts_the_stream_and_the_geglu_pairs_and_can_be_repeated(batches):
    teacher = modernbert_teacher()
    student, report = compress_model(teacher, batches, sigma_quantile=0.5, progress=False)
    config = student.config
    assert config.residual_size == report.kept_widths["residual"] < 48
    assert config.intermediate_sizes == [report.kept_widths[f"ffn.{layer}"] for layer in range(3)]
    assert student.model.layers[1].mlp.Wi.out_features == 2 * config.intermediate_sizes[1]  # input and gate halves
    assert report.num_parameters_after < 0.8 * report.num_parameters_before
    again, _ = compress_model(student, batches, keep_all=True, progress=False)
    for batch in batches[:2]:
        torch.testing.assert_close(logits_of(again, batch), logits_of(student, batch), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory):
    batches = make_batches()
    student, _ = compress_model(modernbert_teacher(), batches, sigma_quantile=0.5, progress=False)
    directory = tmp_path_factory.mktemp("rmt_modernbert")
    save_compressed(student, directory)
    return student.eval(), batches, directory


def test_the_saved_model_loads_back_through_the_auto_classes_and_without_the_package(saved_student, tmp_path):
    student, batches, directory = saved_student
    assert AutoConfig.from_pretrained(directory).model_type == "rmt_modernbert"
    loaded = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    assert type(loaded) is type(student)
    torch.testing.assert_close(logits_of(loaded, batches[0]), logits_of(student, batches[0]), atol=0, rtol=0)
    logits = logits_without_the_package(directory, batches[0], tmp_path, type(student).__name__)
    assert torch.equal(logits, logits_of(student, batches[0]))


def test_the_compressed_model_exports_to_onnx(saved_student, tmp_path):
    student, batches, directory = saved_student
    exported = export_onnx(directory, tmp_path / "onnx")
    assert exported.max_abs_difference <= 1e-4
    session = ort_session(exported.onnx_path)
    for batch in batches[:2]:
        logits = session.run(["logits"], ort_feed(session, batch))[0]
        np.testing.assert_allclose(logits, logits_of(student, batch).numpy(), atol=1e-4)


def test_the_trainer_compresses_a_modernbert_classifier_end_to_end(tmp_path):
    trainer = make_trainer(
        tmp_path, model=modernbert_teacher(num_labels=2), stage_max_steps=2, max_metric_drop=1.0, stage_retries=0
    )
    model = trainer.compress()
    history = trainer.compression_history
    assert history["stages"][0]["status"] == "accepted"
    assert history["final"]["num_parameters"] < history["teacher"]["num_parameters"]
    assert history["final"]["widths"]["residual_size"] == model.config.residual_size
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert type(loaded) is type(model)


def test_options_of_the_bert_style_surgery_are_refused_for_modernbert():
    with pytest.raises(ValueError, match=r"\['reduce_attention_heads'\] apply to the BERT-style encoders"):
        get_surgery(modernbert_teacher(), reduce_attention_heads=True)
    assert isinstance(get_surgery(modernbert_teacher(), width_multiple=8), ModernBertSurgery)


def test_the_command_line_compresses_a_modernbert_classifier(tmp_path):
    teacher = save_cli_teacher(modernbert_teacher(num_labels=2), tmp_path / "teacher")
    assert cli_compress(teacher, tiny_csv_files(tmp_path), tmp_path / "out", "--do_eval", "--min_width=4") == 0
    history = json.loads((tmp_path / "out" / "rmt_kd_history.json").read_text())
    assert AutoConfig.from_pretrained(tmp_path / "out").model_type == "rmt_modernbert"
    assert history["final"]["num_parameters"] < history["teacher"]["num_parameters"]
    assert history.get("vocabulary") is None  # only the BERT-style encoders' vocabularies are trimmed
