"""One-shot RMT-KD compression without training: calibrate → analyse → plan → apply."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from .calibration import collect_covariances
from .planning import BudgetSearch, mildest_quantile_within
from .spectral import MarchenkoPasturFit, eigendecompose, fit_marchenko_pastur
from .surgery import get_surgery
from .surgery.base import Site, SiteAnalysis, count_parameters, count_parameters_for_config

logger = logging.get_logger(__name__)


# quantiles stay this far inside (0, 1) once shifted: the MP fit needs some eigenvalues on either side
QUANTILE_MARGIN = 0.01


def site_quantile(kind: str, sigma_quantile: float, quantile_shifts: Mapping[str, float] | None = None) -> float:
    """The σ² quantile of a site of ``kind``: ``sigma_quantile`` plus that kind's shift, kept inside (0, 1)."""
    shifted = sigma_quantile + (quantile_shifts or {}).get(kind, 0.0)
    return min(max(shifted, QUANTILE_MARGIN), 1.0 - QUANTILE_MARGIN)


def analyse_sites(
    sites: Iterable[Site],
    sigma_quantile: float = 0.5,
    refine: bool = True,
    progress: bool = False,
    quantile_shifts: Mapping[str, float] | None = None,
) -> dict[str, SiteAnalysis]:
    """Eigendecompose every site's covariance and fit the Marchenko–Pastur bulk.

    ``quantile_shifts`` moves the σ² quantile of the sites of some kinds (e.g. ``{"ffn": 0.2}``: FFN sites fit at
    ``sigma_quantile + 0.2`` and keep fewer neurons), which shifts a parameter budget between kinds of site.
    """
    analyses = {}
    for site in logging.tqdm(list(sites), desc="Spectra", disable=not progress, leave=False):
        if site.num_samples < site.dim:
            logger.warning(
                "%s: %d calibration samples for %d dimensions (n < d): the spectrum is rank-deficient and the "
                "MP edge uncertain; use more calibration data.",
                site.name,
                site.num_samples,
                site.dim,
            )
        eigenvalues, eigenvectors = eigendecompose(site.covariance)
        fit = fit_site(site, eigenvalues, sigma_quantile, refine, quantile_shifts)
        analyses[site.name] = SiteAnalysis(site, eigenvalues, eigenvectors, fit)
    return analyses


def refit_sites(
    analyses: Mapping[str, SiteAnalysis],
    sigma_quantile: float,
    refine: bool = True,
    quantile_shifts: Mapping[str, float] | None = None,
) -> dict[str, SiteAnalysis]:
    """Fit the Marchenko–Pastur law again at another quantile, reusing the eigendecompositions."""
    return {
        name: SiteAnalysis(
            analysis.site,
            analysis.eigenvalues,
            analysis.eigenvectors,
            fit_site(analysis.site, analysis.eigenvalues, sigma_quantile, refine, quantile_shifts),
        )
        for name, analysis in analyses.items()
    }


def fit_site(
    site: Site,
    eigenvalues: np.ndarray,
    sigma_quantile: float,
    refine: bool,
    quantile_shifts: Mapping[str, float] | None,
) -> MarchenkoPasturFit:
    """The Marchenko–Pastur fit of one site's ``eigenvalues`` (shape ``(dim,)``) at its kind's quantile; a failed
    fit names the site."""
    quantile = site_quantile(site.kind, sigma_quantile, quantile_shifts)
    try:
        return fit_marchenko_pastur(eigenvalues, site.num_samples, sigma_quantile=quantile, refine=refine)
    except ValueError as error:
        raise ValueError(f"Cannot fit the Marchenko–Pastur law at {site.name}: {error}") from None


def randomize_directions(analyses: Mapping[str, SiteAnalysis], seed: int = 0) -> dict[str, SiteAnalysis]:
    """Ablation: the same widths and fits, but random orthonormal directions instead of the eigenvectors.

    Residual sites then keep a random k-dimensional subspace; neuron sites keep random neurons (pivoted QR on
    random directions), with the same least-squares compensation.
    """
    generator = np.random.default_rng(seed)
    randomized = {}
    for name, analysis in analyses.items():
        orthogonal, _ = np.linalg.qr(generator.standard_normal((analysis.site.dim, analysis.site.dim)))
        randomized[name] = SiteAnalysis(
            analysis.site, analysis.eigenvalues, orthogonal, analysis.fit, analysis.kept_width, dict(analysis.extra)
        )
    return randomized


def refuse_empty_sites(analyses: Mapping[str, SiteAnalysis], names: Iterable[str], min_width: int) -> None:
    """Raise a ``ValueError`` when a site of ``names`` has no eigenvalue above λ+ (k = 0) and ``min_width`` does
    not say which width to keep there instead (only ``min_width > 1`` does: 1 is the default, not a choice)."""
    if min_width > 1:
        return
    empty = [name for name in names if analyses[name].fit.num_kept == 0]
    if empty:
        fit = analyses[empty[0]].fit
        raise ValueError(
            f"No eigenvalue lies above the Marchenko–Pastur edge at {', '.join(empty)} (k = 0; at {empty[0]} "
            f"λ+ = {fit.lambda_plus:.4g}, largest eigenvalue {analyses[empty[0]].eigenvalues[0]:.4g}) with "
            f"sigma_quantile={fit.sigma_quantile}: lower sigma_quantile, or set min_width to the narrowest width "
            "you accept there."
        )


def plan_widths(
    analyses: Mapping[str, SiteAnalysis],
    kept_widths: Mapping[str, int] | None = None,
    keep_all: bool = False,
    min_width: int = 1,
) -> dict[str, int]:
    """Choose ``kept_width`` per site: the number of eigenvalues above λ+, unless overridden.

    Args:
        kept_widths: explicit widths for some sites (by site name, e.g. ``{"ffn.0": 512}``).
        keep_all: keep every direction (an exact re-expression; useful to check the surgery).
        min_width: floor for the RMT choice (never for explicit widths).

    Raises:
        ValueError: a site would keep 0 directions, or an explicit width is out of range / names no site.
    """
    kept_widths = dict(kept_widths or {})
    unknown = set(kept_widths) - set(analyses)
    if unknown:
        raise ValueError(f"kept_widths names unknown sites {sorted(unknown)}; sites are {list(analyses)}")
    plan = {}
    for name, analysis in analyses.items():
        dim = analysis.site.dim
        if name in kept_widths:
            width = int(kept_widths[name])
            if not 1 <= width <= dim:
                raise ValueError(f"kept_widths[{name!r}] = {width} is outside 1..{dim}")
        elif keep_all:
            width = dim
        else:
            width = analysis.fit.num_kept
            if width == 0 and min_width < 1:
                raise ValueError(
                    f"No eigenvalue at {name} lies above the Marchenko–Pastur edge λ+ = {analysis.fit.lambda_plus:.4g} "
                    f"(k = 0): lower sigma_quantile (now {analysis.fit.sigma_quantile}) or set min_width >= 1."
                )
            width = min(max(width, min_width), dim)
        analysis.kept_width = width
        plan[name] = width
    return plan


def plan_stage(
    analyses: dict[str, SiteAnalysis], stage_names: Iterable[str], min_width: int = 1
) -> dict[str, SiteAnalysis]:
    """``analyses`` with RMT widths planned for a stage's sites (``stage_names``); the other sites keep every
    direction."""
    stage_names = set(stage_names)
    fixed = {name: analysis.site.dim for name, analysis in analyses.items() if name not in stage_names}
    plan_widths(analyses, kept_widths=fixed, min_width=min_width)
    return analyses


def cuts_nothing(analyses: Mapping[str, SiteAnalysis], names: Iterable[str]) -> bool:
    """Whether every site of ``names`` keeps all its directions."""
    return all(analyses[name].kept_width == analyses[name].site.dim for name in names)


def plan_stage_for_budget(
    surgery,
    model: nn.Module,
    analyses: dict[str, SiteAnalysis],
    stage_names: list[str],
    target_parameters: float,
    mp_refine: bool,
    quantile_shifts: Mapping[str, float] | None = None,
    min_width: int = 1,
) -> BudgetSearch[dict[str, SiteAnalysis]]:
    """The mildest σ² quantile whose stage plan leaves ``model`` with at most ``target_parameters`` (counted from the
    compressed config, nothing is built), and that plan."""

    def parameters_at(quantile: float) -> tuple[int, dict[str, SiteAnalysis]]:
        plan = plan_stage(refit_sites(analyses, quantile, mp_refine, quantile_shifts), stage_names, min_width)
        widths = {name: analysis.kept_width for name, analysis in plan.items()}
        return count_parameters_for_config(type(model), surgery.compressed_config(model, widths)), plan

    return mildest_quantile_within(parameters_at, target_parameters)


@dataclass
class CompressionReport:
    """What one compression did, per site: d, n, σ², λ±, k and the eigenvalues.

    ``analyses`` (eigenvectors included) stays in memory only; ``to_dict`` is JSON-friendly.
    """

    architecture: str
    sigma_quantile: float
    refine: bool
    num_parameters_before: int
    num_parameters_after: int
    calibration_samples: int  # tokens (or pixels) seen at the busiest site, padding excluded
    timings: dict[str, float]
    analyses: dict[str, SiteAnalysis] = field(repr=False)

    @property
    def kept_widths(self) -> dict[str, int]:
        return {name: analysis.kept_width for name, analysis in self.analyses.items()}

    @property
    def parameter_reduction(self) -> float:
        return 1.0 - self.num_parameters_after / self.num_parameters_before

    def site_records(self, include_eigenvalues: bool = True) -> list[dict]:
        records = []
        for name, analysis in self.analyses.items():
            record = {
                "site": name,
                "kind": analysis.site.kind,
                "dim": analysis.site.dim,
                "num_samples": analysis.site.num_samples,
                "kept_width": analysis.kept_width,
                **{key: value for key, value in analysis.fit.to_dict().items() if key not in ("dim", "num_samples")},
            }
            if include_eigenvalues:
                record["eigenvalues"] = [float(value) for value in analysis.eigenvalues]
            records.append(record)
        return records

    def to_dict(self, include_eigenvalues: bool = True) -> dict:
        return {
            "architecture": self.architecture,
            "sigma_quantile": self.sigma_quantile,
            "refine": self.refine,
            "num_parameters_before": self.num_parameters_before,
            "num_parameters_after": self.num_parameters_after,
            "parameter_reduction": self.parameter_reduction,
            "calibration_samples": self.calibration_samples,
            "timings": self.timings,
            "sites": self.site_records(include_eigenvalues),
        }

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as file:
            json.dump(self.to_dict(), file, indent=2)


def _check_compression_arguments(
    sigma_quantile: float, min_width: int, max_batches: int | None, quantile_shifts: Mapping[str, float] | None
) -> None:
    """A ``ValueError`` naming the first argument of ``compress_model`` out of its range."""
    if not 0.0 < sigma_quantile < 1.0:  # also refuses NaN
        raise ValueError(f"sigma_quantile must be in (0, 1), got {sigma_quantile!r}")
    if isinstance(min_width, bool) or not isinstance(min_width, int) or min_width < 0:  # 0: a site may lose all
        raise ValueError(f"min_width must be an integer >= 0, got {min_width!r}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches!r}")
    for kind, shift in (quantile_shifts or {}).items():
        if not -1.0 < shift < 1.0:
            raise ValueError(f"quantile_shifts[{kind!r}] must be in (-1, 1), got {shift!r}")


def compress_model(
    model: nn.Module,
    calibration_dataloader: Iterable[Mapping[str, torch.Tensor]],
    sigma_quantile: float = 0.5,
    refine: bool = True,
    *,
    kept_widths: Mapping[str, int] | None = None,
    keep_all: bool = False,
    min_width: int = 1,
    max_batches: int | None = None,
    progress: bool = True,
    surgery_options: Mapping[str, object] | None = None,
    quantile_shifts: Mapping[str, float] | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """Compress ``model`` once with RMT-KD, without training.

    Calibrates activation covariances at every site over ``calibration_dataloader`` (padding masked), fits the
    Marchenko–Pastur bulk with σ² initialised at the ``sigma_quantile`` eigenvalue quantile (optionally refined),
    keeps the directions above λ+, and rewrites the weights.

    Args:
        model: a supported teacher (``BertModel``, ``BertForSequenceClassification``, ``...TokenClassification``,
            ``...QuestionAnswering``) or an already compressed ``RMTBert*`` model.
        calibration_dataloader: batches as the model's ``forward`` takes them (dicts of tensors).
        sigma_quantile: eigenvalue quantile that initialises σ²; higher keeps fewer directions.
        refine: refine σ² by a robust fit of the MP bulk.
        kept_widths, keep_all, min_width: see ``plan_widths``.
        max_batches: use at most this many calibration batches.
        surgery_options: passed to the architecture's surgery (BERT: ``reduce_attention_heads=False``,
            ``factorize_word_embeddings=False``, ``width_multiple=1``).
        quantile_shifts: added to ``sigma_quantile`` at the sites of a kind (see ``analyse_sites``).

    Returns:
        ``(compressed_model, report)``; ``compressed_model`` is an ``RMTBert*`` model of the matching head.
    """
    _check_compression_arguments(sigma_quantile, min_width, max_batches, quantile_shifts)
    surgery = get_surgery(model, **(surgery_options or {}))
    start = time.perf_counter()
    prepared = surgery.prepare(model)
    accumulators = collect_covariances(prepared, calibration_dataloader, surgery.taps(prepared), max_batches, progress)
    calibrated = time.perf_counter()
    sites = surgery.sites(prepared, accumulators)
    analyses = analyse_sites(sites, sigma_quantile, refine, progress, quantile_shifts)
    analysed = time.perf_counter()
    plan_widths(analyses, kept_widths, keep_all, min_width)
    if not keep_all:
        refuse_empty_sites(analyses, [name for name in analyses if name not in (kept_widths or {})], min_width)
    compressed = surgery.apply(prepared, analyses)
    applied = time.perf_counter()
    report = CompressionReport(
        architecture=surgery.name,
        sigma_quantile=sigma_quantile,
        refine=refine,
        num_parameters_before=count_parameters(model),
        num_parameters_after=count_parameters(compressed),
        calibration_samples=max(accumulator.num_samples for accumulator in accumulators.values()),
        timings={
            "calibration_seconds": calibrated - start,
            "eigendecomposition_and_fit_seconds": analysed - calibrated,
            "apply_seconds": applied - analysed,
        },
        analyses=analyses,
    )
    logger.info(
        "RMT-KD: %d -> %d parameters (%.1f%% fewer)",
        report.num_parameters_before,
        report.num_parameters_after,
        100 * report.parameter_reduction,
    )
    return compressed, report


def format_widths_table(report: CompressionReport) -> str:
    """A plain-text table of the per-site widths d -> k with σ² and λ+."""
    lines = [f"{'site':<14}{'kind':<10}{'d':>6}{'n':>9}{'k':>6}{'sigma2':>12}{'lambda+':>12}"]
    for record in report.site_records(include_eigenvalues=False):
        lines.append(
            f"{record['site']:<14}{record['kind']:<10}{record['dim']:>6}{record['num_samples']:>9}"
            f"{record['kept_width']:>6}{record['sigma2']:>12.4g}{record['lambda_plus']:>12.4g}"
        )
    return "\n".join(lines)


__all__ = [
    "CompressionReport",
    "analyse_sites",
    "randomize_directions",
    "refit_sites",
    "compress_model",
    "format_widths_table",
    "plan_widths",
]
