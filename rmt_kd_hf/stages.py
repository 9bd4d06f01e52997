"""One stage of ``RMTKDTrainer.compress()``: calibrate, fit the MP law, plan, cut, distil, judge against the floor.

A cut is judged like a user would: its validation metric against the floor (``RunHistory.floor``). A rolled-back
cut is retried with milder ones (``planning.CutSearch``); with ``target_metric_drop`` a cut that passes is followed by
stronger ones, and the strongest that passes is kept. The vocabulary trim before the first stage is judged the same
way. :class:`StageRunner` holds what the stages of one run share; the trainer supplies distillation and evaluation.
"""

from __future__ import annotations

import copy
import time

from torch import nn
from transformers import Trainer, enable_full_determinism, set_seed
from transformers.utils import logging

from .calibration import collect_covariances
from .callbacks import ScreenCandidate, random_states, restore_random_states
from .checkpoint import first_names, non_finite_tensors
from .compression import analyse_sites, cuts_nothing, plan_stage, plan_stage_for_budget, refit_sites, refuse_empty_sites
from .history import CutOutcome, RunHistory, StageRecord, StageStatus, StageTry
from .planning import CutSearch, judge_cut, paired_standard_error, stage_parameter_target
from .reports import cpu_latency
from .spectral_report import spectra_record
from .surgery.base import count_parameters
from .vocabulary import TokenIdRemapCollator, WordResplitter, trainer_vocabulary, trim_embeddings

logger = logging.get_logger(__name__)

NOTHING_TO_CUT = "nothing above λ+ left to cut"


def stage_schedule(surgery, model: nn.Module, compression_schedule: str, stage_order: str) -> list[list[str] | None]:
    """The sites of each stage in order: one stage of every site (``None``) for ``one_shot``, else the surgery's
    layer boundaries, shallow to deep or the reverse."""
    if compression_schedule == "one_shot":
        return [None]
    stages = surgery.stages(model)
    return stages if stage_order == "shallow_to_deep" else stages[::-1]


def stop_rule_latency(model: nn.Module, args) -> float:
    """CPU latency of ``model`` as the latency stop rule measures it (``args.latency_batch_size`` rows of
    ``args.latency_sequence_length`` tokens): the teacher and every candidate are timed the same way."""
    return cpu_latency(model, args.latency_batch_size, args.latency_sequence_length)


class StageRunner:
    """The stages of one ``compress()`` run on ``trainer`` (an ``RMTKDTrainer``: its ``distil`` and
    ``validation_metric`` do the training and the judging): what they share (the surgery, the history, the spectra
    of every stage so far) and the work of each. The model being compressed is always ``trainer.model``."""

    def __init__(self, trainer: Trainer, surgery, history: RunHistory, stage_spectra: dict[int, dict], num_stages: int):
        self.trainer, self.args, self.surgery, self.history = trainer, trainer.args, surgery, history
        self.stage_spectra = stage_spectra
        self.num_stages = num_stages

    def _set_model(self, model: nn.Module) -> None:
        self.trainer.model = self.trainer.model_wrapped = model

    # -- the vocabulary ---------------------------------------------------------------------------------------

    def trim_vocabulary(self, resumed: bool) -> None:
        """Trim the model's word embeddings to the training set's tokens (``args.trim_vocabulary``), swap in the
        trimmed tokenizer (saved with every checkpoint) and map the datasets' original ids in the collator.

        The trim is judged like a stage: the trimmed model's validation metric is recorded, and an automatic trim
        (``trim_vocabulary=None``) that alone falls below the floor is undone."""
        trainer, history = self.trainer, self.history
        undone = resumed and history.vocabulary is not None and history.vocabulary.get("undone")
        if isinstance(trainer.data_collator, TokenIdRemapCollator) or undone:  # trimmed already, or undone for good
            return
        tokenizer = trainer.processing_class
        trimmed = trainer_vocabulary(
            self.args.trim_vocabulary, trainer.model, tokenizer, trainer.train_dataset, self.surgery.name == "bert"
        )
        if trimmed is None:
            return
        kept_token_ids, trimmed_tokenizer = trimmed
        if resumed and trainer.model.config.vocab_size != len(kept_token_ids):
            raise ValueError(
                f"The checkpoint's vocabulary has {trainer.model.config.vocab_size} tokens, but this training set "
                f"gives {len(kept_token_ids)}: resume with the training set and tokenizer of the interrupted run."
            )
        untrimmed = (trainer.model, trainer.processing_class, trainer.data_collator)
        if not resumed:
            self._set_model(trim_embeddings(copy.deepcopy(trainer.model), kept_token_ids))
        # evaluations read unseen words as the saved tokenizer splits them; rows that grow stay within the model
        max_length = min(tokenizer.model_max_length, getattr(trainer.model.config, "max_position_embeddings", 512))
        resplit = WordResplitter(tokenizer, trimmed_tokenizer, kept_token_ids, max_length)
        collator = TokenIdRemapCollator(trainer.data_collator, kept_token_ids, tokenizer.unk_token_id, resplit=resplit)
        self._set_tokenizer(trimmed_tokenizer, collator)
        if resumed:
            return
        (metric, correct), floor = trainer.validation_score(), history.floor
        record = {"teacher_size": untrimmed[0].config.vocab_size, "kept_size": len(kept_token_ids)}
        history.vocabulary = {**record, f"eval_{self.args.compression_metric}": metric}
        standard_error = paired_standard_error(correct, history.teacher.validation_correct)
        if standard_error is not None:
            history.vocabulary["paired_standard_error"] = standard_error
        if self.args.trim_vocabulary is None and not metric >= floor:
            history.vocabulary["undone"] = f"{self.args.compression_metric} {metric:.4f} < floor {floor:.4f}"
            logger.warning(
                "The trimmed vocabulary alone falls below the floor (%s): undone.", history.vocabulary["undone"]
            )
            self._set_model(untrimmed[0])
            self._set_tokenizer(*untrimmed[1:])
            return
        logger.info("Vocabulary trimmed to the training set's tokens: %d of %d.", len(kept_token_ids), len(tokenizer))

    def _set_tokenizer(self, tokenizer, collator) -> None:
        self.trainer.processing_class = self.trainer.callback_handler.processing_class = tokenizer
        self.trainer.data_collator = collator

    # -- a stage ----------------------------------------------------------------------------------------------

    def run(self, index: int, stage_sites: list[str] | None, calibration) -> StageRecord:
        """Calibrate, fit, cut, distil and judge stage ``index`` (``stage_sites``: its sites; ``None``: all). A cut
        rolled back (below the floor, or not finite) is retried up to ``stage_retries`` times with milder ones; with
        ``target_metric_drop`` a cut that passes is followed by stronger ones too; the strongest that passes is kept
        as ``trainer.model``. Every try is listed under ``tries`` in the record."""
        args = self.args
        start = time.perf_counter()
        self._seed(index)
        previous = self.trainer.model.eval()
        accumulators = collect_covariances(
            previous, calibration, self.surgery.taps(previous), progress=not args.disable_tqdm
        )
        sites = self.surgery.sites(previous, accumulators)
        fitted = analyse_sites(sites, args.sigma_quantile, args.mp_refine, quantile_shifts=args.sigma_quantile_shifts)
        stage_names = list(fitted) if stage_sites is None else stage_sites
        analyses, quantile = self._plan(previous, fitted, stage_names, index)
        refuse_empty_sites(analyses, stage_names, args.min_width)
        self.stage_spectra[index] = spectra_record(analyses, stage_names)
        if cuts_nothing(analyses, stage_names):
            skipped = CutOutcome(StageStatus.SKIPPED, NOTHING_TO_CUT, seconds=time.perf_counter() - start)
            return StageRecord.from_cut(index, quantile, analyses, stage_names, skipped)
        # every try distils from these generator states: a later try trains as a run started at its quantile would
        # (whose calibration has drawn from the generators as this one's did), and its result does not depend on
        # the tries before it
        distillation_start = random_states()
        candidate, outcome = self._cut_and_judge(previous, analyses)
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
            refitted = refit_sites(fitted, try_quantile, args.mp_refine, args.sigma_quantile_shifts)
            analyses = plan_stage(refitted, stage_names, args.min_width)
            if cuts_nothing(analyses, stage_names):
                search.record(try_quantile, accepted=True)  # nothing to cut this mildly: try stronger
                tries.append(StageTry(StageStatus.SKIPPED, NOTHING_TO_CUT, sigma_quantile=try_quantile))
                continue
            restore_random_states(distillation_start)
            candidate, outcome = self._cut_and_judge(previous, analyses)
            tries.append(StageTry.from_outcome(try_quantile, outcome))
            search.record(try_quantile, outcome.accepted)
            if outcome.accepted:
                best = (candidate, StageRecord.from_cut(index, try_quantile, analyses, stage_names, outcome))
                self.stage_spectra[index] = spectra_record(analyses, stage_names)
        if best is not None:
            candidate, record = best
        self._set_model(candidate if best is not None else previous)
        record.tries = tries if len(tries) > 1 else []
        record.seconds = time.perf_counter() - start
        logger.info("RMT-KD stage %d: %s (%d tries)", index, record.status.value, len(tries))
        return record

    def _seed(self, index: int) -> None:
        # each stage draws from its own seed, so a resumed run repeats exactly what the interrupted one would do
        seed = self.args.seed + index
        enable_full_determinism(seed) if self.args.full_determinism else set_seed(seed)

    def _plan(self, model: nn.Module, analyses: dict, stage_names: list[str], index: int) -> tuple[dict, float]:
        """Widths for this stage's sites (the others keep every direction) and the quantile used."""
        args = self.args
        if args.target_parameter_ratio is None or not args.budget_search:
            return plan_stage(analyses, stage_names, args.min_width), args.sigma_quantile
        teacher_parameters = self.history.teacher.num_parameters
        final_target = args.target_parameter_ratio * teacher_parameters
        target = stage_parameter_target(count_parameters(model), final_target, self.num_stages - index)
        search = plan_stage_for_budget(
            self.surgery,
            model,
            analyses,
            stage_names,
            target,
            args.mp_refine,
            args.sigma_quantile_shifts,
            args.min_width,
        )
        if search.strongest_num_parameters > target and args.compression_schedule == "one_shot":
            raise ValueError(
                f"target_parameter_ratio={args.target_parameter_ratio} cannot be met: even at quantile "
                f"{search.quantile} the model keeps {search.strongest_num_parameters / teacher_parameters:.1%} of the "
                "teacher's parameters. Raise the target, or compress the embeddings too (they often dominate small "
                "BERTs)."
            )
        return search.plan, search.quantile

    def _cut_and_judge(self, previous: nn.Module, analyses: dict) -> tuple[nn.Module, CutOutcome]:
        """Apply ``analyses`` to ``previous``, distil, and judge the candidate against the floor."""
        args, trainer = self.args, self.trainer
        start = time.perf_counter()
        candidate = self.surgery.apply(previous, analyses)
        hidden = trainer.hidden_distillation_weight > 0
        bases = self.surgery.hidden_state_bases(previous, analyses) if hidden else None
        floor = self.history.floor
        screen = self._screening(floor)
        try:
            kept_step = trainer.distil(candidate, previous, bases)  # makes it trainer.model
        finally:
            if screen is not None:
                trainer.remove_callback(screen)
        screened_out = screen is not None and screen.stopped
        metric, correct = (screen.screened_metric, None) if screened_out else trainer.validation_score()
        self._set_model(previous)  # until the stage decides
        num_parameters = count_parameters(candidate)
        outcome = CutOutcome(StageStatus.ACCEPTED, num_parameters=num_parameters, metric=metric, kept_step=kept_step)
        outcome.parameter_ratio = num_parameters / self.history.teacher.num_parameters
        outcome.paired_standard_error = paired_standard_error(correct, self.history.teacher.validation_correct)
        outcome.screened_metric = screen.screened_metric if screen is not None else None
        if screened_out:
            outcome.status = StageStatus.ROLLED_BACK
            outcome.reason = (
                f"screened out after {screen.at_step} of {args.stage_max_steps} steps: {args.compression_metric} "
                f"{metric:.4f} < floor {floor:.4f} - margin {args.screening_margin}"
            )
            outcome.kept_step, outcome.seconds = None, time.perf_counter() - start
            return candidate, outcome
        if args.target_latency_ratio is not None:
            outcome.latency_ratio = stop_rule_latency(candidate, args) / self.history.teacher.cpu_latency_seconds
        broken = non_finite_tensors(candidate)
        outcome.status, outcome.reason = judge_cut(
            metric, floor, args.compression_metric, first_names(broken) if broken else ""
        )
        if outcome.paired_standard_error is not None and abs(metric - floor) < outcome.paired_standard_error:
            logger.info(
                "The cut's %s %.4f is within one paired standard error (%.4f) of the floor %.4f: %s on these "
                "validation rows, but another sample of rows could decide the other way.",
                args.compression_metric,
                metric,
                outcome.paired_standard_error,
                floor,
                outcome.status.value,
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
        self.trainer.add_callback(screen)
        return screen
