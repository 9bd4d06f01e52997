#!/usr/bin/env python
"""One point of the issue-#8 frontier after distillation, or the compute-matched control.

A point: ``RMTKDTrainer.compress()`` one-shot at one σ² quantile from the converged teacher of
``minilm_movie_reviews.py``, with the fast layout (per-head attention, widths rounded to multiples of 8) and the
vocabulary trimmed to the training split's tokens (the trainer's default). Validation and test accuracy are then
measured the way a user meets the result: ``AutoModelForSequenceClassification`` + ``AutoTokenizer`` loaded from
the saved checkpoint, the raw text tokenized by the saved (trimmed) tokenizer.

The control (``--control``): the converged teacher trained ``--steps`` more steps with the same optimiser, batch
and data, without compression or distillation.

    python benchmarks/minilm_movie_reviews.py --steps 600 --work_dir outputs/bench   # once: the converged teacher
    python benchmarks/frontier_point.py --quantile 0.5 --steps 600 --seed 0 --work_dir outputs/bench
    python benchmarks/frontier_point.py --control --steps 600 --seed 0 --work_dir outputs/bench
    python benchmarks/frontier_point.py --target_ratio 0.34 --keep_best_every 100 --seed 0   # best on validation
    python benchmarks/frontier_point.py --target_ratio 0.34 --quantile_shifts '{"ffn": 0.3}' --seed 0   # FFN cut more

Appends one JSON line per run to ``benchmarks/results/frontier_points.jsonl``. The validation split gates
nothing here (``max_metric_drop=1``) and the test split is read once, at the end. With ``--keep_best_every`` the
checkpoints are chosen on the validation split's first 956 rows, so runs are compared on the other 957
(``validation_holdout_accuracy``, recorded for every run). Every run also records its teacher (weights' SHA-256
and accuracies): retraining the teacher on a fresh ``outputs/`` gives another one, and runs are only compared with
runs from the same teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification

import rmt_kd_hf  # noqa: F401  (registers the RMTBert auto classes)
from rmt_kd_hf.data import default_teacher_path, load_movie_reviews
from rmt_kd_hf.reports import parameter_counts, text_classification_accuracy
from rmt_kd_hf.stage_checkpoints import model_fingerprint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minilm_movie_reviews import trainer_for  # noqa: E402

# Recorded with every point: lines written before per-head sizes were rounded to the nearest multiple of 8 had them
# rounded up ("up"), which is a different layout.
HEAD_SIZE_RULE = "nearest"
# --keep_best_every picks checkpoints on the validation rows before this one; the rows from it on are then the only
# unbiased validation score, so every run records its accuracy there too (validation_holdout_accuracy)
SELECTION_ROWS = 956
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "frontier_points.jsonl")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench")
    parser.add_argument("--quantile", type=float, default=0.5)
    parser.add_argument(
        "--target_ratio",
        type=float,
        default=None,
        help="target_parameter_ratio (fraction of the teacher's parameters kept): the quantile is then chosen by "
        "bisection, the mildest one that meets it, instead of --quantile",
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--hidden_weight", type=float, default=1.0, help="hidden_distillation_weight")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=0.7, help="distillation_alpha (task-loss weight)")
    parser.add_argument("--temperature", type=float, default=1.0, help="distillation_temperature")
    parser.add_argument(
        "--keep_best_every",
        type=int,
        default=0,
        help="evaluate on validation every N steps and end on the best weights (load_best_model_at_end); 0: off",
    )
    parser.add_argument(
        "--schedule",
        choices=["one_shot", "per_layer"],
        default="one_shot",
        help="compression_schedule; per_layer splits --steps evenly over the stages (embeddings + one per layer)",
    )
    parser.add_argument(
        "--calibration_fraction", type=float, default=0.1, help="fraction of the training rows that calibrate"
    )
    parser.add_argument(
        "--quantile_shifts",
        type=json.loads,
        default=None,
        help="sigma_quantile_shifts as JSON, e.g. '{\"ffn\": 0.2}' (FFN sites fit at the quantile + 0.2)",
    )
    parser.add_argument("--control", action="store_true", help="the compute-matched control instead of a point")
    parser.add_argument(
        "--rescore_holdout",
        action="store_true",
        help="only add the validation halves' accuracy to recorded runs that lack it (checkpoints on disk)",
    )
    return parser.parse_args(argv)


def point_name(args: argparse.Namespace) -> str:
    best = f"_best{args.keep_best_every}" if args.keep_best_every else ""
    best += "_per_layer" if args.schedule == "per_layer" and not args.control else ""
    best += f"_cal{args.calibration_fraction}" if args.calibration_fraction != 0.1 and not args.control else ""
    for kind, shift in sorted((args.quantile_shifts or {}).items()):
        best += f"_shift-{kind}{shift:+g}" if not args.control else ""
    if args.control:
        return f"control_s{args.seed}_steps{args.steps}_lr{args.learning_rate}{best}"
    recipe = f"steps{args.steps}_h{args.hidden_weight}_lr{args.learning_rate}_a{args.alpha}_T{args.temperature}"
    where = f"t{args.target_ratio}" if args.target_ratio is not None else f"q{args.quantile}"
    return f"frontier_{where}_s{args.seed}_{recipe}_heads-{HEAD_SIZE_RULE}{best}"


def keep_best_fields(every: int) -> dict:
    """RMTKDConfig fields that evaluate on validation every ``every`` steps and end on the best weights."""
    if not every:
        return {}
    return dict(
        eval_strategy="steps",
        eval_steps=every,
        save_strategy="steps",  # TrainingArguments asks for it; compress() keeps the best weights in memory
        save_steps=every,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
    )


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    if args.rescore_holdout:
        return rescore_holdout(args.max_length)
    start = time.perf_counter()
    teacher_dir, teacher = converged_teacher(args.work_dir)
    teacher_parameters = parameter_counts(teacher)["total"]
    tokenizer = AutoTokenizer.from_pretrained(default_teacher_path())
    reviews = load_movie_reviews(seed=0)
    data = reviews.map(
        lambda batch: tokenizer(batch["sentence"], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=["sentence"],
    )
    teacher_scores = teacher_record(teacher_dir, teacher, tokenizer, reviews, args.max_length)
    output_dir = os.path.join(args.work_dir, point_name(args))
    if args.keep_best_every:
        data = {"train": data["train"], "validation": data["validation"].select(range(SELECTION_ROWS))}
    trainer = trainer_for(
        teacher,
        data,
        tokenizer,
        output_dir,
        args.seed,
        sigma_quantile=args.quantile,
        target_parameter_ratio=args.target_ratio,
        compression_schedule=args.schedule,
        calibration_fraction=args.calibration_fraction,
        sigma_quantile_shifts=args.quantile_shifts,
        stage_max_steps=args.steps
        if args.schedule == "one_shot"
        else args.steps // (teacher.config.num_hidden_layers + 1),
        max_steps=args.steps,
        hidden_distillation_weight=args.hidden_weight,
        learning_rate=args.learning_rate,
        distillation_alpha=args.alpha,
        distillation_temperature=args.temperature,
        max_metric_drop=1.0,  # measure, do not gate
        reduce_attention_heads=True,
        width_multiple=8,
        measure_latency=False,
        **keep_best_fields(args.keep_best_every),
    )
    if args.control:
        trainer.train()
        trainer.save_model(output_dir)  # with --keep_best_every, the best evaluated checkpoint
    else:
        trainer.compress()
    model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    saved_tokenizer = AutoTokenizer.from_pretrained(output_dir)

    validation = split_accuracies(model, saved_tokenizer, reviews, args.max_length)
    parameters = parameter_counts(model)["total"]
    quantile = None if args.control else trainer.compression_history["stages"][-1]["sigma_quantile"]
    point = {
        "kind": "control" if args.control else "point",
        "quantile": quantile,
        "target_parameter_ratio": args.target_ratio,
        "seed": args.seed,
        "steps": args.steps,
        "hidden_distillation_weight": args.hidden_weight,
        "learning_rate": args.learning_rate,
        "distillation_alpha": args.alpha,
        "distillation_temperature": args.temperature,
        "head_size_rule": HEAD_SIZE_RULE,
        "keep_best_every": args.keep_best_every,
        "compression_schedule": args.schedule,
        "calibration_fraction": args.calibration_fraction,
        "sigma_quantile_shifts": args.quantile_shifts,
        "stage_quantiles": None
        if args.control
        else [stage["sigma_quantile"] for stage in trainer.compression_history["stages"]],
        "kept_step": kept_step(trainer, args),
        "vocabulary": len(saved_tokenizer),
        "parameters": parameters,
        "param_reduction": 1 - parameters / teacher_parameters,
        **validation,
        "checkpoint": output_dir,
        **teacher_scores,
        "widths": None if args.control else trainer.compression_history["final"]["widths"],
        "seconds": time.perf_counter() - start,
        "command": shlex.join(["python", "benchmarks/frontier_point.py", *(argv or sys.argv[1:])]),
    }
    with open(RESULTS, "a") as file:
        file.write(json.dumps(point) + "\n")
    print(json.dumps(point, indent=2))
    return point


def converged_teacher(work_dir: str) -> tuple[str, BertForSequenceClassification]:
    """The directory and model of the converged teacher that ``minilm_movie_reviews.py`` saved in ``work_dir``."""
    teacher_dir = os.path.join(work_dir, "teacher_converged")
    if not os.path.exists(os.path.join(teacher_dir, "config.json")):
        raise SystemExit(f"{teacher_dir} is missing: run benchmarks/minilm_movie_reviews.py first.")
    return teacher_dir, AutoModelForSequenceClassification.from_pretrained(teacher_dir)


def teacher_record(teacher_dir: str, teacher, tokenizer, reviews, max_length: int) -> dict:
    """The teacher's fingerprint and accuracies (cached beside it): runs are only compared with runs from the same
    teacher, since retraining it (a fresh ``outputs/``) gives another one."""
    fingerprint = model_fingerprint(teacher)
    cache = os.path.join(teacher_dir, "frontier_teacher_scores.json")
    if os.path.exists(cache):
        with open(cache) as file:
            cached = json.load(file)
        if cached["teacher_fingerprint"] == fingerprint:
            return cached
    scores = split_accuracies(teacher, tokenizer, reviews, max_length)
    record = {
        "teacher_fingerprint": fingerprint,
        "teacher_validation_accuracy": scores["validation_accuracy"],
        "teacher_test_accuracy": scores["test_accuracy"],
    }
    with open(cache, "w") as file:
        json.dump(record, file, indent=2)
    return record


def split_accuracies(model, tokenizer, reviews, max_length: int) -> dict[str, float]:
    """Accuracy on the validation split, on its two halves (checkpoint selection / holdout) and on test."""

    def accuracy(rows) -> float:
        return text_classification_accuracy(model, tokenizer, rows["sentence"], rows["label"], max_length)

    validation = reviews["validation"]
    selection_rows, holdout_rows = range(SELECTION_ROWS), range(SELECTION_ROWS, len(validation))
    selection, holdout = accuracy(validation.select(selection_rows)), accuracy(validation.select(holdout_rows))
    return {
        "validation_accuracy": (selection * len(selection_rows) + holdout * len(holdout_rows)) / len(validation),
        "validation_selection_accuracy": selection,
        "validation_holdout_accuracy": holdout,
        "test_accuracy": accuracy(reviews["test"]),
    }


def rescore_holdout(max_length: int = 64) -> None:
    """Add the two validation halves to recorded runs that lack them and whose checkpoint is still on disk."""
    with open(RESULTS) as file:
        runs = [json.loads(line) for line in file if line.strip()]
    reviews = load_movie_reviews(seed=0)
    for run in runs:
        checkpoint = run.get("checkpoint", "")
        if "validation_holdout_accuracy" in run or not os.path.exists(os.path.join(checkpoint, "config.json")):
            continue
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
        scores = split_accuracies(model, AutoTokenizer.from_pretrained(checkpoint), reviews, max_length)
        if abs(scores["test_accuracy"] - run["test_accuracy"]) > 1e-9:
            raise SystemExit(f"{checkpoint} no longer scores its recorded test accuracy: it was overwritten.")
        run.update(scores)
        print(checkpoint, {key: round(value, 4) for key, value in scores.items()}, flush=True)
    with open(RESULTS + ".tmp", "w") as file:
        file.writelines(json.dumps(run) + "\n" for run in runs)
    os.replace(RESULTS + ".tmp", RESULTS)


def kept_step(trainer, args: argparse.Namespace) -> int | None:
    """The step whose weights were kept (``None`` without ``--keep_best_every``)."""
    if not args.keep_best_every:
        return None
    if args.control:
        return int(trainer.state.best_model_checkpoint.rsplit("-", 1)[-1])
    return [stage.get("kept_step") for stage in trainer.compression_history["stages"]][-1]


if __name__ == "__main__":
    main()
