#!/usr/bin/env python
"""Embedding and attention-head options of one-shot RMT-KD on MiniLM-L6 / movie reviews, before any distillation.

Every arm starts from the same fine-tuned teacher and calibration rows (10% of train, seeded) and is compared with
the teacher on the validation split (held out from calibration and from the vocabulary; the test split is never
read): parameters, validation accuracy, agreement of the predicted labels with the teacher's, and the mean cosine
between the student's and the teacher's pooled outputs.

Arms: the teacher with its vocabulary trimmed to the training text (with and without the task's alphabet); the
teacher with its word table factored at the MP rank (nothing else cut); one-shot RMT-KD at ``--quantile`` as is,
with the trimmed vocabulary, with the factored word table, with both, and with per-head attention reductions.

    python benchmarks/embedding_options.py --teacher outputs/bench/teacher_converged
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmt_kd_hf import compress_model
from rmt_kd_hf.data import calibration_subset, default_teacher_path, load_movie_reviews, text_dataloader
from rmt_kd_hf.reports import parameter_counts
from rmt_kd_hf.vocabulary import trim_vocabulary

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a fine-tuned BertForSequenceClassification directory")
    parser.add_argument("--quantile", type=float, default=0.5)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results_name", default="embedding_options")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="groups of arms to run")
    return parser.parse_args(argv)


@torch.no_grad()
def predict(model, tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (rows, labels) and pooled outputs (rows, pooler width) of ``model`` on ``texts``."""
    model.eval()
    logits, pooled = [], []
    for batch in text_dataloader(texts, tokenizer, batch_size=64, max_length=max_length):
        pooler_output = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        logits.append(model.classifier(model.dropout(pooler_output)))  # what model(**batch).logits computes
        pooled.append(pooler_output)
    return torch.cat(logits), torch.cat(pooled)


def teacher_copy(path: str):
    return AutoModelForSequenceClassification.from_pretrained(path).eval()


class Arms:
    """Shared data, teacher outputs and the measurement of one arm."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tokenizer = AutoTokenizer.from_pretrained(default_teacher_path())
        reviews = load_movie_reviews(seed=args.seed)
        self.train_texts = reviews["train"]["sentence"]
        calibration, self.calibration_digest = calibration_subset(reviews["train"], 0.1, args.seed)
        self.calibration_texts = calibration["sentence"]
        self.validation_texts = reviews["validation"]["sentence"]
        self.validation_labels = torch.tensor(reviews["validation"]["label"])
        self.teacher = teacher_copy(args.teacher)
        self.teacher_counts = parameter_counts(self.teacher)
        self.teacher_logits, self.teacher_pooled = predict(
            self.teacher, self.tokenizer, self.validation_texts, args.max_length
        )
        self.rows: list[dict] = []

    def calibration_loader(self, tokenizer):
        return text_dataloader(self.calibration_texts, tokenizer, batch_size=32, max_length=self.args.max_length)

    def trimmed_teacher(self, keep_alphabet: bool = True):
        model, tokenizer, kept = trim_vocabulary(
            teacher_copy(self.args.teacher),
            self.tokenizer,
            self.train_texts,
            max_length=self.args.max_length,
            keep_alphabet=keep_alphabet,
        )
        return model, tokenizer, kept

    def measure(self, name: str, model, tokenizer, extra: dict | None = None) -> dict:
        start = time.perf_counter()
        logits, pooled = predict(model, tokenizer, self.validation_texts, self.args.max_length)
        predictions = logits.argmax(-1)
        counts = parameter_counts(model)
        row = {
            "arm": name,
            "parameters": counts["total"],
            "embedding_parameters": counts["embedding"],
            "parameter_reduction": 1 - counts["total"] / self.teacher_counts["total"],
            "validation_accuracy": float((predictions == self.validation_labels).float().mean()),
            "agreement_with_teacher": float((predictions == self.teacher_logits.argmax(-1)).float().mean()),
            "pooled_cosine_to_teacher": float(
                torch.nn.functional.cosine_similarity(pooled.double(), self.teacher_pooled.double(), dim=-1).mean()
            ),
            "vocab_size": model.config.vocab_size,
            "embedding_size": getattr(model.config, "embedding_size", model.config.hidden_size),
            "word_embedding_rank": getattr(model.config, "word_embedding_rank", None),
            **(extra or {}),
        }
        print(json.dumps(row), f"({time.perf_counter() - start:.0f} s to evaluate)", flush=True)
        self.rows.append(row)
        return row

    def compress(self, model, tokenizer, **options):
        options.setdefault("sigma_quantile", self.args.quantile)
        surgery_options = {
            "factorize_word_embeddings": options.pop("factorize_word_embeddings", False),
            "reduce_attention_heads": options.pop("reduce_attention_heads", False),
            "width_multiple": options.pop("width_multiple", 1),
        }
        loader = self.calibration_loader(tokenizer)
        return compress_model(model, loader, progress=False, surgery_options=surgery_options, **options)


def teacher_arms(arms: Arms) -> None:
    arms.measure("teacher", arms.teacher, arms.tokenizer)
    for keep_alphabet in (True, False):
        model, tokenizer, _ = arms.trimmed_teacher(keep_alphabet)
        arms.measure(f"teacher, vocabulary trimmed (alphabet {keep_alphabet})", model, tokenizer)


def low_rank_arms(arms: Arms) -> None:
    quantile = arms.args.quantile
    factored, report = arms.compress(teacher_copy(arms.args.teacher), arms.tokenizer, factorize_word_embeddings=True)
    rank = report.kept_widths["word_embeddings"]
    low_rank_only, _ = arms.compress(
        teacher_copy(arms.args.teacher),
        arms.tokenizer,
        factorize_word_embeddings=True,
        keep_all=True,
        kept_widths={"word_embeddings": rank},
    )
    arms.measure(f"teacher, word table at MP rank {rank}", low_rank_only, arms.tokenizer, {"mp_rank": rank})
    plain, _ = arms.compress(teacher_copy(arms.args.teacher), arms.tokenizer)
    arms.measure(f"rmt q={quantile}", plain, arms.tokenizer)
    arms.measure(f"rmt q={quantile} + low-rank word table", factored, arms.tokenizer, {"mp_rank": rank})


def trimmed_arms(arms: Arms) -> None:
    quantile = arms.args.quantile
    model, tokenizer, _ = arms.trimmed_teacher()
    trimmed, _ = arms.compress(model, tokenizer)
    arms.measure(f"rmt q={quantile} + trimmed vocabulary", trimmed, tokenizer)
    model, tokenizer, _ = arms.trimmed_teacher()
    both, both_report = arms.compress(model, tokenizer, factorize_word_embeddings=True)
    both_rank = both_report.kept_widths["word_embeddings"]
    arms.measure(f"rmt q={quantile} + trimmed + low-rank", both, tokenizer, {"mp_rank": both_rank})


def head_arms(arms: Arms) -> None:
    quantile = arms.args.quantile
    heads, _ = arms.compress(teacher_copy(arms.args.teacher), arms.tokenizer, reduce_attention_heads=True)
    sizes = {
        "query_key_head_sizes": heads.config.query_key_head_sizes,
        "value_head_sizes": heads.config.value_head_sizes,
    }
    arms.measure(f"rmt q={quantile} + per-head attention", heads, arms.tokenizer, sizes)
    model, tokenizer, _ = arms.trimmed_teacher()
    both, _ = arms.compress(model, tokenizer, reduce_attention_heads=True)
    sizes = {"query_key_head_sizes": both.config.query_key_head_sizes, "value_head_sizes": both.config.value_head_sizes}
    arms.measure(f"rmt q={quantile} + trimmed vocabulary + per-head attention", both, tokenizer, sizes)


def recommended_arm(arms: Arms) -> None:
    """Trimmed vocabulary, per-head attention and widths rounded up to multiples of 8 (the fast layout)."""
    model, tokenizer, _ = arms.trimmed_teacher()
    student, _ = arms.compress(model, tokenizer, reduce_attention_heads=True, width_multiple=8)
    config = student.config
    widths = {"boundary_sizes": config.boundary_sizes, "intermediate_sizes": config.intermediate_sizes}
    name = f"rmt q={arms.args.quantile} + trimmed vocabulary + per-head attention + widths multiple of 8"
    arms.measure(name, student, tokenizer, widths)


ARMS = {
    "teacher": teacher_arms,
    "low_rank": low_rank_arms,
    "trimmed": trimmed_arms,
    "heads": head_arms,
    "recommended": recommended_arm,
}


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    arms = Arms(args)
    for name in args.arms:
        ARMS[name](arms)
    result = {
        "teacher": os.path.abspath(args.teacher),
        "calibration_rows_sha256": arms.calibration_digest,
        "held_out": "validation split (1,912 rows); vocabulary from the train split, calibration = 10% of train",
        "rows": arms.rows,
        "wall_seconds": time.perf_counter() - start,
        "command": "python benchmarks/embedding_options.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, f"{args.results_name}.json"), "w") as file:
        json.dump(result, file, indent=2)
    with open(os.path.join(RESULTS_DIR, f"{args.results_name}.md"), "w") as file:
        file.write(markdown_table(result, args.results_name))
    return result


def markdown_table(result: dict, name: str) -> str:
    lines = [
        f"# {name}",
        "",
        f"Command: `{result['command']}` ({result['wall_seconds'] / 60:.0f} min on 2 shared CPU cores). "
        f"Held out: {result['held_out']}. No distillation: every figure is right after the surgery.",
        "",
        "| arm | params | reduction | embedding params | vocab | word rank | val acc | agreement | pooled cosine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['arm']} | {row['parameters']:,} | {100 * row['parameter_reduction']:.1f}% "
            f"| {row['embedding_parameters']:,} | {row['vocab_size']:,} | {row['word_embedding_rank'] or '-'} "
            f"| {100 * row['validation_accuracy']:.2f}% | {100 * row['agreement_with_teacher']:.2f}% "
            f"| {row['pooled_cosine_to_teacher']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
