import json
import os
import re

import pytest
from huggingface_hub import ModelCard

from rmt_kd_hf.filenames import HISTORY_FILENAME, SPECTRA_FILENAME
from rmt_kd_hf.hub import build_model_card, final_metric, load_history, write_model_card

from .conftest import make_trainer


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory):
    """A real (tiny, untrained) one-shot compression whose stage is always accepted, with its card written."""
    trainer = make_trainer(
        tmp_path_factory.mktemp("card"), sigma_quantile=0.6, max_metric_drop=1.0, stage_max_steps=2, max_steps=2
    )
    trainer.compress()
    trainer.create_model_card(model_name="tiny-rmt-kd", finetuned_from="user/tiny-teacher", dataset="user/tokens")
    output_dir = trainer.args.output_dir
    with open(os.path.join(output_dir, HISTORY_FILENAME)) as file:
        history = json.load(file)
    return output_dir, history


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """Cells of the markdown table whose header row starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_card_metadata_parses_with_the_hub_model_card(compressed_run):
    output_dir, history = compressed_run
    card = ModelCard.load(os.path.join(output_dir, "README.md"))
    data = card.data
    assert data.library_name == "transformers"
    assert data.base_model == "user/tiny-teacher"
    assert {"rmt-kd", "knowledge-distillation"} <= set(data.tags)
    assert data.datasets == ["user/tokens"] and data.metrics == ["accuracy"]
    assert data.pipeline_tag == "text-classification"
    (result,) = data.eval_results
    assert result.metric_type == "accuracy" and result.task_type == "text-classification"
    assert result.metric_value == history["stages"][0]["eval_accuracy"] == final_metric(history)
    assert data.model_name == "tiny-rmt-kd"


def test_card_numbers_equal_the_history(compressed_run):
    output_dir, history = compressed_run
    text = ModelCard.load(os.path.join(output_dir, "README.md")).text
    stage = history["stages"][0]
    assert stage["status"] == "accepted"
    sites = table_rows(text, "| site |")
    assert [row[0] for row in sites] == list(stage["sites"])
    for name, dim, num_samples, kept, sigma2, lambda_plus, refined in sites:
        record = stage["sites"][name]
        assert (int(dim), int(num_samples), int(kept)) == (record["dim"], record["num_samples"], record["kept_width"])
        assert float(sigma2) == pytest.approx(record["sigma2"], rel=1e-3)
        assert float(lambda_plus) == pytest.approx(record["lambda_plus"], rel=1e-3)
        assert refined == ("yes" if record["refined"] else "no")
    results = {row[0]: row[1:] for row in table_rows(text, "| | teacher |")}
    teacher_metric, compressed_metric = (float(value) for value in results["accuracy (validation)"])
    assert teacher_metric == pytest.approx(history["teacher"]["eval_accuracy"], abs=5e-5)
    assert compressed_metric == pytest.approx(stage["eval_accuracy"], abs=5e-5)
    teacher_parameters, compressed_parameters = results["parameters"]
    assert int(teacher_parameters) == history["teacher"]["num_parameters"]
    assert int(compressed_parameters.split()[0]) == history["final"]["num_parameters"] < int(teacher_parameters)
    weights = [float(value) for value in results["weights (MB)"]]
    assert weights == pytest.approx(
        [history["provenance"]["teacher_weights_mb"], history["final"]["weights_mb"]], rel=1e-3
    )
    latency = history["latency"]
    for batch_size in (1, 32):
        row = results[f"CPU latency, batch {batch_size} × {latency['sequence_length']} tokens (ms)"]
        expected = [1e3 * latency[f"batch_{batch_size}"][name] for name in ("teacher", "compressed")]
        assert [float(value) for value in row] == pytest.approx(expected, rel=1e-3)
    assert history["calibration"]["row_ids_sha256"] in text
    assert f"{history['calibration']['num_rows']} training rows" in text
    assert history["provenance"]["command"] in text
    assert 'from_pretrained("tiny-rmt-kd", trust_remote_code=True)' in text


def test_card_embeds_the_spectrum_plots_written_from_the_spectra_json(compressed_run):
    output_dir, history = compressed_run
    with open(os.path.join(output_dir, SPECTRA_FILENAME)) as file:
        spectra = json.load(file)
    assert list(spectra) == ["0"] and set(spectra["0"]) == set(history["stages"][0]["sites"])
    for name, site in spectra["0"].items():
        record = history["stages"][0]["sites"][name]
        assert len(site["eigenvalues"]) == record["dim"]
        assert site["lambda_plus"] == record["lambda_plus"]
        outliers = sum(value > site["lambda_plus"] for value in site["eigenvalues"])
        assert record["kept_width"] == max(outliers, 1)  # k = #{λ > λ+}, at least min_width
    text = open(os.path.join(output_dir, "README.md")).read()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images == ["spectra/overview.png"]
    assert os.path.getsize(os.path.join(output_dir, images[0])) > 1000
    assert os.path.exists(os.path.join(output_dir, "spectra", "stage0_boundary.0.png"))


def test_a_rolled_back_run_reports_the_teacher_metric_and_no_plots(compressed_run):
    _, history = compressed_run
    rolled_back = json.loads(json.dumps(history))
    rolled_back["stages"][0]["status"] = "rolled back: accuracy 0.1 < floor 0.5"
    card = build_model_card(rolled_back, model_name="x", architecture="RMTBertForSequenceClassification")
    assert card.data.eval_results[0].metric_value == history["teacher"]["eval_accuracy"]
    assert "![" not in card.text and "Stage 0: rolled back" in card.text


def test_missing_history_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"rmt_kd_history\.json.*compress\(\)"):
        load_history(tmp_path)
    with pytest.raises(FileNotFoundError, match="compress"):
        write_model_card(tmp_path)


def test_before_compress_the_trainer_writes_the_ordinary_card_with_rmt_kd_tags(tmp_path):
    trainer = make_trainer(tmp_path)
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    trainer.create_model_card(model_name="not-compressed-yet")
    card = ModelCard.load(os.path.join(trainer.args.output_dir, "README.md"))
    assert "rmt-kd" in card.data.tags and "What RMT-KD did" not in card.text
