"""A tiny RMT-KD run as a script, for the tests that kill it, resume it or launch it on several processes.

python -m tests.compress_run --output_dir OUT [--kill_stage 1 --kill_step 2] [--resume]
torchrun --nproc_per_node 2 -m tests.compress_run --output_dir OUT --covariances OUT/cov.safetensors
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from rmt_kd_hf import RMTKDTrainer
from rmt_kd_hf.calibration import collect_covariances
from rmt_kd_hf.surgery import get_surgery

from .conftest import make_trainer


class KillAt(TrainerCallback):
    """SIGKILL this process at ``step`` of the ``stage``-th distillation (0-based), as a power cut would."""

    def __init__(self, stage: int, step: int):
        self.stage, self.step, self.trainings_started = stage, step, -1

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainings_started += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainings_started == self.stage and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def build_trainer(arguments: argparse.Namespace) -> RMTKDTrainer:
    return make_trainer(
        None,
        train_rows=160,
        eval_rows=64,
        callbacks=[KillAt(arguments.kill_stage, arguments.kill_step)] if arguments.kill_stage is not None else None,
        output_dir=arguments.output_dir,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        compression_schedule=arguments.schedule,
        stage_max_steps=arguments.stage_max_steps,
        sigma_quantile=0.6,
        max_metric_drop=1.0,
        calibration_fraction=0.5,
        measure_latency=False,
    )


def dump_covariances(trainer: RMTKDTrainer, path: str) -> None:
    """The all-reduced calibration covariances of the prepared teacher, written by the main process."""
    surgery = get_surgery(trainer.model)
    prepared = surgery.prepare(trainer.model)
    dataloader = trainer._calibration_dataloader()
    accumulators = collect_covariances(prepared, dataloader, surgery.taps(prepared), progress=False)
    if trainer.is_world_process_zero():
        tensors = {name: accumulator.covariance() for name, accumulator in accumulators.items()}
        tensors.update({f"{name}.num_samples": torch.tensor(acc.num_samples) for name, acc in accumulators.items()})
        save_file(tensors, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--schedule", default="per_layer")
    parser.add_argument("--stage_max_steps", type=int, default=4)
    parser.add_argument("--kill_stage", type=int, default=None)
    parser.add_argument("--kill_step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--covariances", default=None, help="Also write the calibration covariances here.")
    arguments = parser.parse_args()
    trainer = build_trainer(arguments)
    if arguments.covariances:
        dump_covariances(trainer, arguments.covariances)
    trainer.compress(resume_from_checkpoint=True if arguments.resume else None)


if __name__ == "__main__":
    main()
