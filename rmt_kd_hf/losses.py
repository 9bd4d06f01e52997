"""The losses of RMT-KD's distillation: logits (task + KL to the model before the stage) and hidden states in the
stage's reduced basis."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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


def hidden_state_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Intermediate-layer distillation in the reduced basis: the mean over layers of
    ``‖h_new − h_old·Bᵀ‖² / ‖h_old·Bᵀ‖²`` over the real (unpadded) tokens.

    Args:
        student_states: per layer, (batch, seq, new_width) hidden states of the model being trained.
        teacher_states: per layer, (batch, seq, old_width) hidden states of the frozen model before the stage.
        bases: per layer, (new_width, old_width): the stage's basis, so that ``h_new ≈ h_old @ basis.T``.
        attention_mask: (batch, seq), 1 for real tokens; ``None`` counts every position.
    """
    real = attention_mask.bool() if attention_mask is not None else None
    terms = []
    for student, teacher, basis in zip(student_states, teacher_states, bases, strict=True):
        target = teacher.detach() @ basis.T
        if real is not None:
            student, target = student[real], target[real]
        terms.append((student - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


__all__ = ["distillation_loss", "hidden_state_loss"]
