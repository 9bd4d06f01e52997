import json
import logging
import struct
import sys

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification, BertTokenizerFast

import rmt_kd_hf
from rmt_kd_hf.checkpoint import save_compressed
from rmt_kd_hf.cli import main
from rmt_kd_hf.spectral import eigendecompose, fit_marchenko_pastur
from rmt_kd_hf.spectral_report import SPECTRAL_REPORT_FILENAME, spectral_report

from .conftest import make_batches, tiny_bert_config


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless the file starts as a PNG does."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def tiny_teacher() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


def test_report_of_a_saved_compression_lists_outliers_and_writes_pngs(tmp_path):
    student, report = rmt_kd_hf.compress_model(tiny_teacher(), make_batches(), sigma_quantile=0.6, progress=False)
    save_compressed(student, tmp_path / "model", report=report)
    payload = spectral_report(tmp_path / "model", output_dir=tmp_path / "report")
    assert json.loads((tmp_path / "report" / SPECTRAL_REPORT_FILENAME).read_text()) == payload
    assert [site["site"] for site in payload["sites"]] == list(report.analyses)
    for site in payload["sites"]:
        analysis = report.analyses[site["site"]]
        expected = sorted((value for value in analysis.eigenvalues if value > analysis.fit.lambda_plus), reverse=True)
        assert site["outliers"] == pytest.approx(expected) and site["num_outliers"] == analysis.fit.num_kept
        assert site["lambda_plus"] == analysis.fit.lambda_plus and site["kept_width"] == analysis.kept_width
        assert site["bulk_ks_distance"] == analysis.fit.bulk_ks_distance
        width, height = png_size(tmp_path / "report" / site["plot"])
        assert width > 400 and height > 200
    assert png_size(tmp_path / "report" / payload["overview_plot"])[0] > 400


def synthetic_site(eigenvalues: np.ndarray, num_samples: int) -> dict:
    fit = fit_marchenko_pastur(eigenvalues, num_samples)
    return {
        "eigenvalues": eigenvalues.tolist(),
        "num_samples": num_samples,
        "sigma2": fit.sigma2,
        "lambda_plus": fit.lambda_plus,
        "lambda_minus": fit.lambda_minus,
    }  # no bulk_ks_distance: the report computes it


def test_a_poor_marchenko_pastur_fit_is_flagged_and_warned(tmp_path, caplog):
    generator = np.random.default_rng(0)
    dim, num_samples = 60, 1200
    noise = generator.standard_normal((num_samples, dim))
    wishart, _ = eigendecompose(noise.T @ noise / num_samples)  # pure noise: the MP law holds
    heavy_tailed = np.sort(generator.pareto(1.5, dim) + 1e-3)[::-1]  # no MP bulk at all
    spectra = {"0": {"noise": synthetic_site(wishart, num_samples), "heavy": synthetic_site(heavy_tailed, num_samples)}}
    (tmp_path / "rmt_kd_spectra.json").write_text(json.dumps(spectra))
    with caplog.at_level(logging.WARNING, logger="rmt_kd_hf"):
        payload = spectral_report(tmp_path, output_dir=tmp_path / "report", plots=False)
    sites = {site["site"]: site for site in payload["sites"]}
    assert sites["noise"]["fit_quality"] == "good" and sites["noise"]["bulk_ks_distance"] < 0.1
    assert sites["heavy"]["fit_quality"] == "poor" and sites["heavy"]["bulk_ks_distance"] > 0.1
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "stage0/heavy" in warnings[0] and "fits the bulk poorly" in warnings[0]
    assert sites["heavy"]["outliers"] == sorted(heavy_tailed[heavy_tailed > sites["heavy"]["lambda_plus"]])[::-1]


def test_preview_of_an_uncompressed_bert_matches_compression_and_changes_nothing(tmp_path):
    teacher = tiny_teacher()
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    payload = spectral_report(teacher, make_batches(), output_dir=tmp_path, sigma_quantile=0.6, plots=False)
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    student, report = rmt_kd_hf.compress_model(teacher, make_batches(), sigma_quantile=0.6, progress=False)
    assert {site["site"]: site["kept_width"] for site in payload["sites"]} == report.kept_widths
    preview = payload["preview"]
    assert preview["num_parameters"] == report.num_parameters_before
    assert preview["num_parameters_if_compressed"] == report.num_parameters_after < report.num_parameters_before


def test_a_model_without_a_dataloader_or_saved_spectra_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="calibration dataloader"):
        spectral_report(tiny_teacher(), output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"rmt_kd_spectra\.json.*--data"):
        spectral_report(tmp_path, output_dir=tmp_path / "report")


def test_plots_without_matplotlib_name_the_extra(tmp_path, monkeypatch):
    _, report = rmt_kd_hf.compress_model(tiny_teacher(), make_batches(2), progress=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install rmt-kd-hf\[plots\]"):
        spectral_report(report, output_dir=tmp_path)
    assert spectral_report(report, output_dir=tmp_path, plots=False)["sites"]  # the JSON needs no matplotlib


@pytest.fixture
def model_dir_and_csv(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(115)]
    tokenizer = BertTokenizerFast(vocab={word: index for index, word in enumerate(words)})
    tiny_teacher().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    generator = np.random.default_rng(0)
    rows = [" ".join(f"w{i}" for i in generator.integers(0, 115, generator.integers(6, 14))) for _ in range(40)]
    (tmp_path / "data.csv").write_text("sentence,label\n" + "".join(f"{row},0\n" for row in rows))
    return tmp_path / "model", tmp_path / "data.csv"


def test_cli_report_previews_a_model_directory_on_a_csv(model_dir_and_csv, tmp_path, capsys):
    model_dir, csv = model_dir_and_csv
    argv = ["report", str(model_dir), "--data", str(csv), "--output_dir", str(tmp_path / "out"), "--no_plots"]
    assert main([*argv, "--max_samples", "24", "--sigma_quantile", "0.6"]) == 0
    payload = json.loads((tmp_path / "out" / SPECTRAL_REPORT_FILENAME).read_text())
    assert payload["preview"]["num_parameters_if_compressed"] < payload["preview"]["num_parameters"]
    assert payload["sites"][0]["site"] == "embeddings" and "RMT-KD would keep" in capsys.readouterr().out
    assert main(["report", str(model_dir), "--data", str(csv), "--text_column", "text"]) == 2
    assert "no column 'text'" in capsys.readouterr().err


def test_cli_help_lists_defaults_and_missing_spectra_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--text_column" in help_text and "(default: sentence)" in help_text and "(default: 0.5)" in help_text
    assert main(["report", str(tmp_path)]) == 2
    assert "rmt_kd_spectra.json" in capsys.readouterr().err
