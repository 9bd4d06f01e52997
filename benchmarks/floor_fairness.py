#!/usr/bin/env python
"""Why RMT-KD students look worse against their teacher on validation than on test (issue #19), measured.

On the movie reviews, q = 0.5 students score 2.6–3.1 pt below their teacher on validation but −0.8 to +0.6 pt on
test. Two suspects, each measured here on the converged teacher of ``minilm_movie_reviews.py``:

1. **The teacher's selection.** Early stopping keeps the epoch with the best validation accuracy, so the teacher's
   validation score is the maximum of several noisy measurements. Every epoch checkpoint kept from its fine-tuning
   (``--epochs_dir``) is scored on validation and test: the chosen epoch's validation − test gap against the other
   epochs'.
2. **The trimmed vocabulary.** Every student reads text through the tokenizer trimmed to the training split's
   tokens. The teacher with the same trim (embedding rows dropped, nothing retrained) is scored on both splits, and
   the rows whose token ids change are counted.

3. **Paired differences.** For each student checkpoint given (``--students``), the per-row difference from the
   teacher (student correct − teacher correct) on each split, with its standard error, against the trimmed and the
   untrimmed teacher.

    python benchmarks/floor_fairness.py --work_dir outputs/bench --epochs_dir outputs/teacher_epochs \\
        --students outputs/bench/frontier_t0.34_s1_...

Results: ``benchmarks/results/floor_fairness.json`` and ``floor_fairness.md``.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import shlex
import sys

import numpy as np
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmt_kd_hf.data import default_teacher_path, load_movie_reviews
from rmt_kd_hf.reports import text_classification_correct
from rmt_kd_hf.vocabulary import dataset_token_ids, trim_embeddings, trim_tokenizer, vocabulary_to_keep

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import frontier_point  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MAX_LENGTH = 64
SPLITS = ("validation", "test")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench")
    parser.add_argument("--epochs_dir", default=None, help="Trainer checkpoints of the teacher's fine-tuning.")
    parser.add_argument("--students", nargs="*", default=[], help="Student checkpoints (with their tokenizer).")
    return parser.parse_args(argv)


def correct_rows(model, tokenizer, sentences: list[str], labels: list[int]) -> np.ndarray:
    """Per row: whether ``model`` reading ``sentences`` through ``tokenizer`` predicts the label."""
    return text_classification_correct(model, tokenizer, sentences, labels, MAX_LENGTH).numpy()


def paired(student: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    """Mean per-row difference (points) and its standard error."""
    difference = student.astype(float) - teacher.astype(float)
    return {
        "difference": 100 * difference.mean(),
        "standard_error": 100 * difference.std(ddof=1) / math.sqrt(len(difference)),
    }


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    reviews = load_movie_reviews(seed=0)
    texts = {split: (list(reviews[split]["sentence"]), list(reviews[split]["label"])) for split in SPLITS}
    teacher_dir, teacher = frontier_point.converged_teacher(args.work_dir)
    tokenizer = AutoTokenizer.from_pretrained(default_teacher_path())
    result: dict = {"teacher_fingerprint": frontier_point.model_fingerprint(teacher)}

    teacher_correct = {split: correct_rows(teacher, tokenizer, *texts[split]) for split in SPLITS}
    result["teacher"] = {split: 100 * teacher_correct[split].mean() for split in SPLITS}

    # 2. the trimmed vocabulary, as every student reads text
    train_ids = reviews["train"].map(
        lambda batch: tokenizer(batch["sentence"], truncation=True, max_length=MAX_LENGTH), batched=True
    )
    kept = vocabulary_to_keep(tokenizer, dataset_token_ids(train_ids))
    trimmed_tokenizer = trim_tokenizer(tokenizer, kept)
    trimmed_teacher = trim_embeddings(copy.deepcopy(teacher), kept)
    trimmed_correct = {split: correct_rows(trimmed_teacher, trimmed_tokenizer, *texts[split]) for split in SPLITS}
    old_to_new = {old: new for new, old in enumerate(kept)}
    changed = {}
    for split in SPLITS:
        sentences = texts[split][0]
        original = tokenizer(sentences, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        trimmed = trimmed_tokenizer(sentences, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        changed[split] = float(
            np.mean([[old_to_new.get(token, -1) for token in a] != b for a, b in zip(original, trimmed, strict=True)])
        )
    result["trimmed_teacher"] = {
        split: {
            "accuracy": 100 * trimmed_correct[split].mean(),
            "rows_tokenized_differently": 100 * changed[split],
            "paired_vs_teacher": paired(trimmed_correct[split], teacher_correct[split]),
        }
        for split in SPLITS
    }

    # 1. the teacher's own selection on validation
    epochs = []
    if args.epochs_dir:
        with open(os.path.join(teacher_dir, "log_history.json")) as file:
            log = [entry for entry in json.load(file) if "eval_accuracy" in entry]
        for checkpoint in sorted(
            glob.glob(os.path.join(args.epochs_dir, "checkpoint-*")), key=lambda p: int(p.split("-")[-1])
        ):
            model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
            scores = {split: 100 * correct_rows(model, tokenizer, *texts[split]).mean() for split in SPLITS}
            step = int(checkpoint.split("-")[-1])
            chosen = frontier_point.model_fingerprint(model) == result["teacher_fingerprint"]
            epoch = next((entry["epoch"] for entry in log if entry.get("step") == step), None)
            epochs.append(
                {"step": step, "epoch": epoch, "chosen": chosen, **scores, "gap": scores["validation"] - scores["test"]}
            )
    result["epochs"] = epochs

    # 3. students, paired against the teacher and the trimmed teacher
    students = []
    for checkpoint in args.students:
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
        student_tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        correct = {split: correct_rows(model, student_tokenizer, *texts[split]) for split in SPLITS}
        students.append(
            {
                "checkpoint": checkpoint,
                **{
                    split: {
                        "accuracy": 100 * correct[split].mean(),
                        "vs_teacher": paired(correct[split], teacher_correct[split]),
                        "vs_trimmed_teacher": paired(correct[split], trimmed_correct[split]),
                    }
                    for split in SPLITS
                },
            }
        )
    result["students"] = students
    result["command"] = shlex.join(
        ["python", "benchmarks/floor_fairness.py", *(sys.argv[1:] if argv is None else argv)]
    )
    with open(os.path.join(RESULTS_DIR, "floor_fairness.json"), "w") as file:
        json.dump(result, file, indent=2)
    with open(os.path.join(RESULTS_DIR, "floor_fairness.md"), "w") as file:
        file.write(markdown(result))
    print(json.dumps(result, indent=2))
    return result


def markdown(result: dict) -> str:
    """``floor_fairness.md``: the three measurements as tables (accuracies in %, differences in points ± SE)."""

    def pm(entry: dict) -> str:
        return f"{entry['difference']:+.2f} ± {entry['standard_error']:.2f}"

    teacher, trimmed = result["teacher"], result["trimmed_teacher"]
    lines = [
        "# Floor fairness: validation against test for the teacher and its students",
        "",
        f"Teacher `{result['teacher_fingerprint'][:12]}`. Command: `{result['command']}`",
        "",
        "| model | validation | test | validation − test |",
        "|---|---|---|---|",
        f"| teacher | {teacher['validation']:.2f} | {teacher['test']:.2f} | "
        f"{teacher['validation'] - teacher['test']:+.2f} |",
        f"| teacher, trimmed vocabulary | {trimmed['validation']['accuracy']:.2f} | "
        f"{trimmed['test']['accuracy']:.2f} | "
        f"{trimmed['validation']['accuracy'] - trimmed['test']['accuracy']:+.2f} |",
        "",
        "Trimmed vocabulary, per split: rows tokenized differently, and the paired difference from the untrimmed",
        "teacher (points ± SE):",
        "",
        "| split | rows tokenized differently | trimmed − teacher |",
        "|---|---|---|",
    ]
    for split in SPLITS:
        entry = trimmed[split]
        lines.append(f"| {split} | {entry['rows_tokenized_differently']:.1f}% | {pm(entry['paired_vs_teacher'])} |")
    if result["epochs"]:
        lines += ["", "The teacher's epochs (the chosen one is the best on validation):", ""]
        lines += ["| epoch | step | chosen | validation | test | validation − test |", "|---|---|---|---|---|---|"]
        for epoch in result["epochs"]:
            lines.append(
                f"| {epoch['epoch']} | {epoch['step']} | {'yes' if epoch['chosen'] else ''} | "
                f"{epoch['validation']:.2f} | {epoch['test']:.2f} | {epoch['gap']:+.2f} |"
            )
    if result["students"]:
        lines += ["", "Students, paired per row against the teacher and the trimmed teacher (points ± SE):", ""]
        lines += [
            "| student | validation | vs teacher | vs trimmed | test | vs teacher | vs trimmed |",
            "|---|---|---|---|---|---|---|",
        ]
        for student in result["students"]:
            validation, test = student["validation"], student["test"]
            lines.append(
                f"| `{os.path.basename(student['checkpoint'].rstrip('/'))}` | {validation['accuracy']:.2f} | "
                f"{pm(validation['vs_teacher'])} | {pm(validation['vs_trimmed_teacher'])} | {test['accuracy']:.2f} | "
                f"{pm(test['vs_teacher'])} | {pm(test['vs_trimmed_teacher'])} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
