"""Sequence classification with RMT-KD, GLUE-style: the logic behind ``rmt-kd compress`` and
``examples/text-classification/run_glue.py``.

Shaped like transformers' ``examples/pytorch/text-classification/run_glue.py``; the Trainer is an
``RMTKDTrainer`` and the training arguments an ``RMTKDConfig``. If the model is not yet fine-tuned for the task
(its classifier is new), it is fine-tuned first (``num_train_epochs``, ``teacher_learning_rate``) and cached in
``teacher_dir``; then ``compress()`` runs the compress-and-distil loop and saves the result in ``output_dir``
(``--resume_from_checkpoint`` continues an interrupted run at its next stage).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    set_seed,
)

from .checkpoint import check_checkpoint, copy_out_of_file, refuse_teacher_folder
from .cli import evaluate_split, parse_dataclass_arguments, setup_logging, train_teacher
from .config import RMTKDConfig
from .metrics import load_glue_metric
from .trainer import RMTKDTrainer

logger = logging.getLogger(__name__)

TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher checkpoint (hub id or path). Default: the packaged all-MiniLM-L6-v2 (offline)."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are stored."})
    teacher_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache of the fine-tuned teacher: loaded if present, written after fine-tuning if not "
            "(default: OUTPUT_DIR/checkpoint-teacher, so that --resume_from_checkpoint finds the same teacher)."
        },
    )
    teacher_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of teacher fine-tuning (default: learning_rate)."}
    )


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(
        default=None, metadata={"help": f"A GLUE task from the hub: {', '.join(TASK_TO_KEYS)}."}
    )
    train_file: str | None = field(default=None, metadata={"help": "csv/json with sentence(s) and label."})
    validation_file: str | None = field(default=None, metadata={"help": "csv/json validation file."})
    test_file: str | None = field(default=None, metadata={"help": "csv/json test file (labels give test metrics)."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test set."})

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASK_TO_KEYS:
                raise ValueError(f"Unknown task {self.task_name!r}; choose one of {', '.join(TASK_TO_KEYS)}.")
        elif self.train_file is None or self.validation_file is None:
            raise ValueError("Pass --task_name, or --train_file and --validation_file (csv or json).")
        for path in (self.train_file, self.validation_file, self.test_file):
            if path is not None and not path.endswith((".csv", ".json", ".jsonl")):
                raise ValueError(f"{path}: data files must be .csv, .json or .jsonl")


def parse_arguments(argv: list[str] | None = None, prog: str | None = None):
    """Model, data and ``RMTKDConfig`` options; ``--help`` shows every option with its default."""
    return parse_dataclass_arguments((ModelArguments, DataTrainingArguments, RMTKDConfig), argv, prog)


def load_raw_datasets(data_args: DataTrainingArguments, cache_dir: str | None) -> DatasetDict:
    if data_args.task_name is not None:
        return load_dataset("nyu-mll/glue", data_args.task_name, cache_dir=cache_dir)
    files = {"train": data_args.train_file, "validation": data_args.validation_file}
    if data_args.test_file is not None:
        files["test"] = data_args.test_file
    extension = "csv" if data_args.train_file.endswith(".csv") else "json"
    return load_dataset(extension, data_files=files, cache_dir=cache_dir)


def sentence_keys(data_args: DataTrainingArguments, raw: DatasetDict) -> tuple[str, str | None]:
    if data_args.task_name is not None:
        return TASK_TO_KEYS[data_args.task_name]
    columns = [name for name in raw["train"].column_names if name != "label"]
    if "sentence1" in columns and "sentence2" in columns:
        return "sentence1", "sentence2"
    if "sentence" in columns:
        return "sentence", None
    raise ValueError(f"Local files need a 'sentence' or 'sentence1'+'sentence2' column and 'label'; got {columns}.")


def label_setup(data_args: DataTrainingArguments, raw: DatasetDict) -> tuple[bool, list | None]:
    """(is_regression, label_list or None)."""
    if "label" not in raw["train"].column_names:
        raise ValueError("The training data has no 'label' column.")
    if data_args.task_name is not None:
        is_regression = data_args.task_name == "stsb"
        return is_regression, None if is_regression else raw["train"].features["label"].names
    is_regression = raw["train"].features["label"].dtype in ("float32", "float64")
    return is_regression, None if is_regression else sorted(raw["train"].unique("label"))


def load_teacher(model_args: ModelArguments, num_labels: int, label_list, is_regression: bool):
    """The model to compress and whether it still needs fine-tuning (its classifier is new)."""
    path = model_args.model_name_or_path
    if path is None:
        from .data import default_teacher_path

        path = default_teacher_path()
    if model_args.teacher_dir and os.path.exists(os.path.join(model_args.teacher_dir, "config.json")):
        logger.info("Loading the cached fine-tuned teacher from %s", model_args.teacher_dir)
        path = model_args.teacher_dir
    if os.path.isdir(path):
        check_checkpoint(path)  # a truncated or pickle-only checkpoint fails here, clearly
    config = AutoConfig.from_pretrained(path, num_labels=num_labels, cache_dir=model_args.cache_dir)
    if label_list is not None and not is_regression:
        config.label2id = {str(label): index for index, label in enumerate(label_list)}
        config.id2label = {index: str(label) for index, label in enumerate(label_list)}
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or path, cache_dir=model_args.cache_dir)
    model, loading_info = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, cache_dir=model_args.cache_dir, output_loading_info=True, use_safetensors=True
    )
    needs_finetuning = any(key.startswith("classifier") for key in loading_info["missing_keys"])
    return copy_out_of_file(model), tokenizer, needs_finetuning


def preprocess(raw: DatasetDict, tokenizer, keys, label_list, data_args, training_args) -> DatasetDict:
    first, second = keys
    label_to_id = {label: index for index, label in enumerate(label_list)} if label_list is not None else None

    def tokenize(examples):
        texts = (examples[first],) if second is None else (examples[first], examples[second])
        result = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        if label_to_id is not None and data_args.task_name is None:
            result["label"] = [label_to_id[label] for label in examples["label"]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        processed = raw.map(tokenize, batched=True, desc="Running tokenizer on dataset")
    limits = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_predict_samples,
    }
    for split, limit in limits.items():
        if split in processed and limit is not None:
            processed[split] = processed[split].select(range(min(limit, len(processed[split]))))
    return processed


def metrics_function(data_args: DataTrainingArguments, is_regression: bool):
    task = data_args.task_name or ("regression" if is_regression else "accuracy")
    metric = load_glue_metric(task)

    def compute_metrics(prediction: EvalPrediction) -> dict:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits) if is_regression else np.argmax(logits, axis=1)
        result = metric.compute(predictions=predictions, references=prediction.label_ids)
        if len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    return compute_metrics


def run(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Parse ``argv``, fine-tune the teacher if its classifier is new, compress, evaluate; returns the metrics."""
    model_args, data_args, training_args = parse_arguments(argv, prog)
    refuse_teacher_folder(training_args.output_dir, model_args.model_name_or_path)
    if model_args.teacher_dir is None:
        model_args.teacher_dir = os.path.join(training_args.output_dir, "checkpoint-teacher")
    setup_logging(training_args, logger)
    set_seed(training_args.seed)
    raw = load_raw_datasets(data_args, model_args.cache_dir)
    is_regression, label_list = label_setup(data_args, raw)
    num_labels = 1 if is_regression else len(label_list)
    model, tokenizer, needs_finetuning = load_teacher(model_args, num_labels, label_list, is_regression)
    processed = preprocess(raw, tokenizer, sentence_keys(data_args, raw), label_list, data_args, training_args)
    eval_split = "validation_matched" if data_args.task_name == "mnli" else "validation"
    trainer = RMTKDTrainer(
        model=model,
        args=training_args,
        train_dataset=processed["train"] if training_args.do_train else None,
        eval_dataset=processed[eval_split] if training_args.do_eval or training_args.do_train else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=metrics_function(data_args, is_regression),
    )
    results = {}
    if training_args.do_train:
        if needs_finetuning:
            logger.info("The classifier is new: fine-tuning the teacher first.")
            train_teacher(trainer, model_args.teacher_dir, model_args.teacher_learning_rate)
        trainer.compress()
    if training_args.do_eval:
        results.update(evaluate_split(trainer, "eval"))
    if training_args.do_predict and "test" in processed:
        test = processed["test"]
        if "label" in test.column_names and min(test["label"]) >= 0:
            results.update(evaluate_split(trainer, "test", test))
    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)  # writes the model card too
    elif training_args.do_train:
        trainer.create_model_card(**card)  # as run_glue.py does when it does not push
    return results


__all__ = ["DataTrainingArguments", "ModelArguments", "parse_arguments", "run"]
