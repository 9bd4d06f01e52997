"""Measurements a practitioner reads next to a compression: parameter counts and fidelity to the teacher."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .calibration import forward_inputs
from .compression import CompressionReport
from .surgery import get_surgery


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"total", "embedding", "non_embedding"}`` parameter counts (embedding = the ``*_embeddings`` tables)."""
    total = embedding = 0
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        if name.endswith("_embeddings.weight"):
            embedding += parameter.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def parameter_comparison(counts: Mapping[str, int], teacher_counts: Mapping[str, int]) -> dict[str, float | int]:
    """Parameters, non-embedding parameters and the fraction of each removed, from two ``parameter_counts``."""
    return {
        "parameters": counts["total"],
        "non_embedding_parameters": counts["non_embedding"],
        "parameter_reduction": 1 - counts["total"] / teacher_counts["total"],
        "non_embedding_reduction": 1 - counts["non_embedding"] / teacher_counts["non_embedding"],
    }


def safetensors_size_mb(directory: str | os.PathLike) -> float:
    """Size in MB (10^6 bytes) of the ``*.safetensors`` files in ``directory``."""
    sizes = [entry.stat().st_size for entry in os.scandir(directory) if entry.name.endswith(".safetensors")]
    return sum(sizes) / 1e6


@torch.no_grad()
def hidden_state_similarity(
    teacher: nn.Module,
    student: nn.Module,
    report: CompressionReport,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
) -> list[float]:
    """Mean token cosine similarity, per layer output (embeddings first), between teacher and lifted student.

    The student's hidden state at boundary ``2i`` is mapped back to the teacher's coordinates with the basis the
    compression chose there; padding tokens are excluded.

    Returns:
        ``num_hidden_layers + 1`` floats.
    """
    surgery = get_surgery(student)
    teacher_model, student_model = teacher.eval(), student.eval()
    sums, count = None, 0
    for batch in dataloader:
        inputs = forward_inputs(teacher_model, batch, next(teacher_model.parameters()).device)
        teacher_states = teacher_model(**inputs, output_hidden_states=True).hidden_states
        student_states = student_model(**inputs, output_hidden_states=True).hidden_states
        lifted = surgery.lift_hidden_states(student_states, report.analyses)
        mask = inputs["attention_mask"].bool()
        cosines = [
            nn.functional.cosine_similarity(reference.to(torch.float64)[mask], approximation[mask], dim=-1).sum()
            for reference, approximation in zip(teacher_states, lifted, strict=True)
        ]
        sums = cosines if sums is None else [a + b for a, b in zip(sums, cosines, strict=True)]
        count += int(mask.sum())
    if not count:
        raise ValueError("hidden_state_similarity needs at least one non-padding token.")
    return [float(value) / count for value in sums]


@torch.inference_mode()
def text_classification_correct(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    labels: list[int],
    max_length: int | None = None,
    batch_size: int = 128,
) -> torch.Tensor:
    """Per row, whether ``model`` predicts the label of raw ``texts`` tokenized by ``tokenizer`` (truncated to
    ``max_length``), as a user of a saved checkpoint and its tokenizer would: a (len(texts),) bool tensor."""
    from transformers import DataCollatorWithPadding

    model.eval()
    collator = DataCollatorWithPadding(tokenizer)
    correct = []
    for start in range(0, len(texts), batch_size):
        encoded = [
            tokenizer(text, truncation=max_length is not None, max_length=max_length)
            for text in texts[start : start + batch_size]
        ]
        predictions = model(**collator(encoded)).logits.argmax(-1)
        correct.append(predictions.cpu() == torch.tensor(labels[start : start + batch_size]))
    return torch.cat(correct)


def text_classification_accuracy(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    labels: list[int],
    max_length: int | None = None,
    batch_size: int = 128,
) -> float:
    """Accuracy of ``model`` on raw ``texts`` (:func:`text_classification_correct`, averaged)."""
    correct = text_classification_correct(model, tokenizer, texts, labels, max_length, batch_size)
    return int(correct.sum()) / len(texts)


@torch.inference_mode()
def cpu_latency(
    model: nn.Module,
    batch_size: int = 1,
    sequence_length: int | None = 128,
    repeats: int = 20,
    warmup: int = 3,
) -> float:
    """Median wall time in seconds of one forward pass on random inputs of ``batch_size`` rows.

    ``sequence_length`` is the tokens per row for text models (clamped to the position table) and the image side
    for vision models (``None``: the model's own). Text models get an all-ones attention mask (transformers' BERT
    skips it; the compressed models apply it, so that their graphs export with any padding). Compare models only
    within one process run, one after the other, with nothing else running.
    """
    model = model.eval()
    inputs = get_surgery(model).example_inputs(model, batch_size, sequence_length)
    inputs = {name: tensor.to(next(model.parameters()).device) for name, tensor in inputs.items()}
    return median_seconds(lambda: model(**inputs), repeats, warmup)


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """Median wall time in seconds of ``run()`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def latency_comparison(teacher: nn.Module, compressed: nn.Module, sequence_length: int | None) -> dict:
    """Teacher vs compressed CPU latency (median seconds) at batch 1 and 32, one after the other in this process:
    ``{"sequence_length", "threads", "batch_1": {"teacher", "compressed"}, "batch_32": {...}}``."""
    comparison = {"sequence_length": sequence_length, "threads": torch.get_num_threads()}
    for batch_size, repeats in ((1, 10), (32, 3)):
        comparison[f"batch_{batch_size}"] = {
            name: cpu_latency(model, batch_size, sequence_length, repeats=repeats, warmup=2)
            for name, model in (("teacher", teacher), ("compressed", compressed))
        }
    return comparison


__all__ = [
    "cpu_latency",
    "hidden_state_similarity",
    "latency_comparison",
    "median_seconds",
    "parameter_comparison",
    "parameter_counts",
    "safetensors_size_mb",
    "text_classification_accuracy",
    "text_classification_correct",
]
