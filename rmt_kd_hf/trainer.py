"""``RMTKDTrainer``: RMT-KD's calibrate → analyse → plan → apply → distil loop as a ``Trainer``.

This module holds the loop and the ``Trainer`` hooks only. What the loop calls lives beside it: the losses
(``losses``), stage planning (``planning``), stage checkpoints and resume (``stage_checkpoints``), the run's record
(``history``), the checks before any work (``input_checks``), pickle-free Trainer checkpoints (``trainer_state``) and
the work of one stage (``stages``).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from transformers.utils import logging

from .calibration import plan_calibration
from .callbacks import BestStageWeights
from .checkpoint import load_checkpoint, output_lock, refuse_finished_output, refuse_teacher_folder, save_compressed
from .config import RMTKDConfig
from .filenames import HISTORY_FILENAME, SPECTRA_FILENAME
from .history import FinalRecord, RunHistory, StageStatus, TeacherRecord
from .hub import run_provenance, weights_megabytes, write_model_card
from .input_checks import check_compress_inputs, hidden_distillation_weight
from .losses import distillation_loss, hidden_state_loss
from .planning import stop_rule_fired
from .reports import latency_comparison
from .stage_checkpoints import (
    ResumeState,
    checkpoint_to_resume,
    model_fingerprint,
    read_resume_state,
    resume_settings,
    save_stage_checkpoint,
    setting_defaults,
)
from .stages import StageRunner, stage_schedule, stop_rule_latency
from .surgery import get_surgery
from .surgery.base import count_parameters
from .teacher_outputs import TeacherOutputCache, cache_bytes_for
from .trainer_state import SafetensorsTrainerStateMixin

logger = logging.get_logger(__name__)


class RMTKDTrainer(SafetensorsTrainerStateMixin, Trainer):
    """A ``Trainer`` whose ``compress()`` runs RMT-KD: calibrate, fit the MP law, project a stage, distil from the
    model before the stage, evaluate, and accept or roll back, until a stop rule fires.

    ``train()`` is the ordinary ``Trainer.train`` (use it to fine-tune the teacher first); inside ``compress()``
    every stage's fine-tuning uses the distillation loss of :func:`~rmt_kd_hf.losses.distillation_loss`. After
    ``compress()``, ``history`` is the run's :class:`~rmt_kd_hf.history.RunHistory` (``compression_history``: its
    JSON form, as written to ``rmt_kd_history.json``).
    """

    _tag_names = ["rmt-kd", "knowledge-distillation", "compression"]

    def __init__(self, model: nn.Module, args: RMTKDConfig, **kwargs):
        if not isinstance(args, RMTKDConfig):
            raise TypeError(f"RMTKDTrainer needs an RMTKDConfig as args, got {type(args).__name__}.")
        surgery = get_surgery(model, **args.surgery_options())  # unsupported architectures/options fail here
        hidden_weight = hidden_distillation_weight(args.hidden_distillation_weight, surgery, model)
        # before Trainer creates output_dir; the CLI's checkpoint-teacher cache inside output_dir is safe (the final
        # save merges into output_dir)
        refuse_teacher_folder(args.output_dir, getattr(model, "name_or_path", None), refuse_containing=False)
        super().__init__(model=model, args=args, **kwargs)
        self.hidden_distillation_weight = hidden_weight
        self.teacher_model: nn.Module | None = None
        self.history: RunHistory | None = None
        self._hidden_state_bases: list[torch.Tensor] | None = None
        self._teacher_outputs = TeacherOutputCache(0)
        self._stage_spectra: dict[int, dict] = {}
        self._keep_evaluated_rows, self._evaluated_rows = False, None

    @property
    def compression_history(self) -> dict:
        """The run's history as written to ``rmt_kd_history.json`` (empty before ``compress()``)."""
        return self.history.to_dict() if self.history is not None else {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher_model is None or not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        features = {key: value for key, value in inputs.items() if key != "labels"}
        hidden = self.hidden_distillation_weight > 0 and self._hidden_state_bases is not None
        outputs = model(**features, output_hidden_states=True) if hidden else model(**features)
        with torch.no_grad():
            teacher_logits, teacher_states = self._teacher_outputs.outputs(self.teacher_model, features, hidden)
        loss = distillation_loss(
            outputs.logits,
            teacher_logits,
            labels,
            self.args.distillation_alpha,
            self.args.distillation_temperature,
        )
        if hidden:
            loss = loss + self.hidden_distillation_weight * hidden_state_loss(
                outputs.hidden_states,
                teacher_states,
                self._hidden_state_bases,
                features.get("attention_mask"),
            )
        return (loss, outputs) if return_outputs else loss

    # -- the compress-and-distil loop -------------------------------------------------------------------------

    def compress(self, resume_from_checkpoint: str | bool | None = None) -> nn.Module:
        """Run RMT-KD to a stop rule, save the final model in ``output_dir`` and return it.

        Stop rules: the parameter/latency target is met; a stage's validation metric falls more than
        ``max_metric_drop`` (or ``target_metric_drop``) below the teacher's even after ``stage_retries`` milder cuts
        (that stage is rolled back); ``max_stages`` accepted stages. A stage with nothing above λ+ left to cut is
        skipped (the one-shot schedule then ends; a per-layer one goes on to the next layer).

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
        check_compress_inputs(self.model, args.output_dir, self.train_dataset, self.processing_class)
        checkpoint = checkpoint_to_resume(args.output_dir, resume_from_checkpoint) if resume_from_checkpoint else None
        if checkpoint is None:
            refuse_finished_output(args.output_dir, args.overwrite_output_dir)
        with output_lock(args.output_dir) if args.should_save else contextlib.nullcontext():
            return self._compress(checkpoint)

    def _compress(self, checkpoint: str | None) -> nn.Module:
        args = self.args
        surgery = get_surgery(self.model, **args.surgery_options())
        teacher = self.model
        teacher_fingerprint = model_fingerprint(teacher)
        prepared = surgery.prepare(teacher)
        if checkpoint is not None:
            settings = resume_settings(args, self.hidden_distillation_weight)
            state = read_resume_state(checkpoint, teacher_fingerprint, settings, setting_defaults(type(args)))
            history, first_stage, self._stage_spectra = state.history, state.next_stage, state.stage_spectra
            self.model = self.model_wrapped = load_checkpoint(type(prepared), checkpoint).to(args.device)
            logger.info("Resuming RMT-KD from %s at stage %d", checkpoint, first_stage)
        else:
            history, first_stage, self._stage_spectra = self._start_history(teacher, teacher_fingerprint), 0, {}
            self.model = self.model_wrapped = prepared
        stages = stage_schedule(surgery, self.model, args.compression_schedule, args.stage_order)
        runner = StageRunner(self, surgery, history, self._stage_spectra, len(stages))
        runner.trim_vocabulary(resumed=checkpoint is not None)
        calibration = self._calibration_dataloader(history)
        progress = logging.tqdm(total=len(stages), initial=first_stage, desc="RMT-KD stages", disable=args.disable_tqdm)
        for index in range(first_stage, len(stages)):
            if stop_rule_fired(history.stages, args.max_stages, args.target_parameter_ratio, args.target_latency_ratio):
                break  # also when a resumed run had already stopped
            record = runner.run(index, stages[index], calibration)
            history.stages.append(record)
            progress.update(1)
            fields = record.to_dict(history.metric_name).items()
            self.log({f"rmt_kd/stage_{index}/{key}": value for key, value in fields if _is_number(value)})
            if record.status is StageStatus.ROLLED_BACK:
                break
            if args.should_save:
                state = ResumeState(history, index + 1, self._stage_spectra)
                save_stage_checkpoint(
                    self.model, args.output_dir, index, self.processing_class, state, args.save_total_limit
                )
            self.accelerator.wait_for_everyone()
        progress.close()
        self.teacher_model = None
        history.final = FinalRecord(
            count_parameters(self.model), surgery.widths(self.model), weights_megabytes(self.model)
        )
        if not history.accepted_stages:
            logger.warning(
                "No cut was kept: the saved model is the teacher re-expressed in its compressible form (%d "
                "parameters against the teacher's %d). Keep using the teacher, or relax the floor.",
                history.final.num_parameters,
                history.teacher.num_parameters,
            )
        if args.measure_latency and next(self.model.parameters()).device.type == "cpu":
            history.latency = latency_comparison(teacher, self.model, args.latency_sequence_length)
        self.history = history
        self._save_final(history)
        return self.model

    def _start_history(self, teacher: nn.Module, fingerprint: str) -> RunHistory:
        args = self.args
        metric, correct = self.validation_score()
        record = TeacherRecord(count_parameters(teacher), metric, validation_correct=correct)
        if args.target_latency_ratio is not None:
            record.cpu_latency_seconds = stop_rule_latency(teacher, args)
        record.fingerprint = fingerprint
        return RunHistory(
            teacher=record,
            config=resume_settings(args, self.hidden_distillation_weight),
            provenance=run_provenance(teacher),
        )

    def _calibration_dataloader(self, history: RunHistory | None = None) -> torch.utils.data.DataLoader:
        """This process's share of the seeded calibration rows, in fixed batches (``calibration.plan_calibration``);
        which rows, recorded in ``history``."""
        args = self.args
        plan = plan_calibration(
            len(self.train_dataset),
            args.calibration_fraction,
            args.calibration_max_samples,
            args.seed,
            args.per_device_eval_batch_size,
            args.world_size,
            args.process_index,
        )
        if history is not None:
            history.calibration = {"num_rows": len(plan.rows), "row_ids_sha256": plan.row_ids_sha256}
        collator = self.data_collator
        if hasattr(self.train_dataset, "select"):
            subset = self._remove_unused_columns(self.train_dataset.select(plan.rows), description="calibration")
        else:
            subset = torch.utils.data.Subset(self.train_dataset, plan.rows)
            collator = self._get_collator_with_removed_columns(collator, description="calibration")
        return torch.utils.data.DataLoader(subset, batch_sampler=plan.batches, collate_fn=collator)

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
                :func:`~rmt_kd_hf.losses.hidden_state_loss` (weight ``hidden_distillation_weight``). ``None``: logits
                only.

        Returns:
            With ``load_best_model_at_end`` and an ``eval_strategy``, the step whose weights the student ends on (the
            best at its evaluations); ``None`` otherwise.
        """
        if hidden_state_bases is not None and self.hidden_distillation_weight > 0:
            device = self.args.device
            self._hidden_state_bases = [basis.to(device=device, dtype=torch.float32) for basis in hidden_state_bases]
        self.teacher_model = teacher.eval().requires_grad_(False)
        self.model = self.model_wrapped = student
        if self.args.stage_max_steps == 0:
            self._hidden_state_bases = None
            return None
        self.optimizer, self.lr_scheduler = None, None
        keep_best = None
        if self.args.load_best_model_at_end and self.args.eval_strategy != IntervalStrategy.NO:
            keep_best = BestStageWeights(student, self.args.metric_for_best_model, self.args.greater_is_better)
            self.add_callback(keep_best)
        # the stage trains with its own copy of the arguments: stage_max_steps steps, and no Trainer checkpoints (a
        # mid-stage one could not be resumed into another width; stage checkpoints replace them)
        user_args, self.args = self.args, copy.copy(self.args)
        self.args.max_steps, self.args.save_strategy = user_args.stage_max_steps, SaveStrategy.NO
        rows_per_step = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        num_rows = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else 0
        cache_bytes = cache_bytes_for(self.args.teacher_output_cache_mb, self.args.max_steps, rows_per_step, num_rows)
        self._teacher_outputs = TeacherOutputCache(cache_bytes)
        try:
            self.train()
        finally:
            self.args = user_args
            cache = self._teacher_outputs
            if cache.max_bytes:
                logger.info(
                    "Teacher outputs read from memory for %d of %d batches (%d rows, %.0f MB).",
                    cache.hits,
                    cache.hits + cache.misses,
                    len(cache),
                    cache.used_bytes / 2**20,
                )
            self._teacher_outputs = TeacherOutputCache(0)  # its rows belong to this teacher only
            self.teacher_model.requires_grad_(True)
            self._hidden_state_bases = None
            if keep_best is not None:
                self.remove_callback(keep_best)
        if keep_best is None:
            return None
        keep_best.restore()
        return keep_best.best_step

    def validation_metric(self) -> float:
        """``evaluate()``'s ``compression_metric`` on ``eval_dataset``: what the floor judges."""
        return self.validation_score()[0]

    def validation_score(self) -> tuple[float, np.ndarray | None]:
        """``validation_metric()`` and, when the metric is ``accuracy`` of a classifier, which rows it got right:
        a ``(eval rows,)`` bool array in the evaluation order (the same for every model of a run), else ``None``.
        The floor's paired standard errors compare these rows between a cut and its teacher."""
        key = f"eval_{self.args.compression_metric}"
        self._keep_evaluated_rows, self._evaluated_rows = self.args.compression_metric == "accuracy", None
        try:
            metrics = self.evaluate()
        finally:
            self._keep_evaluated_rows = False
        if key not in metrics:
            raise ValueError(
                f"evaluate() returned no {key!r} (got {sorted(metrics)}): pass compute_metrics that returns "
                f"{self.args.compression_metric!r}, or set compression_metric to one of its keys."
            )
        correct, self._evaluated_rows = self._evaluated_rows, None
        return float(metrics[key]), correct

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        if self._keep_evaluated_rows:
            self._evaluated_rows = correct_rows(output.predictions, output.label_ids)
        return output

    def _save_final(self, history: RunHistory) -> None:
        """The final model with its history and spectra; ``config.json`` lands last, so an interrupted save never
        looks complete."""
        if self.args.should_save:
            accepted = {stage.stage for stage in history.accepted_stages}
            spectra = {str(index): self._stage_spectra[index] for index in sorted(accepted)}
            save_compressed(
                self.model,
                self.args.output_dir,
                self.processing_class,
                merge_into_existing=True,
                json_files={HISTORY_FILENAME: history.to_dict(), SPECTRA_FILENAME: spectra},
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
        write_model_card(
            self.args.output_dir,
            model_name=model_name or os.path.basename(os.path.abspath(self.args.output_dir)),
            repo_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            base_model=finetuned_from,
            datasets=dataset,
            license=license,
            language=language,
            tags=tags,
            measurements=measurements,
        )


def correct_rows(predictions, label_ids) -> np.ndarray | None:
    """Which rows a classifier got right: ``predictions`` (rows, classes) logits, or (rows,) class ids when
    ``preprocess_logits_for_metrics`` already took the argmax, against ``label_ids`` (rows,); ``None`` for anything
    else (regression, several outputs per row, no labels)."""
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0] if predictions else None
    if predictions is None or label_ids is None or isinstance(label_ids, (tuple, list)):
        return None
    predictions, label_ids = np.asarray(predictions), np.asarray(label_ids)
    if label_ids.ndim != 1 or len(predictions) != len(label_ids):
        return None
    if predictions.ndim == 2 and predictions.shape[1] > 1:
        predictions = predictions.argmax(axis=-1)
    elif predictions.ndim != 1 or not np.issubdtype(predictions.dtype, np.integer):
        return None
    return predictions == label_ids


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["RMTKDTrainer", "distillation_loss", "hidden_state_loss", "model_fingerprint"]
