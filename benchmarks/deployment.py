#!/usr/bin/env python
"""Deployment on CPU: RMT-KD stacked with ONNX Runtime int8, against the int8 teacher (issue #17).

From the frontier's setting (MiniLM-L6 on the movie reviews, the converged teacher of ``minilm_movie_reviews.py``
and the frontier points ``frontier_point.py`` saved, trimmed vocabulary), every model is deployed three ways:
PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime int8, all written by ``rmt_kd_hf.export_onnx`` (the teacher
too). For each arm:

* test accuracy over the whole test split, computed through the deployed file (the ONNX file for ORT arms) with
  the folder's own tokenizer (max_length 64, as in training);
* latency at batch 1 and 32 (seq 128, 2 threads), every arm alternating round by round in one process, median;
* disk MB of the deployed weights (safetensors or ONNX file);
* peak RSS of a fresh process that loads the arm and runs one batch of 32 (ORT arms never import torch).

    python benchmarks/minilm_movie_reviews.py --steps 600          # once: the converged teacher
    python benchmarks/frontier_point.py --quantile 0.5 --seed 0    # the points (and --target_ratio 0.34)
    python benchmarks/deployment.py                                # writes results/deployment.{json,md,png}

Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import shlex
import statistics
import subprocess
import sys

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import rmt_kd_hf  # noqa: F401  (registers the RMTBert auto classes)
from rmt_kd_hf.data import default_teacher_path, load_movie_reviews
from rmt_kd_hf.export import Int8Settings, export_onnx, ort_feed, ort_session
from rmt_kd_hf.reports import median_seconds, safetensors_size_mb, text_classification_accuracy

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# the frontier points deployed: setting -> glob of frontier_point.py's output folder (seed 0)
SETTINGS = {"target>=66%": "frontier_t0.34_s0_steps600_*", "q=0.5": "frontier_q0.5_s0_steps600_*"}
SEQUENCE_LENGTH, MAX_LENGTH = 128, 64


def common_parser(description: str, rounds: int) -> argparse.ArgumentParser:
    """The options this benchmark shares with ``quantization_options.py``: where the models are, threads, rounds."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench", help="the converged teacher and frontier points")
    parser.add_argument("--deploy_dir", default="outputs/deploy", help="where the exported folders go")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=rounds, help="alternating latency rounds")
    return parser


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = common_parser(__doc__, rounds=7)
    parser.add_argument("--name", default="deployment", help="results/NAME.{json,md,png}")
    parser.add_argument(
        "--teacher_int8",
        default="{}",
        type=json.loads,
        help="Int8Settings fields for the teacher (JSON), as chosen on validation by quantization_options.py",
    )
    parser.add_argument("--student_int8", default="{}", type=json.loads, help="Int8Settings fields for students")
    parser.add_argument("--tables_only", action="store_true", help="rewrite NAME.md and NAME.png from NAME.json")
    return parser.parse_args(argv)


def teacher_folder(work_dir: str, deploy_dir: str) -> str:
    """The converged teacher with the tokenizer it was trained with (``minilm_movie_reviews.py`` saves no
    tokenizer), as a user would ship it."""
    source = os.path.join(work_dir, "teacher_converged")
    if not os.path.exists(os.path.join(source, "config.json")):
        raise SystemExit(f"{source} is missing: run benchmarks/minilm_movie_reviews.py first.")
    folder = os.path.join(deploy_dir, "teacher")
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        AutoModelForSequenceClassification.from_pretrained(source).save_pretrained(folder)
        AutoTokenizer.from_pretrained(default_teacher_path()).save_pretrained(folder)
    return folder


def student_folders(work_dir: str) -> dict[str, str]:
    folders = {}
    for setting, pattern in SETTINGS.items():
        matches = sorted(path for path in glob.glob(os.path.join(work_dir, pattern)) if "_shift-" not in path)
        matches = [path for path in matches if os.path.exists(os.path.join(path, "config.json"))]
        if not matches:
            raise SystemExit(f"No {pattern} in {work_dir}: run benchmarks/frontier_point.py for {setting} first.")
        folders[setting] = matches[0]
    return folders


class Arm:
    """One deployed model: how it loads, runs a batch and what it weighs on disk."""

    def __init__(self, model: str, setting: str | None, runtime: str, precision: str, folder: str, path: str):
        self.model, self.setting, self.runtime, self.precision = model, setting, runtime, precision
        self.folder, self.path = folder, path  # path: the ONNX file, or the model folder for PyTorch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.session = None  # ORT arms: opened by open()
        self.module = AutoModelForSequenceClassification.from_pretrained(folder).eval() if runtime == "torch" else None

    @property
    def name(self) -> str:
        return f"{self.model} {self.setting or ''} {self.runtime} {self.precision}".replace("  ", " ")

    def open(self, threads: int) -> None:
        if self.runtime == "ort":
            self.session = ort_session(self.path, threads)

    def logits(self, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        if self.session is not None:
            return self.session.run(["logits"], ort_feed(self.session, inputs))[0]
        with torch.inference_mode():
            return self.module(**inputs).logits.numpy()

    def disk_mb(self) -> float:
        return safetensors_size_mb(self.path) if self.runtime == "torch" else os.path.getsize(self.path) / 1e6


def build_arms(args) -> list[Arm]:
    folders = {"teacher": (None, teacher_folder(args.work_dir, args.deploy_dir))}
    folders.update({setting: (setting, path) for setting, path in student_folders(args.work_dir).items()})
    arms = []
    for key, (setting, folder) in folders.items():
        model = "teacher" if setting is None else "compressed"
        int8 = Int8Settings(**(args.teacher_int8 if setting is None else args.student_int8))
        onnx_dir = os.path.join(args.deploy_dir, f"{key}_onnx")
        exported = export_onnx(folder, onnx_dir, quantize="int8", int8=int8, overwrite=True)
        print(f"{key}: exported to {onnx_dir} (fp32 max |ONNX - PyTorch| {exported.max_abs_difference:.2g})")
        arms.append(Arm(model, setting, "torch", "fp32", folder, folder))
        arms.append(Arm(model, setting, "ort", "fp32", onnx_dir, exported.onnx_path))
        arms.append(Arm(model, setting, "ort", "int8", onnx_dir, exported.quantized_path))
    return arms


def test_logits(arm: Arm, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(rows, labels) logits of the deployed file on raw ``texts``, tokenized by the folder's tokenizer in padded
    batches of ``batch_size``."""
    logits = []
    for start in range(0, len(texts), batch_size):
        rows = texts[start : start + batch_size]
        encoded = arm.tokenizer(rows, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
        logits.append(arm.logits(dict(encoded)))
    return np.concatenate(logits)


def accuracy(arm: Arm, texts: list[str], labels: list[int]) -> float:
    """Accuracy of the deployed file on raw ``texts`` (PyTorch arms: as ``text_classification_accuracy``)."""
    if arm.runtime == "torch":
        return text_classification_accuracy(arm.module, arm.tokenizer, texts, labels, MAX_LENGTH)
    return float((test_logits(arm, texts).argmax(-1) == np.asarray(labels)).mean())


def timing_inputs(arm: Arm, batch_size: int) -> dict[str, torch.Tensor]:
    """Random ids of the arm's own vocabulary, ``SEQUENCE_LENGTH`` tokens, all-ones mask (as ``cpu_latency``)."""
    generator = torch.Generator().manual_seed(batch_size)
    input_ids = torch.randint(1, len(arm.tokenizer), (batch_size, SEQUENCE_LENGTH), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def alternating_latency(arms: list[Arm], batch_size: int, rounds: int, repeats: int) -> list[float]:
    """Per arm, the median over ``rounds`` of its median time (seconds) over ``repeats`` runs; arms alternate, after
    one untimed round (first-run allocations, caches)."""
    per_round = [[] for _ in arms]
    runs = [functools.partial(arm.logits, timing_inputs(arm, batch_size)) for arm in arms]
    for run in runs:  # the untimed round
        for _ in range(repeats):
            run()
    for _ in range(rounds):
        for index, run in enumerate(runs):
            per_round[index].append(median_seconds(run, repeats, warmup=2))
    return [statistics.median(values) for values in per_round]


_RSS_SCRIPT = """
import sys
runtime, folder, path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import numpy as np
ids = np.random.default_rng(0).integers(1, 1000, size=(32, {length}), dtype=np.int64)
feed = {{"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}}
if runtime == "ort":
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    assert "torch" not in sys.modules
    session.run(["logits"], feed)
else:
    import torch, rmt_kd_hf
    from transformers import AutoModelForSequenceClassification
    torch.set_num_threads(threads)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        model(**{{name: torch.from_numpy(value) for name, value in feed.items()}})
# VmHWM: this program's own peak (ru_maxrss would include the parent's pages from before exec)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(peak_kb / 1024)
"""


def peak_rss_mb(arm: Arm, threads: int) -> float:
    """Peak resident memory (MB) of a fresh process that loads the arm and runs one batch of 32."""
    script = _RSS_SCRIPT.format(length=SEQUENCE_LENGTH)
    command = [sys.executable, "-c", script, arm.runtime, arm.folder, arm.path, str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    return float(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    if args.tables_only:
        with open(os.path.join(RESULTS_DIR, f"{args.name}.json")) as file:
            result = json.load(file)
        write_results(result, args.name)
        return result
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/deployment.py", *(sys.argv[1:] if argv is None else argv)])
    arms = build_arms(args)
    for arm in arms:
        arm.open(args.threads)
    test = load_movie_reviews(seed=0)["test"]
    texts, labels = list(test["sentence"]), list(test["label"])
    rows = []
    torch_logits = {}
    for arm in arms:
        logits = test_logits(arm, texts)
        if arm.runtime == "torch":
            torch_logits[arm.setting] = logits
        rows.append(
            {
                "model": arm.model,
                "setting": arm.setting,
                "runtime": arm.runtime,
                "precision": arm.precision,
                "test_accuracy": accuracy(arm, texts, labels),
                "disk_mb": arm.disk_mb(),
                "peak_rss_mb": peak_rss_mb(arm, args.threads),
                # the exported graph against PyTorch on every real test row, padded batches of 64
                "max_abs_logit_difference_vs_torch": float(np.abs(logits - torch_logits[arm.setting]).max()),
                "path": arm.path,
                "command": command,
            }
        )
        print(f"{arm.name}: test {rows[-1]['test_accuracy']:.4f}, {rows[-1]['disk_mb']:.1f} MB", flush=True)
    load_before = os.getloadavg()[0]
    for batch_size, repeats in ((1, 20), (32, 3)):
        for row, seconds in zip(rows, alternating_latency(arms, batch_size, args.rounds, repeats), strict=True):
            row[f"latency_ms_b{batch_size}"] = 1e3 * seconds
    result = {
        "arms": rows,
        "threads": args.threads,
        "rounds": args.rounds,
        "sequence_length": SEQUENCE_LENGTH,
        "teacher_int8": args.teacher_int8,
        "student_int8": args.student_int8,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "command": command,
    }
    write_results(result, args.name)
    return result


def _reference(rows: list[dict], model: str, runtime: str, precision: str) -> dict:
    return next(row for row in rows if (row["model"], row["runtime"], row["precision"]) == (model, runtime, precision))


def write_results(result: dict, name: str) -> None:
    rows = result["arms"]
    with open(os.path.join(RESULTS_DIR, f"{name}.json"), "w") as file:
        json.dump(result, file, indent=2)
    teacher = _reference(rows, "teacher", "torch", "fp32")
    teacher_int8 = _reference(rows, "teacher", "ort", "int8")
    lines = [
        f"# {name}",
        "",
        f"Command: `{result['command']}` — {result['threads']} threads, seq {result['sequence_length']}, "
        f"{result['rounds']} alternating rounds (median), onnxruntime {result['onnxruntime']}, "
        f"torch {result['torch']}.",
        "Accuracy: the whole test split through the deployed file. Speedups are against the PyTorch fp32 teacher "
        "and against the teacher's ORT int8 file (the peer), measured in the same run.",
        "",
        "| model | setting | runtime | precision | test acc | Δ vs teacher (pt) | b1 ms | b32 ms | speedup b1 / b32 "
        "| vs int8 teacher b1 / b32 | disk MB | peak RSS MB | max abs logit diff vs PyTorch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        delta = 100 * (row["test_accuracy"] - teacher["test_accuracy"])
        lines.append(
            f"| {row['model']} | {row['setting'] or '—'} | {row['runtime']} | {row['precision']} "
            f"| {100 * row['test_accuracy']:.2f}% | {delta:+.2f} | {row['latency_ms_b1']:.2f} "
            f"| {row['latency_ms_b32']:.1f} "
            f"| {teacher['latency_ms_b1'] / row['latency_ms_b1']:.2f}× / "
            f"{teacher['latency_ms_b32'] / row['latency_ms_b32']:.2f}× "
            f"| {teacher_int8['latency_ms_b1'] / row['latency_ms_b1']:.2f}× / "
            f"{teacher_int8['latency_ms_b32'] / row['latency_ms_b32']:.2f}× "
            f"| {row['disk_mb']:.1f} | {row['peak_rss_mb']:.0f} | {row['max_abs_logit_difference_vs_torch']:.1e} |"
        )
    with open(os.path.join(RESULTS_DIR, f"{name}.md"), "w") as file:
        file.write("\n".join(lines) + "\n")
    plot(rows, os.path.join(RESULTS_DIR, f"{name}.png"))
    print("\n".join(lines))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {("torch", "fp32"): "o", ("ort", "fp32"): "s", ("ort", "int8"): "^"}
    colours = {}
    for row in rows:
        label = row["setting"] or "teacher"
        colour = colours.setdefault(label, f"C{len(colours)}")
        for axis, batch in zip(axes, (1, 32), strict=True):
            axis.scatter(
                row[f"latency_ms_b{batch}"],
                100 * row["test_accuracy"],
                marker=markers[(row["runtime"], row["precision"])],
                color=colour,
                s=60,
            )
    for axis, batch in zip(axes, (1, 32), strict=True):
        axis.set_xscale("log")
        axis.set_xlabel(f"latency at batch {batch}, seq {SEQUENCE_LENGTH} (ms, 2 CPU threads)")
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=label) for label, c in colours.items()]
    handles += [
        plt.Line2D([], [], color="grey", marker=m, ls="", label=f"{runtime} {precision}")
        for (runtime, precision), m in markers.items()
    ]
    figure.legend(handles=handles, fontsize=8, loc="center right")
    figure.suptitle("MiniLM-L6 movie reviews: accuracy vs CPU latency, deployed files")
    figure.tight_layout(rect=(0, 0, 0.86, 1))
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
