"""Sequence classification with RMT-KD, GLUE-style: the logic behind ``rmt-kd compress`` and
``examples/text-classification/run_glue.py``.

Shaped like transformers' ``examples/pytorch/text-classification/run_glue.py``; the Trainer is an
``RMTKDTrainer`` and the training arguments an ``RMTKDConfig``. If the model is not yet fine-tuned for the task
(its classifier is new), it is fine-tuned first (``num_train_epochs``, ``teacher_learning_rate``) and cached in
``teacher_dir``; then ``compress()`` runs the compress-and-distil loop and saves the result in ``output_dir``
(``--resume_from_checkpoint`` continues an interrupted run at its next stage).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from datasets import DatasetDict
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    set_seed,
)

from .checkpoint import (
    check_checkpoint,
    load_checkpoint,
    output_lock,
    refuse_finished_output,
    refuse_teacher_folder,
    write_json_atomic,
)
from .config import RMTKDConfig
from .data import default_teacher_path
from .filenames import HISTORY_FILENAME
from .metrics import load_glue_metric
from .scripts import evaluate_split, parse_dataclass_arguments, setup_logging, train_teacher
from .text_data import DataTrainingArguments, label_setup, load_raw_datasets, sentence_keys
from .trainer import RMTKDTrainer

logger = logging.getLogger(__name__)


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
    teacher_max_epochs: float = field(
        default=10.0,
        metadata={"help": "Most epochs of teacher fine-tuning; it stops earlier once validation stops improving."},
    )
    teacher_early_stopping_patience: int = field(
        default=1,
        metadata={
            "help": "Epochs without a better validation compression_metric before teacher fine-tuning stops (the "
            "best epoch is kept). 0: train exactly teacher_max_epochs epochs."
        },
    )

    def __post_init__(self):
        if not 0 < self.teacher_max_epochs < math.inf:
            raise ValueError(f"teacher_max_epochs must be finite and > 0, got {self.teacher_max_epochs!r}")
        if self.teacher_early_stopping_patience < 0:
            raise ValueError(
                f"teacher_early_stopping_patience must be >= 0, got {self.teacher_early_stopping_patience!r}"
            )


def parse_arguments(argv: list[str] | None = None, prog: str | None = None):
    """Model, data and ``RMTKDConfig`` options; ``--help`` shows every option with its default."""
    return parse_dataclass_arguments((ModelArguments, DataTrainingArguments, RMTKDConfig), argv, prog)


def load_teacher(model_args: ModelArguments, num_labels: int, label_list, is_regression: bool):
    """The model to compress and whether it still needs fine-tuning (its classifier is new)."""
    path = model_args.model_name_or_path
    if path is None:
        path = default_teacher_path()
    if model_args.teacher_dir and os.path.exists(os.path.join(model_args.teacher_dir, "config.json")):
        logger.info("Loading the cached fine-tuned teacher from %s", model_args.teacher_dir)
        path = model_args.teacher_dir
    if os.path.isdir(path):
        check_checkpoint(path)  # before AutoConfig reads it: a damaged or pickle-only checkpoint fails clearly
    config = AutoConfig.from_pretrained(path, num_labels=num_labels, cache_dir=model_args.cache_dir)
    if label_list is not None and not is_regression:
        config.label2id = {str(label): index for index, label in enumerate(label_list)}
        config.id2label = {index: str(label) for index, label in enumerate(label_list)}
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or path, cache_dir=model_args.cache_dir)
    model, new_head = load_checkpoint(
        AutoModelForSequenceClassification,
        path,
        allow_new_head=True,
        output_loading_info=True,
        verify=False,  # checked above
        config=config,
        cache_dir=model_args.cache_dir,
    )
    return model, tokenizer, bool(new_head)


def preprocess(raw: DatasetDict, tokenizer, keys, data_args, training_args) -> DatasetDict:
    """Tokenized splits (labels are ids already: ``load_raw_datasets`` encodes them)."""
    first, second = keys

    def tokenize(examples):
        texts = (examples[first],) if second is None else (examples[first], examples[second])
        return tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)

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
    """Parse ``argv``, fine-tune the teacher if its classifier is new, compress, evaluate; returns the metrics.

    The reported metrics are those of the folder the run saved, with the tokenizer saved there (the run's own
    evaluations read the teacher tokenizer's ids through a remapping collator, which splits unseen words as that
    tokenizer does but cannot see words the run's truncation cut)."""
    model_args, data_args, training_args = parse_arguments(argv, prog)
    refuse_teacher_folder(training_args.output_dir, model_args.model_name_or_path)
    if training_args.do_train and not training_args.resume_from_checkpoint:
        refuse_finished_output(training_args.output_dir, training_args.overwrite_output_dir)
    if model_args.teacher_dir is None:
        model_args.teacher_dir = os.path.join(training_args.output_dir, "checkpoint-teacher")
    setup_logging(training_args, logger)
    set_seed(training_args.seed)
    raw = load_raw_datasets(data_args, model_args.cache_dir)
    is_regression, label_list = label_setup(raw)
    num_labels = 1 if is_regression else len(label_list)
    main_metric = "pearson" if is_regression else "matthews_correlation" if data_args.task_name == "cola" else None
    if main_metric and training_args.compression_metric == "accuracy":  # the default, which this task lacks
        logger.info("compression_metric: %s (this task reports no accuracy).", main_metric)
        training_args.compression_metric = main_metric
    apply_command_line_defaults(training_args, argv, len(raw["train"]) if "train" in raw else 0)
    model, tokenizer, needs_finetuning = load_teacher(model_args, num_labels, label_list, is_regression)
    keys = sentence_keys(data_args, raw)
    processed = preprocess(raw, tokenizer, keys, data_args, training_args)
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
    lock = output_lock(training_args.output_dir) if training_args.do_train and training_args.should_save else None
    with lock or contextlib.nullcontext():
        if training_args.do_train:
            if needs_finetuning:
                logger.info("The classifier is new: fine-tuning the teacher first.")
                train_teacher(
                    trainer,
                    model_args.teacher_dir,
                    model_args.teacher_learning_rate,
                    model_args.teacher_max_epochs,
                    model_args.teacher_early_stopping_patience,
                )
            test = labelled_test_split(processed) if training_args.do_predict else None
            if test is not None:  # the teacher's test score, beside the compressed model's
                results.update(evaluate_split(trainer, "teacher_test", test))
            trainer.compress()
            processed = score_the_saved_folder(trainer, raw, keys, data_args)
        if training_args.do_eval:
            results.update(evaluate_split(trainer, "eval", processed[eval_split]))
        test = labelled_test_split(processed) if training_args.do_predict else None
        if test is not None:
            results.update(evaluate_split(trainer, "test", test))
        if training_args.do_train:
            record_final_metrics(trainer, results)
        card = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
        if training_args.push_to_hub:
            trainer.push_to_hub(**card)  # writes the model card too
        elif training_args.do_train:
            trainer.create_model_card(**card)  # as run_glue.py does when it does not push
    return results


# rmt-kd compress's defaults where RMTKDConfig's would not suit a user's own data
DEFAULT_TARGET_METRIC_DROP = 0.01
STAGE_EPOCHS = 24  # distillation: this many passes over a small training set per cut, within STAGE_STEPS_RANGE
STAGE_STEPS_RANGE = (30, 6000)
CALIBRATION_MIN_ROWS = 800  # calibrate on at least this many rows (all of a smaller training set)


def apply_command_line_defaults(training_args: RMTKDConfig, argv: list[str] | None, num_train_rows: int) -> None:
    """What ``rmt-kd compress`` assumes when not told otherwise:

    * without ``--target_metric_drop``, ``--max_metric_drop``, ``--target_parameter_ratio`` or
      ``--target_latency_ratio``: the accuracy-targeted mode, ``target_metric_drop=0.01`` (the strongest cut within
      one point of the teacher's validation metric);
    * without ``--stage_max_steps``: a cut is distilled for ``STAGE_EPOCHS`` epochs of the training set, within
      ``STAGE_STEPS_RANGE`` steps (600 rows at batch 8: 1,800 steps; 2,000 rows: 6,000; 200 rows: 600): on 600
      movie-review rows a cut at σ² quantile 0.25 scored 1.57, 0.68 and 0.26 pt below the teacher after 225, 900
      and 1,800 steps, and on 2,000 rows the same epochs were needed, not the same steps: q 0.25 scored −1.15 pt
      after 1,800 steps and −0.16 after 3,600, q 0.375 −1.57 after 3,600 and −0.58 after 6,000
      (docs/results/small_data.md);
    * without ``--calibration_fraction``: at least ``CALIBRATION_MIN_ROWS`` calibration rows (all of a smaller
      training set; 10% of a larger one, as ``RMTKDConfig``), because the fraction of a small set is too few tokens
      for the spectra: on 600 movie-review rows, 60 rows (1,541 tokens for 384 dimensions) gave 73.81% validation
      accuracy at σ² quantile 0.25 where all 600 rows gave 75.74% (benchmarks/results/small_data.md).

    The batch size (the Trainer's 8 per device) and the evaluation (none during distillation: validation is read at
    the screening step and at the end of each cut, whose last step's weights are kept) do not change with the size
    of the training set: the steps rule counts passes over it, and a validation score that picked a cut's step would
    flatter the floor's verdict on it.
    """
    given = given_options(sys.argv[1:] if argv is None else argv)
    if not given & {"target_metric_drop", "max_metric_drop", "target_parameter_ratio", "target_latency_ratio"}:
        training_args.target_metric_drop = DEFAULT_TARGET_METRIC_DROP
        logger.info("target_metric_drop: %s (the strongest cut within it is searched).", DEFAULT_TARGET_METRIC_DROP)
    if "stage_max_steps" not in given and num_train_rows:
        batch = training_args.per_device_train_batch_size * max(training_args.world_size, 1)
        batch *= training_args.gradient_accumulation_steps
        low, high = STAGE_STEPS_RANGE
        training_args.stage_max_steps = min(high, max(low, math.ceil(STAGE_EPOCHS * num_train_rows / batch)))
        logger.info(
            "stage_max_steps: %d (%d epochs of %d rows).", training_args.stage_max_steps, STAGE_EPOCHS, num_train_rows
        )
    if "calibration_fraction" not in given and num_train_rows:
        fraction = min(1.0, CALIBRATION_MIN_ROWS / num_train_rows)
        if fraction > training_args.calibration_fraction:
            training_args.calibration_fraction = fraction
            logger.info("calibration_fraction: %.3f (at least %d rows).", fraction, CALIBRATION_MIN_ROWS)


def given_options(argv: list[str]) -> set[str]:
    """The option names present in ``argv`` (``--name``, ``--name=value``) or in its single JSON file of options."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as file:
            return set(json.load(file))
    return {argument[2:].split("=", 1)[0] for argument in argv if argument.startswith("--")}


def labelled_test_split(processed: DatasetDict):
    """The test split when it has labels (GLUE's hub test splits carry -1)."""
    test = processed.get("test")
    if test is None or "label" not in test.column_names or min(test["label"]) < 0:
        return None
    return test


def record_final_metrics(trainer: RMTKDTrainer, metrics: dict) -> None:
    """Write the saved folder's validation metric (``final``) and the teacher's and the saved folder's test metric
    (``test``) into its ``rmt_kd_history.json``, where the model card reads them."""
    name = trainer.args.compression_metric
    path = os.path.join(trainer.args.output_dir, HISTORY_FILENAME)
    if trainer.history is None or not trainer.is_world_process_zero() or not os.path.exists(path):
        return
    if f"eval_{name}" in metrics:
        trainer.history.final.metric = metrics[f"eval_{name}"]
    if f"test_{name}" in metrics and f"teacher_test_{name}" in metrics:
        trainer.history.test = {"teacher": metrics[f"teacher_test_{name}"], "compressed": metrics[f"test_{name}"]}
    write_json_atomic(path, trainer.history.to_dict())


def score_the_saved_folder(trainer: RMTKDTrainer, raw: DatasetDict, keys, data_args) -> DatasetDict:
    """Point ``trainer`` at the model and tokenizer ``compress()`` saved in ``output_dir``, read back from disk,
    and return the datasets tokenized by that tokenizer: what the run then evaluates is what a user loads."""
    output_dir = trainer.args.output_dir
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = load_checkpoint(AutoModelForSequenceClassification, output_dir).to(trainer.args.device)
    trainer.model = trainer.model_wrapped = model
    trainer.processing_class = trainer.callback_handler.processing_class = tokenizer
    trainer.data_collator = DataCollatorWithPadding(tokenizer)
    return preprocess(raw, tokenizer, keys, data_args, trainer.args)


__all__ = ["DataTrainingArguments", "ModelArguments", "parse_arguments", "run"]
