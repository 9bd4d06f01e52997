import math

import pytest
import torch
from transformers import BertForQuestionAnswering, BertForSequenceClassification, BertModel

from rmt_kd_hf import compress_model
from rmt_kd_hf.surgery import bert as bert_surgery
from rmt_kd_hf.surgery.bert import convert_bert_to_rmt
from rmt_kd_hf.surgery.heads import head_blocks, query_key_reduction, value_output_reduction

from ..conftest import logits_of, tiny_bert_config

HEADS_ON = {"reduce_attention_heads": True}


def second_moment(rows: torch.Tensor) -> torch.Tensor:
    return rows.T @ rows / rows.shape[0]


def test_value_reduction_keeps_a_low_rank_head_output_exactly():
    torch.manual_seed(0)
    head_size, rank, out = 8, 3, 20
    values = torch.randn(4000, head_size, dtype=torch.float64) @ torch.randn(head_size, head_size, dtype=torch.float64)
    columns = torch.randn(out, rank, dtype=torch.float64) @ torch.randn(rank, head_size, dtype=torch.float64)
    reduction = value_output_reduction(second_moment(values)[None], columns[None])
    spectrum = reduction.spectrum[0]
    assert torch.all(spectrum[:rank] > 1e-3 * spectrum[0]) and torch.all(spectrum[rank:] < 1e-20 * spectrum[0])
    kept_values = values @ reduction.left[0, :rank].T  # (rows, rank)
    kept_columns = columns @ reduction.right[0, :rank].T  # (out, rank)
    torch.testing.assert_close(kept_values @ kept_columns.T, values @ columns.T, atol=1e-9, rtol=1e-9)
    # One direction fewer loses exactly the smallest kept share of the output second moment.
    lossy = (values @ reduction.left[0, : rank - 1].T) @ (columns @ reduction.right[0, : rank - 1].T).T
    error = (lossy - values @ columns.T).square().sum(-1).mean()
    torch.testing.assert_close(error, spectrum[rank - 1], rtol=1e-6, atol=0)


def test_query_key_reduction_keeps_a_low_rank_score_exactly():
    torch.manual_seed(1)
    head_size, rank = 8, 2
    queries = torch.randn(3000, head_size, dtype=torch.float64) + 0.5
    mixing = torch.randn(head_size, rank, dtype=torch.float64) @ torch.randn(rank, head_size, dtype=torch.float64)
    keys = torch.randn(3000, head_size, dtype=torch.float64) * torch.linspace(0.2, 2.0, head_size, dtype=torch.float64)
    # Scores qᵀ M k: a rank-2 bilinear form, written as queries q and keys Mk.
    keys = keys @ mixing.T
    reduction = query_key_reduction(second_moment(queries)[None], second_moment(keys)[None])
    assert torch.all(reduction.spectrum[0, rank:] < 1e-9 * reduction.spectrum[0, 0])  # floored null space
    scores = queries[:50] @ keys[:60].T
    reduced = (queries[:50] @ reduction.left[0, :rank].T) @ (keys[:60] @ reduction.right[0, :rank].T).T
    torch.testing.assert_close(reduced, scores, atol=1e-8, rtol=1e-8)
    full = (queries[:50] @ reduction.left[0].T) @ (keys[:60] @ reduction.right[0].T).T
    torch.testing.assert_close(full, scores, atol=1e-8, rtol=1e-8)


def test_head_blocks_are_the_diagonal_blocks():
    matrix = torch.arange(36.0).reshape(6, 6)
    blocks = head_blocks(matrix, num_heads=3)
    assert blocks.shape == (3, 2, 2)
    assert torch.equal(blocks[1], matrix[2:4, 2:4])


@pytest.mark.parametrize("teacher_class", [BertModel, BertForSequenceClassification, BertForQuestionAnswering])
def test_keep_all_with_head_and_rank_sites_reproduces_the_teacher(teacher_class, batches):
    torch.manual_seed(2)
    teacher = teacher_class(tiny_bert_config(num_labels=2)).eval()
    options = {"reduce_attention_heads": True, "factorize_word_embeddings": True}
    student, report = compress_model(teacher, batches, keep_all=True, progress=False, surgery_options=options)
    assert {"attention.0.query_key", "attention.1.value", "word_embeddings"} <= set(report.kept_widths)
    assert student.config.query_key_head_sizes == [12, 12] and student.config.value_head_sizes == [12, 12]
    for batch in batches[:3]:
        torch.testing.assert_close(logits_of(student, batch), logits_of(teacher, batch), atol=1e-5, rtol=0)


def test_per_head_reduction_cuts_attention_widths(batches, monkeypatch):
    monkeypatch.setattr(bert_surgery, "HEAD_SIZE_MULTIPLE", 1)  # MP sizes to the nearest 1 (the default: 8)
    torch.manual_seed(3)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    student, report = compress_model(teacher, batches, sigma_quantile=0.6, progress=False, surgery_options=HEADS_ON)
    config = student.config
    for layer in range(2):
        kept = {}
        for name in ("query_key", "value"):
            analysis = report.analyses[f"attention.{layer}.{name}"]
            kept[name] = analysis.kept_width
            assert kept[name] == max(1, int((analysis.eigenvalues > analysis.fit.lambda_plus).sum()))
        # One size per layer for queries/keys and values (the fast attention kernel needs them equal): the larger.
        expected = max(1, math.floor(max(kept.values()) / 4 + 0.5))
        assert config.query_key_head_sizes[layer] == config.value_head_sizes[layer] == expected < 12
    attention = student.bert.encoder.layer[0].attention
    assert attention.self.query.out_features == 4 * config.query_key_head_sizes[0]
    assert attention.output.dense.in_features == 4 * config.value_head_sizes[0]
    assert torch.count_nonzero(attention.self.key.bias) == 0  # the softmax ignores it
    inputs = {"input_ids": batches[0]["input_ids"], "attention_mask": batches[0]["attention_mask"]}
    with torch.no_grad():
        output = student(**inputs, output_attentions=True)
    assert output.attentions[0].shape == (8, 4, 16, 16)
    torch.testing.assert_close(output.logits, logits_of(student, batches[0]), atol=1e-5, rtol=0)


def test_head_sizes_round_to_the_nearest_multiple_and_never_grow(config):
    rmt_config = convert_bert_to_rmt(BertModel(tiny_bert_config(hidden_size=64, num_attention_heads=2))).config
    widths = {"attention.0.query_key": 13, "attention.0.value": 3, "attention.1.value": 63}
    assert bert_surgery._head_sizes(rmt_config, widths, 0) == (8, 8)  # 6.5 -> 8, value 1.5 -> 8 (at least one)
    assert bert_surgery._head_sizes(rmt_config, widths, 1) == (32, 32)  # 31.5 -> 32 is the current size
    widths = {"attention.0.query_key": 37, "attention.0.value": 23, "attention.1.value": 41, "attention.1.query_key": 9}
    # 18.5 per head -> 16, not 24: heads x size stays near the 37 kept directions; value 11.5 -> 8, the larger wins
    assert bert_surgery._head_sizes(rmt_config, widths, 0) == (16, 16)
    assert bert_surgery._head_sizes(rmt_config, widths, 1) == (24, 24)  # value 20.5 -> 24, query/key 4.5 -> 8


def test_a_reduced_model_can_be_reduced_again_exactly(batches):
    torch.manual_seed(4)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    student, _ = compress_model(teacher, batches, sigma_quantile=0.6, progress=False, surgery_options=HEADS_ON)
    again, report = compress_model(student, batches, keep_all=True, progress=False, surgery_options=HEADS_ON)
    assert again.config.value_head_sizes == student.config.value_head_sizes
    torch.testing.assert_close(logits_of(again, batches[1]), logits_of(student, batches[1]), atol=1e-5, rtol=0)
