"""RMTKDTrainer on images: a tiny ResNet trained on scikit-learn's digits, then compressed layer by layer."""

import json
import os

import pytest
import torch
from transformers import (
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    default_data_collator,
)

from rmt_kd_hf import RMTKDConfig, RMTKDTrainer
from rmt_kd_hf.filenames import HISTORY_FILENAME

from .conftest import QUIET_CPU_ARGS
from .resnet_fixtures import single_thread  # noqa: F401

pytest.importorskip("sklearn", reason="the digits data come from scikit-learn (test extra)")

from rmt_kd_hf.image_data import load_digits  # noqa: E402


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("digits")
    digits = load_digits(seed=0)
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    args = RMTKDConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=32,
        per_device_eval_batch_size=256,
        learning_rate=3e-3,
        max_steps=120,
        stage_max_steps=8,
        sigma_quantile=0.5,
        max_metric_drop=1.0,
        min_width=2,  # 4-channel sites of a tiny ResNet can have k = 0: accept a floor of 2
        compression_schedule="per_layer",
        latency_sequence_length=16,
        seed=0,
        **QUIET_CPU_ARGS,
    )
    trainer = RMTKDTrainer(
        model=ResNetForImageClassification(config),
        args=args,
        train_dataset=digits["train"],
        eval_dataset=digits["validation"],
        data_collator=default_data_collator,
        compute_metrics=accuracy,
    )
    trainer.train()  # the teacher, from scratch
    teacher_accuracy = trainer.evaluate()["eval_accuracy"]
    model = trainer.compress()
    return trainer, model, teacher_accuracy, digits


def test_per_layer_compression_of_a_digits_resnet(compressed_run):
    trainer, model, teacher_accuracy, digits = compressed_run
    assert teacher_accuracy > 0.5  # the teacher learned something: 10 classes, chance is 0.1
    history = json.load(open(os.path.join(trainer.args.output_dir, HISTORY_FILENAME)))
    stages = history["stages"]
    assert [list(stage["sites"]) for stage in stages] == [
        ["stem"],
        ["block.0.conv1", "block.0.conv2"],
        ["stage.0"],
        ["block.1.conv1", "block.1.conv2"],
        ["stage.1"],
    ]
    assert all(stage["status"] == "accepted" for stage in stages)
    assert history["final"]["num_parameters"] < history["teacher"]["num_parameters"]
    assert history["final"]["widths"]["hidden_sizes"] == model.config.hidden_sizes
    assert history["latency"]["sequence_length"] == 16
    assert stages[-1]["eval_accuracy"] > 0.3


def test_the_saved_student_reloads_with_identical_logits(compressed_run):
    trainer, model, _, digits = compressed_run
    reloaded = AutoModelForImageClassification.from_pretrained(trainer.args.output_dir)
    assert reloaded.config.model_type == "rmt_resnet"
    pixels = digits["test"][:16]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.eval()(pixel_values=pixels).logits, model.eval()(pixel_values=pixels).logits
        )


def test_the_model_card_names_the_image_task(compressed_run):
    from huggingface_hub import ModelCard

    trainer, _, _, _ = compressed_run
    trainer.create_model_card(model_name="digits-rmt-kd", dataset="sklearn-digits")
    card = ModelCard.load(os.path.join(trainer.args.output_dir, "README.md"))
    assert card.data.pipeline_tag == "image-classification"
    assert "AutoModelForImageClassification.from_pretrained" in card.text
    assert "AutoTokenizer" not in card.text  # no tokenizer (nor image processor) was saved with this model
    assert "× 16×16 px images (ms)" in card.text
