"""Checkpoints on disk: written atomically (a crash never leaves a directory that looks complete), read only from
safetensors and JSON (nothing is ever unpickled), checked before use so that a damaged one fails with a clear message.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .compression import CompressionReport

REPORT_FILENAME = "rmt_kd_report.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def save_compressed(
    model: PreTrainedModel,
    output_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    report: CompressionReport | None = None,
    overwrite: bool = False,
    merge_into_existing: bool = False,
    json_files: dict[str, object] | None = None,
) -> str:
    """Save ``model`` (safetensors + config + modeling files), ``tokenizer``, ``report`` and ``json_files``
    (``{file name: JSON-able payload}``) into ``output_dir``.

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
    with staged_directory(output_dir, merge_into_existing) as staging:
        model.save_pretrained(staging)  # transformers 5 writes safetensors only
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if report is not None:
            report.save_json(os.path.join(staging, REPORT_FILENAME))
        for name, payload in (json_files or {}).items():
            with open(os.path.join(staging, name), "w") as file:
                json.dump(payload, file, indent=2)
    return output_dir


def refuse_teacher_folder(
    output_dir: str | os.PathLike, teacher_dir: str | os.PathLike | None, refuse_containing: bool = True
) -> None:
    """Raise a ``ValueError`` when writing ``output_dir`` could overwrite the teacher saved in ``teacher_dir``: the
    same folder, a folder inside it, or (``refuse_containing``) one that contains it. A ``teacher_dir`` that is not
    a local folder (a hub id, ``None``) passes."""
    if not teacher_dir or not os.path.isdir(teacher_dir):
        return
    output, teacher = os.path.realpath(output_dir), os.path.realpath(teacher_dir)
    if output == teacher:
        relation = "is"
    elif output.startswith(teacher + os.sep):
        relation = "lies inside"
    elif refuse_containing and teacher.startswith(output + os.sep):
        relation = "contains"
    else:
        return
    raise ValueError(
        f"output_dir {os.fspath(output_dir)} {relation} the teacher's folder {os.fspath(teacher_dir)}: the compressed "
        "model would be written over the teacher. Choose an output_dir outside it."
    )


@contextlib.contextmanager
def staged_directory(output_dir: str, merge_into_existing: bool = False) -> Iterator[str]:
    """A temporary sibling of ``output_dir`` to write into. On success it replaces ``output_dir`` (with
    ``merge_into_existing``, its files are moved into an existing ``output_dir``, ``config.json`` last); on failure
    it is deleted and ``output_dir`` is left as it was."""
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"Cannot write into {parent}: choose a writable output directory.")
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        yield staging
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


def _move_files_config_last(source: str, destination: str) -> None:
    names = sorted(os.listdir(source), key=lambda name: name == "config.json")
    for name in names:
        target = os.path.join(destination, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(source, name), target)


def write_json_atomic(path: str | os.PathLike, payload: object) -> None:
    """Write ``payload`` as JSON to a temporary sibling, then rename it over ``path``: readers never see half."""
    path = os.fspath(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(payload, file, indent=2)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def check_checkpoint(directory: str | os.PathLike) -> list[str]:
    """Check that ``directory`` holds a complete safetensors checkpoint, before anything loads it.

    Raises a ``ValueError`` naming the problem and the fix for: a missing directory or ``config.json``, a
    ``config.json`` that is not JSON, weights only in pickle formats (never loaded: they can run code), and a
    truncated or corrupted ``*.safetensors`` file.

    Returns:
        The safetensors file names, sorted.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"Checkpoint {directory!r} is not a directory: pass the folder save_pretrained wrote.")
    names = sorted(os.listdir(directory))
    if "config.json" not in names:
        raise ValueError(
            f"Checkpoint {directory} has no config.json: it is incomplete (an interrupted save?). "
            "Resume from an earlier checkpoint or save the model again."
        )
    try:
        with open(os.path.join(directory, "config.json")) as file:
            json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{directory}/config.json is corrupted ({error}): save the model again.") from None
    weights = [name for name in names if name.endswith(".safetensors")]
    if not weights:
        pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
        found = f" (found {', '.join(pickles)}: pickle files, which rmt-kd never loads)" if pickles else ""
        raise ValueError(
            f"Checkpoint {directory} has no *.safetensors weights{found}. Convert it once in a trusted environment: "
            "`AutoModel.from_pretrained(path).save_pretrained(path)` writes safetensors."
        )
    for name in weights:
        path = os.path.join(directory, name)
        try:
            with safe_open(path, framework="pt") as file:
                for key in file.keys():  # noqa: SIM118 - safe_open has no __iter__
                    file.get_slice(key)
            _check_safetensors_length(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(
                f"{path} is truncated or corrupted ({error}). Re-download it, or resume from an earlier checkpoint."
            ) from None
    return weights


def _check_safetensors_length(path: str) -> None:
    """The file must be exactly header + the data its header describes (a cut-off copy is shorter)."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if os.path.getsize(path) != 8 + header_size + data_end:
        raise ValueError(f"expected {8 + header_size + data_end} bytes, found {os.path.getsize(path)}")


def load_checkpoint(model_class: type[PreTrainedModel], directory: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """``model_class.from_pretrained(directory)`` after :func:`check_checkpoint`, safetensors only.

    Parameters are copied out of the memory-mapped file: with mapped storage, float32 matrix products round
    differently (~1e-6), and a resumed run must compute exactly what an uninterrupted one would.
    """
    check_checkpoint(directory)
    return copy_out_of_file(model_class.from_pretrained(os.fspath(directory), use_safetensors=True, **kwargs))


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and floating-point buffers of ``model`` holding a NaN or an infinity."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, tensor in tensors if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def copy_out_of_file(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter and buffer its own memory (instead of pages of a memory-mapped safetensors file)."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.clone()
    return model


# -- Trainer state without pickles: tensors in safetensors, everything else in JSON ------------------------------


def save_state_dict_file(state_dict: dict, directory: str | os.PathLike, prefix: str) -> None:
    """Write an optimizer/scheduler/scaler state dict as ``{prefix}.safetensors`` (its tensors) + ``{prefix}.json``
    (everything else: numbers, strings, lists, nested dicts)."""
    tensors, plain = _split_tensors(state_dict)
    save_file(tensors, os.path.join(os.fspath(directory), f"{prefix}.safetensors"))
    with open(os.path.join(os.fspath(directory), f"{prefix}.json"), "w") as file:
        json.dump(plain, file)


def load_state_dict_file(directory: str | os.PathLike, prefix: str) -> dict:
    """The state dict :func:`save_state_dict_file` wrote (an optimizer's integer ``state`` keys restored)."""
    tensors = load_file(os.path.join(os.fspath(directory), f"{prefix}.safetensors"))
    with open(os.path.join(os.fspath(directory), f"{prefix}.json")) as file:
        plain = json.load(file)
    state_dict = _merge_tensors(plain, tensors)
    if "state" in state_dict:
        state_dict["state"] = {int(key): value for key, value in state_dict["state"].items()}
    return state_dict


def save_rng_state(path: str | os.PathLike) -> None:
    """Python, numpy and torch CPU generator states as one safetensors file (``path`` ends in .safetensors)."""
    version, python_state, gauss = random.getstate()
    _, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    tensors = {
        "python": torch.tensor(python_state, dtype=torch.int64),
        "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
        "torch_cpu": torch.random.get_rng_state(),
    }
    metadata = {
        "python": json.dumps([version, gauss]),
        "numpy": json.dumps([int(numpy_position), int(numpy_has_gauss), float(numpy_gauss)]),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_rng_state(path: str | os.PathLike) -> None:
    """Restore the generators :func:`save_rng_state` saved."""
    with safe_open(os.fspath(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    version, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(int(value) for value in tensors["python"].tolist()), gauss))
    position, has_gauss, cached_gauss = json.loads(metadata["numpy"])
    keys = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, position, has_gauss, cached_gauss))
    torch.random.set_rng_state(tensors["torch_cpu"])


def _split_tensors(value, path: str = "") -> tuple[dict[str, torch.Tensor], object]:
    """Replace every tensor in a nested dict/list by ``{"__tensor__": key}`` and collect the tensors under key."""
    if isinstance(value, torch.Tensor):
        return {path: value.detach().cpu().contiguous()}, {"__tensor__": path}
    if isinstance(value, dict):
        tensors, plain = {}, {}
        for key, item in value.items():
            found, plain[str(key)] = _split_tensors(item, f"{path}.{key}" if path else str(key))
            tensors.update(found)
        return tensors, plain
    if isinstance(value, (list, tuple)):
        tensors, plain = {}, []
        for index, item in enumerate(value):
            found, converted = _split_tensors(item, f"{path}.{index}")
            tensors.update(found)
            plain.append(converted)
        return tensors, plain
    if value is None or isinstance(value, (bool, int, float, str)):
        return {}, value
    raise TypeError(f"Cannot store {type(value).__name__} at {path!r} without pickling it.")


def _merge_tensors(plain, tensors: dict[str, torch.Tensor]):
    if isinstance(plain, dict):
        if set(plain) == {"__tensor__"}:
            return tensors[plain["__tensor__"]]
        return {key: _merge_tensors(item, tensors) for key, item in plain.items()}
    if isinstance(plain, list):
        return [_merge_tensors(item, tensors) for item in plain]
    return plain


__all__ = [
    "REPORT_FILENAME",
    "check_checkpoint",
    "copy_out_of_file",
    "load_checkpoint",
    "load_state_dict_file",
    "load_rng_state",
    "save_compressed",
    "save_state_dict_file",
    "save_rng_state",
    "write_json_atomic",
]
