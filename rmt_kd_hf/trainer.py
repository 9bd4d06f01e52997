"""``RMTKDTrainer``: RMT-KD's train → analyse → project → distil loop as a ``Trainer``."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from .calibration import collect_covariances
from .checkpoint import save_compressed
from .compression import analyse_sites, plan_widths, refit_sites
from .config import RMTKDConfig
from .data import calibration_rows
from .reports import cpu_latency
from .spectral_report import SPECTRA_FILENAME, spectra_record
from .surgery import get_surgery
from .surgery.base import SiteAnalysis, count_parameters, count_parameters_for_config

logger = logging.get_logger(__name__)

HISTORY_FILENAME = "rmt_kd_history.json"


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
        get_surgery(model)  # unsupported architectures fail here, before any work
        super().__init__(model=model, args=args, **kwargs)
        self.teacher_model: nn.Module | None = None
        self.compression_history: dict = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher_model is None or not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        features = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**features)
        with torch.no_grad():
            teacher_logits = self.teacher_model(**features).logits
        loss = distillation_loss(
            outputs.logits, teacher_logits, labels, self.args.distillation_alpha, self.args.distillation_temperature
        )
        return (loss, outputs) if return_outputs else loss

    # -- the compress-and-distil loop -------------------------------------------------------------------------

    def compress(self) -> nn.Module:
        """Run RMT-KD to a stop rule, save the final model in ``output_dir`` and return it.

        Stop rules: the parameter/latency target is met; a stage's validation metric falls more than
        ``max_metric_drop`` below the teacher's (that stage is rolled back); nothing above λ+ is left to cut;
        ``max_stages`` accepted stages.
        """
        args = self.args
        if self.train_dataset is None or self.eval_dataset is None:
            raise ValueError("compress() needs train_dataset (calibration, distillation) and eval_dataset (the floor).")
        self._check_inputs()
        surgery = get_surgery(self.model)
        teacher = self.model
        history = self._start_history(teacher)
        history["provenance"] = _provenance(teacher)
        self._stage_spectra: dict[int, dict] = {}  # per stage: eigenvalues and MP fits, for spectrum plots
        self.model = self.model_wrapped = surgery.prepare(teacher)
        calibration = self._calibration_dataloader(history)
        stages = self._stages(surgery)
        for index, stage_sites in enumerate(logging.tqdm(stages, desc="RMT-KD stages", disable=args.disable_tqdm)):
            record = self._run_stage(surgery, calibration, index, stage_sites, history)
            history["stages"].append(record)
            self.log({f"rmt_kd/stage_{index}/{key}": value for key, value in record.items() if _is_number(value)})
            if record["status"] != "accepted":
                if record["status"].startswith("rolled back"):
                    break
                continue
            if self._target_met(record, history) or self._accepted_stages(history) == args.max_stages:
                break
        self.teacher_model = None
        history["final"] = {"num_parameters": count_parameters(self.model), "widths": surgery.widths(self.model)}
        history["final"]["weights_mb"] = _weights_mb(self.model)
        if args.measure_latency and next(self.model.parameters()).device.type == "cpu":
            history["latency"] = self._latency_comparison(teacher)
        self.compression_history = history
        self._save_final(history)
        return self.model

    def _check_inputs(self) -> None:
        """Fail before any work on inputs that would break a stage hours later."""
        output_dir = self.args.output_dir
        try:
            os.makedirs(output_dir, exist_ok=True)
            with tempfile.TemporaryFile(dir=output_dir):
                pass
        except OSError as error:
            raise PermissionError(
                f"Cannot write into output_dir={output_dir!r} ({error}); choose a writable one."
            ) from None
        vocab_size = getattr(self.model.config, "vocab_size", None)
        tokenizer_size = len(self.processing_class) if hasattr(self.processing_class, "__len__") else None
        if vocab_size is not None and tokenizer_size is not None and tokenizer_size > vocab_size:
            raise ValueError(
                f"The tokenizer has {tokenizer_size} tokens but the model's embeddings only {vocab_size}: this is not "
                "the model's tokenizer. Pass the tokenizer saved with the teacher."
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

    def _start_history(self, teacher: nn.Module) -> dict:
        args = self.args
        teacher_metric = self._validation_metric()
        history = {
            "teacher": {
                "num_parameters": count_parameters(teacher),
                f"eval_{args.compression_metric}": teacher_metric,
            },
            "config": {
                key: getattr(args, key)
                for key in (
                    "sigma_quantile",
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
                )
            },
            "stages": [],
        }
        if args.target_latency_ratio is not None:
            history["teacher"]["cpu_latency_seconds"] = self._latency(teacher)
        return history

    def _calibration_dataloader(self, history: dict):
        args = self.args
        size = max(1, round(args.calibration_fraction * len(self.train_dataset)))
        if args.calibration_max_samples is not None:
            size = min(size, args.calibration_max_samples)
        rows, digest = calibration_rows(len(self.train_dataset), size, args.seed)
        history["calibration"] = {"num_rows": len(rows), "row_ids_sha256": digest}
        if hasattr(self.train_dataset, "select"):
            subset = self.train_dataset.select(rows)
        else:
            subset = torch.utils.data.Subset(self.train_dataset, rows)
        return self.get_eval_dataloader(subset)

    def _stages(self, surgery) -> list[list[str] | None]:
        if self.args.compression_schedule == "one_shot":
            return [None]
        stages = surgery.stages(self.model)
        return stages if self.args.stage_order == "shallow_to_deep" else stages[::-1]

    def _run_stage(self, surgery, calibration, index: int, stage_sites: list[str] | None, history: dict) -> dict:
        args = self.args
        start = time.perf_counter()
        previous = self.model.eval()
        taps = surgery.taps(previous)
        accumulators = collect_covariances(previous, calibration, taps, progress=not args.disable_tqdm)
        analyses = analyse_sites(surgery.sites(previous, accumulators), args.sigma_quantile, args.mp_refine)
        stage_names = list(analyses) if stage_sites is None else stage_sites
        analyses, quantile = self._plan_stage(surgery, previous, analyses, stage_names, history, index)
        record = _stage_record(index, stage_names, quantile, analyses)
        self._stage_spectra[index] = spectra_record(analyses, stage_names)
        if all(analyses[name].kept_width == analyses[name].site.dim for name in stage_names):
            record.update(status="skipped: nothing above λ+ left to cut", seconds=time.perf_counter() - start)
            return record
        candidate = surgery.apply(previous, analyses)
        self._distil(candidate, previous)
        metric = self._validation_metric()
        floor = history["teacher"][f"eval_{args.compression_metric}"] - args.max_metric_drop
        record.update(num_parameters=count_parameters(candidate), **{f"eval_{args.compression_metric}": metric})
        record["parameter_ratio"] = record["num_parameters"] / history["teacher"]["num_parameters"]
        if args.target_latency_ratio is not None:
            record["latency_ratio"] = self._latency(candidate) / history["teacher"]["cpu_latency_seconds"]
        if metric < floor:
            self.model = self.model_wrapped = previous
            record["status"] = f"rolled back: {args.compression_metric} {metric:.4f} < floor {floor:.4f}"
        else:
            record["status"] = "accepted"
        record["seconds"] = time.perf_counter() - start
        logger.info("RMT-KD stage %d: %s", index, record["status"])
        return record

    def _plan_stage(self, surgery, model, analyses, stage_names, history, index):
        """Widths for this stage's sites (the others keep every direction) and the quantile used."""
        args = self.args
        fixed = {name: analysis.site.dim for name, analysis in analyses.items() if name not in stage_names}

        def planned(candidate_analyses):
            plan_widths(candidate_analyses, kept_widths=fixed, min_width=args.min_width)
            return candidate_analyses

        if args.target_parameter_ratio is None or not args.budget_search:
            return planned(analyses), args.sigma_quantile
        target = self._stage_parameter_target(model, history, index)

        def parameters_at(quantile: float) -> tuple[int, dict[str, SiteAnalysis]]:
            candidate = planned(refit_sites(analyses, quantile, args.mp_refine))
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

    def _stage_parameter_target(self, model, history, index) -> float:
        """Spread the remaining cut evenly over the remaining stages."""
        target = self.args.target_parameter_ratio * history["teacher"]["num_parameters"]
        remaining_stages = len(self._stages(get_surgery(model))) - index
        current = count_parameters(model)
        return current - (current - target) / max(remaining_stages, 1)

    def _distil(self, candidate: nn.Module, previous: nn.Module) -> None:
        """Fine-tune ``candidate`` for ``stage_max_steps`` with distillation from the frozen ``previous``."""
        self.teacher_model = previous.eval().requires_grad_(False)
        self.model = self.model_wrapped = candidate
        if self.args.stage_max_steps == 0:
            return
        self.optimizer, self.lr_scheduler = None, None
        full_max_steps, self.args.max_steps = self.args.max_steps, self.args.stage_max_steps
        try:
            self.train()
        finally:
            self.args.max_steps = full_max_steps
            self.teacher_model.requires_grad_(True)

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

    @staticmethod
    def _accepted_stages(history: dict) -> int:
        return sum(stage["status"] == "accepted" for stage in history["stages"])

    def _save_final(self, history: dict) -> None:
        if not self.is_world_process_zero():
            return
        output_dir = self.args.output_dir
        save_compressed(self.model, output_dir, self.processing_class, merge_into_existing=True)
        with open(os.path.join(output_dir, HISTORY_FILENAME), "w") as file:
            json.dump(history, file, indent=2)
        accepted = {stage["stage"] for stage in history["stages"] if stage["status"] == "accepted"}
        with open(os.path.join(output_dir, SPECTRA_FILENAME), "w") as file:
            json.dump({str(index): self._stage_spectra[index] for index in sorted(accepted)}, file)

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


def _provenance(teacher: nn.Module) -> dict:
    from .hub import run_provenance

    return run_provenance(teacher)


def _weights_mb(model: nn.Module) -> float:
    from .hub import weights_megabytes

    return weights_megabytes(model)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _stage_record(index: int, stage_names: list[str], quantile: float, analyses: Mapping[str, SiteAnalysis]) -> dict:
    return {
        "stage": index,
        "sigma_quantile": quantile,
        "sites": {
            name: {
                "dim": analyses[name].site.dim,
                "num_samples": analyses[name].site.num_samples,
                "kept_width": analyses[name].kept_width,
                "sigma2": analyses[name].fit.sigma2,
                "lambda_plus": analyses[name].fit.lambda_plus,
                "refined": analyses[name].fit.refined,
            }
            for name in stage_names
        },
    }


__all__ = ["HISTORY_FILENAME", "RMTKDTrainer", "distillation_loss"]
