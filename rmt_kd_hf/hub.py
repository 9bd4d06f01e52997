"""Hub-native model cards for RMT-KD checkpoints, generated from the run's own history (no number typed by hand).

The card's metadata is a ``huggingface_hub.ModelCardData`` (``library_name``, ``base_model``, ``tags`` with
``rmt-kd``, ``datasets``, ``metrics``, ``model-index``); its body is ``templates/rmt_kd_model_card.md`` (also in
the repository's ``model_cards/``) rendered with jinja2 by ``ModelCard.from_template``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Mapping, Sequence
from importlib import resources
from importlib.metadata import version

import torch
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn
from transformers.utils import logging

from .checkpoint import move_files
from .filenames import PLOTS_DIRNAME, SPECTRA_FILENAME
from .history import CutOutcome, RunHistory
from .spectral_report import _pyplot, load_spectra, plot_overview, plot_site

logger = logging.get_logger(__name__)

MODEL_CARD_TEMPLATE = "rmt_kd_model_card.md"
TAGS = ("rmt-kd", "knowledge-distillation", "compression", "marchenko-pastur")
_TASKS = {  # architecture suffix -> (pipeline/task tag, Auto class)
    "ForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
    "ForTokenClassification": ("token-classification", "AutoModelForTokenClassification"),
    "ForQuestionAnswering": ("question-answering", "AutoModelForQuestionAnswering"),
    "ForImageClassification": ("image-classification", "AutoModelForImageClassification"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_card_template() -> str:
    """The jinja2 template shipped in the package (``rmt_kd_hf/templates/rmt_kd_model_card.md``)."""
    return resources.files("rmt_kd_hf").joinpath("templates", MODEL_CARD_TEMPLATE).read_text(encoding="utf-8")


def weights_megabytes(model: nn.Module) -> float:
    """Bytes of the model's parameter tensors / 10^6 (what safetensors stores, without its small header)."""
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters()) / 1e6


def run_provenance(teacher: nn.Module) -> dict:
    """What a card needs to say where a run came from: the command line, the teacher and library versions."""
    return {
        "command": shlex.join(["python", *sys.argv] if sys.argv and sys.argv[0].endswith(".py") else sys.argv),
        "teacher_name_or_path": getattr(getattr(teacher, "config", None), "_name_or_path", "") or "",
        "teacher_weights_mb": weights_megabytes(teacher),
        "versions": {
            "rmt_kd_hf": version("rmt-kd-hf"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }


def load_history(directory: str | os.PathLike) -> RunHistory:
    """``rmt_kd_history.json`` of a compression run, or a FileNotFoundError saying how to produce it."""
    return RunHistory.load(directory)


def as_history(history: RunHistory | Mapping) -> RunHistory:
    """``history`` as a :class:`~rmt_kd_hf.history.RunHistory` (parsed from its JSON form if need be)."""
    return history if isinstance(history, RunHistory) else RunHistory.from_dict(history)


def final_metric(history: RunHistory | Mapping) -> float:
    """The compressed model's validation metric (:meth:`RunHistory.final_metric`)."""
    return as_history(history).final_metric()


def _number(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}g}"


def _results_rows(
    history: RunHistory, measurements: Mapping[str, Sequence] | None, images: bool = False
) -> list[tuple[str, str, str]]:
    metric, teacher, final = history.metric_name, history.teacher, history.final
    rows = [
        (f"{metric} (validation)", f"{teacher.metric:.4f}", f"{history.final_metric():.4f}"),
        (
            "parameters",
            _number(teacher.num_parameters),
            f"{final.num_parameters} ({final.num_parameters / teacher.num_parameters:.1%})",
        ),
    ]
    if history.test:  # scored by rmt-kd compress --do_predict
        test = history.test
        rows.insert(1, (f"{metric} (test)", f"{test['teacher']:.4f}", f"{test['compressed']:.4f}"))
    if history.vocabulary:  # trimmed to the training set's tokens; the saved tokenizer matches
        vocabulary = history.vocabulary
        kept = _number(vocabulary["kept_size"])
        if vocabulary.get("undone"):
            kept = f"{_number(vocabulary['teacher_size'])} (a trim to {kept} was undone: {vocabulary['undone']})"
        elif f"eval_{metric}" in vocabulary:
            kept += f" ({metric} {vocabulary[f'eval_{metric}']:.4f} with the trim alone)"
        rows.append(("vocabulary (tokens)", _number(vocabulary["teacher_size"]), kept))
    teacher_mb = history.provenance.get("teacher_weights_mb")
    if teacher_mb is not None or final.weights_mb is not None:
        rows.append(("weights (MB)", _number(teacher_mb), _number(final.weights_mb)))
    if teacher.cpu_latency_seconds is not None:  # measured when the run had a latency target
        ratios = [stage.latency_ratio for stage in history.accepted_stages]
        compressed = teacher.cpu_latency_seconds * (ratios[-1] if ratios else 1.0)
        rows.append(("CPU latency (s)", _number(teacher.cpu_latency_seconds), _number(compressed)))
    latency = history.latency
    for batch_size in (1, 32):
        timing = latency.get(f"batch_{batch_size}")
        if timing:
            size = latency["sequence_length"]
            shape = f"{size}×{size} px images" if images else f"{size} tokens"
            name = f"CPU latency, batch {batch_size} × {shape} (ms)"
            rows.append((name, _number(1e3 * timing["teacher"]), _number(1e3 * timing["compressed"])))
    for name, (teacher_value, compressed_value) in (measurements or {}).items():
        rows.append((name, _number(teacher_value), _number(compressed_value)))
    return rows


def _stage_views(history: RunHistory) -> list[dict]:
    views = []
    for stage in history.stages:
        sites = [
            {
                "name": name,
                "dim": site.dim,
                "num_samples": site.num_samples,
                "kept_width": site.kept_width,
                "sigma2": _number(site.sigma2),
                "lambda_plus": _number(site.lambda_plus),
                "refined": "yes" if site.refined else "no",
            }
            for name, site in stage.sites.items()
        ]
        views.append(
            {
                "stage": stage.stage,
                "status": _status(stage),
                "sigma_quantile": _number(stage.sigma_quantile),
                "seconds": None if stage.seconds is None else f"{stage.seconds:.1f}",
                "kept_step": stage.kept_step,
                "sites": sites,
                "metric_change": _metric_change(stage, history),
                "tries": [
                    {"sigma_quantile": _number(entry.sigma_quantile), "result": _try_result(entry, history)}
                    for entry in stage.tries
                ],
            }
        )
    return views


PAIRED_NOTE = (
    " Below, ± is the standard error of a cut's change against the teacher, paired on the same validation rows: a cut"
    " within one standard error of the floor was judged on these rows, and another sample of rows could judge it"
    " the other way."
)


def _has_paired_errors(history: RunHistory) -> bool:
    return any(
        outcome.paired_standard_error is not None for stage in history.stages for outcome in (stage, *stage.tries)
    )


def _try_result(entry: CutOutcome, history: RunHistory) -> str:
    """A try's verdict, size and change against the teacher, as the card lists them."""
    parts = [_status(entry)]
    if entry.num_parameters is not None:
        parts.append(f"{entry.num_parameters:,} parameters")
    change = _metric_change(entry, history)
    if change:
        parts.append(change)
    return ", ".join(parts)


def _metric_change(outcome: CutOutcome, history: RunHistory) -> str:
    """``"accuracy -1.52 ± 0.65 pt against the teacher"`` (± the paired standard error, where recorded)."""
    if outcome.metric is None:
        return ""
    change = 100 * (outcome.metric - history.teacher.metric)
    spread = "" if outcome.paired_standard_error is None else f" ± {100 * outcome.paired_standard_error:.2f}"
    return f"{history.metric_name} {change:+.2f}{spread} pt against the teacher"


def _status(outcome: CutOutcome) -> str:
    return f"{outcome.status.value}: {outcome.reason}" if outcome.reason else outcome.status.value


def _task_of(architecture: str | None) -> tuple[str | None, str]:
    for suffix, (task, auto_class) in _TASKS.items():
        if architecture and architecture.endswith(suffix):
            return task, auto_class
    return None, "AutoModel"


def build_model_card(
    history: RunHistory | Mapping,
    *,
    model_name: str,
    repo_id: str | None = None,
    base_model: str | None = None,
    architecture: str | None = None,
    datasets: str | list[str] | None = None,
    dataset_name: str | None = None,
    license: str | None = None,  # noqa: A002 - the hub's field name
    language: str | list[str] | None = None,
    tags: Sequence[str] = (),
    overview_plot: str | None = None,
    has_spectra: bool = False,
    measurements: Mapping[str, Sequence] | None = None,
    template_str: str | None = None,
    processor_class: str | None = "AutoTokenizer",
) -> ModelCard:
    """The model card of one RMT-KD run.

    Args:
        history: the run's history (or the parsed ``rmt_kd_history.json``).
        model_name: title and ``model-index`` name; ``repo_id`` (default ``model_name``) goes in the loading code.
        base_model: the teacher's hub id; default: the teacher's ``name_or_path`` in the history, when it is a hub
            id (a local path is no valid ``base_model``).
        architecture: e.g. ``"RMTBertForSequenceClassification"`` (sets the task and the Auto class shown).
        datasets, dataset_name: the hub dataset id(s) and a readable name for the results.
        overview_plot: path of the spectra overview PNG relative to the card.
        measurements: extra results rows ``{name: (teacher, compressed)}`` measured outside the run.
        template_str: a jinja2 template of your own (default: :func:`model_card_template`; variables in
            ``model_cards/README.md``).
    """
    history = as_history(history)
    metric, provenance = history.metric_name, history.provenance
    if base_model is None:
        candidate = provenance.get("teacher_name_or_path", "")
        base_model = candidate if _HUB_ID.match(candidate) and not os.path.exists(candidate) else None
    task, auto_class = _task_of(architecture)
    dataset_ids = [datasets] if isinstance(datasets, str) else list(datasets or [])
    eval_results = None
    if task is not None:
        eval_results = [
            EvalResult(
                task_type=task,
                dataset_type=dataset_ids[0] if dataset_ids else "custom",
                dataset_name=dataset_name or (dataset_ids[0] if dataset_ids else "validation set"),
                dataset_split="validation",
                metric_type=metric,
                metric_name=metric,
                metric_value=history.final_metric(),
            )
        ]
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        library_name="transformers",
        license=license,
        language=language,
        pipeline_tag=task,
        tags=list(dict.fromkeys([*TAGS, *tags])),
        datasets=dataset_ids or None,
        metrics=[metric],
        eval_results=eval_results,
    )
    config, calibration = history.config, history.calibration
    settings = ", ".join(f"{key}={config[key]}" for key in sorted(config) if config[key] is not None)
    return ModelCard.from_template(
        card_data,
        template_str=template_str or model_card_template(),
        model_name=model_name,
        repo_id=repo_id or model_name,
        base_model=base_model,
        auto_class=auto_class,
        processor_class=processor_class,
        processor_name={"AutoImageProcessor": "image_processor", "AutoTokenizer": "tokenizer"}.get(processor_class),
        results_rows=_results_rows(history, measurements, images=task == "image-classification"),
        metric_note=f"The compressed {metric} is the last accepted stage's; parameters in parentheses are the "
        "fraction of the teacher's." + (PAIRED_NOTE if _has_paired_errors(history) else ""),
        stages=_stage_views(history),
        overview_plot=overview_plot,
        plots_dir=os.path.dirname(overview_plot) if overview_plot else None,
        has_spectra=has_spectra,
        calibration_rows=calibration.get("num_rows", "—"),
        calibration_sha256=calibration.get("row_ids_sha256", "not recorded"),
        settings=settings,
        command=provenance.get("command", "not recorded (history written before provenance was kept)"),
    )


def write_spectrum_plots(directory: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> str | None:
    """Render ``rmt_kd_spectra.json`` of ``directory`` into ``spectra/`` (per-site PNGs + overview) of
    ``output_dir`` (default: ``directory``).

    Returns:
        The overview's path relative to ``output_dir``, or None without spectra or without matplotlib.
    """
    directory = os.fspath(directory)
    output_dir = directory if output_dir is None else os.fspath(output_dir)
    if not os.path.exists(os.path.join(directory, SPECTRA_FILENAME)):
        return None
    try:
        pyplot = _pyplot()
    except ImportError as error:
        logger.warning("The model card gets no spectrum plots: %s", error)
        return None
    spectra = load_spectra(os.path.join(directory, SPECTRA_FILENAME))
    if not spectra:  # no stage was kept
        return None
    os.makedirs(os.path.join(output_dir, PLOTS_DIRNAME), exist_ok=True)
    for spectrum in spectra:
        plot_site(spectrum, os.path.join(output_dir, PLOTS_DIRNAME, f"{spectrum.group}_{spectrum.name}.png"), pyplot)
    overview = f"{PLOTS_DIRNAME}/overview.png"
    plot_overview(spectra, os.path.join(output_dir, overview), pyplot)
    return overview


def write_model_card(directory: str | os.PathLike, *, plots: bool = True, **card_kwargs) -> ModelCard:
    """Write ``README.md`` (and, with ``plots``, the spectrum PNGs) into a compression run's ``directory``.

    ``card_kwargs`` go to :func:`build_model_card`; ``model_name`` defaults to the directory's name and
    ``architecture`` to the one in its ``config.json``.
    """
    directory = os.fspath(directory)
    history = load_history(directory)
    card_kwargs.setdefault("model_name", os.path.basename(os.path.abspath(directory)))
    config_path = os.path.join(directory, "config.json")
    if "processor_class" not in card_kwargs:  # name only what was saved beside the weights
        saved = set(os.listdir(directory))
        card_kwargs["processor_class"] = (
            "AutoTokenizer"
            if "tokenizer_config.json" in saved
            else "AutoImageProcessor"
            if "preprocessor_config.json" in saved
            else None
        )
    if "architecture" not in card_kwargs and os.path.exists(config_path):
        with open(config_path) as file:
            card_kwargs["architecture"] = (json.load(file).get("architectures") or [None])[0]
    # all or nothing: the card and its plots are rendered aside, then moved in (a full disk leaves no half card)
    with tempfile.TemporaryDirectory(prefix=".model-card-", dir=directory) as staging:
        overview = write_spectrum_plots(directory, staging) if plots else None
        card = build_model_card(
            history,
            overview_plot=overview,
            has_spectra=os.path.exists(os.path.join(directory, SPECTRA_FILENAME)),
            **card_kwargs,
        )
        card.save(os.path.join(staging, "README.md"))
        move_files(staging, directory, last=("README.md",))
    return card


__all__ = [
    "MODEL_CARD_TEMPLATE",
    "TAGS",
    "as_history",
    "build_model_card",
    "final_metric",
    "load_history",
    "model_card_template",
    "run_provenance",
    "weights_megabytes",
    "write_model_card",
    "write_spectrum_plots",
]
