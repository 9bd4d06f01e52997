"""What every architecture family's surgery provides, and the shared linear algebra."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import scipy.linalg
import torch
from torch import nn

from ..calibration import ActivationTap
from ..spectral import CovarianceAccumulator, MarchenkoPasturFit

SiteKind = Literal["embedding", "residual", "ffn", "channels", "attention", "rank"]


@dataclass
class Site:
    """One place whose width RMT-KD chooses, with the statistics the choice is made from.

    Attributes:
        name: e.g. ``"boundary.3"`` or ``"ffn.1"``.
        kind: ``"residual"`` sites are rotated to an eigenbasis and truncated; ``"ffn"``/``"channels"`` sites
            keep a subset of neurons and compensate the next layer by least squares; ``"attention"`` sites keep
            per-head directions (``factors`` holds the maps); ``"rank"`` sites factor a matrix at a lower rank.
        covariance: (dim, dim) float64 matrix the eigenvalues come from.
        num_samples: the ``n`` of the Marchenko–Pastur aspect ratio ``dim / n``.
        mean: (dim,) float64 activation mean (neuron sites: least-squares intercept).
        factors: tensors the surgery computed with the statistics and needs again when it applies the widths.
    """

    name: str
    kind: SiteKind
    covariance: torch.Tensor
    num_samples: int
    mean: torch.Tensor | None = None
    factors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        return self.covariance.shape[0]


@dataclass
class SiteAnalysis:
    """Eigendecomposition and Marchenko–Pastur fit of one site."""

    site: Site
    eigenvalues: np.ndarray  # (dim,) descending
    eigenvectors: np.ndarray  # (dim, dim), column i belongs to eigenvalues[i]
    fit: MarchenkoPasturFit
    kept_width: int = 0
    extra: dict = field(default_factory=dict)

    def basis(self, width: int | None = None) -> np.ndarray:
        """(width, dim) orthonormal rows: the top-``width`` eigenvectors."""
        width = self.kept_width if width is None else width
        return self.eigenvectors[:, :width].T.copy()


class ArchitectureSurgery(Protocol):
    """The interface ``compress_model`` drives: calibrate → analyse → plan → apply."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """Return the model in the family's compressible form (an exact re-expression of ``model``)."""

    def taps(self, model: nn.Module) -> list[ActivationTap]:
        """Where calibration reads activations."""

    def sites(self, model: nn.Module, accumulators: dict[str, CovarianceAccumulator]) -> list[Site]:
        """Turn raw accumulators into the sites whose widths are chosen."""

    def apply(self, model: nn.Module, analyses: dict[str, SiteAnalysis]) -> nn.Module:
        """Build the compressed model from ``analyses[name].kept_width`` and the eigenvectors."""

    def compressed_config(self, model: nn.Module, widths: dict[str, int]):
        """The config ``apply`` would give ``model`` for these per-site widths (cheap: no weights)."""

    def stages(self, model: nn.Module) -> list[list[str]]:
        """Site names grouped into per-layer stages, shallow to deep."""

    def widths(self, model: nn.Module) -> dict:
        """The widths ``model`` (prepared or compressed) runs at, for histories and reports (JSON-able)."""

    def example_inputs(self, model: nn.Module, batch_size: int, size: int | None = None) -> dict[str, torch.Tensor]:
        """Random forward inputs for timing: ``size`` is the sequence length (text) or image side (vision);
        ``None`` or a value the model cannot take is replaced by the model's own limit."""


def select_neurons(analysis: SiteAnalysis, width: int) -> np.ndarray:
    """Indices (sorted, (width,)) of ``width`` neurons that best span the top-``width`` eigenvectors.

    Column-pivoted QR of the (width x dim) top eigenvector block picks the most linearly independent neurons.
    """
    if width >= analysis.site.dim:
        return np.arange(analysis.site.dim)
    _, _, pivots = scipy.linalg.qr(analysis.eigenvectors[:, :width].T, mode="economic", pivoting=True)
    return np.sort(pivots[:width])


def least_squares_compensation(
    covariance: np.ndarray, mean: np.ndarray, kept: np.ndarray, ridge: float = 1e-8
) -> tuple[np.ndarray, np.ndarray]:
    """Best affine reconstruction of all neurons from the kept ones: ``a ≈ C a[kept] + c0``.

    Args:
        covariance: (dim, dim) uncentred second moment E[a aᵀ].
        mean: (dim,) E[a].
        kept: (width,) indices of the kept neurons.
        ridge: relative Tikhonov term (times trace/width of the kept block); tiny so that exact cases stay exact.

    Returns:
        ``C`` (dim, width) and ``c0`` (dim,). Fold them into the next layer: ``W' = W C``, ``b' = b + W c0``.
    """
    dim, width = covariance.shape[0], len(kept)
    if width == dim:
        return np.eye(dim), np.zeros(dim)
    gram = np.empty((width + 1, width + 1))
    gram[:width, :width] = covariance[np.ix_(kept, kept)]
    gram[:width, width] = gram[width, :width] = mean[kept]
    gram[width, width] = 1.0
    gram[:width, :width] += np.eye(width) * ridge * max(np.trace(gram[:width, :width]) / width, 1e-30)
    cross = np.concatenate([covariance[:, kept], mean[:, None]], axis=1)  # (dim, width + 1)
    solution = scipy.linalg.solve(gram, cross.T, assume_a="pos").T
    return solution[:, :width], solution[:, width]


def random_token_inputs(config, batch_size: int, length: int) -> dict[str, torch.Tensor]:
    """Seeded random token ids (batch_size, length) from 1 to ``config.vocab_size`` with no padding token among them,
    and an all-ones mask: timing inputs for a text encoder."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, config.vocab_size, (batch_size, length), generator=generator)
    if config.pad_token_id is not None:  # no padding inside the timed rows
        input_ids[input_ids == config.pad_token_id] = (config.pad_token_id + 1) % config.vocab_size
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def trace_normalised(covariance: torch.Tensor) -> torch.Tensor:
    return covariance / covariance.trace().clamp_min(1e-300)


def embedding_site(pre_norm: CovarianceAccumulator, table: torch.Tensor) -> Site:
    """The ``"embeddings"`` site of a text encoder: the embedding LayerNorm's input over the calibration tokens plus
    the (vocab, width) float64 token ``table``'s rows (tokens the calibration set never shows still count), each
    normalised by its trace."""
    table_covariance = table.T @ table / table.shape[0]
    covariance = trace_normalised(pre_norm.covariance()) + trace_normalised(table_covariance)
    return Site("embeddings", "embedding", covariance, pre_norm.num_samples + table.shape[0])


def neuron_reduction(analysis: SiteAnalysis) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``analysis.kept_width`` neurons to keep (``select_neurons``; recorded in ``extra["kept_neurons"]``) and
    the float64 least-squares map ``C`` (dim, width) and intercept ``c0`` (dim,) that rebuild all of them from the
    kept ones (``least_squares_compensation``), for the dense that reads them (``write_reconstructed``)."""
    site = analysis.site
    kept = select_neurons(analysis, analysis.kept_width)
    mixing, intercept = least_squares_compensation(
        site.covariance.numpy(), site.mean.numpy(), kept, ridge=analysis.extra.get("ridge", 1e-8)
    )
    analysis.extra["kept_neurons"] = kept.tolist()
    return torch.from_numpy(kept), torch.from_numpy(mixing), torch.from_numpy(intercept)


class StateRewriter:
    """Applies new bases to a state dict in float64: the weights under ``prefix`` (a base model's, e.g. ``"bert."``) are
    read from ``state`` and the rewritten ones collected in ``self.state``."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str):
        self.source = state
        self.prefix = prefix
        self.state: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        return self.source[self.prefix + name].to(torch.float64)

    def has(self, name: str) -> bool:
        return self.prefix + name in self.source

    def set(self, name: str, value: torch.Tensor) -> None:
        self.state[self.prefix + name] = value

    def lifted_norm(self, name: str, basis_in: torch.Tensor, basis_out: torch.Tensor, norm_size: int) -> None:
        weight, mean_direction = self.get(f"{name}.weight"), self.get(f"{name}.mean_direction")
        if self.prefix + f"{name}.gain_direction" in self.source:  # format 1: fold the centring in
            weight = weight - torch.outer(self.get(f"{name}.gain_direction"), mean_direction) / norm_size
        self.set(f"{name}.weight", basis_out @ weight @ basis_in.T)
        self.set(f"{name}.mean_direction", basis_in @ mean_direction)
        self.set(f"{name}.bias", basis_out @ self.get(f"{name}.bias"))

    def read(self, name: str, basis_in: torch.Tensor) -> None:
        """A dense that reads the stream: ``W Q_inᵀ`` (its bias, if any, unchanged)."""
        self.set(f"{name}.weight", self.get(f"{name}.weight") @ basis_in.T)
        if self.has(f"{name}.bias"):
            self.set(f"{name}.bias", self.get(f"{name}.bias"))

    def write(self, name: str, basis_out: torch.Tensor, weight=None, bias=None) -> None:
        """A dense that writes the stream: ``Q_out W`` (and ``Q_out b``, when it has a bias)."""
        weight = self.get(f"{name}.weight") if weight is None else weight
        if bias is None and self.has(f"{name}.bias"):
            bias = self.get(f"{name}.bias")
        self.set(f"{name}.weight", basis_out @ weight)
        if bias is not None:
            self.set(f"{name}.bias", basis_out @ bias)

    def write_reconstructed(
        self, name: str, basis_out: torch.Tensor, mixing: torch.Tensor, intercept: torch.Tensor
    ) -> None:
        """A dense that reads kept neurons and writes the stream: ``Q_out W C`` and ``Q_out (b + W c0)``
        (``neuron_reduction``'s map); its bias must exist."""
        weight = self.get(f"{name}.weight")
        self.write(name, basis_out, weight=weight @ mixing, bias=self.get(f"{name}.bias") + weight @ intercept)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def count_parameters_for_config(model_class: type, config) -> int:
    """Parameters of ``model_class(config)``, built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return count_parameters(model_class(config))


__all__ = [
    "ArchitectureSurgery",
    "Site",
    "SiteAnalysis",
    "StateRewriter",
    "count_parameters",
    "count_parameters_for_config",
    "embedding_site",
    "least_squares_compensation",
    "neuron_reduction",
    "random_token_inputs",
    "select_neurons",
    "trace_normalised",
]
