#!/usr/bin/env python
"""One point of the issue-#8 frontier after distillation: trimmed vocabulary + per-head attention + widths rounded to
multiples of 8, one-shot at one quantile, distilled from the converged teacher of ``minilm_movie_reviews.py``.

    python benchmarks/minilm_movie_reviews.py --steps 600 --work_dir outputs/bench   # once: the converged teacher
    python benchmarks/frontier_point.py --quantile 0.5 --steps 600 --seed 0 --work_dir outputs/bench

Appends one JSON line per run to ``benchmarks/results/frontier_points.jsonl``. The vocabulary is built from the
training split only; the validation split gates nothing here and the test split is read once, at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmt_kd_hf.data import default_teacher_path, load_movie_reviews
from rmt_kd_hf.reports import parameter_counts
from rmt_kd_hf.vocabulary import trim_vocabulary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minilm_movie_reviews import trainer_for  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "frontier_points.jsonl")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench")
    parser.add_argument("--quantile", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_length", type=int, default=64)
    args = parser.parse_args(argv)
    teacher_dir = os.path.join(args.work_dir, "teacher_converged")
    if not os.path.exists(os.path.join(teacher_dir, "config.json")):
        raise SystemExit(f"{teacher_dir} is missing: run benchmarks/minilm_movie_reviews.py first.")
    start = time.perf_counter()
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    teacher_counts = parameter_counts(teacher)
    tokenizer = AutoTokenizer.from_pretrained(default_teacher_path())
    reviews = load_movie_reviews(seed=0)
    model, trimmed_tokenizer, kept = trim_vocabulary(
        teacher, tokenizer, reviews["train"]["sentence"], max_length=args.max_length
    )
    data = reviews.map(
        lambda batch: trimmed_tokenizer(batch["sentence"], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=["sentence"],
    )
    name = f"frontier_q{args.quantile}_s{args.seed}"
    trainer = trainer_for(
        model,
        data,
        trimmed_tokenizer,
        os.path.join(args.work_dir, name),
        args.seed,
        sigma_quantile=args.quantile,
        stage_max_steps=args.steps,
        max_metric_drop=1.0,  # measure, do not gate: the floor is judged on the validation split below
        reduce_attention_heads=True,
        width_multiple=8,
        measure_latency=False,
    )
    student = trainer.compress()
    validation = trainer.evaluate()["eval_accuracy"]
    test = trainer.evaluate(eval_dataset=data["test"], metric_key_prefix="test")["test_accuracy"]
    counts = parameter_counts(student)
    with open(os.path.join(os.path.dirname(RESULTS), "minilm_movie_reviews.json")) as file:
        arms = {row["arm"]: row for row in json.load(file)["rows"]}
    point = {
        "quantile": args.quantile,
        "seed": args.seed,
        "steps": args.steps,
        "vocabulary": len(kept),
        "parameters": counts["total"],
        "param_reduction": 1 - counts["total"] / teacher_counts["total"],
        "validation_accuracy": validation,
        "test_accuracy": test,
        "teacher_test_accuracy": arms["teacher (converged)"]["test_accuracy"],
        "control_test_accuracy": arms["control (+steps, no compression)"]["test_accuracy"],
        "widths": trainer.compression_history["final"]["widths"],
        "seconds": time.perf_counter() - start,
        "command": shlex.join(["python", "benchmarks/frontier_point.py", *(argv or sys.argv[1:])]),
    }
    with open(RESULTS, "a") as file:
        file.write(json.dumps(point) + "\n")
    print(json.dumps(point, indent=2))
    return point


if __name__ == "__main__":
    main()
