import pytest
import torch
from transformers import BertForSequenceClassification

from rmt_kd_hf import compress_model
from rmt_kd_hf.surgery.bert import BertSurgery

from ..conftest import logits_of, tiny_bert_config


def test_widths_round_up_to_the_multiple(batches):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    exact, exact_report = compress_model(teacher, batches, sigma_quantile=0.6, progress=False)
    rounded, report = compress_model(
        teacher, batches, sigma_quantile=0.6, progress=False, surgery_options={"width_multiple": 8}
    )
    config = rounded.config
    widths = [config.embedding_size, *config.boundary_sizes, *config.intermediate_sizes]
    assert all(width % 8 == 0 for width in widths)
    for name, width in exact_report.kept_widths.items():
        assert report.kept_widths[name] == -(-width // 8) * 8  # the report shows the widths the model has
    assert report.num_parameters_after > exact_report.num_parameters_after
    surgery = BertSurgery(width_multiple=8)
    prepared = surgery.prepare(teacher)
    planned = surgery.compressed_config(prepared, exact_report.kept_widths)  # what budget search counts
    for field in ("embedding_size", "boundary_sizes", "intermediate_sizes"):
        assert getattr(planned, field) == getattr(config, field)
    assert logits_of(rounded, batches[0]).shape == logits_of(exact, batches[0]).shape


def test_bad_multiple_is_rejected():
    with pytest.raises(ValueError, match="width_multiple must be >= 1"):
        BertSurgery(width_multiple=0)
