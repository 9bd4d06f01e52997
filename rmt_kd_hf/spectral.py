"""Random-matrix statistics for RMT-KD: activation covariances and the Marchenko–Pastur bulk edge.

Pure numerics (numpy / scipy / torch), no model knowledge. Conventions: activations X are ``n`` samples of
dimension ``d``; the covariance is the uncentred ``Σ = X Xᵀ / n`` (``d × d``); the aspect ratio is
``q = d / n``. Under pure noise of variance σ² the eigenvalues of Σ follow the Marchenko–Pastur (MP) law on
``[σ²(1 - √q)², σ²(1 + √q)²]``; RMT-KD keeps the eigen-directions whose eigenvalues lie above the upper edge.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import minimize_scalar

__all__ = [
    "CovarianceAccumulator",
    "MarchenkoPasturFit",
    "eigendecompose",
    "fit_marchenko_pastur",
    "marchenko_pastur_cdf",
    "marchenko_pastur_edges",
    "marchenko_pastur_pdf",
]

# Points of the θ grid on which the MP CDF is tabulated; trapezoid error ~1e-9 at this size.
_CDF_GRID_SIZE = 16385
# Step of the log σ² lattice searched by the refinement (0.1 %). A lattice fixed in absolute terms (not
# relative to the initial value) makes the refined σ² monotone in the quantile that sets the search window.
_CLAMP_TOLERANCE = 0.05  # a refined σ² within 5% of a clamp bound counts as "on the clamp"
_MAX_REFINED_KS_DISTANCE = 0.1  # above this the MP law does not describe the bulk: keep the quantile start
_LOG_SIGMA2_STEP = 0.001


class CovarianceAccumulator:
    """Streaming uncentred second-moment accumulator: Σ = X Xᵀ / n in float64.

    Sums are kept on the CPU in float64 so that long calibration runs do not lose precision.

    Attributes:
        dim: feature dimension ``d``.
        name: label used in error messages (e.g. the module the activations come from).
        num_samples: number of rows accumulated so far (``n``).
        sum_outer: ``(d, d)`` float64, ``Σ_rows x xᵀ``.
        sum: ``(d,)`` float64, ``Σ_rows x`` (for means and least-squares intercepts).
    """

    def __init__(self, dim: int, name: str | None = None) -> None:
        if int(dim) != dim or dim < 1:
            raise ValueError(f"CovarianceAccumulator needs dim >= 1, got {dim!r}")
        self.dim = int(dim)
        self.name = name
        self.num_samples = 0
        self.sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self.sum = torch.zeros(self.dim, dtype=torch.float64)

    @property
    def _label(self) -> str:
        return self.name if self.name is not None else "unnamed accumulator"

    def update(self, activations: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch of activations ``(..., dim)``, any float dtype / device (products formed in float64).

        Rows where ``mask`` (broadcastable to ``activations.shape[:-1]``) is 0 / False are skipped: padding.
        """
        if activations.ndim == 0 or activations.shape[-1] != self.dim:
            raise ValueError(
                f"{self._label}: expected activations with last dimension {self.dim}, "
                f"got shape {tuple(activations.shape)}"
            )
        rows = activations.detach().reshape(-1, self.dim)
        if mask is not None:
            keep = torch.broadcast_to(mask.detach().to(rows.device), activations.shape[:-1]).reshape(-1)
            rows = rows[keep != 0]
        rows = rows.to(torch.float64)
        if not bool(torch.isfinite(rows).all()):
            bad = int((~torch.isfinite(rows)).sum())
            raise ValueError(
                f"non-finite activations in {self._label}: {bad} of {rows.numel()} values are NaN/inf; "
                "check the model/inputs for NaN/inf weights or values, and calibrate in float32 (fp16 overflow?)"
            )
        self.sum_outer += (rows.T @ rows).cpu()
        self.sum += rows.sum(dim=0).cpu()
        self.num_samples += rows.shape[0]

    def merge(self, other: CovarianceAccumulator) -> None:
        """Add another accumulator's sums into this one (e.g. from another data shard)."""
        if other.dim != self.dim:
            raise ValueError(f"{self._label}: cannot merge an accumulator of dim {other.dim} into dim {self.dim}")
        self.sum_outer += other.sum_outer
        self.sum += other.sum
        self.num_samples += other.num_samples

    def all_reduce(self) -> None:
        """Sum the statistics over all processes of an initialised ``torch.distributed`` group (no-op when
        not distributed): Σ and n must both be global before the eigendecomposition."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        # NCCL only reduces CUDA tensors; other backends (gloo) take CPU tensors.
        use_cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        count = torch.tensor([self.num_samples], dtype=torch.int64, device=device)
        for tensor in (self.sum_outer, self.sum, count):
            buffer = tensor.to(device)
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            tensor.copy_(buffer.cpu())
        self.num_samples = int(count.item())

    def _check_nonempty(self) -> None:
        if self.num_samples == 0:
            raise ValueError(
                f"no samples were accumulated for {self._label}: the calibration set is empty or fully masked"
            )

    def covariance(self) -> torch.Tensor:
        """Return Σ = Σ x xᵀ / n as a symmetric ``(dim, dim)`` float64 CPU tensor."""
        self._check_nonempty()
        cov = self.sum_outer / self.num_samples
        return (cov + cov.T) / 2  # exact symmetry so that eigh sees a symmetric matrix

    def mean(self) -> torch.Tensor:
        """Return the ``(dim,)`` float64 mean activation."""
        self._check_nonempty()
        return self.sum / self.num_samples

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors only (safetensors-friendly)."""
        return {
            "sum_outer": self.sum_outer.clone(),
            "sum": self.sum.clone(),
            "num_samples": torch.tensor(self.num_samples, dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], name: str | None = None) -> CovarianceAccumulator:
        """Rebuild an accumulator from :meth:`state_dict` output."""
        missing = {"sum_outer", "sum", "num_samples"} - set(state)
        if missing:
            raise ValueError(f"covariance state of {name or 'accumulator'} lacks keys {sorted(missing)}")
        sum_outer = torch.as_tensor(state["sum_outer"], dtype=torch.float64).cpu()
        dim = sum_outer.shape[-1]
        if sum_outer.shape != (dim, dim) or tuple(state["sum"].shape) != (dim,):
            raise ValueError(
                f"inconsistent covariance state for {name or 'accumulator'}: sum_outer "
                f"{tuple(sum_outer.shape)}, sum {tuple(state['sum'].shape)}"
            )
        acc = cls(dim, name=name)
        acc.sum_outer.copy_(sum_outer)
        acc.sum.copy_(torch.as_tensor(state["sum"], dtype=torch.float64).cpu())
        acc.num_samples = int(torch.as_tensor(state["num_samples"]).reshape(-1)[0])
        return acc


def eigendecompose(covariance: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric eigendecomposition in float64.

    Args:
        covariance: ``(d, d)`` symmetric matrix (its symmetric part is used).

    Returns:
        ``(eigenvalues (d,), eigenvectors (d, d))``, eigenvalues in descending order and eigenvector ``i`` in
        column ``i``.
    """
    if isinstance(covariance, torch.Tensor):
        covariance = covariance.detach().cpu().to(torch.float64).numpy()
    matrix = np.asarray(covariance, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"eigendecompose needs a square (d, d) matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("eigendecompose got a matrix with NaN/inf entries; check the accumulated activations")
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return values[::-1].copy(), vectors[:, ::-1].copy()


def marchenko_pastur_edges(sigma2: float, aspect_ratio: float) -> tuple[float, float]:
    """Bulk edges ``(λ-, λ+) = σ² (1 ∓ √q)²`` of the non-zero eigenvalues, for any ``q = d / n > 0``."""
    _check_mp_params(sigma2, aspect_ratio)
    root = math.sqrt(aspect_ratio)
    return sigma2 * (1.0 - root) ** 2, sigma2 * (1.0 + root) ** 2


def marchenko_pastur_pdf(x: np.ndarray, sigma2: float, aspect_ratio: float) -> np.ndarray:
    """Density of the non-zero MP eigenvalues at ``x`` (any shape), integrating to 1 for every ``q``.

    ``√((λ+ - x)(x - λ-)) / (2π σ² min(q, 1) x)`` on ``[λ-, λ+]``, 0 outside: for ``q > 1`` the continuous
    part of the MP law carries mass ``1 / q`` (the rest is the atom at 0), so it is multiplied by ``q``.
    """
    lower, upper = marchenko_pastur_edges(sigma2, aspect_ratio)
    x = np.asarray(x, dtype=np.float64)
    inside = (x > lower) & (x < upper)
    safe = np.where(inside, x, 1.0)
    density = np.sqrt(np.clip((upper - safe) * (safe - lower), 0.0, None)) / (
        2.0 * math.pi * sigma2 * min(aspect_ratio, 1.0) * safe
    )
    return np.where(inside, density, 0.0)


def marchenko_pastur_cdf(x: np.ndarray, sigma2: float, aspect_ratio: float) -> np.ndarray:
    """CDF of :func:`marchenko_pastur_pdf` at ``x`` (any shape), accurate to ~1e-8."""
    lower, upper = marchenko_pastur_edges(sigma2, aspect_ratio)
    theta, cdf = _standard_cdf_table(float(aspect_ratio))
    x = np.asarray(x, dtype=np.float64)
    # Invert λ = λ- + (λ+ - λ-)(1 - cos θ)/2; the table is in θ, where it does not depend on σ².
    u = np.clip((x - lower) / (upper - lower), 0.0, 1.0)
    return np.interp(np.arccos(1.0 - 2.0 * u), theta, cdf)


@functools.lru_cache(maxsize=32)
def _standard_cdf_table(aspect_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """``(θ grid, CDF)`` of the MP law for σ² = 1, in the variable θ of λ = a + (b - a)(1 - cos θ)/2.

    The substitution turns the square-root endpoint singularities into the smooth integrand
    ``((b - a)/2)² sin²θ / (2π min(q, 1) λ(θ))``, so a cumulative trapezoid rule is accurate.
    """
    lower, upper = marchenko_pastur_edges(1.0, aspect_ratio)
    theta = np.linspace(0.0, math.pi, _CDF_GRID_SIZE)
    half_width = (upper - lower) / 2.0
    one_minus_cos = 1.0 - np.cos(theta)
    lam = lower + half_width * one_minus_cos
    # sin²θ / λ written as (1 + cos θ)(1 - cos θ) / λ; at q = 1 (λ- = 0) its limit at θ = 0 is 2 / half_width.
    ratio = np.divide(
        (2.0 - one_minus_cos) * one_minus_cos, lam, out=np.full_like(lam, 2.0 / half_width), where=lam > 0
    )
    integrand = half_width**2 * ratio / (2.0 * math.pi * min(aspect_ratio, 1.0))
    steps = np.diff(theta) * (integrand[1:] + integrand[:-1]) / 2.0
    cdf = np.concatenate([[0.0], np.cumsum(steps)])
    cdf = cdf / cdf[-1]  # total is 1 analytically; remove the ~1e-9 discretisation residue
    theta.setflags(write=False)  # cached and shared between calls
    cdf.setflags(write=False)
    return theta, cdf


def _standard_quantiles(probabilities: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """Quantiles of the σ² = 1 MP law of the non-zero eigenvalues."""
    lower, upper = marchenko_pastur_edges(1.0, aspect_ratio)
    theta, cdf = _standard_cdf_table(aspect_ratio)
    return lower + (upper - lower) * (1.0 - np.cos(np.interp(probabilities, cdf, theta))) / 2.0


def _check_mp_params(sigma2: float, aspect_ratio: float) -> None:
    if not (math.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"sigma2 must be a positive finite number, got {sigma2!r}")
    if not (math.isfinite(aspect_ratio) and aspect_ratio > 0):
        raise ValueError(f"aspect_ratio q = d / n must be a positive finite number, got {aspect_ratio!r}")


@dataclasses.dataclass(frozen=True)
class MarchenkoPasturFit:
    """Result of :func:`fit_marchenko_pastur` for one spectrum."""

    sigma2: float  # fitted noise variance
    sigma2_init: float  # eigenvalue quantile used as the start (divided by q when q > 1)
    sigma_quantile: float
    lambda_plus: float
    lambda_minus: float
    aspect_ratio: float  # q = dim / num_samples
    dim: int  # number of eigenvalues given (including zeros)
    num_samples: int
    num_nonzero: int  # eigenvalues kept for the fit after dropping numerical zeros
    num_kept: int  # eigenvalues strictly above lambda_plus
    refined: bool  # True only when the refined σ² was accepted
    bulk_ks_distance: float  # KS distance between the non-zero eigenvalues <= lambda_plus and the MP law
    refine_note: str = ""  # why a refinement was rejected, if it was

    def to_dict(self) -> dict:
        """JSON-friendly plain floats / ints / bools."""
        return {
            field.name: (value if isinstance(value, bool) else type(value)(value))
            for field in dataclasses.fields(self)
            for value in [getattr(self, field.name)]
        }


def fit_marchenko_pastur(
    eigenvalues: np.ndarray | torch.Tensor | Sequence[float],
    num_samples: int,
    sigma_quantile: float = 0.5,
    refine: bool = True,
    refine_bounds: tuple[float, float] = (0.5, 2.0),
    num_bins: int | None = None,
) -> MarchenkoPasturFit:
    """Fit the MP bulk to the ``(d,)`` eigenvalues of a covariance estimated from ``num_samples`` samples.

    σ² starts at the ``sigma_quantile`` quantile of the non-zero eigenvalues (the paper uses the median; a
    higher quantile gives a larger λ+ and fewer kept directions). When ``q = d / n > 1`` the non-zero
    eigenvalues are ``q`` times those of the dual ``n × n`` matrix ``Xᵀ X / d`` (aspect ratio ``1 / q``), so
    the quantile is divided by ``q``. With ``refine``, σ² is then re-fitted to the bulk inside
    ``[refine_bounds[0], refine_bounds[1]] × init`` (see :func:`_refine_sigma2`).
    """
    values = _validated_eigenvalues(eigenvalues)
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer (rows behind the covariance), got {num_samples!r}")
    if not 0.0 < sigma_quantile < 1.0:
        raise ValueError(f"sigma_quantile must lie strictly between 0 and 1 (paper: 0.5), got {sigma_quantile!r}")
    low, high = refine_bounds
    if not 0.0 < low <= 1.0 <= high:
        raise ValueError(f"refine_bounds must satisfy 0 < low <= 1 <= high, got {refine_bounds!r}")
    if num_bins is not None and num_bins < 2:
        raise ValueError(f"num_bins must be at least 2 (or None for automatic), got {num_bins!r}")
    dim = values.size
    aspect_ratio = dim / int(num_samples)
    # Rank deficiency (d > n, dead units) leaves numerical zeros; they are not part of the MP bulk.
    nonzero = np.sort(values[values > values.max() * max(dim, 1) * 1e-12])
    sigma2_init = float(np.quantile(nonzero, sigma_quantile)) / max(aspect_ratio, 1.0)
    sigma2, refine_note = sigma2_init, ""
    if refine:
        sigma2 = _refine_sigma2(nonzero, aspect_ratio, sigma2_init, (low, high), num_bins)
        # Heavy-tailed spectra without an MP bulk (real activations) drive the fit to the clamp or fit badly;
        # then the fit says nothing about the noise level and the quantile start is the honest answer.
        refine_note = _refinement_rejection(nonzero, aspect_ratio, sigma2, sigma2_init, (low, high))
        if refine_note:
            sigma2 = sigma2_init
    lambda_minus, lambda_plus = marchenko_pastur_edges(sigma2, aspect_ratio)
    return MarchenkoPasturFit(
        sigma2=sigma2,
        sigma2_init=sigma2_init,
        sigma_quantile=float(sigma_quantile),
        lambda_plus=lambda_plus,
        lambda_minus=lambda_minus,
        aspect_ratio=aspect_ratio,
        dim=dim,
        num_samples=int(num_samples),
        num_nonzero=int(nonzero.size),
        num_kept=int((values > lambda_plus).sum()),
        refined=bool(refine) and not refine_note,
        bulk_ks_distance=_bulk_ks_distance(nonzero, sigma2, aspect_ratio),
        refine_note=refine_note,
    )


def _refinement_rejection(
    nonzero: np.ndarray, aspect_ratio: float, sigma2: float, sigma2_init: float, bounds: tuple[float, float]
) -> str:
    """Why a refined σ² should not be used ('' when it should): on the clamp, or a poor bulk fit."""
    low, high = bounds
    if not low * (1 + _CLAMP_TOLERANCE) < sigma2 / sigma2_init < high / (1 + _CLAMP_TOLERANCE):
        return (
            f"rejected: the best MP fit (sigma2 = {sigma2:.4g}) lies on the clamp [{low}, {high}] x {sigma2_init:.4g}"
        )
    ks_distance = _bulk_ks_distance(nonzero, sigma2, aspect_ratio)
    if ks_distance > _MAX_REFINED_KS_DISTANCE:
        return f"rejected: the refined MP law fits the bulk poorly (KS distance {ks_distance:.3f})"
    return ""


def _validated_eigenvalues(eigenvalues: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
    """1-D float64 copy of the eigenvalues, tiny negatives from round-off clipped to 0."""
    if isinstance(eigenvalues, torch.Tensor):
        eigenvalues = eigenvalues.detach().cpu().to(torch.float64).numpy()
    values = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no eigenvalues given: the covariance is empty (dim 0)")
    if not np.isfinite(values).all():
        raise ValueError("eigenvalues contain NaN/inf: check the covariance (non-finite activations?)")
    scale = np.abs(values).max()
    if values.min() < -1e-8 * scale:
        raise ValueError(
            f"eigenvalues are clearly negative (most negative {values.min():.6g}, largest |λ| {scale:.6g}): "
            "the matrix is not positive semi-definite; pass the eigenvalues of a covariance X Xᵀ / n"
        )
    if values.max() <= 0:
        raise ValueError("all eigenvalues are zero: the activations are identically zero, nothing to fit")
    return np.clip(values, 0.0, None)


def _refine_sigma2(
    nonzero: np.ndarray,
    aspect_ratio: float,
    sigma2_init: float,
    bounds: tuple[float, float],
    num_bins: int | None,
) -> float:
    """Robust fit of σ² to the bulk, searched over a log σ² lattice inside the clamp then polished by Brent.

    Objective: bins of equal MP mass (edges at the candidate law's quantiles, which scale with σ²) compared
    with the fractions of the eigenvalues lying inside the candidate bulk ``[0, λ+]`` in each bin, by an L1
    distance. Normalising by the eigenvalues inside the bulk keeps spikes above λ+ from pulling the fit, and
    L1 (instead of a squared histogram error) limits the weight of heavy-tailed bins.
    """
    # Few bins: Wishart eigenvalues are rigid, and finer L1 bins add plateaus (measured: 8-16 bins give the
    # smallest σ² scatter at d = 768, n = 100k).
    bins = num_bins or int(np.clip(np.sqrt(nonzero.size) / 2, 8, 32))
    standard_edges = _standard_quantiles(np.arange(bins + 1) / bins, aspect_ratio)
    standard_edges[0] = 0.0  # the first bin also collects eigenvalues below λ-
    # Counting function interpolated between the sorted eigenvalues: continuous in σ², so Brent is usable.
    count_x = np.concatenate([[0.0], nonzero])
    count_y = np.arange(nonzero.size + 1, dtype=np.float64)

    def mismatch(log_sigma2: np.ndarray) -> np.ndarray:
        """L1 distance for each candidate log σ² (vectorised over the grid)."""
        counts = np.interp(np.exp(log_sigma2)[..., None] * standard_edges, count_x, count_y)
        inside = np.maximum(counts[..., -1:], 1e-300)
        distance = np.abs(np.diff(counts, axis=-1) / inside - 1.0 / bins).sum(axis=-1)
        return np.where(counts[..., -1] > 0, distance, 2.0)  # empty candidate bulk: the largest L1 distance

    low, high = math.log(sigma2_init * bounds[0]), math.log(sigma2_init * bounds[1])
    lattice = np.arange(math.ceil(low / _LOG_SIGMA2_STEP), math.floor(high / _LOG_SIGMA2_STEP) + 1)
    grid = lattice * _LOG_SIGMA2_STEP if lattice.size else np.array([math.log(sigma2_init)])
    scores = mismatch(grid)
    best = int(np.argmin(scores))
    bracket = (max(low, grid[best] - _LOG_SIGMA2_STEP), min(high, grid[best] + _LOG_SIGMA2_STEP))
    if bracket[1] - bracket[0] <= 0:
        return float(math.exp(grid[best]))
    polished = minimize_scalar(
        lambda x: float(mismatch(np.asarray(x))), bounds=bracket, method="bounded", options={"xatol": 1e-7}
    )
    log_sigma2 = polished.x if polished.fun < scores[best] else grid[best]
    return float(math.exp(log_sigma2))


def _bulk_ks_distance(nonzero: np.ndarray, sigma2: float, aspect_ratio: float) -> float:
    """Kolmogorov–Smirnov distance between the sorted non-zero eigenvalues <= λ+ and the MP CDF."""
    _, lambda_plus = marchenko_pastur_edges(sigma2, aspect_ratio)
    bulk = nonzero[nonzero <= lambda_plus]
    if bulk.size == 0:
        return 1.0
    model = marchenko_pastur_cdf(bulk, sigma2, aspect_ratio)
    above = np.arange(1, bulk.size + 1) / bulk.size - model
    below = model - np.arange(bulk.size) / bulk.size
    return float(max(above.max(), below.max()))
