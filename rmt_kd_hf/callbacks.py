"""Trainer callbacks of the compression loop."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)


class BestStageWeights(TrainerCallback):
    """Keeps, in memory, the weights of ``model`` that scored best at the evaluations of one distillation stage,
    and puts them back with :meth:`restore`: ``load_best_model_at_end`` for a stage, whose mid-stage states are
    never written to disk (a stage checkpoint is written only once the stage is over)."""

    def __init__(self, model: nn.Module, metric_name: str, greater_is_better: bool):
        self.model = model
        self.metric_key = metric_name if metric_name.startswith("eval_") else f"eval_{metric_name}"
        self.greater_is_better = greater_is_better
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or self.metric_key not in metrics:
            raise ValueError(
                f"load_best_model_at_end: evaluate() returned no {self.metric_key!r} (got {sorted(metrics or {})}); "
                "set metric_for_best_model to one of its keys."
            )
        value = float(metrics[self.metric_key])
        improved = self.best_metric is None or (
            value > self.best_metric if self.greater_is_better else value < self.best_metric
        )
        if improved:
            self.best_metric, self.best_step = value, state.global_step
            self._best_state = {
                name: tensor.detach().to("cpu", copy=True) for name, tensor in self.model.state_dict().items()
            }

    def restore(self) -> None:
        if self._best_state is None:
            return
        self.model.load_state_dict(self._best_state)
        logger.info(
            "Kept the stage's weights of step %d (%s = %.4f).", self.best_step, self.metric_key, self.best_metric
        )


class ScreenCandidate(TrainerCallback):
    """Screens a cut early in its distillation: evaluates once after ``at_step`` steps and stops the training when
    the validation metric is below ``threshold`` (the floor less a margin that distillation can still recover), so
    that a hopeless cut costs a fraction of a stage. A cut that passes trains on exactly as it would unscreened: the
    random generators are put back as they were before the evaluation."""

    def __init__(self, at_step: int, threshold: float, metric_key: str):
        self.at_step, self.threshold, self.metric_key = at_step, threshold, metric_key
        self.screened_metric: float | None = None
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            control.should_evaluate = True
            self._random_states = random_states()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step != self.at_step or self.screened_metric is not None or self.metric_key not in metrics:
            return
        # the evaluation must not move the generators: a cut that passes trains on as it would unscreened
        restore_random_states(self._random_states)
        self.screened_metric = float(metrics[self.metric_key])
        if not self.screened_metric >= self.threshold:  # NaN included
            self.stopped = control.should_training_stop = True


def random_states() -> tuple:
    """The Python, numpy, torch (and CUDA) random generators' states, for :func:`restore_random_states`."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def restore_random_states(states: tuple) -> None:
    python, numpy_state, torch_state, cuda = states
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
