"""Deployment: a saved model (an RMT-KD student or a plain teacher) to ONNX, optionally int8, for ONNX Runtime.

``export_onnx`` writes the folder layout optimum's ``ORTModelFor…`` classes read: ``model.onnx`` (and
``model_quantized.onnx``), ``config.json`` and the tokenizer files (or ``preprocessor_config.json``), so the folder
serves with ``onnxruntime`` and a tokenizer alone, without torch. The graph comes from
``torch.onnx.export(..., dynamo=True)`` with dynamic batch and sequence axes (batch, height and width for images);
int8 is ``onnxruntime.quantization.quantize_dynamic`` with the settings of :class:`Int8Settings`, whose defaults
were measured (``benchmarks/quantization_options.py``, docs in ``benchmarks/results/quantization_options.md``).

Needs the ``onnx`` extra: ``pip install 'rmt-kd-hf[onnx]'`` (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .checkpoint import check_checkpoint, load_checkpoint, staged_directory
from .filenames import EXPORT_INFO_FILENAME, ONNX_FILENAME, QUANTIZED_FILENAME
from .reports import median_seconds

ONNX_EXTRA = "pip install 'rmt-kd-hf[onnx]'"
DEFAULT_OPSET = 18
# the model types whose graphs export_onnx has been tested on, by input kind
TEXT_MODEL_TYPES = (
    "bert",
    "rmt_bert",
    "rmt_roberta",
    "rmt_xlm_roberta",
    "rmt_electra",
    "rmt_distilbert",
    "rmt_modernbert",
)
# their AutoModel returns the last hidden state only
_NO_POOLER_TYPES = ("rmt_electra", "rmt_distilbert", "rmt_modernbert")
IMAGE_MODEL_TYPES = ("resnet", "rmt_resnet")
# architecture suffix -> (Auto class, ONNX output names)
_HEADS = {
    "ForSequenceClassification": ("AutoModelForSequenceClassification", ("logits",)),
    "ForTokenClassification": ("AutoModelForTokenClassification", ("logits",)),
    "ForQuestionAnswering": ("AutoModelForQuestionAnswering", ("start_logits", "end_logits")),
    "ForImageClassification": ("AutoModelForImageClassification", ("logits",)),
}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "added_tokens.json",
)
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json",)
_SCOPE_KEY = "pkg.torch.onnx.name_scopes"


class ExportError(ValueError):
    """The model cannot be exported as asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class Int8Settings:
    """How ``quantize_dynamic`` makes the int8 file.

    Args:
        per_channel: one scale per output channel of each weight (else one per tensor).
        reduce_range: 7-bit weights, which avoid saturation on CPUs without VNNI (AVX2 only).
        quantize_embeddings: the embedding tables (``Gather``) in int8 too; they are most of a small model's file.
        keep_float: module-name substrings whose matrix products stay fp32. Default ``("LayerNorm",)``: the lifted
            LayerNorm projections of compressed BERTs (a plain BERT's LayerNorms are no matrix products). Pooler and
            classifier are ``Gemm`` nodes, which dynamic quantisation leaves fp32 anyway.

    Defaults chosen on validation by ``benchmarks/quantization_options.py`` (``results/quantization_options.md``):
    per-tensor scales cost 1.7 pt at q = 0.5, 7-bit weights 0.5–0.7 pt, int8 LayerNorm projections 0.6–0.8 pt.
    """

    per_channel: bool = True
    reduce_range: bool = False
    quantize_embeddings: bool = True
    keep_float: tuple[str, ...] = ("LayerNorm",)


@dataclass
class ExportedModel:
    """What :func:`export_onnx` wrote: paths, the graph's interface and how closely fp32 matches PyTorch."""

    output_dir: str
    onnx_path: str
    quantized_path: str | None
    input_names: list[str]
    output_names: list[str]
    max_abs_difference: float
    int8: dict | None = field(default=None)


def require_onnx_extra() -> None:
    """Raise an ``ImportError`` naming the missing package and the install command."""
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            raise ImportError(f"ONNX export needs the '{name}' package, which is not installed: {ONNX_EXTRA}") from None


def _read_config(model_dir: str) -> dict:
    """``config.json`` of a complete safetensors checkpoint (``check_checkpoint``'s checks, as an ExportError)."""
    try:
        check_checkpoint(model_dir)
    except ValueError as error:
        raise ExportError(str(error)) from None
    with open(os.path.join(model_dir, "config.json")) as file:
        return json.load(file)


def _auto_class_and_outputs(config: Mapping) -> tuple[str, tuple[str, ...]]:
    """The Auto class that loads the saved architecture and the outputs its graph returns."""
    model_type = config.get("model_type")
    supported = TEXT_MODEL_TYPES + IMAGE_MODEL_TYPES
    if model_type not in supported:
        raise ExportError(
            f"ONNX export supports model types {', '.join(supported)}; this model is {model_type!r}. "
            "Export it with its own exporter (e.g. torch.onnx.export)."
        )
    architecture = (config.get("architectures") or [""])[0]
    for suffix, (auto_class, outputs) in _HEADS.items():
        if architecture.endswith(suffix):
            return auto_class, outputs
    if model_type in _NO_POOLER_TYPES:
        return "AutoModel", ("last_hidden_state",)
    return "AutoModel", ("last_hidden_state", "pooler_output")


def _load_model(model_dir: str, auto_class: str, trust_remote_code: bool):
    import transformers

    try:
        model = load_checkpoint(  # _read_config has checked the folder
            getattr(transformers, auto_class), model_dir, verify=False, trust_remote_code=trust_remote_code
        )
    except ValueError as error:  # a missing tensor, shapes that differ from config.json
        raise ExportError(str(error)) from None
    return model.eval()


def example_inputs(model, batch_size: int = 2, length: int = 16, padded_rows: int = 1) -> dict[str, torch.Tensor]:
    """Random inputs of ``batch_size`` rows: text of ``length`` tokens, ``padded_rows`` of them padded to half
    length; images ``32 + length`` pixels square (the exported graph takes sides from 32)."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    if config.model_type in IMAGE_MODEL_TYPES:
        side = 32 + length
        return {"pixel_values": torch.randn(batch_size, config.num_channels, side, side, generator=generator)}
    length = min(length, config.max_position_embeddings)
    input_ids = torch.randint(1, config.vocab_size, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:padded_rows, length // 2 :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id or 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}


def _dynamic_shapes(inputs: Mapping[str, torch.Tensor], config) -> dict[str, dict[int, object]]:
    """Batch and sequence axes dynamic (batch, height and width for images)."""
    batch = torch.export.Dim("batch_size", min=1)
    if "pixel_values" in inputs:
        # stride-2 stem, pool and stages: sides from 32 pixels up
        return {"pixel_values": {0: batch, 2: torch.export.Dim("height", min=32), 3: torch.export.Dim("width", min=32)}}
    longest = config.max_position_embeddings
    if getattr(config, "position_ids_from_padding", False):  # RoBERTa's positions start after pad_token_id
        longest -= config.pad_token_id + 1
    sequence = torch.export.Dim("sequence_length", min=1, max=longest)
    return {name: {0: batch, 1: sequence} for name in inputs}


def _torch_outputs(model, inputs: Mapping[str, torch.Tensor], output_names) -> list[np.ndarray]:
    with torch.no_grad():
        output = model(**inputs, return_dict=True)
    return [output[name].numpy() for name in output_names]


class _OutputSelector(torch.nn.Module):
    """The model with its named outputs as a tuple: the exported graph's outputs, in a fixed order."""

    def __init__(self, model, output_names):
        super().__init__()
        self.model, self.output_names = model, output_names

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None):
        given = dict(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, pixel_values=pixel_values
        )
        output = self.model(**{name: value for name, value in given.items() if value is not None}, return_dict=True)
        return tuple(output[name] for name in self.output_names)


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on the CPU with all graph optimisations and ``threads`` intra-op
    threads (default: onnxruntime's)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def ort_feed(session, inputs: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs the session takes, as numpy arrays; ``token_type_ids`` default to zeros, as in transformers."""
    arrays = {name: value.numpy() if torch.is_tensor(value) else np.asarray(value) for name, value in inputs.items()}
    if "token_type_ids" not in arrays and "input_ids" in arrays:
        arrays["token_type_ids"] = np.zeros_like(arrays["input_ids"])
    return {item.name: arrays[item.name] for item in session.get_inputs()}


def _check_against_torch(model, onnx_path: str, output_names, tolerance: float) -> float:
    """Largest |ONNX − PyTorch| output difference over inputs of several lengths, with padding."""
    import onnxruntime

    largest, session = 0.0, None
    for batch_size, length in ((1, 7), (3, 16), (4, 33)):
        inputs = example_inputs(model, batch_size, length, padded_rows=min(2, batch_size - 1))
        expected = _torch_outputs(model, inputs, output_names)
        try:
            session = session or ort_session(onnx_path)
            actual = session.run(list(output_names), ort_feed(session, inputs))
        except onnxruntime.capi.onnxruntime_pybind11_state.Fail as error:
            raise ExportError(
                f"ONNX Runtime {onnxruntime.__version__} cannot run the exported graph ({str(error)[:300]}): try "
                f"another --opset (default {DEFAULT_OPSET})."
            ) from None
        for reference, value in zip(expected, actual, strict=True):
            largest = max(largest, float(np.abs(reference - value).max()))
    if not largest <= tolerance:
        raise ExportError(
            f"The exported graph differs from PyTorch by {largest:.3g} (tolerance {tolerance:g}); "
            "please report it with the model's config.json."
        )
    return largest


def _nodes_in_modules(model_path: str, patterns: tuple[str, ...]) -> set[str]:
    """Names of the weight products (MatMul, Gemm, Gather) inside a module whose path contains one of
    ``patterns``, read from the exporter's name scopes."""
    import onnx

    names = set()
    for node in onnx.load(model_path, load_external_data=False).graph.node:
        scopes = [ast.literal_eval(prop.value) for prop in node.metadata_props if prop.key == _SCOPE_KEY]
        if node.op_type not in ("MatMul", "Gemm", "Gather") or not scopes:
            continue
        module = next((part for part in reversed(scopes[0][:-1]) if part), "")
        if any(pattern in module for pattern in patterns):
            names.add(node.name)
    return names


def _vector_products(model_path: str) -> set[str]:
    """MatMuls by a constant vector (the lifted LayerNorm's mean): per-channel int8 breaks on them, and they are
    negligible work."""
    import onnx

    graph = onnx.load(model_path, load_external_data=False).graph
    vectors = {tensor.name for tensor in graph.initializer if len(tensor.dims) == 1}
    return {node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in vectors}


def quantize_int8(
    onnx_path: str, output_path: str, settings: Int8Settings = Int8Settings(), scopes_path: str | None = None
) -> dict:
    """Dynamic int8 quantisation of ``onnx_path`` into ``output_path``; returns the settings and how many weight
    products stayed fp32. ``scopes_path``: the exported graph whose name scopes locate ``settings.keep_float``,
    when ``onnx_path`` is a rewrite of it that lost them (default: ``onnx_path`` itself).

    The graph is first pre-processed as ONNX Runtime recommends (``quant_pre_process``: its basic optimisations,
    which fold constant subgraphs such as the fused QKV weight's concatenation into initializers the quantiser can
    see), then quantised.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        prepared = os.path.join(scratch, "prepared.onnx")
        quant_pre_process(onnx_path, prepared, skip_symbolic_shape=True)
        # optimisation drops the name scopes but keeps node names: read the modules from the exported graph
        in_modules = _nodes_in_modules(scopes_path or onnx_path, settings.keep_float)
        excluded = sorted(in_modules | _vector_products(prepared))
        op_types = ["MatMul"] + (["Gather"] if settings.quantize_embeddings else [])
        quantize_dynamic(
            prepared,
            output_path,
            op_types_to_quantize=op_types,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
        )
    return {**asdict(settings), "keep_float": list(settings.keep_float), "fp32_weight_products": len(excluded)}


def _copy_processor_files(model_dir: str, destination: str, model_type: str) -> None:
    """The tokenizer files (or the image processor's) that ``model_dir`` has."""
    names = _IMAGE_PROCESSOR_FILES if model_type in IMAGE_MODEL_TYPES else _TOKENIZER_FILES
    for name in names:
        source = os.path.join(model_dir, name)
        if os.path.isfile(source):
            shutil.copy2(source, os.path.join(destination, name))


def export_onnx(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    quantize: str | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    int8: Int8Settings | None = None,
    tolerance: float = 1e-4,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> ExportedModel:
    """Export the model saved in ``model_dir`` to ``output_dir``/model.onnx, and with ``quantize="int8"`` also
    ``model_quantized.onnx``.

    The fp32 graph is checked against PyTorch on inputs of several lengths with padding (``tolerance`` on every
    output). The folder is built in a temporary sibling and renamed into place: a failure writes nothing.

    Args:
        model_dir: a ``save_pretrained`` folder of a BERT or ResNet model, compressed (RMTBert*, RMTResNet*) or not.
        output_dir: where the folder goes; an existing non-empty one only with ``overwrite=True``.
        quantize: ``None`` or ``"int8"``.
        opset: ONNX opset of the graph.
        int8: quantisation settings (default :class:`Int8Settings`).
    """
    model_dir, output_dir = os.fspath(model_dir), os.path.abspath(os.fspath(output_dir))
    if quantize not in (None, "int8"):
        raise ExportError(f"quantize must be None or 'int8', got {quantize!r}.")
    if not 14 <= opset <= 23:
        raise ExportError(f"opset must be between 14 and 23 (ONNX Runtime's range here), got {opset}.")
    require_onnx_extra()
    config = _read_config(model_dir)
    auto_class, output_names = _auto_class_and_outputs(config)
    if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ExportError(f"{output_dir} exists and is not empty: choose a new folder or pass overwrite=True.")
    if os.path.abspath(model_dir) == output_dir:
        raise ExportError(f"The output folder is the model's own folder ({output_dir}): choose another one.")
    model = _load_model(model_dir, auto_class, trust_remote_code)
    with torch.no_grad():
        trial = model(**example_inputs(model, 1, 32), return_dict=True)
    output_names = tuple(name for name in output_names if trial.get(name) is not None)  # a base model's pooler
    with staged_directory(output_dir) as staging:
        input_names, difference = _export_into(model, model_dir, staging, config, output_names, opset, tolerance)
        int8_info = None
        if quantize == "int8":
            onnx_path, quantized_path = (os.path.join(staging, name) for name in (ONNX_FILENAME, QUANTIZED_FILENAME))
            int8_info = quantize_int8(onnx_path, quantized_path, int8 or Int8Settings())
        with open(os.path.join(staging, EXPORT_INFO_FILENAME), "w") as file:
            json.dump({"opset": opset, "max_abs_difference": difference, "int8": int8_info}, file)
    return ExportedModel(
        output_dir=output_dir,
        onnx_path=os.path.join(output_dir, ONNX_FILENAME),
        quantized_path=os.path.join(output_dir, QUANTIZED_FILENAME) if quantize else None,
        input_names=input_names,
        output_names=list(output_names),
        max_abs_difference=difference,
        int8=int8_info,
    )


def _export_into(
    model, model_dir: str, staging: str, config: Mapping, output_names, opset: int, tolerance: float
) -> tuple[list[str], float]:
    """Write ``model.onnx`` (checked against PyTorch), the served ``config.json`` and the processor files into
    ``staging``; returns the graph's input names and its largest output difference from PyTorch."""
    inputs = example_inputs(model)
    onnx_path = os.path.join(staging, ONNX_FILENAME)
    try:
        with torch.no_grad():  # the inference path (fused QKV) is the one exported
            program = torch.onnx.export(
                _OutputSelector(model, output_names).eval(),
                (),
                kwargs=dict(inputs),
                dynamo=True,
                opset_version=opset,
                input_names=list(inputs),
                output_names=list(output_names),
                dynamic_shapes=_dynamic_shapes(inputs, model.config),
                verbose=False,
            )
    except Exception as error:  # torch.export's errors are pages long; the summary names the cause
        lines = [line for line in str(error).splitlines() if line.strip()]
        summary = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if "Exception summary" in line), lines[0])
        raise ExportError(
            f"torch.onnx.export could not trace {type(model).__name__}: {summary} (pass another --opset, or report "
            "it with the model's config.json)."
        ) from error
    program.save(onnx_path, external_data=False)
    difference = _check_against_torch(model, onnx_path, output_names, tolerance)
    # the folder carries no modeling code: without auto_map, AutoConfig/AutoTokenizer never ask to run any
    served_config = {key: value for key, value in config.items() if key != "auto_map"}
    with open(os.path.join(staging, "config.json"), "w") as file:
        json.dump(served_config, file, indent=2)
    _copy_processor_files(model_dir, staging, config["model_type"])
    return list(inputs), difference


def ort_latency(session, inputs: Mapping[str, torch.Tensor | np.ndarray], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time in seconds of one ``session.run`` on ``inputs``."""
    feed = ort_feed(session, inputs)
    return median_seconds(lambda: session.run(None, feed), repeats, warmup)


__all__ = [
    "ExportError",
    "ExportedModel",
    "Int8Settings",
    "export_onnx",
    "ort_latency",
    "ort_session",
    "quantize_int8",
    "require_onnx_extra",
]
