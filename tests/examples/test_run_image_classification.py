"""End to end: run_image_classification.py trains a tiny ResNet teacher on real digits, then compresses it."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from transformers import AutoModelForImageClassification, BertConfig, BertForSequenceClassification

pytest.importorskip("sklearn", reason="the digits data come from scikit-learn (test extra)")

from rmt_kd_hf.image_data import load_digits, save_image_arrays  # noqa: E402

from ..resnet_fixtures import single_thread  # noqa: E402, F401

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "image-classification")
TINY_RESNET = "embedding_size=8,hidden_sizes=[16,32],depths=[1,1],layer_type=bottleneck"
COMMON = [
    "--do_train",
    "--do_eval",
    "--per_device_train_batch_size=32",
    "--learning_rate=3e-3",
    "--stage_max_steps=4",
    "--max_metric_drop=1.0",
    "--min_width=2",  # 4-channel sites of a tiny ResNet can have k = 0: accept a floor of 2
    "--latency_sequence_length=16",
    "--save_strategy=no",
    "--report_to=none",
    "--use_cpu",
    "--disable_tqdm=true",
]


def load_script():
    path = os.path.join(EXAMPLES, "run_image_classification.py")
    spec = importlib.util.spec_from_file_location("run_image_classification", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_image_classification"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    return save_image_arrays(load_digits(seed=0), tmp_path_factory.mktemp("digits") / "digits.npz")


def test_trains_a_teacher_from_scratch_then_compresses(digits_npz, tmp_path):
    script = load_script()
    arguments = [
        f"--arrays_file={digits_npz}",
        "--model_type=resnet",
        f"--config_overrides={TINY_RESNET}",
        f"--teacher_dir={tmp_path / 'teacher'}",
        "--do_predict",
        "--max_steps=60",
        "--compression_schedule=per_layer",
        *COMMON,
    ]
    results = script.main([f"--output_dir={tmp_path / 'out'}", *arguments])
    assert {"eval_accuracy", "test_accuracy"} <= set(results)
    teacher = AutoModelForImageClassification.from_pretrained(tmp_path / "teacher")
    assert teacher.config.model_type == "resnet" and teacher.config.hidden_sizes == [16, 32]
    assert teacher.config.id2label[3] == "3" and teacher.config.num_channels == 1
    history = json.load(open(tmp_path / "out" / "rmt_kd_history.json"))
    assert [stage["status"] for stage in history["stages"]] == ["accepted"] * 5
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert model.config.model_type == "rmt_resnet"
    assert sum(p.numel() for p in model.parameters()) < history["teacher"]["num_parameters"]

    # A second run picks the cached teacher up and skips its training.
    again = script.main([f"--output_dir={tmp_path / 'out2'}", *arguments])
    assert "eval_accuracy" in again
    assert not os.path.exists(tmp_path / "out2" / "teacher_train_results.json")


def test_image_folders_and_a_pretrained_teacher(tmp_path):
    from PIL import Image

    digits = load_digits(seed=0)
    for split, rows in (("train", 60), ("validation", 20)):
        data = digits[split].with_format("numpy")[:rows]
        for index, (pixels, label) in enumerate(zip(data["pixel_values"], data["labels"], strict=True)):
            folder = tmp_path / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            grey = np.clip((pixels[0] * 0.4 + 0.3) * 255, 0, 255).astype(np.uint8)
            Image.fromarray(grey).save(folder / f"{index}.png")
    script = load_script()
    common = [f"--train_dir={tmp_path / 'train'}", f"--validation_dir={tmp_path / 'validation'}", "--image_size=16"]
    script.main(
        [
            "--model_type=resnet",
            f"--config_overrides={TINY_RESNET}",
            "--num_channels=3",
            "--max_steps=10",
            f"--output_dir={tmp_path / 'from_scratch'}",
            *common,
            *COMMON,
        ]
    )
    teacher = AutoModelForImageClassification.from_pretrained(tmp_path / "from_scratch")  # already compressed
    assert teacher.config.num_channels == 3
    results = script.main(
        [f"--model_name_or_path={tmp_path / 'from_scratch'}", "--max_steps=4", f"--output_dir={tmp_path / 'again'}"]
        + common
        + COMMON
    )
    assert "eval_accuracy" in results
    assert not os.path.exists(tmp_path / "again" / "teacher_train_results.json")  # its head matched: no training


def test_bad_arguments_are_clear_errors(tmp_path, digits_npz):
    script = load_script()
    with pytest.raises(ValueError, match="exactly one data source"):
        script.main([f"--output_dir={tmp_path}", "--model_type=resnet"])
    with pytest.raises(ValueError, match="--model_name_or_path .* or --model_type"):
        script.main([f"--output_dir={tmp_path}", f"--arrays_file={digits_npz}"])
    bert_dir = tmp_path / "bert"
    BertForSequenceClassification(
        BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(bert_dir)
    with pytest.raises(ValueError, match="'bert' model, not an image classifier"):
        script.main(
            [f"--output_dir={tmp_path / 'o'}", f"--arrays_file={digits_npz}", f"--model_name_or_path={bert_dir}"]
        )
    assert script.parse_config_overrides("a=1,b=[1, 2],c=basic") == {"a": 1, "b": [1, 2], "c": "basic"}
