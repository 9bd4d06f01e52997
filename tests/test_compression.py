import json

import pytest
import torch
from transformers import BertForSequenceClassification

from rmt_kd_hf import compress_model, format_widths_table
from rmt_kd_hf.compression import site_quantile

from .conftest import tiny_bert_config


def test_report_holds_per_site_statistics_and_serialises(batches):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    _, report = compress_model(teacher, batches, sigma_quantile=0.5, progress=False)
    data = json.loads(json.dumps(report.to_dict()))
    names = [site["site"] for site in data["sites"]]
    assert names == ["embeddings", *[f"boundary.{b}" for b in range(5)], "ffn.0", "ffn.1"]
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    for site in data["sites"]:
        assert {
            "dim",
            "num_samples",
            "sigma2",
            "lambda_plus",
            "lambda_minus",
            "kept_width",
            "eigenvalues",
        } <= set(site)
        assert len(site["eigenvalues"]) == site["dim"]
        assert site["lambda_plus"] > site["sigma2"] > site["lambda_minus"] >= 0
        expected_samples = tokens + 120 if site["site"] == "embeddings" else tokens  # + vocabulary rows
        assert site["num_samples"] == expected_samples
    assert data["num_parameters_after"] < data["num_parameters_before"]
    assert set(data["timings"]) == {
        "calibration_seconds",
        "eigendecomposition_and_fit_seconds",
        "apply_seconds",
    }
    table = format_widths_table(report)
    assert "boundary.4" in table and "ffn.1" in table


def test_higher_quantile_keeps_fewer_directions(batches):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    widths = []
    for quantile in (0.25, 0.5, 0.75):
        _, report = compress_model(teacher, batches, sigma_quantile=quantile, progress=False)
        widths.append(sum(report.kept_widths.values()))
    assert widths[0] > widths[1] > widths[2]


def test_compression_is_deterministic(batches):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    first, _ = compress_model(teacher, batches, progress=False)
    second, _ = compress_model(teacher, batches, progress=False)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_random_directions_keep_widths_but_change_the_basis(batches):
    from rmt_kd_hf.compression import randomize_directions
    from rmt_kd_hf.surgery import get_surgery

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    student, report = compress_model(teacher, batches, sigma_quantile=0.5, progress=False)
    randomized = randomize_directions(report.analyses, seed=0)
    for name, analysis in randomized.items():
        basis = analysis.eigenvectors
        assert analysis.kept_width == report.analyses[name].kept_width
        torch.testing.assert_close(torch.from_numpy(basis.T @ basis), torch.eye(basis.shape[0], dtype=torch.float64))
        assert abs(basis[:, 0] @ report.analyses[name].eigenvectors[:, 0]) < 0.9
    surgery = get_surgery(teacher)
    random_student = surgery.apply(surgery.prepare(teacher), randomized)
    assert random_student.config.boundary_sizes == student.config.boundary_sizes


def test_quantile_shifts_move_only_the_shifted_kind(batches):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    _, plain = compress_model(teacher, batches, sigma_quantile=0.4, progress=False)
    _, shifted = compress_model(teacher, batches, sigma_quantile=0.4, progress=False, quantile_shifts={"ffn": 0.3})
    for name, analysis in shifted.analyses.items():
        before = plain.analyses[name]
        if analysis.site.kind == "ffn":
            assert analysis.fit.sigma_quantile == pytest.approx(0.7)
            assert analysis.kept_width < before.kept_width
        else:
            assert analysis.fit.sigma_quantile == pytest.approx(0.4)
            assert analysis.kept_width == before.kept_width
    record = next(site for site in shifted.site_records(False) if site["site"] == "ffn.0")
    assert record["sigma_quantile"] == pytest.approx(0.7)


def test_a_shifted_quantile_stays_inside_the_unit_interval():
    assert site_quantile("ffn", 0.9, {"ffn": 0.5}) == pytest.approx(0.99)
    assert site_quantile("residual", 0.1, {"residual": -0.5}) == pytest.approx(0.01)
    assert site_quantile("residual", 0.3, {"ffn": 0.5}) == 0.3
    assert site_quantile("ffn", 0.3) == 0.3
