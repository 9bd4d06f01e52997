"""What the example scripts (``rmt-kd compress``, ``run_glue.py``, ``run_image_classification.py``) share: argument
parsing, logging, fine-tuning a teacher whose head is new (early stopping on validation), and scoring a split."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
from collections.abc import Sequence

import datasets
import transformers
from transformers import EarlyStoppingCallback, HfArgumentParser
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, get_last_checkpoint

from .checkpoint import save_compressed

TEACHER_RUN_DIRNAME = "teacher-run"  # inside output_dir: the Trainer checkpoints of the teacher's fine-tuning


def parse_dataclass_arguments(dataclass_types: tuple, argv: Sequence[str] | None = None, prog: str | None = None):
    """Parse ``argv`` into ``dataclass_types`` with ``HfArgumentParser`` (``--help`` shows every default); a single
    ``.json`` argument is read as a file of arguments, as in transformers' examples."""
    parser = HfArgumentParser(dataclass_types, prog=prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def setup_logging(training_args, logger: logging.Logger) -> None:
    """Log to stdout at the level ``training_args`` gives this process, as transformers' ``run_glue.py``: the main
    process at ``log_level`` (``"passive"``: info), the others at ``log_level_replica``. The level reaches the
    script's ``logger``, datasets, transformers and this package (whose loggers are not under transformers')."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()  # what "passive" resolves to on the main process
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    logging.getLogger(__name__.split(".")[0]).setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)


def train_teacher(
    trainer,
    teacher_dir: str | None = None,
    teacher_learning_rate: float | None = None,
    max_epochs: float | None = None,
    early_stopping_patience: int = 1,
) -> dict:
    """Fine-tune ``trainer.model`` (its head is new) with ``Trainer.train``, then save it atomically to ``teacher_dir``
    so that a resumed run finds the same teacher. Returns the training metrics.

    With ``early_stopping_patience > 0`` and an eval set, the teacher trains for at most ``max_epochs`` epochs
    (default: ``num_train_epochs``), is evaluated after each, stops once ``compression_metric`` has not improved for
    ``early_stopping_patience`` epochs and ends on its best epoch: a converged teacher, so that the compressed model
    is compared with a teacher that more training would not improve (docs/design.md §3). Its Trainer checkpoints go to
    ``output_dir/teacher-run`` and are removed once the teacher is saved. With ``early_stopping_patience=0`` it
    trains exactly ``max_epochs`` epochs with the run's own save settings.

    ``resume_from_checkpoint=True`` resumes this training only from a Trainer checkpoint that exists (``compress()``
    resumes its own stages); the optimizer is reset afterwards so that ``compress()`` starts its own.
    """
    user_args = trainer.args
    teacher_args = copy.copy(user_args)  # the run's own arguments stay as the user gave them
    if teacher_learning_rate is not None:
        teacher_args.learning_rate = teacher_learning_rate
    if max_epochs is not None:
        teacher_args.num_train_epochs, teacher_args.max_steps = max_epochs, -1
    early_stopping = None
    if early_stopping_patience > 0 and trainer.eval_dataset is not None:
        teacher_args.output_dir = os.path.join(user_args.output_dir, TEACHER_RUN_DIRNAME)
        teacher_args.eval_strategy, teacher_args.save_strategy = IntervalStrategy.EPOCH, SaveStrategy.EPOCH
        teacher_args.save_total_limit, teacher_args.load_best_model_at_end = 1, True
        teacher_args.metric_for_best_model = metric = user_args.compression_metric
        teacher_args.greater_is_better = metric != "loss"
        early_stopping = EarlyStoppingCallback(early_stopping_patience=early_stopping_patience)
        trainer.add_callback(early_stopping)
    resume = user_args.resume_from_checkpoint
    if resume in (True, "True"):
        output_dir = teacher_args.output_dir
        resume = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    trainer.args = teacher_args
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        trainer.args = user_args
        if early_stopping is not None:
            trainer.remove_callback(early_stopping)
    trainer.log_metrics("teacher_train", result.metrics)
    trainer.save_metrics("teacher_train", result.metrics)
    if trainer.is_world_process_zero():
        if teacher_dir:
            save_compressed(trainer.model, teacher_dir, trainer.processing_class, overwrite=True)
        if early_stopping is not None:  # the best epoch is loaded: its checkpoints are no longer needed
            shutil.rmtree(teacher_args.output_dir, ignore_errors=True)
    trainer.optimizer, trainer.lr_scheduler = None, None
    return result.metrics


def evaluate_split(trainer, split: str, dataset=None) -> dict:
    """``trainer.evaluate`` on ``dataset`` (default: the eval set) with ``split`` as the metric prefix; the metrics
    are logged and saved to ``{split}_results.json`` as transformers' examples do."""
    metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=split)
    trainer.log_metrics(split, metrics)
    trainer.save_metrics(split, metrics)
    return metrics


__all__ = ["evaluate_split", "parse_dataclass_arguments", "setup_logging", "train_teacher"]
