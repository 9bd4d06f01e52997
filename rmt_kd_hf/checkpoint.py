"""Checkpoints on disk: written atomically (a crash never leaves a directory that looks complete), read only from
safetensors and JSON (nothing is ever unpickled), checked before use so that a damaged one fails with a clear message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .compression import CompressionReport
from .filenames import LOCK_FILENAME, MANIFEST_FILENAME, REPORT_FILENAME

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


def refuse_finished_output(output_dir: str | os.PathLike, overwrite: bool) -> None:
    """Raise a ``ValueError`` when ``output_dir`` already holds a saved model (a ``config.json``) and ``overwrite``
    is off: a new run would replace it."""
    if not overwrite and os.path.exists(os.path.join(os.fspath(output_dir), "config.json")):
        raise ValueError(
            f"output_dir {os.fspath(output_dir)} already holds a saved model: choose a new output_dir, or pass "
            "overwrite_output_dir to replace it (or resume_from_checkpoint to continue its run)."
        )


class OutputFolderBusyError(RuntimeError):
    """Another run holds the output folder's lock."""


_held_locks: dict[str, int] = {}  # real path of output_dir -> depth: re-entrant within one process


@contextlib.contextmanager
def output_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``output_dir`` (``.rmt_kd.lock`` inside it) while the block runs, so that a second
    run into the same folder fails at once instead of mixing its files with this one's. The operating system
    releases the lock when the process dies, however it dies. Re-entrant within one process."""
    output_dir = os.path.realpath(os.fspath(output_dir))
    if output_dir in _held_locks or fcntl is None:
        _held_locks[output_dir] = _held_locks.get(output_dir, 0) + 1
        try:
            yield
        finally:
            _held_locks[output_dir] -= 1
        return
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILENAME)
    with _locked_file(path):
        _held_locks[output_dir] = 0
        try:
            yield
        finally:
            del _held_locks[output_dir]
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


@contextlib.contextmanager
def _locked_file(path: str) -> Iterator[None]:
    while True:
        with open(path, "a") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputFolderBusyError(
                    f"Another run is writing into {os.path.dirname(path)} (it holds {LOCK_FILENAME}): wait for it "
                    "to end, or choose another output_dir."
                ) from None
            # the previous holder may have removed the file between our open and our lock: retry on the new one
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
                file.write(f"{os.getpid()}\n")
                file.flush()
                yield
                return


@contextlib.contextmanager
def staged_directory(output_dir: str, merge_into_existing: bool = False) -> Iterator[str]:
    """A temporary sibling of ``output_dir`` to write into. On success the manifest of its weights is added and it
    replaces ``output_dir``; on failure it is deleted and ``output_dir`` is left as it was.

    With ``merge_into_existing``, its files are moved into an existing ``output_dir`` instead: first the old
    manifest and ``config.json`` go, then the new files, ``config.json`` and the manifest last. Killed at any point,
    the folder holds the old model, the new one, or no ``config.json`` (refused as incomplete), never a mix."""
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"Cannot write into {parent}: choose a writable output directory.")
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        yield staging
        write_manifest(staging)
        if merge_into_existing and os.path.isdir(output_dir):
            _merge_files(staging, output_dir)
            os.rmdir(staging)
        else:
            if os.path.exists(output_dir):
                shutil.rmtree(output_dir)
            os.replace(staging, output_dir)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        os_error = _os_error_of(error, output_dir)
        if os_error is not None:
            raise os_error from error
        raise


def _os_error_of(error: BaseException, path: str) -> OSError | None:
    """safetensors reports a full disk as ``SafetensorError("... (os error 28)")``: the ``OSError`` it stands for."""
    match = re.search(r"\(os error (\d+)\)", str(error)) if isinstance(error, SafetensorError) else None
    if match is None:
        return None
    number = int(match.group(1))
    return OSError(number, os.strerror(number), path)


def _merge_files(source: str, destination: str) -> None:
    for name in (MANIFEST_FILENAME, "config.json"):  # the old model stops looking complete first
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(destination, name))
    move_files(source, destination, last=("config.json", MANIFEST_FILENAME))


def move_files(source: str, destination: str, last: tuple[str, ...] = ()) -> None:
    """Move every entry of ``source`` into ``destination`` (replacing what is there), the names in ``last`` after
    the others and in that order: a reader that waits for them never sees a half-moved set."""
    order = {name: position + 1 for position, name in enumerate(last)}
    for name in sorted(os.listdir(source), key=lambda name: order.get(name, 0)):
        target = os.path.join(destination, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(source, name), target)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike) -> None:
    """Write ``rmt_kd_manifest.json``: the size and SHA-256 of every ``*.safetensors`` file in ``directory``
    (nothing when there is none)."""
    directory = os.fspath(directory)
    weights = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
    if not weights:
        return
    files = {
        name: {
            "bytes": os.path.getsize(os.path.join(directory, name)),
            "sha256": _sha256(os.path.join(directory, name)),
        }
        for name in weights
    }
    with open(os.path.join(directory, MANIFEST_FILENAME), "w") as file:
        json.dump({"manifest_version": 1, "files": files}, file, indent=2)


def _verify_manifest(directory: str, weights: list[str]) -> None:
    """Every weights file the manifest lists is present, of its size and SHA-256; no other weights file."""
    path = os.path.join(directory, MANIFEST_FILENAME)
    try:
        with open(path) as file:
            files = json.load(file)["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is corrupted ({error!r}): save the model again.") from None
    missing = sorted(set(files) - set(weights))
    unlisted = sorted(set(weights) - set(files))
    if missing or unlisted:
        problem = f"{', '.join(missing)} missing" if missing else f"{', '.join(unlisted)} not part of the save"
        raise ValueError(
            f"Checkpoint {directory}: {problem} (see {MANIFEST_FILENAME}). Copy the whole folder the save wrote, "
            "or resume from an earlier checkpoint."
        )
    for name, expected in files.items():
        file_path = os.path.join(directory, name)
        if os.path.getsize(file_path) != expected["bytes"] or _sha256(file_path) != expected["sha256"]:
            raise ValueError(
                f"{file_path} does not match its SHA-256 in {MANIFEST_FILENAME}: the file was changed or damaged "
                "after it was saved. Re-download it, or resume from an earlier checkpoint."
            )


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
    ``config.json`` that is not JSON, weights only in pickle formats (never loaded: they can run code), a
    truncated or corrupted ``*.safetensors`` file, and (where a save of this package wrote
    ``rmt_kd_manifest.json``) a weights file missing or whose SHA-256 differs from the manifest's.

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
    if MANIFEST_FILENAME in names:  # after the structural checks, whose messages say more
        _verify_manifest(directory, weights)
    return weights


def _check_safetensors_length(path: str) -> None:
    """The file must be exactly header + the data its header describes (a cut-off copy is shorter)."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if os.path.getsize(path) != 8 + header_size + data_end:
        raise ValueError(f"expected {8 + header_size + data_end} bytes, found {os.path.getsize(path)}")


def load_checkpoint(
    model_class: type[PreTrainedModel],
    name_or_path: str | os.PathLike,
    allow_new_head: bool = False,
    output_loading_info: bool = False,
    verify: bool = True,
    **kwargs,
) -> PreTrainedModel | tuple[PreTrainedModel, list[str]]:
    """``model_class.from_pretrained(name_or_path)``, safetensors only, after :func:`check_checkpoint` (local
    folders), refusing a checkpoint that lacks a tensor the model needs or whose shapes differ from its config:
    transformers would fill those with random values and only log it.

    Args:
        model_class: a ``PreTrainedModel`` class or an ``AutoModel…`` class.
        name_or_path: a local folder or a hub id.
        allow_new_head: accept a task head (the keys outside the base model, and the pooler) that is missing or
            of another number of labels, initialised anew: the teacher whose classifier is about to be trained.
        output_loading_info: also return the names of the head tensors initialised anew.
        verify: run :func:`check_checkpoint` on a local folder first; ``False`` where the caller just did (it
            hashes every weights file).
        kwargs: passed to ``from_pretrained``.

    Parameters are copied out of the memory-mapped file: with mapped storage, float32 matrix products round
    differently (~1e-6), and a resumed run must compute exactly what an uninterrupted one would.
    """
    name_or_path = os.fspath(name_or_path)
    if verify and os.path.isdir(name_or_path):
        check_checkpoint(name_or_path)
    model, info = model_class.from_pretrained(
        name_or_path, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
    )
    prefix, has_head = getattr(model, "base_model_prefix", ""), model.base_model is not model

    def new_head(key: str) -> bool:
        return allow_new_head and has_head and (not key.startswith(f"{prefix}.") or ".pooler." in key)

    mismatched = sorted(
        f"{key} {tuple(saved)} vs {tuple(expected)}"
        for key, saved, expected in info["mismatched_keys"]
        if not new_head(key)
    )
    if mismatched:
        raise ValueError(
            f"{name_or_path}: {len(mismatched)} tensors do not have the shapes its config.json gives "
            f"({first_names(mismatched, 2)}): the weights and config.json come from different saves. "
            "Save the model again, or copy the whole folder one save wrote."
        )
    missing = [key for key in sorted(info["missing_keys"]) if not new_head(key)]
    if missing:
        raise ValueError(
            f"{name_or_path} lacks {len(missing)} tensors {type(model).__name__} needs ({first_names(missing)}): "
            "they would be random. Copy the complete checkpoint, or load it with the class it was saved from."
        )
    model = copy_out_of_file(model)
    if not output_loading_info:
        return model
    initialised = sorted({*info["missing_keys"], *(key for key, _, _ in info["mismatched_keys"])})
    return model, initialised


def first_names(names: list[str], limit: int = 3) -> str:
    """The first ``limit`` of ``names``, comma-separated, with ``...`` when there are more (for error messages)."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


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
    "MANIFEST_FILENAME",
    "OutputFolderBusyError",
    "REPORT_FILENAME",
    "check_checkpoint",
    "copy_out_of_file",
    "load_checkpoint",
    "load_state_dict_file",
    "load_rng_state",
    "move_files",
    "output_lock",
    "refuse_finished_output",
    "save_compressed",
    "save_state_dict_file",
    "save_rng_state",
    "write_json_atomic",
    "write_manifest",
]
