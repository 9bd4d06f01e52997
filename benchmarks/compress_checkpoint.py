#!/usr/bin/env python
"""One-shot RMT-KD of a fine-tuned MiniLM classifier on the movie-review calibration rows, saved as a checkpoint
(the input of ``dense_equivalent.py``).

    python benchmarks/compress_checkpoint.py TEACHER_DIR outputs/q05_heads --reduce_attention_heads
"""

from __future__ import annotations

import argparse

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmt_kd_hf import compress_model
from rmt_kd_hf.checkpoint import save_compressed
from rmt_kd_hf.data import calibration_subset, default_teacher_path, load_movie_reviews, text_dataloader


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="a fine-tuned BertForSequenceClassification directory")
    parser.add_argument("output_dir")
    parser.add_argument("--quantile", type=float, default=0.5)
    parser.add_argument("--reduce_attention_heads", action="store_true")
    parser.add_argument("--factorize_word_embeddings", action="store_true")
    parser.add_argument("--width_multiple", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(default_teacher_path())
    calibration, _ = calibration_subset(load_movie_reviews(seed=args.seed)["train"], 0.1, args.seed)
    loader = text_dataloader(calibration["sentence"], tokenizer, batch_size=32, max_length=64)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    options = {
        "reduce_attention_heads": args.reduce_attention_heads,
        "factorize_word_embeddings": args.factorize_word_embeddings,
        "width_multiple": args.width_multiple,
    }
    student, report = compress_model(teacher, loader, args.quantile, progress=False, surgery_options=options)
    save_compressed(student, args.output_dir, tokenizer, report, overwrite=True)
    config = student.config
    print(args.output_dir, config.boundary_sizes, config.intermediate_sizes, config.query_key_head_sizes)


if __name__ == "__main__":
    main()
