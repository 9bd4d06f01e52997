#!/usr/bin/env python
"""RMT-KD on a bottleneck ResNet trained from scratch on Fashion-MNIST, against a converged teacher.

* ``teacher``: ``ResNetForImageClassification`` (stem 32, stages [32, 64, 128, 256], depths [2, 2, 2, 2], bottleneck)
  trained from scratch with early stopping on validation accuracy (best epoch kept); cached in ``work_dir``;
* ``rmt …``: ``RMTKDTrainer.compress()`` with ``compression_schedule="per_layer"``: one stage per block's inner
  channels, per stage's residual stream and for the stem, ``--stage_steps`` distillation steps each. An arm is
  ``ORDER:QUANTILE:RATIO`` (``--arms``): stage order, σ² quantile, and the parameter ratio at which it stops
  (``none``: every stage);
* ``control``: the teacher trained as many more steps as each RMT arm distilled, without compression
  (compute-matched, one control per distinct step count);
* ``one-shot q=…, no training``: every site cut at once at each arm's quantile, before any training.

Data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (55k train / 5k validation, seeded; the
official 10k test split, measured once per arm at the end). CPU latency of the teacher and the smallest student
within the target is measured in this run, one after the other, at 28x28 and 224x224.

    python benchmarks/resnet_fashion_mnist.py   # writes benchmarks/results/resnet_fashion_mnist.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForImageClassification,
    EarlyStoppingCallback,
    ResNetConfig,
    ResNetForImageClassification,
    default_data_collator,
)

from rmt_kd_hf import RMTKDConfig, RMTKDTrainer
from rmt_kd_hf.calibration import collect_covariances
from rmt_kd_hf.compression import analyse_sites, plan_widths, refit_sites
from rmt_kd_hf.data import calibration_subset
from rmt_kd_hf.image_data import FASHION_MNIST_LABELS, load_fashion_mnist
from rmt_kd_hf.reports import cpu_latency, parameter_comparison, parameter_counts
from rmt_kd_hf.surgery import get_surgery

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench_resnet")
    parser.add_argument("--results_name", default="resnet_fashion_mnist")
    parser.add_argument(
        "--arms",
        nargs="*",
        default=["deep_to_shallow:0.34:0.5", "deep_to_shallow:0.34:0.4", "shallow_to_deep:0.247:none"],
        help="RMT arms as ORDER:QUANTILE:RATIO (stop at this parameter ratio; none: run every stage)",
    )
    parser.add_argument("--stage_steps", type=int, default=300, help="distillation steps per per-layer stage")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="distillation and control learning rate")
    parser.add_argument("--teacher_max_epochs", type=float, default=6)
    parser.add_argument("--teacher_learning_rate", type=float, default=2e-3)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--max_train_samples", type=int, default=None, help="smoke runs: a prefix of the train split")
    parser.add_argument("--only_teacher", action="store_true", help="train (or load) the teacher and stop")
    return parser.parse_args(argv)


def teacher_config() -> ResNetConfig:
    return ResNetConfig(
        num_channels=1,
        embedding_size=32,
        hidden_sizes=[32, 64, 128, 256],
        depths=[2, 2, 2, 2],
        layer_type="bottleneck",
        num_labels=10,
        id2label=dict(enumerate(FASHION_MNIST_LABELS)),
        label2id={label: index for index, label in enumerate(FASHION_MNIST_LABELS)},
    )


def accuracy(prediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def trainer_for(model, data, output_dir: str, args, **overrides) -> RMTKDTrainer:
    fields = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=512,
        learning_rate=args.learning_rate,
        weight_decay=0.01,
        distillation_alpha=0.7,
        distillation_temperature=1.0,
        save_strategy="no",
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        measure_latency=False,
    )
    fields.update(overrides)
    return RMTKDTrainer(
        model=model,
        args=RMTKDConfig(**fields),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=default_data_collator,
        compute_metrics=accuracy,
    )


def converged_teacher(args, data) -> tuple[ResNetForImageClassification, dict]:
    """Train from scratch until validation accuracy stops improving (best epoch kept); cached in ``work_dir``."""
    teacher_dir = os.path.join(args.work_dir, "teacher_converged")
    if os.path.exists(os.path.join(teacher_dir, "config.json")):
        info = json.load(open(os.path.join(teacher_dir, "training.json")))
        return AutoModelForImageClassification.from_pretrained(teacher_dir), info
    torch.manual_seed(args.seed)
    model = ResNetForImageClassification(teacher_config())
    trainer = trainer_for(
        model,
        data,
        os.path.join(args.work_dir, "teacher_run"),
        args,
        learning_rate=args.teacher_learning_rate,
        num_train_epochs=args.teacher_max_epochs,
        lr_scheduler_type="cosine",
        warmup_steps=100,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
    )
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=2))
    start = time.perf_counter()
    trainer.train()
    info = {
        "seconds": time.perf_counter() - start,
        "steps": trainer.state.global_step,
        "best_validation_accuracy": trainer.state.best_metric,
        "log_history": trainer.state.log_history,
    }
    trainer.model.save_pretrained(teacher_dir)
    json.dump(info, open(os.path.join(teacher_dir, "training.json"), "w"), indent=2)
    return trainer.model, info


def one_shot_analyses(teacher, calibration_loader):
    surgery = get_surgery(teacher)
    prepared = surgery.prepare(teacher)
    accumulators = collect_covariances(prepared, calibration_loader, surgery.taps(prepared), progress=False)
    return surgery, prepared, analyse_sites(surgery.sites(prepared, accumulators), 0.5, refine=True)


def one_shot_student(teacher, calibration_loader, quantile: float):
    surgery, prepared, analyses = one_shot_analyses(teacher, calibration_loader)
    analyses = refit_sites(analyses, quantile, refine=True)
    plan_widths(analyses)
    return surgery.apply(prepared, analyses)


def evaluate_arm(name: str, trainer: RMTKDTrainer, data, teacher_counts, extra=None) -> dict:
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


def flops_per_image(model, side: int) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(pixel_values=torch.randn(1, model.config.num_channels, side, side))
    return counter.get_total_flops()


def measure_speed(teacher, student) -> dict:
    """Median CPU latency of teacher and student, one after the other in this process, and their FLOP ratios."""
    speed = {"threads": torch.get_num_threads(), "latency_seconds": {}}
    for side, batches in ((28, (1, 256)), (224, (1, 16))):
        for batch in batches:
            key = f"{side}px_batch{batch}"
            repeats = 30 if batch == 1 else 5
            times = {
                name: cpu_latency(m, batch, side, repeats=repeats)
                for name, m in (("teacher", teacher), ("student", student))
            }
            speed["latency_seconds"][key] = times
            speed[f"speedup_{key}"] = times["teacher"] / times["student"]
        speed[f"flop_ratio_{side}px"] = flops_per_image(teacher, side) / flops_per_image(student, side)
    return speed


class Bench:
    """The shared state of one run: data, the converged teacher, and how every arm is measured."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.data = load_fashion_mnist(seed=args.seed)
        if args.max_train_samples is not None:
            for split in self.data:
                self.data[split] = self.data[split].select(range(min(args.max_train_samples, len(self.data[split]))))
        calibration, self.calibration_digest = calibration_subset(self.data["train"], 0.1, args.seed)
        self.teacher, self.teacher_info = converged_teacher(args, self.data)
        self.teacher_counts = parameter_counts(self.teacher)
        self.calibration_loader = self.evaluator(self.teacher).get_eval_dataloader(calibration)
        self.rows: list[dict] = []

    def evaluator(self, model) -> RMTKDTrainer:
        return trainer_for(model, self.data, os.path.join(self.args.work_dir, "eval"), self.args)

    def measure(self, name: str, trainer: RMTKDTrainer, extra: dict | None = None) -> dict:
        row = evaluate_arm(name, trainer, self.data, self.teacher_counts, extra)
        self.rows.append(row)
        with open(os.path.join(self.args.work_dir, "partial_rows.json"), "w") as file:  # survives a crash
            json.dump(self.rows, file, indent=2)
        return row

    def fresh_teacher(self):
        return AutoModelForImageClassification.from_pretrained(os.path.join(self.args.work_dir, "teacher_converged"))

    def control(self, steps: int) -> dict:
        output_dir = os.path.join(self.args.work_dir, f"control_{steps}")
        trainer = trainer_for(self.fresh_teacher(), self.data, output_dir, self.args, max_steps=steps)
        start = time.perf_counter()
        trainer.train()
        extra = {"steps": steps, "seconds": time.perf_counter() - start}
        return self.measure(f"control (+{steps} steps, no compression)", trainer, extra)

    def rmt_per_layer(self, order: str, quantile: float, ratio: float | None) -> tuple[dict, torch.nn.Module]:
        name = arm_name(order, quantile, ratio)
        output_dir = os.path.join(self.args.work_dir, f"rmt_{order}_{quantile}_{ratio}")
        trainer = trainer_for(
            self.fresh_teacher(),
            self.data,
            output_dir,
            self.args,
            compression_schedule="per_layer",
            stage_order=order,
            sigma_quantile=quantile,
            target_parameter_ratio=ratio,
            stage_max_steps=self.args.stage_steps,
            max_metric_drop=1.0,  # no rollback: the benchmark reports where the schedule lands
            budget_search=False,
        )
        start = time.perf_counter()
        student = trainer.compress()
        history = trainer.compression_history
        steps = sum(self.args.stage_steps for stage in history["stages"] if stage["status"] == "accepted")
        extra = {
            "stage_order": order,
            "sigma_quantile": quantile,
            "target_parameter_ratio": ratio,
            "widths": history["final"]["widths"],
            "distillation_steps": steps,
            "seconds": time.perf_counter() - start,
            "stages": [
                {key: stage.get(key) for key in ("stage", "status", "eval_accuracy", "parameter_ratio")}
                | {"sites": list(stage["sites"])}
                for stage in history["stages"]
            ],
        }
        return self.measure(name, trainer, extra), student


def arm_name(order: str, quantile: float, ratio: float | None) -> str:
    stop = f"to ≤{ratio:.0%} params" if ratio else "every stage"
    return f"rmt per-layer {order.replace('_', '-')} q={quantile}, {stop}"


def parse_arm(spec: str) -> tuple[str, float, float | None]:
    order, quantile, ratio = spec.split(":")
    if order not in ("shallow_to_deep", "deep_to_shallow"):
        raise ValueError(f"arm {spec!r}: order must be shallow_to_deep or deep_to_shallow")
    return order, float(quantile), None if ratio == "none" else float(ratio)


def run_arms(bench: Bench) -> tuple[list[dict], dict]:
    arms = [parse_arm(spec) for spec in bench.args.arms]
    extra = {"train_seconds": bench.teacher_info["seconds"]}
    bench.measure("teacher (converged)", bench.evaluator(bench.teacher), extra)
    for quantile in sorted({quantile for _, quantile, _ in arms}):
        before = one_shot_student(bench.teacher, bench.calibration_loader, quantile)
        bench.measure(f"one-shot q={quantile}, every site, no training", bench.evaluator(before))
    students = {}
    for order, quantile, ratio in arms:
        row, students[(order, quantile, ratio)] = bench.rmt_per_layer(order, quantile, ratio)
    for steps in sorted({row["distillation_steps"] for row in bench.rows if "distillation_steps" in row}):
        bench.control(steps)
    return bench.rows, students


def smallest_within_target(rows: list[dict], students: dict, max_drop: float = 0.01):
    """The student with the fewest parameters within ``max_drop`` test accuracy of the teacher (else the best)."""
    teacher_accuracy = rows[0]["test_accuracy"]
    by_arm = {row["arm"]: row for row in rows}
    candidates = []
    for key, student in students.items():
        candidates.append((by_arm[arm_name(*key)], student))
    within = [item for item in candidates if item[0]["test_accuracy"] >= teacher_accuracy - max_drop]
    if within:
        return min(within, key=lambda item: item[0]["parameters"])
    return max(candidates, key=lambda item: item[0]["test_accuracy"])


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    start = time.perf_counter()
    bench = Bench(args)
    if args.only_teacher:
        print(json.dumps({k: v for k, v in bench.teacher_info.items() if k != "log_history"}))
        return bench.teacher_info
    rows, students = run_arms(bench)
    speed = {}
    if students:
        row, student = smallest_within_target(rows, students)
        speed = {"student": row["arm"], **measure_speed(bench.teacher, student)}
    result = {
        "task": "Fashion-MNIST (Debian dataset-fashion-mnist): 55k train / 5k validation (seeded) / official 10k test",
        "teacher": {
            "architecture": "ResNetForImageClassification, bottleneck, stem 32, stages [32, 64, 128, 256], depths 2x4",
            "training": {k: v for k, v in bench.teacher_info.items() if k != "log_history"},
        },
        "calibration_rows_sha256": bench.calibration_digest,
        "stage_steps": args.stage_steps,
        "rows": rows,
        "speed": speed,
        "load_average_at_end": os.getloadavg(),
        "wall_seconds": time.perf_counter() - start,
        "command": "python benchmarks/resnet_fashion_mnist.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write_results(result, args.results_name)
    return result


def write_results(result: dict, name: str) -> None:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, f"{name}.json"), "w") as file:
        json.dump(result, file, indent=2)
    teacher_accuracy = result["rows"][0]["test_accuracy"]
    training = result["teacher"]["training"]
    lines = [
        f"# {name}",
        "",
        f"Command: `{result['command']}` ({result['wall_seconds'] / 60:.0f} min on 2 shared CPU cores). Teacher: "
        f"{result['teacher']['architecture']}, trained from scratch in {training['seconds'] / 60:.1f} min "
        f"({training['steps']} steps, early stopping on validation accuracy).",
        "",
        "| arm | test acc | Δ vs teacher (pt) | Δ vs control, same steps (pt) | validation acc | params | reduction "
        "| steps after teacher |",
        "|---|---|---|---|---|---|---|---|",
    ]
    controls = {row["steps"]: row["test_accuracy"] for row in result["rows"] if row["arm"].startswith("control")}
    for row in result["rows"]:
        accuracy_value, delta = 100 * row["test_accuracy"], 100 * (row["test_accuracy"] - teacher_accuracy)
        steps = row.get("distillation_steps", row.get("steps", ""))
        control = controls.get(row.get("distillation_steps"))
        versus_control = "" if control is None else f"{100 * (row['test_accuracy'] - control):+.2f}"
        lines.append(
            f"| {row['arm']} | {accuracy_value:.2f}% | {delta:+.2f} | {versus_control} "
            f"| {100 * row['validation_accuracy']:.2f}% | {row['parameters']:,} "
            f"| {100 * row['parameter_reduction']:.1f}% | {steps} |"
        )
    speed = result["speed"]
    if speed:
        lines += [
            "",
            f"CPU latency, {speed['threads']} threads, same run (machine shared with other jobs, load "
            f"average {result['load_average_at_end'][0]:.1f} at the end): {speed['student']} vs teacher",
        ]
        for key in speed["latency_seconds"]:
            times = speed["latency_seconds"][key]
            lines.append(
                f"- {key}: teacher {1000 * times['teacher']:.2f} ms, student {1000 * times['student']:.2f} ms "
                f"→ {speed[f'speedup_{key}']:.2f}x"
            )
        lines.append(
            f"- FLOP ratio: {speed['flop_ratio_28px']:.2f}x at 28 px, {speed['flop_ratio_224px']:.2f}x at 224 px"
        )
    for row in result["rows"]:
        if "widths" in row:
            lines += ["", f"Widths of {row['arm']}: `{json.dumps(row['widths'])}`"]
    with open(os.path.join(RESULTS_DIR, f"{name}.md"), "w") as file:
        file.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
