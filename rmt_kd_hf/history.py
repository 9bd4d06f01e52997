"""The record of one compression run (``rmt_kd_history.json``) as typed data.

``RMTKDTrainer.compress()`` builds a :class:`RunHistory`, writes it with :meth:`RunHistory.to_dict`, and the model card
reads it back with :meth:`RunHistory.from_dict`, so a field renamed here is renamed for both. The JSON layout is the
one earlier versions wrote: a stage's ``status`` is ``"accepted"``, ``"rolled back: <reason>"`` or
``"skipped: <reason>"``; metrics are stored under ``eval_<compression_metric>``. Keys this version does not know are
kept in ``extra`` and written back unchanged, so a history from a newer version survives a round trip.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .filenames import HISTORY_FILENAME


class StageStatus(str, enum.Enum):
    """What became of a stage (or of one try of it)."""

    ACCEPTED = "accepted"  # kept: at or above the floor
    ROLLED_BACK = "rolled back"  # below the floor or not finite: the model before the stage is kept
    SKIPPED = "skipped"  # nothing above λ+ left to cut


def _status_text(status: StageStatus, reason: str) -> str:
    return f"{status.value}: {reason}" if reason else status.value


def _parse_status(text: str) -> tuple[StageStatus, str]:
    for status in StageStatus:
        if text == status.value:
            return status, ""
        if text.startswith(f"{status.value}: "):
            return status, text[len(status.value) + 2 :]
    raise ValueError(f"Unknown stage status {text!r} in {HISTORY_FILENAME}.")


def _split(data: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in known}


@dataclass
class CutOutcome:
    """What one cut gave after distillation: its size, validation metric and verdict."""

    status: StageStatus
    reason: str = ""
    num_parameters: int | None = None
    metric: float | None = None  # the validation ``compression_metric``
    parameter_ratio: float | None = None  # num_parameters / the teacher's
    latency_ratio: float | None = None  # CPU latency / the teacher's (with a latency target)
    # standard error of (this metric - the teacher's), paired on the same validation rows (accuracy only)
    paired_standard_error: float | None = None
    screened_metric: float | None = None  # the metric at the screening evaluation (``screening_fraction``)
    kept_step: int | None = None  # with load_best_model_at_end: the step whose weights were kept
    seconds: float | None = None

    @property
    def accepted(self) -> bool:
        return self.status is StageStatus.ACCEPTED

    def _fields_to_dict(self, metric_name: str) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        for key, value in (
            ("num_parameters", self.num_parameters),
            (f"eval_{metric_name}", self.metric),
            ("paired_standard_error", self.paired_standard_error),
            (f"screened_eval_{metric_name}", self.screened_metric),
            ("kept_step", self.kept_step),
            ("parameter_ratio", self.parameter_ratio),
            ("latency_ratio", self.latency_ratio),
        ):
            if value is not None:
                payload[key] = value
        payload["status"] = _status_text(self.status, self.reason)
        if self.seconds is not None:
            payload["seconds"] = self.seconds
        return payload

    @classmethod
    def _fields_from_dict(cls, data: Mapping[str, Any], metric_name: str) -> dict[str, Any]:
        status, reason = _parse_status(data["status"])
        return {
            "status": status,
            "reason": reason,
            "num_parameters": data.get("num_parameters"),
            "metric": data.get(f"eval_{metric_name}"),
            "parameter_ratio": data.get("parameter_ratio"),
            "latency_ratio": data.get("latency_ratio"),
            "paired_standard_error": data.get("paired_standard_error"),
            "screened_metric": data.get(f"screened_eval_{metric_name}"),
            "kept_step": data.get("kept_step"),
            "seconds": data.get("seconds"),
        }

    @classmethod
    def _known(cls, metric_name: str) -> set[str]:
        """The keys ``_fields_from_dict`` reads."""
        return cls._KNOWN | {f"eval_{metric_name}", f"screened_eval_{metric_name}"}

    _KNOWN = {
        "status",
        "num_parameters",
        "parameter_ratio",
        "latency_ratio",
        "paired_standard_error",
        "kept_step",
        "seconds",
    }


@dataclass
class StageTry(CutOutcome):
    """One cut tried for a stage, at ``sigma_quantile``."""

    sigma_quantile: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, metric_name: str) -> dict[str, Any]:
        return {"sigma_quantile": self.sigma_quantile, **self._fields_to_dict(metric_name), **self.extra}

    @classmethod
    def from_outcome(cls, sigma_quantile: float, outcome: CutOutcome) -> StageTry:
        """The try at ``sigma_quantile`` that gave ``outcome`` (its kept step is the stage's, not recorded here)."""
        fields = {item.name: getattr(outcome, item.name) for item in dataclasses.fields(CutOutcome)}
        return cls(**{**fields, "kept_step": None}, sigma_quantile=sigma_quantile)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], metric_name: str) -> StageTry:
        known = cls._known(metric_name) | {"sigma_quantile"}
        return cls(
            sigma_quantile=data["sigma_quantile"],
            **cls._fields_from_dict(data, metric_name),
            extra=_split(data, known),
        )


@dataclass
class SiteRecord:
    """One site of a stage: its width, the calibration rows and the Marchenko–Pastur fit that chose ``kept_width``."""

    dim: int
    num_samples: int
    kept_width: int
    sigma_quantile: float
    sigma2: float
    lambda_plus: float
    refined: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_analysis(cls, analysis) -> SiteRecord:
        """From a ``surgery.base.SiteAnalysis`` (its site, MP fit and planned width)."""
        fit = analysis.fit
        return cls(
            dim=analysis.site.dim,
            num_samples=analysis.site.num_samples,
            kept_width=analysis.kept_width,
            sigma_quantile=fit.sigma_quantile,
            sigma2=fit.sigma2,
            lambda_plus=fit.lambda_plus,
            refined=fit.refined,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteRecord:
        return cls(**{item.name: data[item.name] for item in dataclasses.fields(cls)})


@dataclass
class StageRecord(CutOutcome):
    """One stage: the sites it cut, the cut it kept (or why none) and every try."""

    stage: int = 0
    sigma_quantile: float = 0.0
    sites: dict[str, SiteRecord] = field(default_factory=dict)
    tries: list[StageTry] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, metric_name: str) -> dict[str, Any]:
        payload = {
            "stage": self.stage,
            "sigma_quantile": self.sigma_quantile,
            "sites": {name: site.to_dict() for name, site in self.sites.items()},
            **self._fields_to_dict(metric_name),
        }
        if self.tries:
            payload["tries"] = [entry.to_dict(metric_name) for entry in self.tries]
        return {**payload, **self.extra}

    @classmethod
    def from_cut(
        cls, stage: int, sigma_quantile: float, analyses: Mapping[str, Any], names: list[str], outcome: CutOutcome
    ) -> StageRecord:
        """Stage ``stage`` cut at ``sigma_quantile``: the sites ``names`` of ``analyses`` (``SiteAnalysis`` by name)
        and what the cut gave."""
        fields = {item.name: getattr(outcome, item.name) for item in dataclasses.fields(CutOutcome)}
        sites = {name: SiteRecord.from_analysis(analyses[name]) for name in names}
        return cls(**fields, stage=stage, sigma_quantile=sigma_quantile, sites=sites)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], metric_name: str) -> StageRecord:
        known = cls._known(metric_name) | {"stage", "sigma_quantile", "sites", "tries"}
        return cls(
            stage=data["stage"],
            sigma_quantile=data["sigma_quantile"],
            sites={name: SiteRecord.from_dict(site) for name, site in data["sites"].items()},
            tries=[StageTry.from_dict(entry, metric_name) for entry in data.get("tries", [])],
            **cls._fields_from_dict(data, metric_name),
            extra=_split(data, known),
        )


@dataclass
class TeacherRecord:
    """The model the run started from, as scored on the validation set before any cut."""

    num_parameters: int
    metric: float
    fingerprint: str | None = None  # SHA-256 of the weights (``model_fingerprint``): resume checks it
    cpu_latency_seconds: float | None = None  # measured when the run has a latency target
    # (validation rows,) bool: which rows the teacher classified correctly (accuracy only), for paired comparisons
    validation_correct: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, metric_name: str) -> dict[str, Any]:
        payload: dict[str, Any] = {"num_parameters": self.num_parameters, f"eval_{metric_name}": self.metric}
        if self.cpu_latency_seconds is not None:
            payload["cpu_latency_seconds"] = self.cpu_latency_seconds
        if self.fingerprint is not None:
            payload["fingerprint"] = self.fingerprint
        if self.validation_correct is not None:
            payload["validation_correct"] = pack_rows(self.validation_correct)
        return {**payload, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], metric_name: str) -> TeacherRecord:
        known = {"num_parameters", f"eval_{metric_name}", "fingerprint", "cpu_latency_seconds", "validation_correct"}
        packed = data.get("validation_correct")
        return cls(
            num_parameters=data["num_parameters"],
            metric=data[f"eval_{metric_name}"],
            fingerprint=data.get("fingerprint"),
            cpu_latency_seconds=data.get("cpu_latency_seconds"),
            validation_correct=None if packed is None else unpack_rows(packed),
            extra=_split(data, known),
        )


def pack_rows(rows: np.ndarray) -> dict[str, Any]:
    """A (rows,) bool array as ``{"num_rows", "bits"}`` (``bits``: base64 of the packed bits), for JSON."""
    rows = np.asarray(rows, dtype=bool)
    return {"num_rows": int(rows.size), "bits": base64.b64encode(np.packbits(rows)).decode("ascii")}


def unpack_rows(packed: Mapping[str, Any]) -> np.ndarray:
    """The inverse of :func:`pack_rows`."""
    bits = np.frombuffer(base64.b64decode(packed["bits"]), dtype=np.uint8)
    return np.unpackbits(bits, count=packed["num_rows"]).astype(bool)


@dataclass
class FinalRecord:
    """The model the run saved."""

    num_parameters: int
    widths: dict[str, Any]
    weights_mb: float | None = None
    metric: float | None = None  # the saved folder's validation metric, where the run scored it (``rmt-kd``)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, metric_name: str) -> dict[str, Any]:
        payload: dict[str, Any] = {"num_parameters": self.num_parameters, "widths": self.widths}
        if self.weights_mb is not None:
            payload["weights_mb"] = self.weights_mb
        if self.metric is not None:
            payload[f"eval_{metric_name}"] = self.metric
        return {**payload, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], metric_name: str) -> FinalRecord:
        known = {"num_parameters", "widths", "weights_mb", f"eval_{metric_name}"}
        return cls(
            num_parameters=data["num_parameters"],
            widths=data.get("widths", {}),
            weights_mb=data.get("weights_mb"),
            metric=data.get(f"eval_{metric_name}"),
            extra=_split(data, known),
        )


@dataclass
class RunHistory:
    """Everything ``compress()`` records: the teacher, the settings, every stage, and the saved model.

    ``config`` holds the settings a resumed run must share (``RESUME_INVARIANTS``, defaults resolved); ``provenance``
    the command line, the teacher's name and the library versions; ``calibration`` the number of calibration rows and
    the SHA-256 of their ids; ``vocabulary`` the teacher's and the kept vocabulary sizes; ``latency`` the CPU latency
    of teacher and compressed model per batch size; ``test`` the ``compression_metric`` of teacher and saved model on a
    labelled test split, where the run scored one (``rmt-kd compress --do_predict``).
    """

    teacher: TeacherRecord
    config: dict[str, Any]
    stages: list[StageRecord] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    vocabulary: dict[str, Any] | None = None
    final: FinalRecord | None = None
    latency: dict[str, Any] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metric_name(self) -> str:
        return self.config.get("compression_metric", "accuracy")

    @property
    def accepted_stages(self) -> list[StageRecord]:
        return [stage for stage in self.stages if stage.accepted]

    @property
    def floor(self) -> float:
        """The validation metric a cut must keep: the teacher's less ``target_metric_drop`` or ``max_metric_drop``."""
        drop = self.config.get("target_metric_drop")
        return self.teacher.metric - (self.config.get("max_metric_drop", 0.0) if drop is None else drop)

    def final_metric(self) -> float:
        """The compressed model's validation metric: the saved folder's where the run scored it, otherwise the last
        accepted stage's, or the teacher's if no stage was accepted."""
        if self.final is not None and self.final.metric is not None:
            return float(self.final.metric)
        accepted = self.accepted_stages
        return float(accepted[-1].metric if accepted else self.teacher.metric)

    def to_dict(self) -> dict[str, Any]:
        metric = self.metric_name
        payload: dict[str, Any] = {
            "teacher": self.teacher.to_dict(metric),
            "config": self.config,
            "stages": [stage.to_dict(metric) for stage in self.stages],
        }
        if self.provenance:
            payload["provenance"] = self.provenance
        if self.calibration:
            payload["calibration"] = self.calibration
        if self.vocabulary is not None:
            payload["vocabulary"] = self.vocabulary
        if self.final is not None:
            payload["final"] = self.final.to_dict(metric)
        if self.latency:
            payload["latency"] = self.latency
        if self.test:
            payload["test"] = self.test
        return {**payload, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunHistory:
        config = dict(data["config"])
        metric = config.get("compression_metric", "accuracy")
        known = {"teacher", "config", "stages", "provenance", "calibration", "vocabulary", "final", "latency", "test"}
        return cls(
            teacher=TeacherRecord.from_dict(data["teacher"], metric),
            config=config,
            stages=[StageRecord.from_dict(stage, metric) for stage in data.get("stages", [])],
            provenance=dict(data.get("provenance", {})),
            calibration=dict(data.get("calibration", {})),
            vocabulary=data.get("vocabulary"),
            final=FinalRecord.from_dict(data["final"], metric) if "final" in data else None,
            latency=dict(data.get("latency", {})),
            test=dict(data.get("test", {})),
            extra=_split(data, known),
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RunHistory:
        """The history of a compression run's output folder (or of a stage checkpoint)."""
        path = os.path.join(os.fspath(directory), HISTORY_FILENAME)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} does not exist: model cards are generated from the history that RMTKDTrainer.compress() "
                f"writes into its output_dir. Run compress() first (or point at that output_dir)."
            )
        try:
            with open(path) as file:
                return cls.from_dict(json.load(file))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a readable RMT-KD history ({type(error).__name__}: {error}).") from None


__all__ = ["CutOutcome", "FinalRecord", "RunHistory", "SiteRecord", "StageRecord", "StageStatus", "StageTry"]
