"""The frozen teacher's outputs during one distillation, kept per training row so that later epochs skip its
forward pass (on a small training set a cut is distilled for many epochs; the teacher's forward pass is about a third
of a step on a CPU).

Rows are known by their content: the tokens of every ``(batch, seq)`` feature at the positions ``attention_mask``
marks real. Only right-padded token batches are kept (a row's real tokens then sit at the same positions whatever
the batch's length, so the teacher's outputs for them do not depend on the batch); anything else goes to the teacher
every time.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence


class TeacherOutputCache:
    """The teacher's logits and hidden states of the rows seen, up to ``max_bytes``.

    A batch whose rows are all kept is answered from memory; any other goes to the teacher whole (the outputs are
    those of the batch as given) and its rows not yet kept are added while room is left. The caller makes a new
    cache for each teacher (each stage, each cut), so nothing kept can belong to another model.

    Args:
        max_bytes: memory for the kept outputs; 0 keeps nothing (every batch goes to the teacher).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._rows: dict[bytes, tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def outputs(
        self, teacher: nn.Module, features: Mapping[str, torch.Tensor], output_hidden_states: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The teacher's ``(batch, num_labels)`` logits and, with ``output_hidden_states``, its per-layer
        ``(batch, seq, width)`` hidden states (zeros at padded positions when answered from memory) for
        ``features``; call it under ``torch.no_grad()``."""
        keys, lengths = self._row_keys(features) if self.max_bytes > 0 else (None, None)
        if keys is not None:
            kept = [self._rows.get(key) for key in keys]
            if all(entry is not None and (entry[1] is not None or not output_hidden_states) for entry in kept):
                self.hits += 1
                return self._assemble(kept, features["attention_mask"].shape[1], output_hidden_states)
        self.misses += 1
        teacher_outputs = teacher(**features, output_hidden_states=output_hidden_states)
        logits = teacher_outputs.logits
        states = tuple(teacher_outputs.hidden_states) if output_hidden_states else None
        if keys is not None:
            self._keep(keys, lengths, logits, states)
        return logits, states

    def _row_keys(self, features: Mapping[str, torch.Tensor]) -> tuple[list[bytes] | None, list[int] | None]:
        """One key a row (its real tokens in every feature) and the rows' real lengths, or ``(None, None)`` when
        the batch cannot be kept."""
        mask = features.get("attention_mask")
        if mask is None or "input_ids" not in features or mask.dim() != 2:
            return None, None
        if any(not torch.is_tensor(value) or value.shape != mask.shape for value in features.values()):
            return None, None
        lengths = mask.sum(dim=1)
        positions = torch.arange(mask.shape[1], device=mask.device)
        if not torch.equal(mask.bool(), positions[None, :] < lengths[:, None]):  # not right-padded
            return None, None
        lengths = lengths.tolist()
        columns = [features[name].cpu() for name in sorted(features)]
        keys = [
            b"".join(column[index, :length].numpy().tobytes() for column in columns)
            for index, length in enumerate(lengths)
        ]
        return keys, lengths

    def _keep(
        self,
        keys: list[bytes],
        lengths: list[int],
        logits: torch.Tensor,
        states: tuple[torch.Tensor, ...] | None,
    ) -> None:
        for index, (key, length) in enumerate(zip(keys, lengths, strict=True)):
            previous = self._rows.get(key)
            if previous is not None and (previous[1] is not None or states is None):
                continue
            row_states = None if states is None else tuple(state[index, :length].clone() for state in states)
            row_logits = logits[index].clone()
            size = row_logits.nbytes + sum(state.nbytes for state in row_states or ())
            if self.used_bytes + size > self.max_bytes:
                return
            if previous is not None:
                self.used_bytes -= previous[0].nbytes
            self._rows[key] = (row_logits, row_states)
            self.used_bytes += size

    @staticmethod
    def _assemble(
        kept: list[tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]], seq_length: int, output_hidden_states: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        logits = torch.stack([row_logits for row_logits, _ in kept])
        if not output_hidden_states:
            return logits, None
        states = []
        for layer in range(len(kept[0][1])):
            padded = pad_sequence([row_states[layer] for _, row_states in kept], batch_first=True)
            states.append(F.pad(padded, (0, 0, 0, seq_length - padded.shape[1])))  # to the batch's length
        return logits, tuple(states)


def cache_bytes_for(megabytes: float, stage_steps: int, rows_per_step: int, num_train_rows: int) -> int:
    """The memory a distillation's cache may use: ``megabytes`` when its ``stage_steps`` steps of ``rows_per_step``
    rows pass over its ``num_train_rows`` training rows more than once, else 0 (no row comes back)."""
    if num_train_rows <= 0 or stage_steps * rows_per_step <= num_train_rows:
        return 0
    return int(megabytes * 2**20)


__all__ = ["TeacherOutputCache", "cache_bytes_for"]
