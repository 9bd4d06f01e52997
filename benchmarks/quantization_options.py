#!/usr/bin/env python
"""Which int8 settings, measured on validation (issue #17): for the teacher and for the RMT-KD students.

Each model of ``deployment.py`` (converged teacher, frontier points) is exported once with ``export_onnx`` and
quantised several ways; each file is scored on the validation split (never test) through ONNX Runtime, and timed
at batch 1 and 32 (seq 128, 2 threads, all files of one model alternating round by round):

* ``dynamic``: ``quantize_dynamic`` after ORT's pre-processing, every weight product int8 with per-channel scales,
  embeddings int8 (every dynamic variant is pre-processed the same way, and changes one thing):
* ``per-tensor``, ``reduce-range`` (7-bit weights, for CPUs without VNNI, as this one), ``per-tensor+reduce-range``;
* ``fp32 LayerNorm``: the lifted LayerNorm products kept fp32; ``fp32 head``: pooler and classifier kept fp32;
* ``fp32 embeddings``: the embedding tables left fp32;
* ``ort-fused``: ONNX Runtime's transformer optimiser (``onnxruntime.transformers.optimizer``, model_type bert,
  its recommended path for BERT) before dynamic int8 (students: also with the lifted LayerNorms fp32);
* ``static``: ``quantize_static`` (QDQ, per-channel, MinMax) calibrated on RMT-KD's own calibration rows (10% of
  train, seeded).

    python benchmarks/quantization_options.py      # after deployment.py's prerequisites; writes
                                                  # results/quantization_options.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import replace

import numpy as np
import torch
from transformers import AutoTokenizer

from rmt_kd_hf.data import calibration_subset, load_movie_reviews
from rmt_kd_hf.export import Int8Settings, export_onnx, quantize_int8

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deployment import (  # noqa: E402
    MAX_LENGTH,
    RESULTS_DIR,
    Arm,
    accuracy,
    alternating_latency,
    common_parser,
    student_folders,
    teacher_folder,
)

# every weight product int8 (per channel, embeddings too), then one change at a time
ALL_INT8 = Int8Settings(keep_float=())
DYNAMIC_VARIANTS = {
    "dynamic": ALL_INT8,
    "per-tensor": replace(ALL_INT8, per_channel=False),
    "reduce-range": replace(ALL_INT8, reduce_range=True),
    "per-tensor+reduce-range": replace(ALL_INT8, per_channel=False, reduce_range=True),
    "fp32 LayerNorm": replace(ALL_INT8, keep_float=("LayerNorm",)),
    "fp32 head": replace(ALL_INT8, keep_float=("pooler", "classifier")),
    "fp32 embeddings": replace(ALL_INT8, quantize_embeddings=False),
}


def parse_arguments(argv=None) -> argparse.Namespace:
    return common_parser(__doc__, rounds=5).parse_args(argv)


class CalibrationRows:
    """``onnxruntime.quantization.CalibrationDataReader`` over tokenized calibration rows, 32 a batch."""

    def __init__(self, tokenizer, texts: list[str], input_names: list[str]):
        self.batches = []
        for start in range(0, len(texts), 32):
            encoded = tokenizer(texts[start : start + 32], truncation=True, max_length=MAX_LENGTH, padding=True)
            self.batches.append({name: np.asarray(encoded[name], dtype=np.int64) for name in input_names})
        self.position = 0

    def get_next(self):
        if self.position == len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self):
        self.position = 0


def ort_fused(onnx_path: str, output_path: str, settings: Int8Settings) -> None:
    """ONNX Runtime's transformer optimiser (attention, LayerNorm and GELU fusions), then dynamic int8."""
    from onnxruntime.transformers.optimizer import optimize_model

    fused_path = output_path.replace(".onnx", "_fp32.onnx")
    optimized = optimize_model(onnx_path, model_type="bert", num_heads=0, hidden_size=0)
    optimized.save_model_to_file(fused_path)
    quantize_int8(fused_path, output_path, settings, scopes_path=onnx_path)  # the optimiser drops name scopes


def static_int8(onnx_path: str, output_path: str, reader: CalibrationRows) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        onnx_path,
        output_path,
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def variants_of(key: str, folder: str, args, calibration_texts: list[str]) -> dict[str, str]:
    """Variant name -> ONNX file, all from one fp32 export of ``folder``."""
    onnx_dir = os.path.join(args.deploy_dir, f"options_{key}")
    exported = export_onnx(folder, onnx_dir, overwrite=True)
    files = {"fp32": exported.onnx_path}
    for name, settings in DYNAMIC_VARIANTS.items():
        files[name] = os.path.join(onnx_dir, f"int8_{name.replace(' ', '_').replace('+', '_')}.onnx")
        quantize_int8(exported.onnx_path, files[name], settings)
    files["ort-fused"] = os.path.join(onnx_dir, "int8_ort_fused.onnx")
    ort_fused(exported.onnx_path, files["ort-fused"], ALL_INT8)
    if key != "teacher":  # the teacher's LayerNorms are not matrix products
        files["ort-fused, fp32 LayerNorm"] = os.path.join(onnx_dir, "int8_ort_fused_fp32_layernorm.onnx")
        ort_fused(exported.onnx_path, files["ort-fused, fp32 LayerNorm"], DYNAMIC_VARIANTS["fp32 LayerNorm"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    files["static"] = os.path.join(onnx_dir, "int8_static.onnx")
    static_int8(
        exported.onnx_path, files["static"], CalibrationRows(tokenizer, calibration_texts, exported.input_names)
    )
    return files


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    reviews = load_movie_reviews(seed=0)
    validation = reviews["validation"]
    calibration, _ = calibration_subset(reviews["train"], 0.1, 0)
    texts, labels = list(validation["sentence"]), list(validation["label"])
    models = {"teacher": teacher_folder(args.work_dir, args.deploy_dir), **student_folders(args.work_dir)}
    rows = []
    for key, folder in models.items():
        files = variants_of(key, folder, args, list(calibration["sentence"]))
        arms = []
        for variant, path in files.items():
            arm = Arm("teacher" if key == "teacher" else "compressed", key, "ort", variant, folder, path)
            arm.open(args.threads)
            arms.append(arm)
        scores = [accuracy(arm, texts, labels) for arm in arms]
        latency = {
            batch: alternating_latency(arms, batch, args.rounds, repeats) for batch, repeats in ((1, 20), (32, 3))
        }
        for index, arm in enumerate(arms):
            rows.append(
                {
                    "model": key,
                    "variant": arm.precision,
                    "validation_accuracy": scores[index],
                    "onnx_mb": os.path.getsize(arm.path) / 1e6,
                    "latency_ms_b1": 1e3 * latency[1][index],
                    "latency_ms_b32": 1e3 * latency[32][index],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "rows": rows,
        "threads": args.threads,
        "rounds": args.rounds,
        "command": shlex.join(
            ["python", "benchmarks/quantization_options.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    write_results(result)
    return result


def write_results(result: dict) -> None:
    with open(os.path.join(RESULTS_DIR, "quantization_options.json"), "w") as file:
        json.dump(result, file, indent=2)
    lines = [
        "# quantization_options",
        "",
        f"Command: `{result['command']}` — validation split through ONNX Runtime, {result['threads']} threads, "
        f"seq 128, {result['rounds']} alternating rounds per model (median). Nothing here reads the test split.",
        "",
        "| model | variant | validation acc | Δ vs fp32 (pt) | b1 ms | b32 ms | ONNX MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        fp32 = next(r for r in result["rows"] if r["model"] == row["model"] and r["variant"] == "fp32")
        delta = 100 * (row["validation_accuracy"] - fp32["validation_accuracy"])
        lines.append(
            f"| {row['model']} | {row['variant']} | {100 * row['validation_accuracy']:.2f}% | {delta:+.2f} "
            f"| {row['latency_ms_b1']:.2f} | {row['latency_ms_b32']:.1f} | {row['onnx_mb']:.1f} |"
        )
    with open(os.path.join(RESULTS_DIR, "quantization_options.md"), "w") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
