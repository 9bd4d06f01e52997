import numpy as np
import pytest
import torch
from transformers import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2Config,
    GPT2Model,
)

from rmt_kd_hf import RMTBertForSequenceClassification, compress_model
from rmt_kd_hf.surgery.base import least_squares_compensation
from rmt_kd_hf.surgery.bert import convert_bert_to_rmt

from ..conftest import logits_of, tiny_bert_config

HEADS = [BertModel, BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering]


@pytest.mark.parametrize("teacher_class", HEADS)
def test_keeping_every_direction_reproduces_the_teacher(teacher_class, batches):
    torch.manual_seed(0)
    num_labels = 2 if teacher_class is BertForQuestionAnswering else 3  # QA heads output start/end
    teacher = teacher_class(tiny_bert_config(num_labels=num_labels)).eval()
    student, report = compress_model(teacher, batches, keep_all=True, progress=False)
    assert all(width == report.analyses[name].site.dim for name, width in report.kept_widths.items())
    for batch in batches[:3]:
        torch.testing.assert_close(logits_of(student, batch), logits_of(teacher, batch), atol=1e-5, rtol=0)


def test_identity_conversion_is_exact(batches):
    torch.manual_seed(1)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    converted = convert_bert_to_rmt(teacher)
    assert isinstance(converted, RMTBertForSequenceClassification)
    torch.testing.assert_close(logits_of(converted, batches[0]), logits_of(teacher, batches[0]), atol=1e-6, rtol=0)


def test_compression_cuts_widths_and_parameters(batches):
    torch.manual_seed(2)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    student, report = compress_model(teacher, batches, sigma_quantile=0.75, progress=False)
    config = student.config
    assert config.boundary_sizes == [report.kept_widths[f"boundary.{b}"] for b in range(5)]
    assert config.intermediate_sizes == [report.kept_widths["ffn.0"], report.kept_widths["ffn.1"]]
    assert max(config.boundary_sizes) < 48 and max(config.intermediate_sizes) < 96
    assert report.num_parameters_after < 0.9 * report.num_parameters_before
    assert logits_of(student, batches[0]).shape == (8, 3)
    # Each kept width is exactly the number of eigenvalues above the fitted edge.
    for analysis in report.analyses.values():
        assert analysis.kept_width == max(1, int((analysis.eigenvalues > analysis.fit.lambda_plus).sum()))


def test_compressed_model_can_be_compressed_again(batches):
    torch.manual_seed(3)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    student, _ = compress_model(teacher, batches, sigma_quantile=0.5, progress=False)
    again, report = compress_model(student, batches, keep_all=True, progress=False)
    assert report.kept_widths["boundary.0"] == student.config.boundary_sizes[0]
    torch.testing.assert_close(logits_of(again, batches[1]), logits_of(student, batches[1]), atol=1e-5, rtol=0)


def test_explicit_widths_override_the_fit(batches):
    torch.manual_seed(4)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    student, report = compress_model(
        teacher, batches, kept_widths={"boundary.2": 7, "ffn.1": 11, "embeddings": 5}, progress=False
    )
    assert student.config.boundary_sizes[2] == 7
    assert student.config.intermediate_sizes[1] == 11
    assert student.config.embedding_size == 5
    assert student.bert.embeddings.word_embeddings.weight.shape == (120, 5)


def test_bad_widths_are_rejected(batches):
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    with pytest.raises(ValueError, match="outside 1..48"):
        compress_model(teacher, batches, kept_widths={"boundary.0": 0}, progress=False)
    with pytest.raises(ValueError, match="unknown sites"):
        compress_model(teacher, batches, kept_widths={"layer.9": 3}, progress=False)


def test_no_direction_above_the_edge_is_a_clear_error(batches):
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    # A quantile this close to 1 puts λ+ above every eigenvalue of some site.
    with pytest.raises(ValueError, match=r"k = 0.*sigma_quantile"):
        compress_model(teacher, batches, sigma_quantile=0.999, refine=False, min_width=0, progress=False)


def test_unsupported_architectures_are_named():
    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="no surgery for GPT2Model"):
        compress_model(gpt2, [], progress=False)
    masked_lm = BertForMaskedLM(tiny_bert_config())
    with pytest.raises(ValueError, match="BertForMaskedLM"):
        compress_model(masked_lm, [], progress=False)


def test_empty_calibration_set_is_a_clear_error():
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    with pytest.raises(ValueError, match="no batches"):
        compress_model(teacher, [], progress=False)


def test_least_squares_compensation_recovers_linear_dependencies():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(500, 4))
    # Neurons 4 and 5 are affine functions of neurons 0..3: keeping 0..3 must reconstruct them exactly.
    activations = np.concatenate([base, base @ [[1.0], [2.0], [0.0], [-1.0]] + 0.5, base[:, :1] * 3.0], axis=1)
    covariance = activations.T @ activations / len(activations)
    mixing, intercept = least_squares_compensation(covariance, activations.mean(0), np.arange(4), ridge=1e-12)
    reconstructed = activations[:, :4] @ mixing.T + intercept
    np.testing.assert_allclose(reconstructed, activations, atol=1e-6)
