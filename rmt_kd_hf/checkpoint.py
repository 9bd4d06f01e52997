"""Writing compressed checkpoints atomically: a crash never leaves a directory that looks complete."""

from __future__ import annotations

import os
import shutil
import tempfile

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .compression import CompressionReport

REPORT_FILENAME = "rmt_kd_report.json"


def save_compressed(
    model: PreTrainedModel,
    output_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    report: CompressionReport | None = None,
    overwrite: bool = False,
    merge_into_existing: bool = False,
) -> str:
    """Save ``model`` (safetensors + config + modeling files), ``tokenizer`` and ``report`` into ``output_dir``.

    Everything is written to a temporary sibling directory first and renamed into place at the end, so a failure
    leaves ``output_dir`` untouched. With ``merge_into_existing`` (a Trainer's ``output_dir`` that already holds
    logs), the files are moved in one by one and ``config.json`` last: until it lands, the directory does not
    look like a complete checkpoint.

    Returns:
        The absolute path of ``output_dir``.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(output_dir) and os.listdir(output_dir) and not (overwrite or merge_into_existing):
        raise FileExistsError(f"{output_dir} exists and is not empty: choose a new directory or pass overwrite=True.")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"Cannot write into {parent}: choose a writable output directory.")
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        model.save_pretrained(staging)  # transformers 5 writes safetensors only
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if report is not None:
            report.save_json(os.path.join(staging, REPORT_FILENAME))
        if merge_into_existing and os.path.isdir(output_dir):
            _move_files_config_last(staging, output_dir)
            os.rmdir(staging)
        else:
            if os.path.exists(output_dir):
                shutil.rmtree(output_dir)
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _move_files_config_last(source: str, destination: str) -> None:
    names = sorted(os.listdir(source), key=lambda name: name == "config.json")
    for name in names:
        target = os.path.join(destination, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(source, name), target)


__all__ = ["REPORT_FILENAME", "save_compressed"]
