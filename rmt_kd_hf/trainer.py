"""``RMTKDTrainer``: RMT-KD's train → analyse → project → distil loop as a ``Trainer``."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, enable_full_determinism, set_seed
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from transformers.utils import logging

from .calibration import collect_covariances
from .checkpoint import (
    first_names,
    load_checkpoint,
    load_rng_state,
    load_state_dict_file,
    non_finite_tensors,
    output_lock,
    refuse_finished_output,
    refuse_teacher_folder,
    save_compressed,
    save_rng_state,
    save_state_dict_file,
)
from .compression import analyse_sites, plan_widths, refit_sites, refuse_empty_sites
from .config import RMTKDConfig
from .data import calibration_rows
from .reports import cpu_latency
from .spectral_report import SPECTRA_FILENAME, spectra_record
from .surgery import get_surgery
from .surgery.base import SiteAnalysis, count_parameters, count_parameters_for_config
from .vocabulary import TokenIdRemapCollator, dataset_token_ids, trim_embeddings, trim_tokenizer, vocabulary_to_keep

logger = logging.get_logger(__name__)

HISTORY_FILENAME = "rmt_kd_history.json"
RESUME_STATE_FILENAME = "rmt_kd_resume.json"
STAGE_CHECKPOINT_PREFIX = "checkpoint-stage"
TRAINING_ARGS_JSON = "training_args.json"
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
)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.7,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``α·CE(y, p_new) + (1 − α)·T²·KL(p_old ‖ p_new)``, averaged over examples (or labelled tokens).

    Args:
        student_logits: (batch, num_labels) or (batch, seq, num_labels) logits of the model being trained.
        teacher_logits: same shape, from the frozen model before the current stage.
        labels: (batch,) or (batch, seq) class ids; ``ignore_index`` entries are skipped. For regression
            (``num_labels == 1``) float targets, and both terms are mean squared errors.
        alpha: weight of the task term.
        temperature: softmax temperature of the distillation term (its gradient scale is kept by ``T²``).
    """
    num_labels = student_logits.shape[-1]
    if num_labels == 1:
        student, teacher = student_logits.squeeze(-1), teacher_logits.squeeze(-1)
        return alpha * F.mse_loss(student, labels.to(student.dtype)) + (1 - alpha) * F.mse_loss(student, teacher)
    student = student_logits.reshape(-1, num_labels)
    teacher = teacher_logits.reshape(-1, num_labels).detach()
    labels = labels.reshape(-1)
    keep = labels != ignore_index
    task = F.cross_entropy(student[keep], labels[keep])
    log_p_new = F.log_softmax(student[keep] / temperature, dim=-1)
    log_p_old = F.log_softmax(teacher[keep] / temperature, dim=-1)
    kl = F.kl_div(log_p_new, log_p_old, log_target=True, reduction="batchmean") * temperature**2
    return alpha * task + (1 - alpha) * kl


def hidden_state_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Intermediate-layer distillation in the reduced basis: the mean over layers of
    ``‖h_new − h_old·Bᵀ‖² / ‖h_old·Bᵀ‖²`` over the real (unpadded) tokens.

    Args:
        student_states: per layer, (batch, seq, new_width) hidden states of the model being trained.
        teacher_states: per layer, (batch, seq, old_width) hidden states of the frozen model before the stage.
        bases: per layer, (new_width, old_width): the stage's basis, so that ``h_new ≈ h_old @ basis.T``.
        attention_mask: (batch, seq), 1 for real tokens; ``None`` counts every position.
    """
    real = attention_mask.bool() if attention_mask is not None else None
    terms = []
    for student, teacher, basis in zip(student_states, teacher_states, bases, strict=True):
        target = teacher.detach() @ basis.T
        if real is not None:
            student, target = student[real], target[real]
        terms.append((student - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


class RMTKDTrainer(Trainer):
    """A ``Trainer`` whose ``compress()`` runs RMT-KD: calibrate, fit the MP law, project a stage, distil from the
    model before the stage, evaluate, and accept or roll back, until a stop rule fires.

    ``train()`` is the ordinary ``Trainer.train`` (use it to fine-tune the teacher first); inside ``compress()``
    every stage's fine-tuning uses the distillation loss of :func:`distillation_loss`.
    """

    _tag_names = ["rmt-kd", "knowledge-distillation", "compression"]

    def __init__(self, model: nn.Module, args: RMTKDConfig, **kwargs):
        if not isinstance(args, RMTKDConfig):
            raise TypeError(f"RMTKDTrainer needs an RMTKDConfig as args, got {type(args).__name__}.")
        surgery = get_surgery(model, **args.surgery_options())  # unsupported architectures/options fail here
        # before Trainer creates output_dir; the CLI's checkpoint-teacher cache inside output_dir is safe (the final
        # save merges into output_dir)
        refuse_teacher_folder(args.output_dir, getattr(model, "name_or_path", None), refuse_containing=False)
        super().__init__(model=model, args=args, **kwargs)
        if args.push_to_hub and args.hub_strategy != "end":
            logger.warning(
                "hub_strategy=%r: Trainer's own push of each checkpoint also uploads training_args.bin (a pickle). "
                "Use hub_strategy='end' to publish only safetensors and JSON.",
                getattr(args.hub_strategy, "value", args.hub_strategy),
            )
        supports_hidden = hasattr(surgery, "hidden_state_bases")
        if args.hidden_distillation_weight and not supports_hidden:
            raise ValueError(
                f"hidden_distillation_weight={args.hidden_distillation_weight}: intermediate-layer distillation "
                f"supports BERT encoders only, not {type(model).__name__}; set it to 0."
            )
        # None: on where the architecture supports it (won on validation, benchmarks/results/frontier_sweep.md)
        weight = args.hidden_distillation_weight
        self.hidden_distillation_weight = (1.0 if supports_hidden else 0.0) if weight is None else weight
        self.teacher_model: nn.Module | None = None
        self._hidden_state_bases: list[torch.Tensor] | None = None
        self.compression_history: dict = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher_model is None or not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        features = {key: value for key, value in inputs.items() if key != "labels"}
        hidden = self.hidden_distillation_weight > 0 and self._hidden_state_bases is not None
        outputs = model(**features, output_hidden_states=True) if hidden else model(**features)
        with torch.no_grad():
            teacher_outputs = self.teacher_model(**features, output_hidden_states=hidden)
        loss = distillation_loss(
            outputs.logits,
            teacher_outputs.logits,
            labels,
            self.args.distillation_alpha,
            self.args.distillation_temperature,
        )
        if hidden:
            loss = loss + self.hidden_distillation_weight * hidden_state_loss(
                outputs.hidden_states,
                teacher_outputs.hidden_states,
                self._hidden_state_bases,
                features.get("attention_mask"),
            )
        return (loss, outputs) if return_outputs else loss

    # -- Trainer checkpoints without pickles ------------------------------------------------------------------
    # Trainer writes training_args.bin, optimizer.pt, scheduler.pt and rng_state.pth with torch.save (pickle).
    # Here the same states go to safetensors + JSON and are read back from them; DeepSpeed/FSDP keep their formats.

    def _plain_checkpoints(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
            if os.path.exists(pickled):
                os.remove(pickled)
            with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w") as file:
                file.write(self.args.to_json_string())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._plain_checkpoints():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_state_dict_file(self.optimizer.state_dict(), output_dir, "optimizer")
            save_state_dict_file(self.lr_scheduler.state_dict(), output_dir, "scheduler")

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            save_state_dict_file(scaler.state_dict(), output_dir, "scaler")

    def _save_rng_state(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        save_rng_state(os.path.join(output_dir, self._rng_state_name()))

    def _rng_state_name(self) -> str:
        return (
            "rng_state.safetensors" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.safetensors"
        )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._plain_checkpoints():
            return super()._load_optimizer_and_scheduler(checkpoint)
        if os.path.exists(os.path.join(checkpoint, "optimizer.safetensors")):
            self.optimizer.load_state_dict(load_state_dict_file(checkpoint, "optimizer"))
            self.lr_scheduler.load_state_dict(load_state_dict_file(checkpoint, "scheduler"))
        else:
            _refuse_pickles(checkpoint, ("optimizer.pt", "scheduler.pt"))

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and os.path.exists(os.path.join(checkpoint, "scaler.json")):
            scaler.load_state_dict(load_state_dict_file(checkpoint, "scaler"))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, self._rng_state_name())
        if os.path.exists(path):
            load_rng_state(path)
        else:
            _refuse_pickles(checkpoint, ("rng_state.pth", f"rng_state_{self.args.process_index}.pth"))

    # -- the compress-and-distil loop -------------------------------------------------------------------------

    def compress(self, resume_from_checkpoint: str | bool | None = None) -> nn.Module:
        """Run RMT-KD to a stop rule, save the final model in ``output_dir`` and return it.

        Stop rules: the parameter/latency target is met; a stage's validation metric falls more than
        ``max_metric_drop`` below the teacher's even after ``stage_retries`` milder cuts (that stage is rolled
        back); ``max_stages`` accepted stages. A stage with nothing above λ+ left to cut is skipped (the one-shot
        schedule then ends; a per-layer one goes on to the next layer).

        After every stage that is kept (accepted, or skipped with nothing to cut) the model, the history and the
        next stage's index are written atomically to ``output_dir/checkpoint-stage-<i>``. Every stage starts from its
        own seed (``seed + i``) and a fresh optimizer (the widths change, so old moments have the wrong shapes), so
        a run resumed from such a checkpoint computes exactly what the uninterrupted run would have.

        Args:
            resume_from_checkpoint: a stage checkpoint directory, or ``True`` for the latest one in ``output_dir``;
                defaults to ``args.resume_from_checkpoint``. The teacher passed to the trainer must be the one the
                run started from.

        Raises:
            ValueError: bad input (checked before any work), or an ``output_dir`` that already holds a saved model
                while neither ``overwrite_output_dir`` nor a resume is asked for.
            OutputFolderBusyError: another run holds ``output_dir`` (its ``.rmt_kd.lock``).
        """
        args = self.args
        if self.train_dataset is None or self.eval_dataset is None:
            raise ValueError("compress() needs train_dataset (calibration, distillation) and eval_dataset (the floor).")
        if resume_from_checkpoint is None:
            resume_from_checkpoint = args.resume_from_checkpoint
        self._check_inputs()
        checkpoint = self._stage_checkpoint_to_resume(resume_from_checkpoint) if resume_from_checkpoint else None
        if checkpoint is None:
            refuse_finished_output(args.output_dir, args.overwrite_output_dir)
        lock = output_lock(args.output_dir) if args.should_save else contextlib.nullcontext()
        with lock:
            return self._compress(checkpoint)

    def _compress(self, checkpoint: str | None) -> nn.Module:
        args = self.args
        surgery = get_surgery(self.model, **args.surgery_options())
        teacher = self.model
        teacher_fingerprint = model_fingerprint(teacher)
        prepared = surgery.prepare(teacher)
        if checkpoint is not None:
            history, first_stage = self._resume_state(checkpoint, teacher_fingerprint)
            self.model = self.model_wrapped = load_checkpoint(type(prepared), checkpoint).to(args.device)
            logger.info("Resuming RMT-KD from %s at stage %d", checkpoint, first_stage)
        else:
            history, first_stage = self._start_history(teacher), 0
            history["provenance"] = _provenance(teacher)
            history["teacher"]["fingerprint"] = teacher_fingerprint
            self._stage_spectra = {}
            self.model = self.model_wrapped = prepared
        self._trim_vocabulary(surgery, history, resumed=checkpoint is not None)
        calibration = self._calibration_dataloader(history)
        stages = self._stages(surgery)
        progress = logging.tqdm(total=len(stages), initial=first_stage, desc="RMT-KD stages", disable=args.disable_tqdm)
        for index in range(first_stage, len(stages)):
            if self._stop_rule_fired(history):  # also when a resumed run had already stopped
                break
            record = self._run_stage(surgery, calibration, index, stages[index], history)
            history["stages"].append(record)
            progress.update(1)
            self.log({f"rmt_kd/stage_{index}/{key}": value for key, value in record.items() if _is_number(value)})
            if record["status"].startswith("rolled back"):
                break
            self._save_stage_checkpoint(index, history)
        progress.close()
        self.teacher_model = None
        history["final"] = {"num_parameters": count_parameters(self.model), "widths": surgery.widths(self.model)}
        history["final"]["weights_mb"] = _weights_mb(self.model)
        if args.measure_latency and next(self.model.parameters()).device.type == "cpu":
            history["latency"] = self._latency_comparison(teacher)
        self.compression_history = history
        self._save_final(history)
        return self.model

    def _stop_rule_fired(self, history: dict) -> bool:
        """Target met or ``max_stages`` accepted, judged on the last accepted stage."""
        accepted = [stage for stage in history["stages"] if stage["status"] == "accepted"]
        if not accepted:
            return False
        return self._target_met(accepted[-1], history) or len(accepted) == self.args.max_stages

    # -- stage checkpoints and resume -------------------------------------------------------------------------

    def _save_stage_checkpoint(self, index: int, history: dict) -> None:
        """``output_dir/checkpoint-stage-<index>``: weights, config, tokenizer, history, spectra, next stage; atomic."""
        if self.args.should_save:
            directory = os.path.join(self.args.output_dir, f"{STAGE_CHECKPOINT_PREFIX}-{index}")
            resume_state = {
                "next_stage": index + 1,
                "stage_spectra": {str(k): v for k, v in self._stage_spectra.items()},
            }
            save_compressed(
                self.model,
                directory,
                self.processing_class,
                overwrite=True,
                json_files={HISTORY_FILENAME: history, RESUME_STATE_FILENAME: resume_state},
            )
            self._rotate_stage_checkpoints()
        self.accelerator.wait_for_everyone()

    def _stage_checkpoints(self, directory: str) -> list[str]:
        """Complete stage checkpoints in ``directory``, oldest first (a partial one has no resume state yet)."""
        found = []
        for path in glob.glob(os.path.join(directory, f"{STAGE_CHECKPOINT_PREFIX}-*")):
            match = re.fullmatch(rf"{STAGE_CHECKPOINT_PREFIX}-(\d+)", os.path.basename(path))
            if match and os.path.exists(os.path.join(path, RESUME_STATE_FILENAME)):
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def _rotate_stage_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        checkpoints = self._stage_checkpoints(self.args.output_dir)
        if limit is not None and limit > 0:
            for path in checkpoints[:-limit]:
                shutil.rmtree(path, ignore_errors=True)

    def _stage_checkpoint_to_resume(self, resume_from_checkpoint: str | bool) -> str | None:
        """The checkpoint to resume: a path, or with ``True`` the latest in ``output_dir`` (``None`` if there is
        none yet: the run was interrupted before its first stage ended and starts over)."""
        if resume_from_checkpoint is True or resume_from_checkpoint == "True":
            checkpoints = self._stage_checkpoints(self.args.output_dir)
            if not checkpoints:
                logger.warning("No stage checkpoint in %s yet: starting from the first stage.", self.args.output_dir)
                return None
            return checkpoints[-1]
        checkpoint = os.fspath(resume_from_checkpoint)
        if not os.path.exists(os.path.join(checkpoint, RESUME_STATE_FILENAME)):
            raise ValueError(
                f"{checkpoint} is not an RMT-KD stage checkpoint (no {RESUME_STATE_FILENAME}): pass a "
                f"{STAGE_CHECKPOINT_PREFIX}-<i> directory that compress() wrote, or True for the latest one."
            )
        return checkpoint

    def _resume_state(self, checkpoint: str, teacher_fingerprint: str) -> tuple[dict, int]:
        """History and next stage of ``checkpoint``, after checking it belongs to this teacher and these settings
        (its weights are checked when ``load_checkpoint`` reads them, right after)."""
        try:
            with open(os.path.join(checkpoint, HISTORY_FILENAME)) as file:
                history = json.load(file)
            with open(os.path.join(checkpoint, RESUME_STATE_FILENAME)) as file:
                resume_state = json.load(file)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{checkpoint} is corrupted ({error}): resume from an earlier stage checkpoint.") from None
        if history["teacher"].get("fingerprint") != teacher_fingerprint:
            raise ValueError(
                f"{checkpoint} was made from a different teacher (weights fingerprint differs): pass the teacher the "
                "run started from, or start a new run in a fresh output_dir."
            )
        settings = self._settings()
        # a key missing from an older history had its default then
        recorded = {key: history["config"].get(key, RMTKDConfig.__dataclass_fields__[key].default) for key in settings}
        changed = [
            f"{key}: {recorded[key]!r} -> {settings[key]!r}"
            for key in RESUME_INVARIANTS
            if recorded[key] != settings[key]
        ]
        if changed:
            raise ValueError(
                f"Resuming {checkpoint} with different settings ({'; '.join(changed)}): resume with the settings "
                "of the interrupted run, or start a new run in a fresh output_dir."
            )
        self._stage_spectra = {int(key): value for key, value in resume_state["stage_spectra"].items()}
        return history, int(resume_state["next_stage"])

    def _settings(self) -> dict:
        """The settings a resumed run must share with the interrupted one, defaults resolved (as in the history)."""
        settings = {key: getattr(self.args, key) for key in RESUME_INVARIANTS}
        settings["hidden_distillation_weight"] = self.hidden_distillation_weight
        return settings

    def _check_inputs(self) -> None:
        """Fail before any work on inputs that would break a stage hours later."""
        refuse_teacher_folder(self.args.output_dir, getattr(self.model, "name_or_path", None), refuse_containing=False)
        output_dir = os.path.abspath(self.args.output_dir)
        existing = output_dir
        while not os.path.exists(existing):  # probe the nearest existing ancestor: create nothing yet
            existing = os.path.dirname(existing)
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            raise PermissionError(
                f"Cannot write into output_dir={self.args.output_dir!r} ({error}); choose a writable one."
            ) from None
        if len(self.train_dataset) == 0:
            raise ValueError("train_dataset is empty: calibration and distillation need training rows.")
        broken = non_finite_tensors(self.model)
        if broken:
            raise ValueError(
                f"The teacher has non-finite weights ({first_names(broken)}): "
                "reload or retrain it; RMT-KD cannot compress a model that computes NaN."
            )
        vocab_size = getattr(self.model.config, "vocab_size", None)
        tokenizer_size = len(self.processing_class) if hasattr(self.processing_class, "__len__") else None
        if vocab_size is not None and tokenizer_size is not None and tokenizer_size > vocab_size:
            raise ValueError(
                f"The tokenizer has {tokenizer_size} tokens but the model's embeddings only {vocab_size}: this is not "
                "the model's tokenizer. Pass the tokenizer saved with the teacher."
            )
        self._check_tokenizer_reads_the_data()
        if getattr(self.model.config, "problem_type", None) == "multi_label_classification":
            raise ValueError(
                "The teacher is a multi-label classifier (problem_type='multi_label_classification'), which RMT-KD "
                "does not support yet: compress a single-label or regression teacher."
            )
        num_labels = getattr(self.model.config, "num_labels", None)
        columns = getattr(self.train_dataset, "column_names", None) or []
        label_column = "labels" if "labels" in columns else "label" if "label" in columns else None
        labels = self.train_dataset[label_column] if label_column is not None else []
        if num_labels and num_labels > 1 and len(labels) and isinstance(labels[0], int):  # sequence labels
            low, high = min(labels), max(labels)
            if low < 0 or high >= num_labels:
                raise ValueError(
                    f"Training labels span {low}..{high} but the classification head has {num_labels} outputs: "
                    "map the labels to 0..num_labels-1 or load the teacher with the right num_labels."
                )

    def _check_tokenizer_reads_the_data(self, sample_rows: int = 256, max_unknown_fraction: float = 0.5) -> None:
        """Refuse training text that is mostly ``[UNK]``: the tokenizer is not the model's (a folder without
        tokenizer files gives transformers' few-token placeholder, which maps every word to ``[UNK]``)."""
        unk_id = getattr(self.processing_class, "unk_token_id", None)
        columns = getattr(self.train_dataset, "column_names", None) or []
        if unk_id is None or "input_ids" not in columns or not hasattr(self.train_dataset, "select"):
            return
        special = set(getattr(self.processing_class, "all_special_ids", [])) - {unk_id}
        rows = self.train_dataset.select(range(min(sample_rows, len(self.train_dataset))))["input_ids"]
        tokens = [token for row in rows for token in row if token not in special]
        unknown = sum(token == unk_id for token in tokens) / max(len(tokens), 1)
        if tokens and unknown > max_unknown_fraction:
            raise ValueError(
                f"{unknown:.0%} of the training tokens are the unknown token: the tokenizer "
                f"({type(self.processing_class).__name__}, {len(self.processing_class)} tokens) cannot read this text. "
                "Pass the tokenizer saved with the teacher (--tokenizer_name), or save it into the teacher's folder."
            )

    def _start_history(self, teacher: nn.Module) -> dict:
        args = self.args
        teacher_metric = self._validation_metric()
        history = {
            "teacher": {
                "num_parameters": count_parameters(teacher),
                f"eval_{args.compression_metric}": teacher_metric,
            },
            "config": self._settings(),
            "stages": [],
        }
        if args.target_latency_ratio is not None:
            history["teacher"]["cpu_latency_seconds"] = self._latency(teacher)
        return history

    def _trim_vocabulary(self, surgery, history: dict, resumed: bool) -> None:
        """Trim ``self.model``'s word embeddings to the training set's tokens (``args.trim_vocabulary``), swap in
        the trimmed tokenizer (saved with every checkpoint) and map the datasets' original ids in the collator."""
        setting = self.args.trim_vocabulary
        if setting is False or isinstance(self.data_collator, TokenIdRemapCollator):  # off, or trimmed already
            return
        tokenizer = self.processing_class
        columns = getattr(self.train_dataset, "column_names", None) or []
        reason = None
        if surgery.name != "bert" or self.model.get_output_embeddings() is not None:
            reason = f"{type(self.model).__name__} has no BERT encoder vocabulary to trim"
        elif tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
            reason = "the trainer has no fast tokenizer as processing_class to trim and save with the model"
        elif "input_ids" not in columns:
            reason = "train_dataset has no input_ids column to read the task's tokens from"
        else:
            try:
                kept_token_ids = vocabulary_to_keep(tokenizer, dataset_token_ids(self.train_dataset))
                trimmed_tokenizer = trim_tokenizer(tokenizer, kept_token_ids)
            except ValueError as error:
                reason = str(error)
        if reason is not None:
            if setting:
                raise ValueError(f"trim_vocabulary=True, but {reason}: set trim_vocabulary=False.")
            logger.info("Vocabulary not trimmed: %s.", reason)
            return
        if not resumed:
            history["vocabulary"] = {"teacher_size": self.model.config.vocab_size, "kept_size": len(kept_token_ids)}
            trim_embeddings(self.model, kept_token_ids)
        elif self.model.config.vocab_size != len(kept_token_ids):
            raise ValueError(
                f"The checkpoint's vocabulary has {self.model.config.vocab_size} tokens, but this training set "
                f"gives {len(kept_token_ids)}: resume with the training set and tokenizer of the interrupted run."
            )
        logger.info("Vocabulary trimmed to the training set's tokens: %d of %d.", len(kept_token_ids), len(tokenizer))
        self.processing_class = self.callback_handler.processing_class = trimmed_tokenizer
        self.data_collator = TokenIdRemapCollator(self.data_collator, kept_token_ids, tokenizer.unk_token_id)

    def _calibration_dataloader(self, history: dict) -> torch.utils.data.DataLoader:
        """The seeded calibration rows in fixed batches. With several processes each takes every
        ``world_size``-th batch: the batches are those of a one-process run (same rows, same padding, so the same
        float32 activations) and no row is padded in twice, as an evaluation loader would; the covariance sums are
        added across processes before any eigendecomposition."""
        args = self.args
        size = max(1, round(args.calibration_fraction * len(self.train_dataset)))
        if args.calibration_max_samples is not None:
            size = min(size, args.calibration_max_samples)
        rows, digest = calibration_rows(len(self.train_dataset), size, args.seed)
        history["calibration"] = {"num_rows": len(rows), "row_ids_sha256": digest}
        batch_size = args.per_device_eval_batch_size
        batches = [list(range(start, min(start + batch_size, len(rows)))) for start in range(0, len(rows), batch_size)]
        if len(batches) < args.world_size:
            raise ValueError(
                f"{len(rows)} calibration rows make {len(batches)} batches of {batch_size}, fewer than the "
                f"{args.world_size} processes: lower per_device_eval_batch_size or raise calibration_fraction."
            )
        collator = self.data_collator
        if hasattr(self.train_dataset, "select"):
            subset = self._remove_unused_columns(self.train_dataset.select(rows), description="calibration")
        else:
            subset = torch.utils.data.Subset(self.train_dataset, rows)
            collator = self._get_collator_with_removed_columns(collator, description="calibration")
        return torch.utils.data.DataLoader(
            subset, batch_sampler=batches[args.process_index :: args.world_size], collate_fn=collator
        )

    def _stages(self, surgery) -> list[list[str] | None]:
        if self.args.compression_schedule == "one_shot":
            return [None]
        stages = surgery.stages(self.model)
        return stages if self.args.stage_order == "shallow_to_deep" else stages[::-1]

    def _run_stage(self, surgery, calibration, index: int, stage_sites: list[str] | None, history: dict) -> dict:
        """Calibrate, fit, cut, distil and judge one stage. A cut rolled back (below the floor, or not finite) is
        retried up to ``stage_retries`` times with milder ones, its σ² quantile bisected between the strongest
        cut that passed (at first: none, quantile 0) and the mildest that failed; the strongest that passes is kept.
        Every try is listed under ``tries`` in the record."""
        args = self.args
        start = time.perf_counter()
        self._seed_stage(index)
        previous = self.model.eval()
        taps = surgery.taps(previous)
        accumulators = collect_covariances(previous, calibration, taps, progress=not args.disable_tqdm)
        fitted = analyse_sites(
            surgery.sites(previous, accumulators),
            args.sigma_quantile,
            args.mp_refine,
            quantile_shifts=args.sigma_quantile_shifts,
        )
        stage_names = list(fitted) if stage_sites is None else stage_sites
        analyses, quantile = self._plan_stage(surgery, previous, fitted, stage_names, history, index)
        refuse_empty_sites(analyses, stage_names, args.min_width)
        record = _stage_record(index, stage_names, quantile, analyses)
        self._stage_spectra[index] = spectra_record(analyses, stage_names)
        if _cuts_nothing(analyses, stage_names):
            record.update(status="skipped: nothing above λ+ left to cut", seconds=time.perf_counter() - start)
            return record
        candidate, outcome = self._cut_and_judge(surgery, previous, analyses, history)
        record.update(outcome)
        tries = [_try_summary(quantile, outcome)]
        passed, failed = 0.0, quantile  # quantile 0 keeps every direction: the mildest possible "cut"
        best = (candidate, record) if outcome["status"] == "accepted" else None
        for _ in range(args.stage_retries if best is None else 0):
            milder = (passed + failed) / 2
            self._seed_stage(index)  # every try from the same state, as a resumed run would redo it
            refitted = refit_sites(fitted, milder, args.mp_refine, args.sigma_quantile_shifts)
            analyses = self._planned(refitted, stage_names)
            if _cuts_nothing(analyses, stage_names):
                passed = milder  # nothing to cut this mildly: try stronger
                tries.append({"sigma_quantile": milder, "status": "skipped: nothing above λ+ left to cut"})
                continue
            candidate, outcome = self._cut_and_judge(surgery, previous, analyses, history)
            tries.append(_try_summary(milder, outcome))
            if outcome["status"] == "accepted":
                passed = milder
                best = (candidate, {**_stage_record(index, stage_names, milder, analyses), **outcome})
                self._stage_spectra[index] = spectra_record(analyses, stage_names)
            else:
                failed = milder
        if best is not None:
            candidate, record = best
            self.model = self.model_wrapped = candidate
        else:
            self.model = self.model_wrapped = previous
        if len(tries) > 1:
            record["tries"] = tries
        record["seconds"] = time.perf_counter() - start
        logger.info("RMT-KD stage %d: %s (%d tries)", index, record["status"], len(tries))
        return record

    def _seed_stage(self, index: int) -> None:
        # each stage draws from its own seed, so a resumed run repeats exactly what the interrupted one would do
        seed = self.args.seed + index
        enable_full_determinism(seed) if self.args.full_determinism else set_seed(seed)

    def _cut_and_judge(self, surgery, previous: nn.Module, analyses, history: dict) -> tuple[nn.Module, dict]:
        """Apply ``analyses`` to ``previous``, distil, and judge against the floor: (the candidate, its fields
        for the stage record, ``status`` among them)."""
        args = self.args
        start = time.perf_counter()
        candidate = surgery.apply(previous, analyses)
        bases = surgery.hidden_state_bases(previous, analyses) if self.hidden_distillation_weight > 0 else None
        kept_step = self.distil(candidate, previous, bases)  # makes it self.model
        metric = self._validation_metric()
        self.model = self.model_wrapped = previous  # until the stage decides
        floor = history["teacher"][f"eval_{args.compression_metric}"] - args.max_metric_drop
        outcome = {"num_parameters": count_parameters(candidate), f"eval_{args.compression_metric}": metric}
        if kept_step is not None:
            outcome["kept_step"] = kept_step
        outcome["parameter_ratio"] = outcome["num_parameters"] / history["teacher"]["num_parameters"]
        if args.target_latency_ratio is not None:
            outcome["latency_ratio"] = self._latency(candidate) / history["teacher"]["cpu_latency_seconds"]
        broken = non_finite_tensors(candidate)
        if broken or not math.isfinite(metric):  # whatever the floor: a NaN model is never kept
            where = f"weights ({first_names(broken)})" if broken else "metric"
            outcome["status"] = f"rolled back: non-finite {where} after distillation"
        elif metric < floor:
            outcome["status"] = f"rolled back: {args.compression_metric} {metric:.4f} < floor {floor:.4f}"
        else:
            outcome["status"] = "accepted"
        outcome["seconds"] = time.perf_counter() - start
        return candidate, outcome

    def _plan_stage(self, surgery, model, analyses, stage_names, history, index):
        """Widths for this stage's sites (the others keep every direction) and the quantile used."""
        args = self.args

        def planned(candidate_analyses):
            return self._planned(candidate_analyses, stage_names)

        if args.target_parameter_ratio is None or not args.budget_search:
            return planned(analyses), args.sigma_quantile
        target = self._stage_parameter_target(model, history, index)

        def parameters_at(quantile: float) -> tuple[int, dict[str, SiteAnalysis]]:
            candidate = planned(refit_sites(analyses, quantile, args.mp_refine, args.sigma_quantile_shifts))
            widths = {name: analysis.kept_width for name, analysis in candidate.items()}
            return count_parameters_for_config(type(model), surgery.compressed_config(model, widths)), candidate

        low, high = 0.01, 0.99
        count, best = parameters_at(high)
        if count > target and args.compression_schedule == "one_shot":
            raise ValueError(
                f"target_parameter_ratio={args.target_parameter_ratio} cannot be met: even at quantile {high} the "
                f"model keeps {count / history['teacher']['num_parameters']:.1%} of the teacher's parameters. "
                "Raise the target, or compress the embeddings too (they often dominate small BERTs)."
            )
        best_quantile = high
        for _ in range(12):  # widths grow as the quantile falls: find the mildest quantile that meets the target
            middle = (low + high) / 2
            count, candidate = parameters_at(middle)
            if count <= target:
                high, best, best_quantile = middle, candidate, middle
            else:
                low = middle
        return best, best_quantile

    def _planned(self, analyses: dict[str, SiteAnalysis], stage_names: list[str]) -> dict[str, SiteAnalysis]:
        """``analyses`` with widths planned for this stage's sites; the other sites keep every direction."""
        fixed = {name: analysis.site.dim for name, analysis in analyses.items() if name not in stage_names}
        plan_widths(analyses, kept_widths=fixed, min_width=self.args.min_width)
        return analyses

    def _stage_parameter_target(self, model, history, index) -> float:
        """Spread the remaining cut evenly over the remaining stages."""
        target = self.args.target_parameter_ratio * history["teacher"]["num_parameters"]
        remaining_stages = len(self._stages(get_surgery(model, **self.args.surgery_options()))) - index
        current = count_parameters(model)
        return current - (current - target) / max(remaining_stages, 1)

    def distil(
        self, student: nn.Module, teacher: nn.Module, hidden_state_bases: Sequence[torch.Tensor] | None = None
    ) -> int | None:
        """Train ``student`` for ``stage_max_steps`` steps on ``train_dataset`` with the distillation loss from the
        frozen ``teacher``; ``student`` becomes ``self.model``. Each stage of ``compress()`` runs it; it also distils,
        on the same terms, a model that another tool made smaller.

        Args:
            student: the smaller model, taking the same inputs as ``teacher``.
            teacher: the model before the cut.
            hidden_state_bases: per entry of ``output_hidden_states`` (embeddings, then each layer), the
                (student width, teacher width) matrix ``B`` with ``h_student ≈ h_teacher @ B.T``: adds
                :func:`hidden_state_loss` (weight ``hidden_distillation_weight``). ``None``: logits only.

        Returns:
            With ``load_best_model_at_end`` and an ``eval_strategy``, the step whose weights the student ends on (the
            best at its evaluations); ``None`` otherwise.
        """
        if hidden_state_bases is not None and self.hidden_distillation_weight > 0:
            device = self.args.device
            self._hidden_state_bases = [basis.to(device=device, dtype=torch.float32) for basis in hidden_state_bases]
        try:
            return self._distil(student, teacher)
        finally:
            self._hidden_state_bases = None

    def _distil(self, candidate: nn.Module, previous: nn.Module) -> int | None:
        self.teacher_model = previous.eval().requires_grad_(False)
        self.model = self.model_wrapped = candidate
        if self.args.stage_max_steps == 0:
            return None
        self.optimizer, self.lr_scheduler = None, None
        # stage checkpoints replace the Trainer's own: a mid-stage one could not be resumed into another width
        full_max_steps, self.args.max_steps = self.args.max_steps, self.args.stage_max_steps
        save_strategy, self.args.save_strategy = self.args.save_strategy, SaveStrategy.NO
        keep_best = None
        if self.args.load_best_model_at_end and self.args.eval_strategy != IntervalStrategy.NO:
            keep_best = BestStageWeights(candidate, self.args.metric_for_best_model, self.args.greater_is_better)
            self.add_callback(keep_best)
        try:
            self.train()
        finally:
            self.args.max_steps, self.args.save_strategy = full_max_steps, save_strategy
            self.teacher_model.requires_grad_(True)
            if keep_best is not None:
                self.remove_callback(keep_best)
        if keep_best is None:
            return None
        keep_best.restore()
        return keep_best.best_step

    def _validation_metric(self) -> float:
        key = f"eval_{self.args.compression_metric}"
        metrics = self.evaluate()
        if key not in metrics:
            raise ValueError(
                f"evaluate() returned no {key!r} (got {sorted(metrics)}): pass compute_metrics that returns "
                f"{self.args.compression_metric!r}, or set compression_metric to one of its keys."
            )
        return float(metrics[key])

    def _latency(self, model: nn.Module) -> float:
        return cpu_latency(model, self.args.latency_batch_size, self.args.latency_sequence_length)

    def _latency_comparison(self, teacher: nn.Module) -> dict:
        """Teacher vs compressed CPU latency (median seconds), measured one after the other in this process."""
        length = self.args.latency_sequence_length
        comparison = {"sequence_length": length, "threads": torch.get_num_threads()}
        for batch_size, repeats in ((1, 10), (32, 3)):
            comparison[f"batch_{batch_size}"] = {
                name: cpu_latency(model, batch_size, length, repeats=repeats, warmup=2)
                for name, model in (("teacher", teacher), ("compressed", self.model))
            }
        return comparison

    def _target_met(self, record: dict, history: dict) -> bool:
        args = self.args
        if args.target_parameter_ratio is not None and record["parameter_ratio"] <= args.target_parameter_ratio:
            return True
        return args.target_latency_ratio is not None and record["latency_ratio"] <= args.target_latency_ratio

    def _save_final(self, history: dict) -> None:
        """The final model with its history and spectra; ``config.json`` lands last, so an interrupted save never
        looks complete."""
        if self.args.should_save:
            accepted = {stage["stage"] for stage in history["stages"] if stage["status"] == "accepted"}
            spectra = {str(index): self._stage_spectra[index] for index in sorted(accepted)}
            save_compressed(
                self.model,
                self.args.output_dir,
                self.processing_class,
                merge_into_existing=True,
                json_files={HISTORY_FILENAME: history, SPECTRA_FILENAME: spectra},
            )
        self.accelerator.wait_for_everyone()

    # -- the hub ----------------------------------------------------------------------------------------------

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,  # noqa: A002 - Trainer's signature
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        measurements: Mapping[str, tuple] | None = None,
    ) -> None:
        """Write ``output_dir/README.md`` from ``rmt_kd_history.json`` (spectrum plots under ``spectra/``);
        ``Trainer.push_to_hub`` calls it and then uploads ``output_dir``. Before ``compress()`` has written a history,
        the ordinary ``Trainer`` card is written instead.

        ``finetuned_from`` is the teacher's hub id (``base_model``); ``dataset`` the hub dataset id(s);
        ``measurements`` extra ``{row: (teacher, compressed)}`` results measured outside the run.
        """
        if not self.is_world_process_zero():
            return
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        if not os.path.exists(os.path.join(self.args.output_dir, HISTORY_FILENAME)):
            extra = [tag for tag in self._tag_names if tag not in tags]
            return super().create_model_card(
                language, license, tags + extra, model_name, finetuned_from, tasks, dataset_tags, dataset, dataset_args
            )
        from .hub import write_model_card

        hub_model_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
        write_model_card(
            self.args.output_dir,
            model_name=model_name or os.path.basename(os.path.abspath(self.args.output_dir)),
            repo_id=hub_model_id,
            base_model=finetuned_from,
            datasets=dataset,
            license=license,
            language=language,
            tags=tags,
            measurements=measurements,
        )


class BestStageWeights(TrainerCallback):
    """Keeps, in memory, the weights of ``model`` that scored best at the evaluations of one distillation stage,
    and puts them back with :meth:`restore`: ``load_best_model_at_end`` for a stage, whose mid-stage states are
    never written to disk (a stage checkpoint is written only once the stage is over)."""

    def __init__(self, model: nn.Module, metric_name: str, greater_is_better: bool):
        self.model = model
        self.metric_key = metric_name if metric_name.startswith("eval_") else f"eval_{metric_name}"
        self.greater_is_better = greater_is_better
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or self.metric_key not in metrics:
            raise ValueError(
                f"load_best_model_at_end: evaluate() returned no {self.metric_key!r} (got {sorted(metrics or {})}); "
                "set metric_for_best_model to one of its keys."
            )
        value = float(metrics[self.metric_key])
        improved = self.best_metric is None or (
            value > self.best_metric if self.greater_is_better else value < self.best_metric
        )
        if improved:
            self.best_metric, self.best_step = value, state.global_step
            self._best_state = {
                name: tensor.detach().to("cpu", copy=True) for name, tensor in self.model.state_dict().items()
            }

    def restore(self) -> None:
        if self._best_state is None:
            return
        self.model.load_state_dict(self._best_state)
        logger.info(
            "Kept the stage's weights of step %d (%s = %.4f).", self.best_step, self.metric_key, self.best_metric
        )


def _refuse_pickles(checkpoint: str, names: tuple[str, ...]) -> None:
    found = [name for name in names if os.path.exists(os.path.join(checkpoint, name))]
    if found:
        raise ValueError(
            f"{checkpoint} holds {', '.join(found)}: pickle files, which RMTKDTrainer never loads (they can run "
            "code). Resume it with transformers.Trainer, or restart the run without resume_from_checkpoint."
        )
    logger.warning("%s has no optimizer/RNG state: resuming with fresh ones.", checkpoint)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the parameter names, shapes and bytes: identifies the teacher a run started from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _provenance(teacher: nn.Module) -> dict:
    from .hub import run_provenance

    return run_provenance(teacher)


def _weights_mb(model: nn.Module) -> float:
    from .hub import weights_megabytes

    return weights_megabytes(model)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cuts_nothing(analyses: Mapping[str, SiteAnalysis], names: Sequence[str]) -> bool:
    return all(analyses[name].kept_width == analyses[name].site.dim for name in names)


def _try_summary(quantile: float, outcome: Mapping) -> dict:
    """One try of a stage, for the history: its quantile and what it gave."""
    return {"sigma_quantile": quantile, **{key: value for key, value in outcome.items() if key != "kept_step"}}


def _stage_record(index: int, stage_names: list[str], quantile: float, analyses: Mapping[str, SiteAnalysis]) -> dict:
    return {
        "stage": index,
        "sigma_quantile": quantile,
        "sites": {
            name: {
                "dim": analyses[name].site.dim,
                "num_samples": analyses[name].site.num_samples,
                "kept_width": analyses[name].kept_width,
                "sigma_quantile": analyses[name].fit.sigma_quantile,
                "sigma2": analyses[name].fit.sigma2,
                "lambda_plus": analyses[name].fit.lambda_plus,
                "refined": analyses[name].fit.refined,
            }
            for name in stage_names
        },
    }


__all__ = ["HISTORY_FILENAME", "RMTKDTrainer", "distillation_loss", "hidden_state_loss", "model_fingerprint"]
