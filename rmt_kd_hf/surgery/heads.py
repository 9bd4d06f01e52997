"""Per-head reductions of multi-head attention: pure linear algebra on calibration second moments.

Each head ``h`` of a layer sees the same token ``x``; in its own coordinates it computes a query ``q``, a key ``k``
and a value ``v`` (head size ``dh``) and adds ``O_h Σ_j a_ij v_j`` to the residual stream. Both reductions below
keep the ``rank`` most informative directions of a head, ranked by their share of a second moment, and are exact
(up to rounding) when ``rank = dh``:

* values: minimise ``E|O_h v - O_h S T v|²`` over rank-``rank`` maps ``T`` (rank x dh, applied to the values) and
  ``S`` (dh x rank, folded into the output dense). With ``Σ_v = L L`` (symmetric square root) and
  ``O_h L = U diag(σ) Wᵀ``: ``T = W_rᵀ L⁻¹``, ``S = L W_r``; ``σ²`` splits the head's output second moment.
  The attention weights mix values linearly, so projecting values before mixing equals projecting after.
* queries/keys: the score ``qᵀk`` is a bilinear form; with ``Σ_q = L_q L_q``, ``Σ_k = L_k L_k`` and
  ``L_q L_k = U diag(σ) Wᵀ``: ``q' = diag(σ_r)^½ U_rᵀ L_q⁻¹ q``, ``k' = diag(σ_r)^½ W_rᵀ L_k⁻¹ k`` minimise
  ``E|qᵀk - q'ᵀk'|²`` for independent query and key tokens; ``σ²`` splits that score second moment.

The squared singular values are the spectrum the Marchenko–Pastur rule reads, pooled over the heads of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadReduction:
    """Rank-ordered maps of every head of one layer, for truncation to any rank.

    Attributes:
        left: (heads, dh, dh) maps applied to queries (or values): row ``i`` is direction ``i``.
        right: (heads, dh, dh) maps applied to keys (rows), or folded into the output dense (columns, values).
        spectrum: (heads, dh) squared singular values, descending per head.
    """

    left: torch.Tensor
    right: torch.Tensor
    spectrum: torch.Tensor


def symmetric_sqrt_and_inverse(second_moment: torch.Tensor, floor: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, L⁻¹)`` with ``L L = second_moment`` (dh x dh, symmetric PSD); eigenvalues floored at ``floor · max``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment.to(torch.float64))
    eigenvalues = eigenvalues.clamp_min(floor * max(float(eigenvalues.max()), 1e-300))
    root = eigenvalues.sqrt()
    return (eigenvectors * root) @ eigenvectors.T, (eigenvectors / root) @ eigenvectors.T


def query_key_reduction(query_second_moments: torch.Tensor, key_second_moments: torch.Tensor) -> HeadReduction:
    """Directions of the score ``qᵀk`` per head, strongest first.

    Args:
        query_second_moments: (heads, dh, dh) uncentred ``E[q qᵀ]`` per head (query bias included).
        key_second_moments: (heads, dh, dh) ``E[k kᵀ]`` per head (without the key bias, which the softmax ignores).

    Returns:
        ``left`` (new queries ``= left[h, :r] @ q``), ``right`` (new keys ``= right[h, :r] @ k``), ``spectrum`` σ².
    """
    lefts, rights, spectra = [], [], []
    for query_moment, key_moment in zip(query_second_moments, key_second_moments, strict=True):
        query_root, query_inverse = symmetric_sqrt_and_inverse(query_moment)
        key_root, key_inverse = symmetric_sqrt_and_inverse(key_moment)
        left_vectors, singular_values, right_vectors_t = torch.linalg.svd(query_root @ key_root)
        scale = singular_values.sqrt()[:, None]
        lefts.append(scale * (left_vectors.T @ query_inverse))
        rights.append(scale * (right_vectors_t @ key_inverse))
        spectra.append(singular_values.square())
    return HeadReduction(torch.stack(lefts), torch.stack(rights), torch.stack(spectra))


def value_output_reduction(value_second_moments: torch.Tensor, output_columns: torch.Tensor) -> HeadReduction:
    """Directions of each head's output ``O_h v``, strongest first.

    Args:
        value_second_moments: (heads, dh, dh) uncentred ``E[v vᵀ]`` per head (value bias included).
        output_columns: (heads, out, dh) the output dense's columns that read each head.

    Returns:
        ``left`` (new values ``= left[h, :r] @ v``), ``right`` (new output columns ``= O_h @ right[h, :r].T``),
        ``spectrum`` σ².
    """
    lefts, rights, spectra = [], [], []
    for value_moment, columns in zip(value_second_moments, output_columns, strict=True):
        root, inverse = symmetric_sqrt_and_inverse(value_moment)
        _, singular_values, right_vectors_t = torch.linalg.svd(columns.to(torch.float64) @ root)
        lefts.append(right_vectors_t @ inverse)
        rights.append(right_vectors_t @ root)  # (root W)ᵀ: row i is column i of S = L W
        spectrum = torch.zeros(root.shape[0], dtype=torch.float64)  # fewer outputs than dh: the rest carry nothing
        spectrum[: len(singular_values)] = singular_values.square()
        spectra.append(spectrum)
    return HeadReduction(torch.stack(lefts), torch.stack(rights), torch.stack(spectra))


def head_blocks(second_moment: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(heads, dh, dh) diagonal blocks of a (heads·dh, heads·dh) matrix."""
    head_size = second_moment.shape[0] // num_heads
    blocks = second_moment.reshape(num_heads, head_size, num_heads, head_size)
    return torch.stack([blocks[head, :, head, :] for head in range(num_heads)])


__all__ = [
    "HeadReduction",
    "head_blocks",
    "query_key_reduction",
    "symmetric_sqrt_and_inverse",
    "value_output_reduction",
]
