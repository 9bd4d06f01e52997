#!/usr/bin/env python
"""Compress an image classifier (a transformers ResNet) with RMT-KD.

Shaped like transformers' ``examples/pytorch/image-classification/run_image_classification.py``; the Trainer is an
``RMTKDTrainer`` and the training arguments an ``RMTKDConfig``. Data: a hub dataset (``--dataset_name``), image
folders (``--train_dir``/``--validation_dir``), or a local ``.npz`` of arrays (``--arrays_file``, written by
``rmt_kd_hf.image_data.save_image_arrays``). The teacher is loaded (``--model_name_or_path``) or built from scratch
(``--model_type resnet --config_overrides ...``); if its classifier is new it is trained first
(``num_train_epochs``, ``teacher_learning_rate``) and cached in ``teacher_dir``; then ``compress()`` runs the
compress-and-distil loop and saves the result in ``output_dir``.

    python run_image_classification.py --dataset_name zalando-datasets/fashion_mnist --model_type resnet \\
        --config_overrides "embedding_size=32,hidden_sizes=[32,64,128,256],depths=[2,2,2,2]" \\
        --do_train --do_eval --output_dir out/fashion
    python run_image_classification.py --arrays_file fashion_mnist.npz --model_type resnet \\
        --compression_schedule per_layer --do_train --do_eval --do_predict --output_dir out/local
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    EvalPrediction,
    default_data_collator,
    set_seed,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from rmt_kd_hf import RMTKDConfig, RMTKDTrainer
from rmt_kd_hf.scripts import evaluate_split, parse_dataclass_arguments, setup_logging, train_teacher

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher checkpoint (hub id or path). Without it, --model_type from scratch."}
    )
    model_type: str | None = field(
        default=None, metadata={"help": "Architecture of a teacher built from scratch (e.g. 'resnet')."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "From-scratch config fields, e.g. 'embedding_size=32,hidden_sizes=[32,64,128,256],depths=[2,2,2,2]'"
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are stored."})
    teacher_dir: str | None = field(
        default=None,
        metadata={"help": "Cache of the trained teacher: loaded if present, written after training if not."},
    )
    teacher_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of teacher training (default: learning_rate)."}
    )

    def __post_init__(self):
        if self.model_name_or_path is None and self.model_type is None:
            raise ValueError(
                "Pass --model_name_or_path (a trained teacher) or --model_type (e.g. resnet, from scratch)."
            )
        if self.config_overrides is not None and self.model_name_or_path is not None:
            raise ValueError("--config_overrides only applies to a teacher built from scratch (--model_type).")


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the hub (online users)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "imagefolder: one sub-folder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "imagefolder validation images."})
    test_dir: str | None = field(default=None, metadata={"help": "imagefolder test images."})
    arrays_file: str | None = field(
        default=None, metadata={"help": ".npz with {split}_images, {split}_labels (and label_names)."}
    )
    image_column_name: str = field(default="image", metadata={"help": "Image column of hub/imagefolder data."})
    label_column_name: str = field(default="label", metadata={"help": "Label column of hub/imagefolder data."})
    image_size: int | None = field(
        default=None, metadata={"help": "Resize images to this side (default: 224 for hub/folder data, arrays as is)."}
    )
    num_channels: int = field(default=3, metadata={"help": "Channels of hub/folder images: 1 (grey) or 3 (RGB)."})
    train_val_split: float = field(default=0.15, metadata={"help": "Validation fraction when there is no split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test set."})

    def __post_init__(self):
        sources = [self.dataset_name, self.train_dir, self.arrays_file]
        if sum(source is not None for source in sources) != 1:
            raise ValueError(
                "Pass exactly one data source: --dataset_name, --train_dir (imagefolder) or --arrays_file."
            )
        if self.arrays_file is not None and not self.arrays_file.endswith(".npz"):
            raise ValueError(f"{self.arrays_file}: --arrays_file must be a .npz file")
        if self.num_channels not in (1, 3):
            raise ValueError(f"--num_channels must be 1 or 3, got {self.num_channels}")


def parse_arguments(argv: list[str] | None = None):
    return parse_dataclass_arguments((ModelArguments, DataTrainingArguments, RMTKDConfig), argv)


def arrays_dataset(path: str) -> DatasetDict:
    """``{split}_images`` ((n, h, w) or (n, c, h, w); uint8 0..255 or float, used as is) and ``{split}_labels``."""
    arrays = np.load(path)
    splits = sorted(key[: -len("_images")] for key in arrays.files if key.endswith("_images"))
    if "train" not in splits:
        raise ValueError(f"{path} has no train_images array (found {arrays.files})")
    num_labels = int(max(arrays[f"{split}_labels"].max() for split in splits)) + 1
    names = [str(name) for name in arrays["label_names"]] if "label_names" in arrays.files else None
    label = ClassLabel(names=names) if names else ClassLabel(num_classes=num_labels)
    result = {}
    for split in splits:
        images = arrays[f"{split}_images"]
        images = images[:, None] if images.ndim == 3 else images
        pixel_values = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
        features = Features({"pixel_values": Array3D(pixel_values.shape[1:], "float32"), "labels": label})
        rows = {"pixel_values": pixel_values, "labels": arrays[f"{split}_labels"].astype(np.int64)}
        result[split] = Dataset.from_dict(rows, features).with_format("torch")
    return DatasetDict(result)


def image_transform(data_args: DataTrainingArguments, image_column: str):
    """PIL images -> normalised ``pixel_values`` (channels, side, side) float32, on the fly (``set_transform``).

    Batches that only hold some columns (a ``dataset["labels"]`` read) pass those through.
    """
    side = data_args.image_size or 224
    mode = "L" if data_args.num_channels == 1 else "RGB"

    def transform(batch: dict) -> dict:
        result = {"labels": batch["labels"]} if "labels" in batch else {}
        if image_column in batch:
            result["pixel_values"] = []
            for image in batch[image_column]:
                array = np.asarray(image.convert(mode).resize((side, side)), dtype=np.float32) / 255.0
                array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
                result["pixel_values"].append((array - 0.5) / 0.5)
        return result

    return transform


def load_image_datasets(data_args: DataTrainingArguments, cache_dir: str | None, seed: int) -> DatasetDict:
    """train/validation(/test) splits whose rows are ``{"pixel_values", "labels"}``; ``labels`` is a ClassLabel."""
    if data_args.arrays_file is not None:
        raw = arrays_dataset(data_args.arrays_file)
    else:
        if data_args.dataset_name is not None:
            raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
        else:
            folders = {"train": data_args.train_dir, "validation": data_args.validation_dir, "test": data_args.test_dir}
            files = {split: os.path.join(path, "**") for split, path in folders.items() if path is not None}
            raw = load_dataset("imagefolder", data_files=files, cache_dir=cache_dir)
        image_column = _column(raw, data_args.image_column_name, ("image", "img"))
        label_column = _column(raw, data_args.label_column_name, ("label", "labels"))
        if label_column != "labels":
            raw = raw.rename_column(label_column, "labels")
        label_feature = raw["train"].features["labels"]
        raw = DatasetDict({split: rows.cast_column("labels", label_feature) for split, rows in raw.items()})
        for split in raw:
            raw[split].set_transform(image_transform(data_args, image_column))
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=data_args.train_val_split, seed=seed)
        raw["train"], raw["validation"] = split["train"], split["test"]
    limits = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_predict_samples,
    }
    for split, limit in limits.items():
        if split in raw and limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return raw


def _column(raw: DatasetDict, preferred: str, fallbacks: tuple[str, ...]) -> str:
    columns = raw["train"].column_names
    for name in (preferred, *fallbacks):
        if name in columns:
            return name
    raise ValueError(f"No {preferred!r} column in the data (columns: {columns}); pass --image/label_column_name.")


def label_names(raw: DatasetDict) -> list[str]:
    feature = raw["train"].features.get("labels")
    if not isinstance(feature, ClassLabel):
        raise ValueError(f"The labels must be a ClassLabel (class ids with names), got {feature}.")
    return list(feature.names)


def num_channels_of(raw: DatasetDict, data_args: DataTrainingArguments) -> int:
    if data_args.arrays_file is not None:
        return int(raw["train"][0]["pixel_values"].shape[0])
    return data_args.num_channels


# -- model -----------------------------------------------------------------------------------------------------------


def parse_config_overrides(overrides: str | None) -> dict:
    """``"a=1,b=[1,2],c=bottleneck"`` -> ``{"a": 1, "b": [1, 2], "c": "bottleneck"}`` (values parsed as JSON)."""
    if not overrides:
        return {}
    fields = {}
    for match in re.finditer(r"\s*(\w+)\s*=\s*(\[[^\]]*\]|[^,]+)\s*(,|$)", overrides):
        key, value = match.group(1), match.group(2).strip()
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    if not fields:
        raise ValueError(f"--config_overrides {overrides!r}: expected key=value pairs separated by commas")
    return fields


def _check_image_classifier(config) -> None:
    if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and not config.model_type.startswith(
        "rmt_"
    ):
        raise ValueError(
            f"The teacher is a {config.model_type!r} model, not an image classifier: pass a ResNet image "
            "classification checkpoint (e.g. microsoft/resnet-50) or --model_type resnet to build one from scratch."
        )


def load_teacher(model_args: ModelArguments, labels: list[str], num_channels: int):
    """The model to compress and whether it still needs training (built from scratch, or its classifier is new)."""
    label_fields = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: index for index, label in enumerate(labels)},
    }
    path = model_args.model_name_or_path
    if model_args.teacher_dir and os.path.exists(os.path.join(model_args.teacher_dir, "config.json")):
        logger.info("Loading the cached trained teacher from %s", model_args.teacher_dir)
        path = model_args.teacher_dir
    if path is None:
        fields = {"num_channels": num_channels, **label_fields, **parse_config_overrides(model_args.config_overrides)}
        config = AutoConfig.for_model(model_args.model_type, **fields)
        _check_image_classifier(config)
        return AutoModelForImageClassification.from_config(config), True
    config = AutoConfig.from_pretrained(path, cache_dir=model_args.cache_dir)
    _check_image_classifier(config)
    same_labels = getattr(config, "num_labels", None) == len(labels)
    model, loading_info = AutoModelForImageClassification.from_pretrained(
        path,
        cache_dir=model_args.cache_dir,
        output_loading_info=True,
        ignore_mismatched_sizes=not same_labels,
        **label_fields,
    )
    new_head = not same_labels or any(key.startswith("classifier") for key in loading_info["missing_keys"])
    return model, new_head


def compute_metrics(prediction: EvalPrediction) -> dict:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments(argv)
    setup_logging(training_args, logger)
    set_seed(training_args.seed)
    raw = load_image_datasets(data_args, model_args.cache_dir, training_args.seed)
    labels = label_names(raw)
    model, needs_training = load_teacher(model_args, labels, num_channels_of(raw, data_args))
    training_args.remove_unused_columns = False  # on-the-fly transforms need the raw image column
    trainer = RMTKDTrainer(
        model=model,
        args=training_args,
        train_dataset=raw["train"] if training_args.do_train else None,
        eval_dataset=raw["validation"] if training_args.do_eval or training_args.do_train else None,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
    )
    results = {}
    if training_args.do_train:
        if needs_training:
            logger.info("The teacher is new or its classifier is: training it first.")
            train_teacher(trainer, model_args.teacher_dir, model_args.teacher_learning_rate)
        trainer.compress()
    if training_args.do_eval:
        results.update(evaluate_split(trainer, "eval"))
    if training_args.do_predict and "test" in raw:
        results.update(evaluate_split(trainer, "test", raw["test"]))
    if training_args.push_to_hub:
        trainer.push_to_hub(finetuned_from=model_args.model_name_or_path, tasks="image-classification")
    return results


if __name__ == "__main__":
    main()
