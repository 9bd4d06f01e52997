"""Stage checkpoints of a compression run, and resuming from them.

After every stage that is kept, ``compress()`` writes ``output_dir/checkpoint-stage-<i>`` atomically: the model,
config and tokenizer, the run's history and the resume state (the next stage, the spectra so far). A run resumed from
it must start from the same teacher (weights fingerprint) with the same settings (:data:`RESUME_INVARIANTS`), and
then computes exactly what the uninterrupted run would have (docs/design.md §8).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import logging

from .checkpoint import save_compressed
from .filenames import HISTORY_FILENAME, RESUME_STATE_FILENAME, STAGE_CHECKPOINT_PREFIX
from .history import RunHistory

logger = logging.get_logger(__name__)

# settings a resumed run must share with the run that wrote the checkpoint
RESUME_INVARIANTS = (
    "sigma_quantile",
    "sigma_quantile_shifts",
    "mp_refine",
    "distillation_alpha",
    "distillation_temperature",
    "max_metric_drop",
    "compression_metric",
    "target_parameter_ratio",
    "target_latency_ratio",
    "compression_schedule",
    "stage_order",
    "stage_max_steps",
    "learning_rate",
    "seed",
    "reduce_attention_heads",
    "width_multiple",
    "factorize_word_embeddings",
    "hidden_distillation_weight",
    "trim_vocabulary",
    "load_best_model_at_end",
    "metric_for_best_model",
    "stage_retries",
    "calibration_fraction",
    "calibration_max_samples",
    "per_device_eval_batch_size",
    "min_width",
    "budget_search",
    "target_metric_drop",
    "screening_fraction",
    "screening_margin",
)


@dataclass
class ResumeState:
    """What a stage checkpoint holds besides the model: the run so far and where to go on."""

    history: RunHistory
    next_stage: int
    stage_spectra: dict[int, dict]


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the parameter names, shapes and bytes: identifies the teacher a run started from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_stage_checkpoint(
    model: nn.Module,
    output_dir: str,
    index: int,
    processing_class,
    state: ResumeState,
    save_total_limit: int | None = None,
) -> str:
    """Write ``output_dir/checkpoint-stage-<index>`` atomically (the resume state lands with it), then keep only the
    ``save_total_limit`` newest stage checkpoints. Returns the checkpoint's path."""
    directory = os.path.join(output_dir, f"{STAGE_CHECKPOINT_PREFIX}-{index}")
    resume_state = {
        "next_stage": state.next_stage,
        "stage_spectra": {str(key): value for key, value in state.stage_spectra.items()},
    }
    save_compressed(
        model,
        directory,
        processing_class,
        overwrite=True,
        json_files={HISTORY_FILENAME: state.history.to_dict(), RESUME_STATE_FILENAME: resume_state},
    )
    if save_total_limit is not None and save_total_limit > 0:
        for path in stage_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return directory


def stage_checkpoints(directory: str) -> list[str]:
    """Complete stage checkpoints in ``directory``, oldest first (a partial one has no resume state yet)."""
    found = []
    for path in glob.glob(os.path.join(directory, f"{STAGE_CHECKPOINT_PREFIX}-*")):
        match = re.fullmatch(rf"{STAGE_CHECKPOINT_PREFIX}-(\d+)", os.path.basename(path))
        if match and os.path.exists(os.path.join(path, RESUME_STATE_FILENAME)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def checkpoint_to_resume(output_dir: str, resume_from_checkpoint: str | bool) -> str | None:
    """The checkpoint to resume: a path, or with ``True`` the latest in ``output_dir`` (``None`` if there is none
    yet: the run was interrupted before its first stage ended and starts over)."""
    if resume_from_checkpoint is True or resume_from_checkpoint == "True":
        checkpoints = stage_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("No stage checkpoint in %s yet: starting from the first stage.", output_dir)
            return None
        return checkpoints[-1]
    checkpoint = os.fspath(resume_from_checkpoint)
    if not os.path.exists(os.path.join(checkpoint, RESUME_STATE_FILENAME)):
        raise ValueError(
            f"{checkpoint} is not an RMT-KD stage checkpoint (no {RESUME_STATE_FILENAME}): pass a "
            f"{STAGE_CHECKPOINT_PREFIX}-<i> directory that compress() wrote, or True for the latest one."
        )
    return checkpoint


def resume_settings(args, hidden_distillation_weight: float) -> dict:
    """The settings of ``args`` (an ``RMTKDConfig``) that a resumed run must share with the interrupted one, defaults
    resolved (as in the history)."""
    return {
        **{key: getattr(args, key) for key in RESUME_INVARIANTS},
        "hidden_distillation_weight": hidden_distillation_weight,
    }


def setting_defaults(config_class: type) -> dict:
    """The default of every resume invariant of ``config_class``: what an older history that lacks one ran with."""
    return {key: config_class.__dataclass_fields__[key].default for key in RESUME_INVARIANTS}


def read_resume_state(
    checkpoint: str, teacher_fingerprint: str, settings: Mapping[str, object], defaults: Mapping[str, object]
) -> ResumeState:
    """The history and resume state of ``checkpoint``, after checking that it belongs to this teacher and these
    ``settings`` (its weights are checked when ``load_checkpoint`` reads them). ``defaults``: the value of a setting
    that an older history does not record."""
    try:
        history = RunHistory.load(checkpoint)
        with open(os.path.join(checkpoint, RESUME_STATE_FILENAME)) as file:
            resume_state = json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(f"{checkpoint} is corrupted ({error}): resume from an earlier stage checkpoint.") from None
    if history.teacher.fingerprint != teacher_fingerprint:
        raise ValueError(
            f"{checkpoint} was made from a different teacher (weights fingerprint differs): pass the teacher the "
            "run started from, or start a new run in a fresh output_dir."
        )
    recorded = {key: history.config.get(key, defaults[key]) for key in RESUME_INVARIANTS}
    changed = [
        f"{key}: {recorded[key]!r} -> {settings[key]!r}" for key in RESUME_INVARIANTS if recorded[key] != settings[key]
    ]
    if changed:
        raise ValueError(
            f"Resuming {checkpoint} with different settings ({'; '.join(changed)}): resume with the settings "
            "of the interrupted run, or start a new run in a fresh output_dir."
        )
    spectra = {int(key): value for key, value in resume_state["stage_spectra"].items()}
    return ResumeState(history, int(resume_state["next_stage"]), spectra)


__all__ = [
    "RESUME_INVARIANTS",
    "ResumeState",
    "checkpoint_to_resume",
    "model_fingerprint",
    "read_resume_state",
    "save_stage_checkpoint",
    "stage_checkpoints",
]
