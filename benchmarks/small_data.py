#!/usr/bin/env python
"""RMT-KD on a user's own small dataset, with the command line's defaults (issue #19).

Subsets of the movie-review training split (600 and 2,000 rows, drawn with the run's seed; validation and test
splits whole, as everywhere else) go through ``rmt-kd compress`` exactly as a new user would run it: no option but
the data files and the output folder. The bundled all-MiniLM-L6-v2 has no classifier, so the command fine-tunes the
teacher first (early stopping on validation), then searches the strongest cut within one point of the teacher's
validation accuracy (``target_metric_drop=0.01``, its default), screening hopeless cuts early.

    python benchmarks/small_data.py --work_dir outputs/small_data                  # 600 and 2,000 rows, seeds 0-2
    python benchmarks/small_data.py --train_rows 600 --seeds 0 --work_dir outputs/small_data
    python benchmarks/small_data.py --tables_only

Results: ``benchmarks/results/small_data.json`` (``{"runs": [...]}``) and ``small_data.md``. A run already in the
JSON (same rows and seed) is not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import pandas as pd

from rmt_kd_hf.data import write_movie_review_csvs
from rmt_kd_hf.filenames import HISTORY_FILENAME

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULTS = os.path.join(RESULTS_DIR, "small_data.json")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/small_data")
    parser.add_argument("--train_rows", type=int, nargs="+", default=[600, 2000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tables_only", action="store_true")
    return parser.parse_args(argv)


def subset_files(work_dir: str, train_rows: int, seed: int) -> dict[str, str]:
    """The full validation and test csv files and a seeded ``train_rows`` sample of the training csv."""
    full = write_movie_review_csvs(os.path.join(work_dir, "data"), seed=0)
    files = dict(full)
    files["train"] = os.path.join(work_dir, "data", f"train_{train_rows}_s{seed}.csv")
    pd.read_csv(full["train"]).sample(n=train_rows, random_state=seed).to_csv(files["train"], index=False)
    return files


TRY_FIELDS = (
    "sigma_quantile",
    "status",
    "num_parameters",
    "eval_accuracy",
    "paired_standard_error",
    "screened_eval_accuracy",
    "seconds",
)


def run_one(work_dir: str, train_rows: int, seed: int) -> dict:
    files = subset_files(work_dir, train_rows, seed)
    output_dir = os.path.join(work_dir, f"rows{train_rows}_s{seed}")
    command = [
        "rmt-kd",
        "compress",
        f"--train_file={files['train']}",
        f"--validation_file={files['validation']}",
        f"--test_file={files['test']}",
        f"--output_dir={output_dir}",
        "--overwrite_output_dir",
        "--do_train",
        "--do_eval",
        "--do_predict",
        f"--seed={seed}",
    ]
    teacher_cached = os.path.exists(os.path.join(output_dir, "checkpoint-teacher", "config.json"))
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall_seconds = time.perf_counter() - start
    return collect_run(output_dir, train_rows, seed, command, wall_seconds, teacher_cached)


def collect_run(
    output_dir: str, train_rows: int, seed: int, command: list[str], wall_seconds: float, teacher_cached: bool
) -> dict:
    """The JSON entry of one finished ``rmt-kd compress`` run, read from its ``output_dir``."""
    with open(os.path.join(output_dir, HISTORY_FILENAME)) as file:
        history = json.load(file)
    results = {}
    for name in ("eval_results.json", "test_results.json", "teacher_test_results.json", "teacher_train_results.json"):
        path = os.path.join(output_dir, name)
        if name == "teacher_train_results.json" and not os.path.exists(path):
            continue  # a teacher loaded from checkpoint-teacher was not trained by this run
        with open(path) as file:
            results.update(json.load(file))
    stage = history["stages"][0] if history["stages"] else {}
    teacher_parameters = history["teacher"]["num_parameters"]
    return {
        "train_rows": train_rows,
        "seed": seed,
        "param_reduction": 1 - history["final"]["num_parameters"] / teacher_parameters,
        "parameters": history["final"]["num_parameters"],
        "teacher_parameters": teacher_parameters,
        "teacher_validation_accuracy": history["teacher"]["eval_accuracy"],
        "validation_accuracy": results["eval_accuracy"],
        "teacher_test_accuracy": results["teacher_test_accuracy"],
        "test_accuracy": results["test_accuracy"],
        "status": stage.get("status", "no stage"),
        "sigma_quantile": stage.get("sigma_quantile"),
        "paired_standard_error": stage.get("paired_standard_error"),
        "tries": [
            {key: entry.get(key) for key in TRY_FIELDS} for entry in stage.get("tries", [stage] if stage else [])
        ],
        "vocabulary": history.get("vocabulary"),
        "stage_max_steps": history["config"]["stage_max_steps"],
        "wall_seconds": wall_seconds,
        # a teacher fine-tuned by an earlier run into the same folder is loaded, not trained again
        "teacher_cached": teacher_cached,
        "teacher_train_seconds": results.get("train_runtime"),  # teacher_train_results.json's only runtime
        "command": shlex.join(command),
    }


def load_results() -> dict:
    if not os.path.exists(RESULTS):
        return {"runs": []}
    with open(RESULTS) as file:
        return json.load(file)


def write_tables(results: dict) -> None:
    lines = [
        "# RMT-KD on small datasets with the command line's defaults (issue #19)",
        "",
        "Each run: `rmt-kd compress` with only the data files and the output folder (its defaults: teacher "
        "fine-tuned with early stopping, `target_metric_drop=0.01`, `stage_retries=3`, screening), on a seeded "
        "subset of the movie-review training split; validation (1,913 rows) and test (1,913 rows) whole. "
        "Command: `python benchmarks/small_data.py --work_dir outputs/small_data`; each run's own command is in "
        "`small_data.json`.",
        "",
        "| train rows | seed | steps a cut | vocabulary trim | params removed | teacher val | val | Δ val (pt) "
        "| teacher test | test | Δ test (pt) | tries | minutes (teacher) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(results["runs"], key=lambda run: (run["train_rows"], run["seed"])):
        lines.append(
            f"| {run['train_rows']:,} | {run['seed']} | {run.get('stage_max_steps') or 0:,} "
            f"| {_vocabulary_cell(run.get('vocabulary'))} | {100 * run['param_reduction']:.1f}% "
            f"| {100 * run['teacher_validation_accuracy']:.2f} | {100 * run['validation_accuracy']:.2f} "
            f"| {100 * (run['validation_accuracy'] - run['teacher_validation_accuracy']):+.2f} "
            f"| {100 * run['teacher_test_accuracy']:.2f} | {100 * run['test_accuracy']:.2f} "
            f"| {100 * (run['test_accuracy'] - run['teacher_test_accuracy']):+.2f} | {len(run['tries'])} "
            f"| {run['wall_seconds'] / 60:.1f} ({_teacher_minutes(run)}) |"
        )
    for rows in sorted({run["train_rows"] for run in results["runs"]}):
        runs = [run for run in results["runs"] if run["train_rows"] == rows]
        reduction = statistics.fmean(run["param_reduction"] for run in runs)
        seeds = f"{len(runs)} seed{'s' * (len(runs) > 1)}"
        steps = sorted({run.get("stage_max_steps") or 0 for run in runs})
        mixed = f" (mixed: {' and '.join(f'{step:,}' for step in steps)} steps a cut)" if len(steps) > 1 else ""
        lines.append(f"\n{rows:,} rows: mean {100 * reduction:.1f}% of the parameters removed over {seeds}{mixed}.")
    lines += [
        "",
        "Every cut each run tried (σ² quantile; the metric at the screening evaluation; the validation accuracy after "
        "its distillation, Δ ± paired SE against the teacher):",
        "",
        "| train rows | seed | σ² quantile | parameters | screened | validation | Δ (pt) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(results["runs"], key=lambda run: (run["train_rows"], run["seed"])):
        for entry in run["tries"]:
            lines.append(f"| {run['train_rows']:,} | {run['seed']} | {_try_cells(entry, run)} |")
    with open(os.path.join(RESULTS_DIR, "small_data.md"), "w") as file:
        file.write("\n".join(lines) + "\n")


def _teacher_minutes(run: dict) -> str:
    """The teacher's fine-tuning time, marked when the run loaded it from an earlier run (its minutes exclude it)."""
    seconds = run.get("teacher_train_seconds")
    if seconds is None:  # a teacher loaded from a folder whose run's train results are gone
        return "cached" if run.get("teacher_cached") else "?"
    return f"{seconds / 60:.1f}{', cached' if run.get('teacher_cached') else ''}"


def _vocabulary_cell(vocabulary: dict | None) -> str:
    """The trim's outcome: the tokens kept, or undone (judged alone below the floor), or none made."""
    if not vocabulary:
        return "—"
    if vocabulary.get("undone"):
        return "undone"
    return f"{vocabulary['kept_size']:,} of {vocabulary['teacher_size']:,} tokens"


def _try_cells(entry: dict, run: dict) -> str:
    teacher = run["teacher_validation_accuracy"]
    screened, metric, error = (
        entry.get("screened_eval_accuracy"),
        entry.get("eval_accuracy"),
        entry.get("paired_standard_error"),
    )
    screened_out = "screened out" in str(entry.get("status", ""))
    cells = [
        f"{entry['sigma_quantile']:g}",
        f"{entry['num_parameters']:,}" if entry.get("num_parameters") else "—",
        f"{100 * screened:.2f}" if screened is not None else "—",
        "—" if metric is None or screened_out else f"{100 * metric:.2f}",
        "—"
        if metric is None or screened_out or error is None
        else f"{100 * (metric - teacher):+.2f} ± {100 * error:.2f}",
        "screened out" if screened_out else str(entry.get("status", "")).split(":")[0],
    ]
    return " | ".join(cells)


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    results = load_results()
    if not args.tables_only:
        done = {(run["train_rows"], run["seed"]) for run in results["runs"]}
        for train_rows in args.train_rows:
            for seed in args.seeds:
                if (train_rows, seed) in done:
                    continue
                results["runs"].append(run_one(args.work_dir, train_rows, seed))
                with open(RESULTS, "w") as file:
                    json.dump(results, file, indent=2)
    write_tables(results)
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
