#!/usr/bin/env python
"""Calibration covariances of the real MiniLM-L6 teacher, in one process or several: the sums must agree.

    python benchmarks/multiprocess_calibration.py --output outputs/mp/one.safetensors
    torchrun --nproc_per_node 2 benchmarks/multiprocess_calibration.py --output outputs/mp/two.safetensors
    python benchmarks/multiprocess_calibration.py --compare outputs/mp/one.safetensors outputs/mp/two.safetensors

Each process reads a disjoint share of the seeded calibration rows (10% of the movie-review training split) through
``RMTKDTrainer``'s own calibration loader; ``collect_covariances`` all-reduces the sums before anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from rmt_kd_hf import RMTKDConfig, RMTKDTrainer
from rmt_kd_hf.calibration import collect_covariances
from rmt_kd_hf.data import default_teacher_path, load_movie_reviews
from rmt_kd_hf.surgery import get_surgery


def covariances(output: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_teacher_path())
    model = AutoModelForSequenceClassification.from_pretrained(default_teacher_path(), num_labels=2)
    splits = load_movie_reviews(seed=0)
    train = splits["train"].map(lambda rows: tokenizer(rows["sentence"], truncation=True, max_length=64), batched=True)
    args = RMTKDConfig(output_dir=os.path.dirname(output) or ".", use_cpu=True, report_to=[], disable_tqdm=True)
    trainer = RMTKDTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=train.select(range(8)),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    surgery = get_surgery(model)
    prepared = surgery.prepare(model).eval()
    history: dict = {}
    loader = trainer._calibration_dataloader(history)
    accumulators = collect_covariances(prepared, loader, surgery.taps(prepared), progress=False)
    if trainer.is_world_process_zero():
        tensors = {name: accumulator.covariance() for name, accumulator in accumulators.items()}
        tensors.update({f"{name}.num_samples": torch.tensor(a.num_samples) for name, a in accumulators.items()})
        metadata = {"world_size": args.world_size, **history["calibration"]}
        save_file(tensors, output, metadata={key: str(value) for key, value in metadata.items()})


def compare(first: str, second: str) -> dict:
    a, b = load_file(first), load_file(second)
    sites = [name for name in a if not name.endswith(".num_samples")]
    result = {
        "max_abs_difference": max(float((a[name] - b[name]).abs().max()) for name in sites),
        "max_abs_entry": max(float(a[name].abs().max()) for name in sites),
        "num_sites": len(sites),
        "num_samples_equal": all(int(a[f"{name}.num_samples"]) == int(b[f"{name}.num_samples"]) for name in sites),
        "num_samples": int(a[f"{sites[0]}.num_samples"]),
    }
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="Where the covariances go (safetensors).")
    parser.add_argument("--compare", nargs=2, metavar=("FIRST", "SECOND"), help="Compare two covariance files.")
    arguments = parser.parse_args()
    if arguments.compare:
        compare(*arguments.compare)
    elif arguments.output:
        os.makedirs(os.path.dirname(os.path.abspath(arguments.output)), exist_ok=True)
        covariances(arguments.output)
    else:
        parser.error("pass --output or --compare")


if __name__ == "__main__":
    sys.exit(main())
