#!/usr/bin/env python
"""Where a small dataset's accuracy goes when MiniLM is cut (issue #19): no distillation, one teacher, validation.

Every probe starts from the same fine-tuned teacher (the 600-row teacher of ``small_data.py``), calibrates on all of
its training rows and scores the validation split through the probe's tokenizer, as a user of the saved folder
would; Δ is the paired difference from the teacher on the same rows ± its standard error.

* ``sites``: one cut at σ² quantile ``--quantile``, then the same cut with the sites of one kind left whole
  (embedding, residual boundaries, FFN), to see which kind costs what;
* ``embedding``: only the embedding site cut, to fixed widths (the word table is half of MiniLM's parameters);
* ``vocabulary``: the vocabulary trimmed to the training rows' tokens plus the first ``N`` ids of the WordPiece
  vocabulary (BERT's vocabulary lists whole words roughly by frequency), unseen words re-split by the trimmed
  tokenizer; and the same kept rows with every dropped token's row replaced by its nearest kept row (cosine), as a
  shared-row table would do;
* ``rank``: the word table replaced by its best rank-``r`` approximation (SVD).

    python benchmarks/small_data_probes.py --teacher outputs/small_data/rows600_s0/checkpoint-teacher \\
        --train_file outputs/small_data/data/train_600_s0.csv --validation_file outputs/small_data/data/validation.csv

Results: ``benchmarks/results/small_data_probes.json`` (each probe's parameters, accuracy, Δ and SE).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys

import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from rmt_kd_hf.compression import compress_model
from rmt_kd_hf.planning import paired_standard_error
from rmt_kd_hf.reports import text_classification_correct
from rmt_kd_hf.surgery.base import count_parameters
from rmt_kd_hf.vocabulary import trim_embeddings, trim_tokenizer, used_token_ids, vocabulary_to_keep

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "small_data_probes.json")
MAX_LENGTH = 128  # rmt-kd compress's max_seq_length
PROBES = ("sites", "embedding", "vocabulary", "rank")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="outputs/small_data/rows600_s0/checkpoint-teacher")
    parser.add_argument("--train_file", default="outputs/small_data/data/train_600_s0.csv")
    parser.add_argument("--validation_file", default="outputs/small_data/data/validation.csv")
    parser.add_argument("--probes", nargs="+", choices=PROBES, default=list(PROBES))
    parser.add_argument("--quantile", type=float, default=0.0625)
    parser.add_argument("--embedding_widths", type=int, nargs="+", default=[256, 192, 128])
    parser.add_argument("--first_ids", type=int, nargs="+", default=[0, 5000, 12000, 20000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[128, 256])
    return parser.parse_args(argv)


class Probe:
    """The teacher, its tokenizer, the calibration batches and the teacher's per-row validation correctness."""

    def __init__(self, args: argparse.Namespace):
        self.tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        self.teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
        train, validation = pd.read_csv(args.train_file), pd.read_csv(args.validation_file)
        self.texts, self.labels = list(validation["sentence"]), list(validation["label"])
        self.train_texts = list(train["sentence"])
        collator = DataCollatorWithPadding(self.tokenizer)
        encoded = self.tokenizer(self.train_texts, truncation=True, max_length=MAX_LENGTH)
        rows = [{key: values[i] for key, values in encoded.items()} for i in range(len(self.train_texts))]
        self.calibration = [collator(rows[start : start + 32]) for start in range(0, len(rows), 32)]
        self.teacher_correct = self.correct(self.teacher)
        self.teacher_parameters = count_parameters(self.teacher)
        self._sites: dict[str, tuple[int, str]] | None = None

    @torch.inference_mode()
    def correct(self, model, tokenizer=None):
        return text_classification_correct(
            model, tokenizer or self.tokenizer, self.texts, self.labels, MAX_LENGTH
        ).numpy()

    def record(self, probe: str, setting: dict, model, tokenizer=None, num_parameters: int | None = None) -> dict:
        """One probe's row (printed as it is measured); ``num_parameters`` when ``model`` is not stored as counted."""
        correct = self.correct(model, tokenizer)
        difference = correct.mean() - self.teacher_correct.mean()
        row = {
            "probe": probe,
            **setting,
            "num_parameters": count_parameters(model) if num_parameters is None else num_parameters,
            "validation_accuracy": float(correct.mean()),
            "difference_pt": 100 * float(difference),
            "standard_error_pt": 100 * paired_standard_error(correct, self.teacher_correct),
        }
        print(json.dumps(row), flush=True)
        return row

    def cut(self, quantile: float, kept_widths: dict[str, int] | None = None):
        compressed, report = compress_model(
            self.teacher, self.calibration, quantile, kept_widths=kept_widths, progress=False
        )
        self._sites = {name: (analysis.site.dim, analysis.site.kind) for name, analysis in report.analyses.items()}
        return compressed, report

    def sites(self) -> dict[str, tuple[int, str]]:
        """``{site: (width, kind)}`` of the teacher, from the last cut (one at quantile 0.5 when none was made)."""
        if self._sites is None:
            self.cut(0.5)
        return self._sites


def probe_sites(probe: Probe, quantile: float) -> list[dict]:
    rows = [probe.record("sites", {"quantile": quantile, "whole": []}, probe.cut(quantile)[0])]
    for whole in (["embedding"], ["residual"], ["ffn"], ["embedding", "residual"]):
        kept = {name: width for name, (width, kind) in probe.sites().items() if kind in whole}
        rows.append(probe.record("sites", {"quantile": quantile, "whole": whole}, probe.cut(quantile, kept)[0]))
    return rows


def probe_embedding(probe: Probe, widths: list[int]) -> list[dict]:
    dims = {name: width for name, (width, _) in probe.sites().items()}
    rows = []
    for width in widths:
        compressed, _ = probe.cut(0.5, {**dims, "embeddings": width})
        rows.append(probe.record("embedding", {"embedding_width": width}, compressed))
    return rows


def probe_vocabulary(probe: Probe, first_ids: list[int]) -> list[dict]:
    used = used_token_ids(probe.tokenizer, probe.train_texts, max_length=MAX_LENGTH)
    table = probe.teacher.get_input_embeddings().weight.detach()
    directions = torch.nn.functional.normalize(table, dim=-1)
    rows = []
    for count in first_ids:
        kept = vocabulary_to_keep(probe.tokenizer, used | set(range(min(count, len(probe.tokenizer)))))
        setting = {"first_ids": count, "kept_tokens": len(kept)}
        trimmed = trim_embeddings(copy.deepcopy(probe.teacher), kept)
        rows.append(
            probe.record(
                "vocabulary", {**setting, "unseen": "re-split"}, trimmed, trim_tokenizer(probe.tokenizer, kept)
            )
        )
        kept_ids = torch.tensor(kept)
        nearest = kept_ids[(directions @ directions[kept_ids].T).argmax(-1)]
        nearest[kept_ids] = kept_ids
        shared = copy.deepcopy(probe.teacher)
        with torch.no_grad():
            shared.get_input_embeddings().weight.copy_(table[nearest])
        # the shared table stores only the kept rows
        rows.append(
            probe.record(
                "vocabulary", {**setting, "unseen": "nearest kept row"}, shared, None, count_parameters(trimmed)
            )
        )
    return rows


def probe_rank(probe: Probe, ranks: list[int]) -> list[dict]:
    table = probe.teacher.get_input_embeddings().weight.detach().double()
    mean = table.mean(0)
    left, singular, right = torch.linalg.svd(table - mean, full_matrices=False)
    rows = []
    for rank in ranks:
        low_rank = copy.deepcopy(probe.teacher)
        with torch.no_grad():
            low_rank.get_input_embeddings().weight.copy_(
                (mean + (left[:, :rank] * singular[:rank]) @ right[:rank]).float()
            )
        vocabulary, width = table.shape
        factored = probe.teacher_parameters - vocabulary * width + (vocabulary + width) * rank
        rows.append(probe.record("rank", {"rank": rank}, low_rank, None, factored))
    return rows


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    probe = Probe(args)
    result = {
        "command": shlex.join(["python", "benchmarks/small_data_probes.py", *(sys.argv[1:] if argv is None else argv)]),
        "teacher": args.teacher,
        "teacher_parameters": probe.teacher_parameters,
        "teacher_validation_accuracy": float(probe.teacher_correct.mean()),
        "rows": [],
    }
    print(json.dumps({key: value for key, value in result.items() if key != "rows"}), flush=True)
    runs = {
        "sites": lambda: probe_sites(probe, args.quantile),
        "embedding": lambda: probe_embedding(probe, args.embedding_widths),
        "vocabulary": lambda: probe_vocabulary(probe, args.first_ids),
        "rank": lambda: probe_rank(probe, args.ranks),
    }
    for name in args.probes:
        result["rows"].extend(runs[name]())
    with open(RESULTS, "w") as file:
        json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
