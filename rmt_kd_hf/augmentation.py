"""Input augmentation for distillation on small training sets: the student learns the model before the stage on
more inputs than the training rows (Tang et al., 2019, "Distilling Task-Specific Knowledge from BERT into Simple
Neural Networks": masking words of the training sentences). Both models read the same augmented batch, so the
distillation targets stay exact."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def mask_random_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    mask_token_id: int,
    protected_token_ids: Iterable[int],
    probability: float,
) -> torch.Tensor:
    """A copy of ``input_ids`` with each real, unprotected token replaced by ``mask_token_id`` with ``probability``.

    Args:
        input_ids: (batch, seq) token ids.
        attention_mask: (batch, seq), 1 for real tokens (padding is never masked); ``None``: every position is real.
        mask_token_id: the id written in place of a masked token (the tokenizer's ``[MASK]``).
        protected_token_ids: ids never masked (the special tokens: ``[CLS]``, ``[SEP]``, padding).
        probability: per-token chance in [0, 1); drawn from torch's global generator (seeded by the stage).
    """
    protected = torch.tensor(sorted(set(protected_token_ids)), dtype=input_ids.dtype, device=input_ids.device)
    maskable = ~torch.isin(input_ids, protected)
    if attention_mask is not None:
        maskable &= attention_mask.bool()
    chosen = maskable & (torch.rand(input_ids.shape, device=input_ids.device) < probability)
    return input_ids.masked_fill(chosen, mask_token_id)


__all__ = ["mask_random_tokens"]
