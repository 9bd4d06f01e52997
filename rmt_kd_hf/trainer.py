"""``RMTKDTrainer``: RMT-KD's calibrate → analyse → plan → apply → distil loop as a ``Trainer``.

This module holds the loop and the ``Trainer`` hooks only. What the loop calls lives beside it: the losses
(``losses``), stage planning (``planning``), stage checkpoints and resume (``stage_checkpoints``), the run's record
(``history``), the checks before any work (``input_checks``) and pickle-free Trainer checkpoints (``trainer_state``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import Trainer, enable_full_determinism, set_seed
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from transformers.utils import logging

from .calibration import collect_covariances, plan_calibration
from .callbacks import BestStageWeights, ScreenCandidate
from .checkpoint import (
    first_names,
    load_checkpoint,
    non_finite_tensors,
    output_lock,
    refuse_finished_output,
    refuse_teacher_folder,
    save_compressed,
)
from .compression import (
    analyse_sites,
    cuts_nothing,
    plan_stage,
    plan_stage_for_budget,
    refit_sites,
    refuse_empty_sites,
)
from .config import RMTKDConfig
from .filenames import HISTORY_FILENAME, SPECTRA_FILENAME
from .history import CutOutcome, FinalRecord, RunHistory, StageRecord, StageStatus, StageTry, TeacherRecord
from .hub import run_provenance, weights_megabytes, write_model_card
from .input_checks import check_compress_inputs
from .losses import distillation_loss, hidden_state_loss
from .planning import CutSearch, judge_cut, stage_parameter_target, stop_rule_fired
from .reports import cpu_latency, latency_comparison
from .spectral_report import spectra_record
from .stage_checkpoints import (
    RESUME_INVARIANTS,
    ResumeState,
    checkpoint_to_resume,
    model_fingerprint,
    read_resume_state,
    save_stage_checkpoint,
)
from .surgery import get_surgery
from .surgery.base import count_parameters
from .trainer_state import SafetensorsTrainerStateMixin
from .vocabulary import TokenIdRemapCollator, trainer_vocabulary, trim_embeddings

logger = logging.get_logger(__name__)

NOTHING_TO_CUT = "nothing above λ+ left to cut"


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
        self.history: RunHistory | None = None
        self._hidden_state_bases: list[torch.Tensor] | None = None
        self._stage_spectra: dict[int, dict] = {}

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
            defaults = {key: RMTKDConfig.__dataclass_fields__[key].default for key in RESUME_INVARIANTS}
            state = read_resume_state(checkpoint, teacher_fingerprint, self._settings(), defaults)
            history, first_stage, self._stage_spectra = state.history, state.next_stage, state.stage_spectra
            self.model = self.model_wrapped = load_checkpoint(type(prepared), checkpoint).to(args.device)
            logger.info("Resuming RMT-KD from %s at stage %d", checkpoint, first_stage)
        else:
            history, first_stage, self._stage_spectra = self._start_history(teacher, teacher_fingerprint), 0, {}
            self.model = self.model_wrapped = prepared
        self._trim_vocabulary(surgery, history, resumed=checkpoint is not None)
        calibration = self._calibration_dataloader(history)
        stages = self._stages(surgery)
        progress = logging.tqdm(total=len(stages), initial=first_stage, desc="RMT-KD stages", disable=args.disable_tqdm)
        for index in range(first_stage, len(stages)):
            if stop_rule_fired(history.stages, args.max_stages, args.target_parameter_ratio, args.target_latency_ratio):
                break  # also when a resumed run had already stopped
            record = self._run_stage(surgery, calibration, index, stages[index], history)
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
        if args.measure_latency and next(self.model.parameters()).device.type == "cpu":
            history.latency = latency_comparison(teacher, self.model, args.latency_sequence_length)
        self.history = history
        self._save_final(history)
        return self.model

    def _start_history(self, teacher: nn.Module, fingerprint: str) -> RunHistory:
        record = TeacherRecord(count_parameters(teacher), self._validation_metric())
        if self.args.target_latency_ratio is not None:
            record.cpu_latency_seconds = self._latency(teacher)
        record.fingerprint = fingerprint
        return RunHistory(teacher=record, config=self._settings(), provenance=run_provenance(teacher))

    def _settings(self) -> dict:
        """The settings a resumed run must share with the interrupted one, defaults resolved (as in the history)."""
        settings = {key: getattr(self.args, key) for key in RESUME_INVARIANTS}
        settings["hidden_distillation_weight"] = self.hidden_distillation_weight
        return settings

    def _trim_vocabulary(self, surgery, history: RunHistory, resumed: bool) -> None:
        """Trim ``self.model``'s word embeddings to the training set's tokens (``args.trim_vocabulary``), swap in
        the trimmed tokenizer (saved with every checkpoint) and map the datasets' original ids in the collator.

        The trim is judged like a stage: the trimmed model's validation metric is recorded, and an automatic trim
        (``trim_vocabulary=None``) that alone falls below the floor is undone."""
        undone = resumed and history.vocabulary is not None and history.vocabulary.get("undone")
        if isinstance(self.data_collator, TokenIdRemapCollator) or undone:  # trimmed already, or undone for good
            return
        tokenizer = self.processing_class
        trimmed = trainer_vocabulary(
            self.args.trim_vocabulary, self.model, tokenizer, self.train_dataset, surgery.name == "bert"
        )
        if trimmed is None:
            return
        kept_token_ids, trimmed_tokenizer = trimmed
        if resumed and self.model.config.vocab_size != len(kept_token_ids):
            raise ValueError(
                f"The checkpoint's vocabulary has {self.model.config.vocab_size} tokens, but this training set "
                f"gives {len(kept_token_ids)}: resume with the training set and tokenizer of the interrupted run."
            )
        untrimmed = (self.model, self.processing_class, self.data_collator)
        if not resumed:
            self.model = self.model_wrapped = trim_embeddings(copy.deepcopy(self.model), kept_token_ids)
        self.processing_class = self.callback_handler.processing_class = trimmed_tokenizer
        self.data_collator = TokenIdRemapCollator(self.data_collator, kept_token_ids, tokenizer.unk_token_id)
        if resumed:
            return
        metric = self._validation_metric()
        floor = history.floor
        record = {"teacher_size": untrimmed[0].config.vocab_size, "kept_size": len(kept_token_ids)}
        history.vocabulary = {**record, f"eval_{self.args.compression_metric}": metric}
        if self.args.trim_vocabulary is None and not metric >= floor:
            history.vocabulary["undone"] = f"{self.args.compression_metric} {metric:.4f} < floor {floor:.4f}"
            logger.warning(
                "The trimmed vocabulary alone falls below the floor (%s): undone.", history.vocabulary["undone"]
            )
            self.model, self.processing_class, self.data_collator = untrimmed
            self.model_wrapped = self.model
            self.callback_handler.processing_class = self.processing_class
            return
        logger.info("Vocabulary trimmed to the training set's tokens: %d of %d.", len(kept_token_ids), len(tokenizer))

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

    def _stages(self, surgery) -> list[list[str] | None]:
        if self.args.compression_schedule == "one_shot":
            return [None]
        stages = surgery.stages(self.model)
        return stages if self.args.stage_order == "shallow_to_deep" else stages[::-1]

    def _run_stage(self, surgery, calibration, index: int, stage_sites: list[str] | None, history) -> StageRecord:
        """Calibrate, fit, cut, distil and judge one stage. A cut rolled back (below the floor, or not finite) is
        retried up to ``stage_retries`` times with milder ones (``planning.CutSearch``; with ``target_metric_drop`` a
        cut that passes is followed by stronger ones too); the strongest that passes is kept. Every try is listed
        under ``tries`` in the record."""
        args = self.args
        start = time.perf_counter()
        self._seed_stage(index)
        previous = self.model.eval()
        accumulators = collect_covariances(
            previous, calibration, surgery.taps(previous), progress=not args.disable_tqdm
        )
        sites = surgery.sites(previous, accumulators)
        fitted = analyse_sites(sites, args.sigma_quantile, args.mp_refine, quantile_shifts=args.sigma_quantile_shifts)
        stage_names = list(fitted) if stage_sites is None else stage_sites
        analyses, quantile = self._plan_stage(surgery, previous, fitted, stage_names, history, index)
        refuse_empty_sites(analyses, stage_names, args.min_width)
        self._stage_spectra[index] = spectra_record(analyses, stage_names)
        if cuts_nothing(analyses, stage_names):
            skipped = CutOutcome(StageStatus.SKIPPED, NOTHING_TO_CUT, seconds=time.perf_counter() - start)
            return StageRecord.from_cut(index, quantile, analyses, stage_names, skipped)
        candidate, outcome = self._cut_and_judge(surgery, previous, analyses, history)
        record = StageRecord.from_cut(index, quantile, analyses, stage_names, outcome)
        tries = [StageTry.from_outcome(quantile, outcome)]
        best = (candidate, record) if outcome.accepted else None
        search = CutSearch()
        search.record(quantile, outcome.accepted)
        stronger_too = args.target_metric_drop is not None  # accuracy-targeted: the strongest cut within the drop
        for _ in range(args.stage_retries if best is None or stronger_too else 0):
            if search.settled:
                break
            try_quantile = search.next_quantile()
            self._seed_stage(index)  # every try from the same state, as a resumed run would redo it
            refitted = refit_sites(fitted, try_quantile, args.mp_refine, args.sigma_quantile_shifts)
            analyses = plan_stage(refitted, stage_names, args.min_width)
            if cuts_nothing(analyses, stage_names):
                search.record(try_quantile, accepted=True)  # nothing to cut this mildly: try stronger
                tries.append(StageTry(StageStatus.SKIPPED, NOTHING_TO_CUT, sigma_quantile=try_quantile))
                continue
            candidate, outcome = self._cut_and_judge(surgery, previous, analyses, history)
            tries.append(StageTry.from_outcome(try_quantile, outcome))
            search.record(try_quantile, outcome.accepted)
            if outcome.accepted:
                best = (candidate, StageRecord.from_cut(index, try_quantile, analyses, stage_names, outcome))
                self._stage_spectra[index] = spectra_record(analyses, stage_names)
        if best is not None:
            candidate, record = best
        self.model = self.model_wrapped = candidate if best is not None else previous
        record.tries = tries if len(tries) > 1 else []
        record.seconds = time.perf_counter() - start
        logger.info("RMT-KD stage %d: %s (%d tries)", index, record.status.value, len(tries))
        return record

    def _seed_stage(self, index: int) -> None:
        # each stage draws from its own seed, so a resumed run repeats exactly what the interrupted one would do
        seed = self.args.seed + index
        enable_full_determinism(seed) if self.args.full_determinism else set_seed(seed)

    def _cut_and_judge(
        self, surgery, previous: nn.Module, analyses, history: RunHistory
    ) -> tuple[nn.Module, CutOutcome]:
        """Apply ``analyses`` to ``previous``, distil, and judge the candidate against the floor."""
        args = self.args
        start = time.perf_counter()
        candidate = surgery.apply(previous, analyses)
        bases = surgery.hidden_state_bases(previous, analyses) if self.hidden_distillation_weight > 0 else None
        floor = history.floor
        screen = self._screening(floor)
        try:
            kept_step = self.distil(candidate, previous, bases)  # makes it self.model
        finally:
            if screen is not None:
                self.remove_callback(screen)
        screened_out = screen is not None and screen.stopped
        metric = screen.screened_metric if screened_out else self._validation_metric()
        self.model = self.model_wrapped = previous  # until the stage decides
        num_parameters = count_parameters(candidate)
        outcome = CutOutcome(StageStatus.ACCEPTED, num_parameters=num_parameters, metric=metric, kept_step=kept_step)
        outcome.parameter_ratio = num_parameters / history.teacher.num_parameters
        if screened_out:
            outcome.status = StageStatus.ROLLED_BACK
            outcome.reason = (
                f"screened out after {screen.at_step} of {args.stage_max_steps} steps: {args.compression_metric} "
                f"{metric:.4f} < floor {floor:.4f} - margin {args.screening_margin}"
            )
            outcome.kept_step, outcome.seconds = None, time.perf_counter() - start
            return candidate, outcome
        if args.target_latency_ratio is not None:
            outcome.latency_ratio = self._latency(candidate) / history.teacher.cpu_latency_seconds
        broken = non_finite_tensors(candidate)
        outcome.status, outcome.reason = judge_cut(
            metric, floor, args.compression_metric, first_names(broken) if broken else ""
        )
        outcome.seconds = time.perf_counter() - start
        return candidate, outcome

    def _screening(self, floor: float) -> ScreenCandidate | None:
        """The callback that screens this cut after ``screening_fraction`` of its steps (added to the trainer)."""
        args = self.args
        at_step = max(1, round(args.screening_fraction * args.stage_max_steps))
        if args.screening_fraction == 0 or at_step >= args.stage_max_steps:
            return None
        screen = ScreenCandidate(at_step, floor - args.screening_margin, f"eval_{args.compression_metric}")
        self.add_callback(screen)
        return screen

    def _plan_stage(self, surgery, model, analyses, stage_names, history: RunHistory, index: int):
        """Widths for this stage's sites (the others keep every direction) and the quantile used."""
        args = self.args
        if args.target_parameter_ratio is None or not args.budget_search:
            return plan_stage(analyses, stage_names, args.min_width), args.sigma_quantile
        teacher_parameters = history.teacher.num_parameters
        final_target = args.target_parameter_ratio * teacher_parameters
        target = stage_parameter_target(count_parameters(model), final_target, len(self._stages(surgery)) - index)
        search = plan_stage_for_budget(
            surgery, model, analyses, stage_names, target, args.mp_refine, args.sigma_quantile_shifts, args.min_width
        )
        if search.strongest_num_parameters > target and args.compression_schedule == "one_shot":
            raise ValueError(
                f"target_parameter_ratio={args.target_parameter_ratio} cannot be met: even at quantile "
                f"{search.quantile} the model keeps {search.strongest_num_parameters / teacher_parameters:.1%} of the "
                "teacher's parameters. Raise the target, or compress the embeddings too (they often dominate small "
                "BERTs)."
            )
        return search.plan, search.quantile

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
        try:
            self.train()
        finally:
            self.args = user_args
            self.teacher_model.requires_grad_(True)
            self._hidden_state_bases = None
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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["RMTKDTrainer", "distillation_loss", "hidden_state_loss", "model_fingerprint"]
