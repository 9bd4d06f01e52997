#!/usr/bin/env python
"""Compress a sequence classifier with RMT-KD on a GLUE task or on your own csv/json files.

The same as ``rmt-kd compress``; the logic lives in ``rmt_kd_hf.text_classification``.

    python run_glue.py --model_name_or_path google-bert/bert-base-uncased --task_name sst2 \\
        --do_train --do_eval --output_dir out/sst2
    python run_glue.py --train_file train.csv --validation_file validation.csv --test_file test.csv \\
        --do_train --do_eval --do_predict --output_dir out/local
    python run_glue.py ... --resume_from_checkpoint True   # after an interruption
"""

from __future__ import annotations

from rmt_kd_hf.text_classification import parse_arguments, run


def main(argv: list[str] | None = None) -> dict:
    return run(argv)


if __name__ == "__main__":
    main()

__all__ = ["main", "parse_arguments"]
