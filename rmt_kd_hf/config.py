"""``RMTKDConfig``: ``TrainingArguments`` plus the knobs of RMT-KD's compress-and-distil loop."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from transformers import TrainingArguments
from transformers.utils import logging

from .surgery.base import SiteKind

logger = logging.get_logger(__name__)
SITE_KINDS = get_args(SiteKind)


@dataclass
class RMTKDConfig(TrainingArguments):
    r"""
    Configuration of [`RMTKDTrainer`]. Every `TrainingArguments` field keeps its meaning; the optimiser settings
    (learning rate, batch size, ...) are used by each distillation stage. With `eval_strategy` set and
    `load_best_model_at_end=True`, each stage is evaluated on the way and ends on its best-scoring weights
    (`metric_for_best_model`), kept in memory: inside `compress()` only whole stages are checkpointed.

    Args:
        calibration_fraction (`float`, defaults to `0.1`):
            Fraction of the training set (seeded by `seed`) whose activations estimate the covariances.
        calibration_max_samples (`int`, *optional*):
            Cap on the number of calibration rows.
        sigma_quantile (`float`, defaults to `0.5`):
            Eigenvalue quantile that initialises the Marchenko–Pastur σ²; higher keeps fewer directions.
        sigma_quantile_shifts (`dict[str, float]` or `str`, *optional*):
            Added to the quantile at the sites of a kind (`"residual"`, `"ffn"`, `"attention"`, `"embedding"`,
            `"rank"`, `"channels"`), e.g. `{"ffn": 0.2}` (or its JSON string on the command line): those sites
            keep fewer directions, so a parameter target leaves the other kinds wider. Default: no shift.
        mp_refine (`bool`, defaults to `True`):
            Refine σ² by a robust fit of the MP bulk (kept at the quantile when no bulk is found).
        distillation_alpha (`float`, defaults to `0.7`):
            Weight of the task loss: `L = α·CE + (1 − α)·T²·KL(p_old ‖ p_new)`.
        distillation_temperature (`float`, defaults to `1.0`):
            Softmax temperature `T` of the distillation term.
        hidden_distillation_weight (`float`, *optional*):
            Weight β of an intermediate-layer term added to the loss, β·mean over layers of
            `‖h_new − h_old·Bᵀ‖² / ‖h_old·Bᵀ‖²`: each layer's output in the compressed model against the model
            before the stage, projected into the stage's reduced basis `B` (BERT only). `None` (default): 1.0 for
            BERT encoders (it won on validation in `benchmarks/results/frontier_sweep.md`), off for the others;
            0 turns it off.
        teacher_output_cache_mb (`float`, defaults to `1024`):
            Memory for the frozen teacher's logits and hidden states of the training rows during a distillation
            that passes over its training set more than once: later epochs read them instead of running the teacher
            (a third of a step on a CPU). Outputs read back match the teacher's up to float rounding (the row was
            run in a batch of another length). 0 turns it off.
        max_metric_drop (`float`, defaults to `0.01`):
            A stage is rolled back when its validation metric falls more than this below the teacher's
            (absolute: 0.01 = one accuracy point).
        target_metric_drop (`float`, *optional*):
            Accuracy-targeted mode: the strongest cut whose validation metric stays within this of the teacher's
            (absolute, like `max_metric_drop`, which it replaces as the floor). Each stage's σ² quantile is
            bisected both ways over `stage_retries` more tries: stronger after a cut that passes, milder after one
            that is rolled back; the strongest that passes is kept. `rmt-kd compress` uses 0.01 when no other
            target or floor is given.
        stage_retries (`int`, defaults to `3`):
            A stage that is rolled back is tried again this many times with milder cuts (its σ² quantile bisected
            between the strongest cut that passed, at first none, and the mildest that failed); the strongest cut
            that passes is kept. Each try costs a distillation. 0: a rolled-back stage ends the run. With
            `target_metric_drop`, the tries also look for stronger cuts after one that passes.
        screening_fraction (`float`, defaults to `0.1`):
            Every cut is screened after this fraction of `stage_max_steps`: one evaluation, and a cut whose metric is
            then more than `screening_margin` below the floor stops there and is rolled back (a hopeless cut costs a
            tenth of a stage). Passing cuts train exactly as without screening. 0 turns it off.
        screening_margin (`float`, defaults to `0.05`):
            How far below the floor a screened cut may still be (absolute): distillation recovers that much.
        compression_metric (`str`, defaults to `"accuracy"`):
            Validation metric (a key of `compute_metrics`, without `eval_`) checked against the floor.
        target_parameter_ratio (`float`, *optional*):
            Stop once the model has at most this fraction of the teacher's parameters. With `budget_search`,
            the quantile of every stage is chosen by bisection to reach it.
        target_latency_ratio (`float`, *optional*):
            Stop once CPU latency (batch `latency_batch_size`, `latency_sequence_length` tokens) is at most this
            fraction of the teacher's.
        compression_schedule (`str`, defaults to `"one_shot"`):
            `"one_shot"`: every site in one stage; `"per_layer"`: one stage per layer (embeddings first).
        stage_order (`str`, defaults to `"shallow_to_deep"`):
            Order of per-layer stages.
        stage_max_steps (`int`, defaults to `300`):
            Distillation steps after each projection.
        max_stages (`int`, *optional*):
            Stop after this many accepted stages.
        budget_search (`bool`, defaults to `True`):
            With `target_parameter_ratio`, choose each stage's quantile by bisection instead of `sigma_quantile`.
        min_width (`int`, defaults to `1`):
            No site is cut below this width.
        reduce_attention_heads (`bool`, defaults to `False`):
            BERT: also choose per-head query/key and value/output sizes by the MP rule, so attention no longer runs
            at the teacher's width (one size per layer, the same for queries/keys and values, rounded to the nearest
            multiple of 8 so that attention stays about as wide as the MP rule keeps it).
        width_multiple (`int`, defaults to `1`):
            BERT: round the kept embedding, residual and FFN widths up to a multiple of this (capped at the
            teacher's); 8 makes CPU matrix products markedly faster. Per-head sizes have their own rounding
            (`reduce_attention_heads`); ResNets refuse it (docs/design.md §3).
        trim_vocabulary (`bool`, *optional*):
            BERT: keep only the word-embedding rows of the tokens the training set uses (plus the special tokens and
            the characters of the kept tokens) and save a tokenizer trimmed to match. Exact on the training text;
            unseen words fall back to known pieces or `[UNK]`. Inside the trainer the datasets keep the teacher
            tokenizer's ids (a collator maps them). `None` (default) trims whenever the model is a BERT encoder, the
            trainer has a WordPiece fast tokenizer as `processing_class` and the training set has `input_ids`.
        factorize_word_embeddings (`bool`, defaults to `False`):
            BERT: replace the word-embedding table by a product at the rank the MP rule keeps (measured worse than
            vocabulary trimming on MiniLM; see `benchmarks/results/embedding_options.md`).
        measure_latency (`bool`, defaults to `True`):
            At the end of `compress()`, time the teacher and the result on the CPU at batch 1 and 32
            (`latency_sequence_length` tokens) and record both in the history and the model card.
        overwrite_output_dir (`bool`, defaults to `False`):
            Replace the model already saved in `output_dir` (a `config.json` there). Without it such a folder is
            refused, unless the run resumes (`resume_from_checkpoint`).
    """

    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "sigma_quantile_shifts"]

    calibration_fraction: float = field(default=0.1, metadata={"help": "Fraction of train rows used to calibrate."})
    calibration_max_samples: int | None = field(default=None, metadata={"help": "Cap on calibration rows."})
    sigma_quantile: float = field(default=0.5, metadata={"help": "Eigenvalue quantile that initialises σ²."})
    sigma_quantile_shifts: dict[str, float] | str | None = field(
        default=None,
        metadata={"help": "Quantile shift per kind of site, as JSON (e.g. '{\"ffn\": 0.2}': narrower FFNs)."},
    )
    mp_refine: bool = field(default=True, metadata={"help": "Refine σ² by fitting the MP bulk."})
    distillation_alpha: float = field(default=0.7, metadata={"help": "Task-loss weight α in α·CE + (1−α)·KL."})
    distillation_temperature: float = field(default=1.0, metadata={"help": "Distillation temperature T."})
    hidden_distillation_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of hidden-state distillation in the reduced basis (default: 1 for BERT; 0 = off)."},
    )
    teacher_output_cache_mb: float = field(
        default=1024,
        metadata={"help": "Memory (MB) for the teacher's outputs of rows distilled on more than once (0: off)."},
    )
    max_metric_drop: float = field(
        default=0.01, metadata={"help": "Roll a stage back when the metric drops more than this below the teacher."}
    )
    stage_retries: int = field(
        default=3, metadata={"help": "Milder cuts tried (quantile bisection) after a stage is rolled back."}
    )
    target_metric_drop: float | None = field(
        default=None,
        metadata={
            "help": "Keep the strongest cut within this drop of the teacher's metric (quantile searched both ways)."
        },
    )
    screening_fraction: float = field(
        default=0.1, metadata={"help": "Screen each cut after this fraction of stage_max_steps (0: off)."}
    )
    screening_margin: float = field(
        default=0.05, metadata={"help": "A screened cut this far below the floor is rolled back at once."}
    )
    compression_metric: str = field(default="accuracy", metadata={"help": "Validation metric checked per stage."})
    target_parameter_ratio: float | None = field(
        default=None, metadata={"help": "Stop at this fraction of the teacher's parameters (e.g. 0.4)."}
    )
    target_latency_ratio: float | None = field(
        default=None, metadata={"help": "Stop at this fraction of the teacher's CPU latency (e.g. 0.5)."}
    )
    compression_schedule: Literal["one_shot", "per_layer"] = field(
        default="one_shot", metadata={"help": "'one_shot' (all sites at once) or 'per_layer' stages."}
    )
    stage_order: Literal["shallow_to_deep", "deep_to_shallow"] = field(
        default="shallow_to_deep", metadata={"help": "Order of per-layer stages."}
    )
    stage_max_steps: int = field(default=300, metadata={"help": "Distillation steps after each projection."})
    max_stages: int | None = field(default=None, metadata={"help": "Stop after this many accepted stages."})
    budget_search: bool = field(
        default=True, metadata={"help": "With a parameter target, pick each stage's quantile by bisection."}
    )
    min_width: int = field(default=1, metadata={"help": "No site is cut below this width."})
    reduce_attention_heads: bool = field(
        default=False,
        metadata={"help": "BERT: also cut per-head query/key and value/output sizes by the MP rule (faster)."},
    )
    width_multiple: int = field(
        default=1, metadata={"help": "BERT: round kept embedding/residual/FFN widths up to a multiple (8: faster)."}
    )
    trim_vocabulary: bool | None = field(
        default=None,
        metadata={"help": "BERT: trim the vocabulary to the training set's tokens (default: whenever possible)."},
    )
    factorize_word_embeddings: bool = field(
        default=False, metadata={"help": "BERT: factor the word-embedding table at a rank chosen by the MP rule."}
    )
    measure_latency: bool = field(
        default=True, metadata={"help": "Time teacher and result on the CPU (batch 1 and 32) for the history."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a model already saved in output_dir (refused otherwise)."}
    )
    latency_batch_size: int = field(default=1, metadata={"help": "Batch size of the latency stop rule."})
    latency_sequence_length: int = field(
        default=128, metadata={"help": "Tokens per row (text) or image side (vision) of latency measurements."}
    )

    def __post_init__(self):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.use_cpu and not _has_accelerator():
            # without this, TrainingArguments on a CPU-only machine runs every launched process on its own, all
            # writing the same output_dir; with it, they form one gloo process group as intended
            logger.info("Launched with WORLD_SIZE > 1 on a machine without an accelerator: setting use_cpu=True.")
            self.use_cpu = True
        super().__post_init__()
        checks = {
            "calibration_fraction": 0.0 < self.calibration_fraction <= 1.0,
            "calibration_max_samples": self.calibration_max_samples is None or self.calibration_max_samples >= 1,
            "sigma_quantile": 0.0 < self.sigma_quantile < 1.0,
            "distillation_alpha": 0.0 <= self.distillation_alpha <= 1.0,
            "distillation_temperature": 0.0 < self.distillation_temperature < math.inf,
            "hidden_distillation_weight": self.hidden_distillation_weight is None
            or 0.0 <= self.hidden_distillation_weight < math.inf,
            "teacher_output_cache_mb": 0.0 <= self.teacher_output_cache_mb < math.inf,
            "max_metric_drop": 0.0 <= self.max_metric_drop < math.inf,
            "stage_max_steps": self.stage_max_steps >= 0,
            "stage_retries": self.stage_retries >= 0,
            "target_metric_drop": self.target_metric_drop is None or 0.0 <= self.target_metric_drop < math.inf,
            "screening_fraction": 0.0 <= self.screening_fraction < 1.0,
            "screening_margin": 0.0 <= self.screening_margin < math.inf,
            "max_stages": self.max_stages is None or self.max_stages >= 1,
            "min_width": self.min_width >= 1,
            "width_multiple": self.width_multiple >= 1,
            "latency_batch_size": self.latency_batch_size >= 1,
            "latency_sequence_length": self.latency_sequence_length >= 1,
            "target_parameter_ratio": self.target_parameter_ratio is None or 0.0 < self.target_parameter_ratio < 1.0,
            "target_latency_ratio": self.target_latency_ratio is None or 0.0 < self.target_latency_ratio < 1.0,
            "compression_schedule": self.compression_schedule in ("one_shot", "per_layer"),
            "stage_order": self.stage_order in ("shallow_to_deep", "deep_to_shallow"),
        }
        expected = {
            "calibration_fraction": "in (0, 1]",
            "calibration_max_samples": ">= 1 or None",
            "sigma_quantile": "in (0, 1)",
            "distillation_alpha": "in [0, 1]",
            "distillation_temperature": "finite and > 0",
            "hidden_distillation_weight": "finite and >= 0, or None",
            "teacher_output_cache_mb": "finite and >= 0 (0: off)",
            "max_metric_drop": "finite and >= 0 (1.0 never rolls back an accuracy)",
            "stage_max_steps": ">= 0",
            "stage_retries": ">= 0",
            "target_metric_drop": "finite and >= 0, or None",
            "screening_fraction": "in [0, 1)",
            "screening_margin": "finite and >= 0",
            "max_stages": ">= 1 or None",
            "min_width": ">= 1",
            "width_multiple": ">= 1",
            "latency_batch_size": ">= 1",
            "latency_sequence_length": ">= 1",
            "target_parameter_ratio": "in (0, 1) or None",
            "target_latency_ratio": "in (0, 1) or None",
            "compression_schedule": "'one_shot' or 'per_layer'",
            "stage_order": "'shallow_to_deep' or 'deep_to_shallow'",
        }
        for name, valid in checks.items():
            if not valid:
                raise ValueError(f"{name} must be {expected[name]}, got {getattr(self, name)!r}")
        if self.push_to_hub and self.hub_strategy != "end":
            logger.warning(
                "hub_strategy=%r: Trainer's own push of each checkpoint also uploads training_args.bin (a pickle). "
                "Use hub_strategy='end' to publish only safetensors and JSON.",
                getattr(self.hub_strategy, "value", self.hub_strategy),
            )
        self._check_quantile_shifts()

    def _check_quantile_shifts(self) -> None:
        shifts = self.sigma_quantile_shifts
        if shifts is None:
            return
        if not isinstance(shifts, dict):
            raise ValueError(
                f"sigma_quantile_shifts must be a dict or its JSON string (e.g. '{{\"ffn\": 0.2}}'), got {shifts!r}"
            )
        unknown = sorted(set(shifts) - set(SITE_KINDS))
        if unknown:
            raise ValueError(f"sigma_quantile_shifts names unknown kinds of site {unknown}: use some of {SITE_KINDS}")
        for kind, shift in shifts.items():
            if isinstance(shift, bool) or not isinstance(shift, int | float) or not -1.0 < shift < 1.0:
                raise ValueError(f"sigma_quantile_shifts[{kind!r}] must be a number in (-1, 1), got {shift!r}")
        self.sigma_quantile_shifts = {kind: float(shift) for kind, shift in shifts.items()}

    def surgery_options(self) -> dict:
        """The architecture options that differ from their defaults (so ResNets, which take none, accept the
        defaults)."""
        options = {
            "reduce_attention_heads": self.reduce_attention_heads,
            "factorize_word_embeddings": self.factorize_word_embeddings,
            "width_multiple": self.width_multiple,
        }
        defaults = {"reduce_attention_heads": False, "factorize_word_embeddings": False, "width_multiple": 1}
        return {key: value for key, value in options.items() if value != defaults[key]}


def _has_accelerator() -> bool:
    return (
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
    )


__all__ = ["RMTKDConfig"]
