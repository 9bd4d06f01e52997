"""Trainer checkpoints without pickles: a mixin for ``transformers.Trainer``.

``Trainer`` writes ``training_args.bin``, ``optimizer.pt``, ``scheduler.pt`` and ``rng_state.pth`` with ``torch.save``
(pickle). With this mixin the same states go to safetensors + JSON and are read back from them, and a checkpoint
that holds only the pickles is refused rather than unpickled. DeepSpeed and FSDP keep their own formats.
"""

from __future__ import annotations

import os

from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import logging

from .checkpoint import load_rng_state, load_state_dict_file, save_rng_state, save_state_dict_file
from .filenames import TRAINING_ARGS_JSON

logger = logging.get_logger(__name__)


class SafetensorsTrainerStateMixin:
    """Overrides the ``Trainer`` methods that save and load optimizer, scheduler, scaler, RNG and argument states.
    Put it before ``Trainer`` in the bases."""

    def _plain_checkpoints(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
            if os.path.exists(pickled):
                os.remove(pickled)
            with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w") as file:
                file.write(self.args.to_json_string())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._plain_checkpoints():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_state_dict_file(self.optimizer.state_dict(), output_dir, "optimizer")
            save_state_dict_file(self.lr_scheduler.state_dict(), output_dir, "scheduler")

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            save_state_dict_file(scaler.state_dict(), output_dir, "scaler")

    def _save_rng_state(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        save_rng_state(os.path.join(output_dir, self._rng_state_name()))

    def _rng_state_name(self) -> str:
        return (
            "rng_state.safetensors" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.safetensors"
        )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._plain_checkpoints():
            return super()._load_optimizer_and_scheduler(checkpoint)
        if os.path.exists(os.path.join(checkpoint, "optimizer.safetensors")):
            self.optimizer.load_state_dict(load_state_dict_file(checkpoint, "optimizer"))
            self.lr_scheduler.load_state_dict(load_state_dict_file(checkpoint, "scheduler"))
        else:
            refuse_pickles(checkpoint, ("optimizer.pt", "scheduler.pt"))

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and os.path.exists(os.path.join(checkpoint, "scaler.json")):
            scaler.load_state_dict(load_state_dict_file(checkpoint, "scaler"))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, self._rng_state_name())
        if os.path.exists(path):
            load_rng_state(path)
        else:
            refuse_pickles(checkpoint, ("rng_state.pth", f"rng_state_{self.args.process_index}.pth"))


def refuse_pickles(checkpoint: str, names: tuple[str, ...]) -> None:
    """Refuse a Trainer checkpoint holding the pickles ``names``; warn when it holds neither them nor safetensors."""
    found = [name for name in names if os.path.exists(os.path.join(checkpoint, name))]
    if found:
        raise ValueError(
            f"{checkpoint} holds {', '.join(found)}: pickle files, which RMTKDTrainer never loads (they can run "
            "code). Resume it with transformers.Trainer, or restart the run without resume_from_checkpoint."
        )
    logger.warning("%s has no optimizer/RNG state: resuming with fresh ones.", checkpoint)
