"""Calibration: forward hooks that stream activation covariances over a DataLoader.

Architecture knowledge stays in ``rmt_kd_hf.surgery``: this module only knows module names (``taps``), which
tensor of a module to read, and which axis holds the features.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.utils import logging

from .spectral import CovarianceAccumulator

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class ActivationTap:
    """Where to read activations.

    Attributes:
        name: key of the accumulator in the result.
        module_name: dotted path of the module in the model (``model.get_submodule``).
        capture: ``"input"`` (first positional input) or ``"output"`` of the module.
        feature_dim: axis of the features: ``-1`` for token activations (batch, seq, features), ``1`` for
            image channels (batch, channels, height, width).
        masked: skip padding tokens using the batch's ``attention_mask`` (token activations only).
    """

    name: str
    module_name: str
    capture: Literal["input", "output"] = "output"
    feature_dim: int = -1
    masked: bool = True


class _TapRecorder:
    """Holds the accumulators and the current batch mask while hooks fire."""

    def __init__(self, taps: Iterable[ActivationTap]):
        self.taps = list(taps)
        self.accumulators: dict[str, CovarianceAccumulator] = {}
        self.current_mask: torch.Tensor | None = None
        self.error: Exception | None = None

    def hook_for(self, tap: ActivationTap):
        def hook(module, args, output):
            if self.error is not None:
                return
            activations = args[0] if tap.capture == "input" else output
            if isinstance(activations, (tuple, list)):
                activations = activations[0]
            try:
                self._record(tap, activations.detach())
            except ValueError as error:  # re-raised by collect_covariances, outside torch's call stack
                self.error = error

        return hook

    def _record(self, tap: ActivationTap, activations: torch.Tensor) -> None:
        if tap.feature_dim != -1:
            activations = activations.movedim(tap.feature_dim, -1)
        accumulator = self.accumulators.get(tap.name)
        if accumulator is None:
            accumulator = CovarianceAccumulator(activations.shape[-1], name=tap.name)
            self.accumulators[tap.name] = accumulator
        mask = self.current_mask if tap.masked else None
        if mask is not None and mask.shape != activations.shape[:-1]:
            mask = None
        accumulator.update(activations, mask)


def forward_inputs(model: nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    """The entries of ``batch`` that ``model.forward`` takes (labels dropped), moved to ``device``."""
    accepted = inspect.signature(model.forward).parameters
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
        if key in accepted and key not in ("labels", "start_positions", "end_positions")
    }


@torch.no_grad()
def collect_covariances(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    taps: Iterable[ActivationTap],
    max_batches: int | None = None,
    progress: bool = True,
    description: str = "Calibrating",
) -> dict[str, CovarianceAccumulator]:
    """Run ``model`` over ``dataloader`` and accumulate the uncentred covariance at every tap.

    Args:
        model: the model to calibrate (put in eval mode for the run, restored afterwards).
        dataloader: yields dicts of tensors (``input_ids``, ``attention_mask``, ... or ``pixel_values``); keys the
            model's ``forward`` does not take (and labels) are dropped.
        taps: where to read activations.
        max_batches: stop after this many batches.
        progress: show a progress bar.

    Returns:
        ``{tap.name: CovarianceAccumulator}``, already all-reduced across processes when
        ``torch.distributed`` is initialised.
    """
    recorder = _TapRecorder(taps)
    handles = [
        model.get_submodule(tap.module_name).register_forward_hook(recorder.hook_for(tap)) for tap in recorder.taps
    ]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    num_batches = 0
    try:
        total = max_batches
        if total is None and hasattr(dataloader, "__len__"):
            total = len(dataloader)
        bar = logging.tqdm(dataloader, total=total, desc=description, disable=not progress, leave=False)
        for batch in bar:
            if max_batches is not None and num_batches >= max_batches:
                break
            inputs = forward_inputs(model, batch, device)
            recorder.current_mask = inputs.get("attention_mask")
            model(**inputs)
            if recorder.error is not None:
                raise recorder.error
            num_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if num_batches == 0:
        raise ValueError(
            "The calibration dataloader yielded no batches: pass a non-empty calibration set "
            "(the paper uses 10% of the training set)."
        )
    for accumulator in recorder.accumulators.values():
        accumulator.all_reduce()
    missing = [tap.name for tap in recorder.taps if tap.name not in recorder.accumulators]
    if missing:
        raise ValueError(f"These calibration taps never fired (wrong module names?): {missing}")
    return recorder.accumulators


__all__ = ["ActivationTap", "collect_covariances", "forward_inputs"]


def calibration_rows(num_rows: int, size: int, seed: int = 0) -> tuple[list[int], str]:
    """``size`` sorted row ids drawn (seeded) from ``range(num_rows)`` and the SHA-256 of that id list."""
    generator = torch.Generator().manual_seed(seed)
    rows = sorted(torch.randperm(num_rows, generator=generator)[:size].tolist())
    return rows, hashlib.sha256(",".join(map(str, rows)).encode()).hexdigest()


@dataclass(frozen=True)
class CalibrationPlan:
    """Which training rows calibrate, in which fixed batches, and this process's share of those batches.

    Attributes:
        rows: training-set indices, seeded (:func:`calibration_rows`).
        row_ids_sha256: SHA-256 of ``rows``, recorded in the history.
        batches: this process's batches, as positions in ``rows``: every ``world_size``-th batch of a one-process
            run, so the batches (rows, padding, hence float32 activations) are those of one process and no row is
            padded in twice, as an evaluation loader would; the covariance sums are added across processes.
    """

    rows: list[int]
    row_ids_sha256: str
    batches: list[list[int]]


def plan_calibration(
    num_train_rows: int,
    fraction: float,
    max_samples: int | None,
    seed: int,
    batch_size: int,
    world_size: int = 1,
    process_index: int = 0,
) -> CalibrationPlan:
    """``fraction`` of the training rows (at most ``max_samples``, at least one) in batches of ``batch_size``."""
    size = max(1, round(fraction * num_train_rows))
    if max_samples is not None:
        size = min(size, max_samples)
    rows, digest = calibration_rows(num_train_rows, size, seed)
    batches = [list(range(start, min(start + batch_size, len(rows)))) for start in range(0, len(rows), batch_size)]
    if len(batches) < world_size:
        raise ValueError(
            f"{len(rows)} calibration rows make {len(batches)} batches of {batch_size}, fewer than the "
            f"{world_size} processes: lower per_device_eval_batch_size or raise calibration_fraction."
        )
    return CalibrationPlan(rows, digest, batches[process_index::world_size])
