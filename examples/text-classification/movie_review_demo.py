#!/usr/bin/env python
"""`make demo`: RMT-KD end to end on real data, offline, on a CPU.

1. Write train/validation/test csv files of the movie-review snippets (seeded 70/15/15 split).
2. `run_glue.py`: fine-tune an all-MiniLM-L6-v2 teacher (cached in `<output>/teacher` between runs), then
   compress it with `RMTKDTrainer` (one stage at sigma_quantile 0.4 with the vocabulary trimmed to the training
   set's tokens, per-head attention and widths rounded to multiples of 8, then distillation) into
   `<output>/compressed`.
3. Reload both models with `AutoModelForSequenceClassification.from_pretrained` and print teacher vs compressed:
   test accuracy (the compressed model's scored again after reloading, through its own trimmed tokenizer),
   parameters, non-embedding parameters, safetensors MB, CPU latency at batch 1 and 32 (seq 128, timed by
   `compress()` one model after the other), all measured in this run, and where the wall time went. Results also
   go to `<output>/demo_results.json`.

The demo teacher is trained for 0.75 epoch and the cut distilled for 200 steps, so that the whole run takes under 10
minutes on 2 CPU cores (#22); `benchmarks/` compares against a teacher trained to convergence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_glue  # noqa: E402

from rmt_kd_hf.data import write_movie_review_csvs  # noqa: E402
from rmt_kd_hf.reports import parameter_counts, safetensors_size_mb, text_classification_accuracy  # noqa: E402


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--sigma_quantile", type=float, default=0.4)
    parser.add_argument("--stage_max_steps", type=int, default=200)
    parser.add_argument("--teacher_epochs", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def run_glue_arguments(args: argparse.Namespace, files: dict[str, str]) -> list[str]:
    return [
        f"--train_file={files['train']}",
        f"--validation_file={files['validation']}",
        f"--test_file={files['test']}",
        f"--teacher_dir={os.path.join(args.output_dir, 'teacher')}",
        f"--output_dir={os.path.join(args.output_dir, 'compressed')}",
        "--overwrite_output_dir",  # a rerun of the demo replaces its previous result
        "--do_train",
        "--do_eval",
        "--do_predict",
        "--max_seq_length=64",
        "--per_device_train_batch_size=32",
        "--per_device_eval_batch_size=128",
        f"--teacher_max_epochs={args.teacher_epochs}",
        "--teacher_early_stopping_patience=0",  # exactly teacher_epochs epochs: fast, not converged
        "--teacher_learning_rate=5e-5",
        "--learning_rate=1e-4",
        f"--sigma_quantile={args.sigma_quantile}",
        f"--stage_max_steps={args.stage_max_steps}",
        "--reduce_attention_heads",  # the fast layout of benchmarks/results/frontier_sweep.md
        "--width_multiple=8",
        "--distillation_alpha=0.7",
        "--distillation_temperature=1.0",
        "--max_metric_drop=0.05",
        "--save_strategy=no",
        "--logging_steps=50",
        "--train_sampling_strategy=group_by_length",
        "--report_to=none",
        f"--seed={args.seed}",
        "--use_cpu",
    ]


def test_accuracy(model, tokenizer, test_csv: str) -> float:
    test = load_dataset("csv", data_files={"test": test_csv})["test"]
    return text_classification_accuracy(model, tokenizer, test["sentence"], test["label"], max_length=64)


def read_json(directory: str, filename: str) -> dict:
    with open(os.path.join(directory, filename)) as file:
        return json.load(file)


def measure(name: str, directory: str, model, accuracy: float, latency: dict) -> dict:
    """Sizes of ``model`` (reloaded with ``from_pretrained`` from ``directory``); its test accuracy and the CPU
    latency that the run measured (``compress()`` times teacher and compressed one after the other)."""
    counts = parameter_counts(model)
    return {
        "model": name,
        "test_accuracy": accuracy,
        "parameters": counts["total"],
        "non_embedding_parameters": counts["non_embedding"],
        "safetensors_mb": safetensors_size_mb(directory),
        "latency_b1_ms": 1e3 * latency["batch_1"][name],
        "latency_b32_ms": 1e3 * latency["batch_32"][name],
    }


def reloaded_test_accuracy(model, directory: str, test_csv: str, run_accuracy: float) -> float:
    """The compressed model's test accuracy as a user meets it: reloaded and read through its own (trimmed)
    tokenizer from ``directory``, checked against the run's own ``--do_predict`` score."""
    accuracy = test_accuracy(model, AutoTokenizer.from_pretrained(directory), test_csv)
    if abs(accuracy - run_accuracy) > 1e-6:
        print(f"Warning: the reloaded model scores {accuracy:.4%} on test, the run's --do_predict {run_accuracy:.4%}.")
    return accuracy


def print_table(rows: list[dict]) -> None:
    teacher = rows[0]
    header = f"{'':<12}{'test acc':>10}{'params':>13}{'non-emb':>12}{'MB':>8}{'b1 ms':>9}{'b32 ms':>9}"
    print("\n" + header)
    for row in rows:
        print(
            f"{row['model']:<12}{100 * row['test_accuracy']:>9.2f}%{row['parameters']:>13,}"
            f"{row['non_embedding_parameters']:>12,}{row['safetensors_mb']:>8.1f}"
            f"{row['latency_b1_ms']:>9.1f}{row['latency_b32_ms']:>9.1f}"
        )
    student = rows[-1]
    print(
        f"\ncompressed vs teacher: {100 * (student['test_accuracy'] - teacher['test_accuracy']):+.2f} pt accuracy, "
        f"{100 * (1 - student['parameters'] / teacher['parameters']):.1f}% fewer parameters "
        f"({100 * (1 - student['non_embedding_parameters'] / teacher['non_embedding_parameters']):.1f}% of "
        f"non-embedding), {teacher['latency_b1_ms'] / student['latency_b1_ms']:.2f}x faster at batch 1, "
        f"{teacher['latency_b32_ms'] / student['latency_b32_ms']:.2f}x at batch 32"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    files = write_movie_review_csvs(os.path.join(args.output_dir, "data"), seed=args.seed)
    run_glue.main(run_glue_arguments(args, files))
    run_glue_end = time.perf_counter()
    compressed_dir = os.path.join(args.output_dir, "compressed")
    teacher_dir = os.path.join(args.output_dir, "teacher")
    history = read_json(compressed_dir, "rmt_kd_history.json")
    run_results = read_json(compressed_dir, "all_results.json")
    teacher, compressed = (
        AutoModelForSequenceClassification.from_pretrained(directory).eval()
        for directory in (teacher_dir, compressed_dir)
    )
    compressed_accuracy = reloaded_test_accuracy(
        compressed, compressed_dir, files["test"], run_results["test_accuracy"]
    )
    rows = [
        measure("teacher", teacher_dir, teacher, run_results["teacher_test_accuracy"], history["latency"]),
        measure("compressed", compressed_dir, compressed, compressed_accuracy, history["latency"]),
    ]
    print_table(rows)
    teacher_seconds = None  # no teacher_train_results.json when the teacher was cached
    if os.path.exists(os.path.join(compressed_dir, "teacher_train_results.json")):
        teacher_seconds = read_json(compressed_dir, "teacher_train_results.json")["train_runtime"]
    phases = {  # where the wall time goes (#22's profile)
        "run_glue": run_glue_end - start,
        "teacher_training": teacher_seconds,
        "compression_stages": sum(stage["seconds"] for stage in history["stages"]),
        "measurement": time.perf_counter() - run_glue_end,
    }
    results = {
        "rows": rows,
        "history": history,
        "wall_seconds": time.perf_counter() - start,
        "phase_seconds": phases,
        "command": "make demo  # " + " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    with open(os.path.join(args.output_dir, "demo_results.json"), "w") as file:
        json.dump(results, file, indent=2)
    print(
        f"\nWall time {results['wall_seconds']:.0f} s ("
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items() if seconds is not None)
        + f"); details in {args.output_dir}/demo_results.json"
    )
    return results


if __name__ == "__main__":
    main()
