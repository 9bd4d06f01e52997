"""Spectral report: per-site eigenvalue histograms against the fitted Marchenko–Pastur law, outliers and fit quality.

Works on a compression's own records (``rmt_kd_spectra.json`` written by ``RMTKDTrainer.compress``, the
``rmt_kd_report.json`` of ``save_compressed``, or an in-memory ``CompressionReport``) and, as a preview of what
RMT-KD would keep, on any supported model with a calibration DataLoader (nothing is applied). PNGs need matplotlib
(the ``plots`` extra); the JSON does not.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from .calibration import collect_covariances
from .compression import CompressionReport, analyse_sites, plan_widths
from .filenames import REPORT_FILENAME, SPECTRA_FILENAME, SPECTRAL_REPORT_FILENAME
from .spectral import marchenko_pastur_cdf, marchenko_pastur_pdf
from .surgery import get_surgery
from .surgery.base import SiteAnalysis, count_parameters, count_parameters_for_config

logger = logging.get_logger(__name__)

POOR_FIT_KS_DISTANCE = 0.1  # above this KS distance the MP law does not describe the bulk (as in spectral.py)


@dataclass
class SiteSpectrum:
    """One site's spectrum and MP fit, as the report reads it.

    Attributes:
        group: where it comes from: ``"stage0"`` (a compression stage), ``"preview"`` or ``"report"``.
        name: the site, e.g. ``"boundary.3"``.
        eigenvalues: (dim,) eigenvalues of the site covariance, any order.
        num_samples: ``n`` of the aspect ratio ``q = dim / n``.
        sigma2, lambda_minus, lambda_plus: the fitted MP noise variance and bulk edges.
        bulk_ks_distance: KS distance between the eigenvalues ≤ λ+ and the MP law (None: computed here).
        kept_width: directions kept at this site (k), when known.
    """

    group: str
    name: str
    eigenvalues: np.ndarray
    num_samples: int
    sigma2: float
    lambda_minus: float
    lambda_plus: float
    bulk_ks_distance: float | None = None
    kept_width: int | None = None

    @property
    def aspect_ratio(self) -> float:
        return self.eigenvalues.size / self.num_samples

    @property
    def nonzero(self) -> np.ndarray:
        """Ascending eigenvalues without the numerical zeros of a rank-deficient covariance (as the fit drops)."""
        values = np.sort(np.clip(self.eigenvalues, 0.0, None))
        return values[values > values.max() * max(values.size, 1) * 1e-12]

    @property
    def outliers(self) -> np.ndarray:
        """Descending eigenvalues strictly above λ+ (the directions RMT-KD keeps)."""
        return np.sort(self.eigenvalues[self.eigenvalues > self.lambda_plus])[::-1]

    def ks_distance(self) -> float:
        if self.bulk_ks_distance is not None:
            return float(self.bulk_ks_distance)
        bulk = self.nonzero[self.nonzero <= self.lambda_plus]
        if bulk.size == 0:
            return 1.0
        model = marchenko_pastur_cdf(bulk, self.sigma2, self.aspect_ratio)
        steps = np.arange(bulk.size + 1) / bulk.size
        return float(max((steps[1:] - model).max(), (model - steps[:-1]).max()))


def spectra_record(analyses: Mapping[str, SiteAnalysis], names: Iterable[str] | None = None) -> dict[str, dict]:
    """JSON-friendly ``{site: {eigenvalues, sigma2, lambda_plus, lambda_minus, ...}}`` of ``analyses``."""
    names = list(analyses) if names is None else list(names)
    return {
        name: {
            "eigenvalues": [float(value) for value in analyses[name].eigenvalues],
            "num_samples": int(analyses[name].site.num_samples),
            "sigma2": float(analyses[name].fit.sigma2),
            "lambda_plus": float(analyses[name].fit.lambda_plus),
            "lambda_minus": float(analyses[name].fit.lambda_minus),
            "bulk_ks_distance": float(analyses[name].fit.bulk_ks_distance),
            "kept_width": int(analyses[name].kept_width),
        }
        for name in names
    }


def spectra_from_analyses(analyses: Mapping[str, SiteAnalysis], group: str) -> list[SiteSpectrum]:
    return _spectra_from_records(spectra_record(analyses), group)


def _spectra_from_records(records: Mapping[str, Mapping], group: str) -> list[SiteSpectrum]:
    return [
        SiteSpectrum(
            group=group,
            name=name,
            eigenvalues=np.asarray(record["eigenvalues"], dtype=np.float64),
            num_samples=int(record["num_samples"]),
            sigma2=float(record["sigma2"]),
            lambda_minus=float(record["lambda_minus"]),
            lambda_plus=float(record["lambda_plus"]),
            bulk_ks_distance=record.get("bulk_ks_distance"),
            kept_width=record.get("kept_width"),
        )
        for name, record in records.items()
    ]


def load_spectra(path: str | os.PathLike) -> list[SiteSpectrum]:
    """Spectra saved by a compression: a directory holding ``rmt_kd_spectra.json`` (trainer) or
    ``rmt_kd_report.json`` (``save_compressed`` with a report), or either file itself."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidates = [os.path.join(path, name) for name in (SPECTRA_FILENAME, REPORT_FILENAME)]
        found = [candidate for candidate in candidates if os.path.exists(candidate)]
        if not found:
            raise FileNotFoundError(
                f"No {SPECTRA_FILENAME} or {REPORT_FILENAME} in {path}: RMTKDTrainer.compress() writes the first, "
                "save_compressed(..., report=report) the second. For any other model, pass a calibration dataloader "
                "(CLI: --data FILE.csv) to preview its spectra."
            )
        path = found[0]
    with open(path) as file:
        payload = json.load(file)
    if "sites" in payload and isinstance(payload["sites"], list):  # CompressionReport.to_dict()
        if not payload["sites"] or "eigenvalues" not in payload["sites"][0]:
            raise ValueError(f"{path} holds no eigenvalues: save the report with include_eigenvalues=True.")
        return _spectra_from_records({record["site"]: record for record in payload["sites"]}, "report")
    return [
        spectrum
        for stage, records in sorted(payload.items(), key=lambda item: int(item[0]))
        for spectrum in _spectra_from_records(records, f"stage{stage}")
    ]


@torch.no_grad()
def preview_analyses(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    sigma_quantile: float = 0.5,
    refine: bool = True,
    max_batches: int | None = None,
) -> tuple[dict[str, SiteAnalysis], dict[str, int]]:
    """Calibrate and analyse ``model`` as ``compress_model`` would, without changing any weight.

    Returns:
        ``(analyses with kept_width planned, {"num_parameters": before, "num_parameters_if_compressed": after})``.
    """
    surgery = get_surgery(model)
    prepared = surgery.prepare(model)
    accumulators = collect_covariances(prepared, dataloader, surgery.taps(prepared), max_batches, False)
    analyses = analyse_sites(surgery.sites(prepared, accumulators), sigma_quantile, refine)
    widths = plan_widths(analyses)
    after = count_parameters_for_config(type(prepared), surgery.compressed_config(prepared, widths))
    return analyses, {"num_parameters": count_parameters(model), "num_parameters_if_compressed": after}


def spectral_report(
    source: nn.Module | CompressionReport | str | os.PathLike,
    dataloader: Iterable[Mapping[str, torch.Tensor]] | None = None,
    output_dir: str | os.PathLike = "rmt_kd_spectral_report",
    sigma_quantile: float = 0.5,
    refine: bool = True,
    max_batches: int | None = None,
    ks_warning_threshold: float = POOR_FIT_KS_DISTANCE,
    plots: bool = True,
) -> dict:
    """Write ``spectral_report.json`` and (with ``plots``) one PNG per site plus ``overview.png`` to ``output_dir``.

    Args:
        source: a model (with ``dataloader``: a preview of what RMT-KD would keep, nothing is applied), a
            ``CompressionReport``, or a saved compression (directory or JSON, see :func:`load_spectra`).
        dataloader: calibration batches as the model's ``forward`` takes them (models only).
        sigma_quantile, refine, max_batches: the MP fit and calibration of a preview, as in ``compress_model``.
        ks_warning_threshold: a site whose bulk KS distance exceeds this gets ``fit_quality = "poor"`` and a warning.

    Returns:
        The JSON payload: ``{"source", "ks_warning_threshold", "sites": [...], "preview"?}``; each site lists d, n,
        q, σ², λ±, k, the outliers (eigenvalues > λ+, descending), the KS distance, fit quality and its PNG.
    """
    payload: dict = {"ks_warning_threshold": ks_warning_threshold}
    if isinstance(source, nn.Module):
        if dataloader is None:
            raise ValueError("A model needs a calibration dataloader to preview its spectra (CLI: --data FILE.csv).")
        analyses, payload["preview"] = preview_analyses(source, dataloader, sigma_quantile, refine, max_batches)
        spectra, payload["source"] = spectra_from_analyses(analyses, "preview"), type(source).__name__
    elif isinstance(source, CompressionReport):
        spectra, payload["source"] = spectra_from_analyses(source.analyses, "report"), "CompressionReport"
    else:
        spectra, payload["source"] = load_spectra(source), os.fspath(source)
    os.makedirs(output_dir, exist_ok=True)
    payload["sites"] = [_site_summary(spectrum, ks_warning_threshold) for spectrum in spectra]
    if plots:
        pyplot = _pyplot()
        for spectrum, summary in zip(spectra, payload["sites"], strict=True):
            summary["plot"] = f"{spectrum.group}_{spectrum.name}.png"
            plot_site(spectrum, os.path.join(output_dir, summary["plot"]), pyplot)
        payload["overview_plot"] = "overview.png"
        plot_overview(spectra, os.path.join(output_dir, payload["overview_plot"]), pyplot)
    with open(os.path.join(output_dir, SPECTRAL_REPORT_FILENAME), "w") as file:
        json.dump(payload, file, indent=2)
    return payload


def _site_summary(spectrum: SiteSpectrum, ks_warning_threshold: float) -> dict:
    ks = spectrum.ks_distance()
    poor = ks > ks_warning_threshold
    if poor:
        logger.warning(
            "%s/%s: the Marchenko–Pastur law fits the bulk poorly (KS distance %.3f > %.3f); λ+ = %.4g is a rough "
            "noise edge here and the %d outliers above it are not all signal.",
            spectrum.group,
            spectrum.name,
            ks,
            ks_warning_threshold,
            spectrum.lambda_plus,
            spectrum.outliers.size,
        )
    return {
        "group": spectrum.group,
        "site": spectrum.name,
        "dim": int(spectrum.eigenvalues.size),
        "num_samples": spectrum.num_samples,
        "aspect_ratio": spectrum.aspect_ratio,
        "sigma2": spectrum.sigma2,
        "lambda_minus": spectrum.lambda_minus,
        "lambda_plus": spectrum.lambda_plus,
        "kept_width": spectrum.kept_width,
        "num_outliers": int(spectrum.outliers.size),
        "outliers": [float(value) for value in spectrum.outliers],
        "bulk_ks_distance": ks,
        "fit_quality": "poor" if poor else "good",
    }


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "Spectrum plots need matplotlib: `pip install rmt-kd-hf[plots]` (or pass plots=False for JSON only)."
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as pyplot

    return pyplot


def _draw_histogram(axis, spectrum: SiteSpectrum) -> None:
    """Eigenvalue density on [0, 2 λ+] against the MP density (both integrate to 1 over the non-zero values)."""
    values, upper = spectrum.nonzero, 2.0 * spectrum.lambda_plus
    shown = values[values <= upper]
    weights = np.full(shown.size, 1.0 / max(values.size, 1))
    bins = int(np.clip(math.sqrt(max(values.size, 1)) * 2, 10, 80))
    width = upper / bins
    axis.hist(shown, bins=bins, range=(0.0, upper), weights=weights / width, color="tab:blue", alpha=0.6, label="λ")
    grid = np.linspace(spectrum.lambda_minus, spectrum.lambda_plus, 400)
    axis.plot(grid, marchenko_pastur_pdf(grid, spectrum.sigma2, spectrum.aspect_ratio), color="black", label="MP")
    for edge, label in ((spectrum.lambda_minus, "λ−"), (spectrum.lambda_plus, "λ+")):
        axis.axvline(edge, color="tab:red", linestyle="--", linewidth=1)
        axis.annotate(label, (edge, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
    beyond = int((values > upper).sum())
    axis.set_xlabel("eigenvalue" + (f"  ({beyond} beyond 2λ+ not shown)" if beyond else ""))
    axis.set_ylabel("density")


def _draw_ranks(axis, spectrum: SiteSpectrum) -> None:
    """Eigenvalues by rank on a log scale, outliers (> λ+) in red."""
    values = np.sort(spectrum.nonzero)[::-1]
    ranks = np.arange(1, values.size + 1)
    outlier = values > spectrum.lambda_plus
    axis.semilogy(ranks[~outlier], values[~outlier], ".", color="tab:blue", markersize=3, label="bulk")
    axis.semilogy(ranks[outlier], values[outlier], ".", color="tab:red", markersize=4, label=f"{outlier.sum()} > λ+")
    axis.axhline(spectrum.lambda_plus, color="tab:red", linestyle="--", linewidth=1)
    axis.set_xlabel("rank")
    axis.legend(fontsize=8)


def plot_site(spectrum: SiteSpectrum, path: str | os.PathLike, pyplot=None) -> None:
    """One PNG: the eigenvalue histogram with the MP density and λ± (left), the ranked spectrum (right)."""
    pyplot = pyplot or _pyplot()
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(10, 3.6))
    _draw_histogram(left, spectrum)
    _draw_ranks(right, spectrum)
    figure.suptitle(
        f"{spectrum.group} / {spectrum.name}: d={spectrum.eigenvalues.size}, n={spectrum.num_samples}, "
        f"σ²={spectrum.sigma2:.3g}, λ+={spectrum.lambda_plus:.3g}, outliers={spectrum.outliers.size}, "
        f"KS={spectrum.ks_distance():.3f}",
        fontsize=10,
    )
    # fixed margins: tight_layout measured every text box and took 40% of the time of a plot
    figure.subplots_adjust(left=0.075, right=0.98, bottom=0.16, top=0.86, wspace=0.2)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def plot_overview(spectra: list[SiteSpectrum], path: str | os.PathLike, pyplot=None) -> None:
    """One PNG with a small histogram + MP density per site, in a grid."""
    pyplot = pyplot or _pyplot()
    columns = min(4, len(spectra))
    rows = math.ceil(len(spectra) / columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for axis, spectrum in zip(axes.flat, spectra, strict=False):
        _draw_histogram(axis, spectrum)
        axis.set_title(f"{spectrum.group}/{spectrum.name}: {spectrum.outliers.size} > λ+", fontsize=9, pad=14)
        axis.set_xlabel("")
        axis.set_ylabel("")
    for axis in list(axes.flat)[len(spectra) :]:
        axis.axis("off")
    width, height = 3.2 * columns, 2.6 * rows  # margins in inches (tight_layout took seconds on a large grid)
    figure.subplots_adjust(
        left=0.5 / width, right=1 - 0.1 / width, bottom=0.3 / height, top=1 - 0.45 / height, wspace=0.35, hspace=0.55
    )
    figure.savefig(path, dpi=80)
    pyplot.close(figure)


__all__ = [
    "POOR_FIT_KS_DISTANCE",
    "SPECTRAL_REPORT_FILENAME",
    "SPECTRA_FILENAME",
    "SiteSpectrum",
    "load_spectra",
    "plot_overview",
    "plot_site",
    "preview_analyses",
    "spectra_from_analyses",
    "spectra_record",
    "spectral_report",
]
