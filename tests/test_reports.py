import pytest
import torch
from transformers import BertModel

from rmt_kd_hf import compress_model
from rmt_kd_hf.reports import cpu_latency, hidden_state_similarity, parameter_counts

from .conftest import tiny_bert_config


def test_hidden_state_similarity_is_one_when_everything_is_kept_and_lower_when_cut(batches):
    torch.manual_seed(0)
    teacher = BertModel(tiny_bert_config()).eval()
    exact, exact_report = compress_model(teacher, batches, keep_all=True, progress=False)
    similarity = hidden_state_similarity(teacher, exact, exact_report, batches[:2])
    assert len(similarity) == 3 and all(value == pytest.approx(1.0, abs=1e-6) for value in similarity)
    cut, cut_report = compress_model(teacher, batches, sigma_quantile=0.75, progress=False)
    assert min(hidden_state_similarity(teacher, cut, cut_report, batches[:2])) < 0.999


def test_parameter_counts_split_embeddings():
    model = BertModel(tiny_bert_config())
    counts = parameter_counts(model)
    embedding = sum(
        module.weight.numel()
        for module in (
            model.embeddings.word_embeddings,
            model.embeddings.position_embeddings,
            model.embeddings.token_type_embeddings,
        )
    )
    assert counts["embedding"] == embedding
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == embedding + counts["non_embedding"]


def test_cpu_latency_times_a_forward_pass():
    model = BertModel(tiny_bert_config())
    model.train()
    latency = cpu_latency(model, batch_size=2, sequence_length=16, repeats=3, warmup=1)
    assert 0 < latency < 5
    assert not model.training  # measured in eval mode


def test_cpu_latency_runs_without_autograd():
    """Timed passes must not build autograd graphs: that overhead would skew the ratios of small models."""
    model = BertModel(tiny_bert_config())
    modes = []
    model.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    cpu_latency(model, batch_size=1, sequence_length=8, repeats=2, warmup=1)
    assert modes == [True] * 3
