"""Checks run before ``compress()`` does any work: inputs that would break a stage hours later are refused at once,
with the problem and the fix in one sentence."""

from __future__ import annotations

import os
import tempfile

from torch import nn

from .checkpoint import first_names, non_finite_tensors, refuse_teacher_folder


def hidden_distillation_weight(weight: float | None, surgery, model: nn.Module) -> float:
    """The weight of the hidden-state loss: ``weight``, or where it is ``None``, 1 on architectures that support it
    (BERT; it won on validation, benchmarks/results/frontier_sweep.md) and 0 elsewhere. A weight asked of an
    architecture without it is refused."""
    supported = hasattr(surgery, "hidden_state_bases")
    if weight and not supported:
        raise ValueError(
            f"hidden_distillation_weight={weight}: intermediate-layer distillation supports BERT encoders only, not "
            f"{type(model).__name__}; set it to 0."
        )
    return (1.0 if supported else 0.0) if weight is None else weight


def check_compress_inputs(model: nn.Module, output_dir: str, train_dataset, processing_class) -> None:
    """Refuse an unwritable or teacher-owned ``output_dir``, an empty training set, a teacher with non-finite weights
    or a multi-label head, a tokenizer that is not the model's, and labels outside the classification head."""
    refuse_teacher_folder(output_dir, getattr(model, "name_or_path", None), refuse_containing=False)
    check_writable(output_dir)
    if len(train_dataset) == 0:
        raise ValueError("train_dataset is empty: calibration and distillation need training rows.")
    broken = non_finite_tensors(model)
    if broken:
        raise ValueError(
            f"The teacher has non-finite weights ({first_names(broken)}): "
            "reload or retrain it; RMT-KD cannot compress a model that computes NaN."
        )
    vocab_size = getattr(model.config, "vocab_size", None)
    tokenizer_size = len(processing_class) if hasattr(processing_class, "__len__") else None
    if vocab_size is not None and tokenizer_size is not None and tokenizer_size > vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer_size} tokens but the model's embeddings only {vocab_size}: this is not "
            "the model's tokenizer. Pass the tokenizer saved with the teacher."
        )
    check_tokenizer_reads_the_data(train_dataset, processing_class)
    if getattr(model.config, "problem_type", None) == "multi_label_classification":
        raise ValueError(
            "The teacher is a multi-label classifier (problem_type='multi_label_classification'), which RMT-KD "
            "does not support yet: compress a single-label or regression teacher."
        )
    check_label_range(train_dataset, getattr(model.config, "num_labels", None))


def check_writable(output_dir: str) -> None:
    """Probe the nearest existing ancestor of ``output_dir`` with a temporary file: create nothing yet."""
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        message = f"Cannot write into output_dir={output_dir!r} ({error}); choose a writable one."
        raise PermissionError(message) from None


def check_label_range(train_dataset, num_labels: int | None) -> None:
    """Sequence-classification labels must index the head's outputs."""
    columns = getattr(train_dataset, "column_names", None) or []
    label_column = "labels" if "labels" in columns else "label" if "label" in columns else None
    labels = train_dataset[label_column] if label_column is not None else []
    if num_labels and num_labels > 1 and len(labels) and isinstance(labels[0], int):
        low, high = min(labels), max(labels)
        if low < 0 or high >= num_labels:
            raise ValueError(
                f"Training labels span {low}..{high} but the classification head has {num_labels} outputs: "
                "map the labels to 0..num_labels-1 or load the teacher with the right num_labels."
            )


def check_tokenizer_reads_the_data(
    train_dataset, processing_class, sample_rows: int = 256, max_unknown_fraction: float = 0.5
) -> None:
    """Refuse training text that is mostly ``[UNK]``: the tokenizer is not the model's (a folder without
    tokenizer files gives transformers' few-token placeholder, which maps every word to ``[UNK]``)."""
    unk_id = getattr(processing_class, "unk_token_id", None)
    columns = getattr(train_dataset, "column_names", None) or []
    if unk_id is None or "input_ids" not in columns or not hasattr(train_dataset, "select"):
        return
    special = set(getattr(processing_class, "all_special_ids", [])) - {unk_id}
    rows = train_dataset.select(range(min(sample_rows, len(train_dataset))))["input_ids"]
    tokens = [token for row in rows for token in row if token not in special]
    unknown = sum(token == unk_id for token in tokens) / max(len(tokens), 1)
    if tokens and unknown > max_unknown_fraction:
        raise ValueError(
            f"{unknown:.0%} of the training tokens are the unknown token: the tokenizer "
            f"({type(processing_class).__name__}, {len(processing_class)} tokens) cannot read this text. "
            "Pass the tokenizer saved with the teacher (--tokenizer_name), or save it into the teacher's folder."
        )


__all__ = ["check_compress_inputs", "check_label_range", "check_tokenizer_reads_the_data", "check_writable"]
