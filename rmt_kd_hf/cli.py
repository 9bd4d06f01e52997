"""``rmt-kd`` command line.

* ``rmt-kd report MODEL_DIR_OR_ID [--data FILE.csv|json]``: a spectral report;
* ``rmt-kd bench TEACHER COMPRESSED [--onnx]``: parameters, disk and CPU latency of both, measured in one run
  (with ``--onnx``, also through ONNX Runtime in fp32 and int8);
* ``rmt-kd export MODEL_DIR --output DIR [--quantize int8]``: ONNX (and int8) in optimum's folder layout.

A user error or a fault of the environment (a bad option, a damaged checkpoint, a full disk) ends in one line on
stderr naming the problem and the fix, with exit status 2; ``--debug`` (or ``RMT_KD_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence

import torch
import transformers
from datasets import load_dataset

from .checkpoint import OutputFolderBusyError, load_checkpoint
from .data import text_dataloader
from .export import DEFAULT_OPSET, Int8Settings, export_onnx, ort_latency, ort_session
from .filenames import SPECTRA_FILENAME
from .reports import cpu_latency, parameter_counts, safetensors_size_mb
from .spectral_report import POOR_FIT_KS_DISTANCE, spectral_report
from .surgery import get_surgery
from .text_classification import run as run_text_classification


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmt-kd",
        description="RMT-KD tools for Hugging Face models. Errors print one line; --debug shows the traceback.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "compress",
        help="Fine-tune the teacher if its classifier is new, then compress and distil it (GLUE task or csv/json "
        "files); `rmt-kd compress --help` lists every option with its default.",
        add_help=False,
    )
    report = commands.add_parser(
        "report",
        help="Spectral report: eigenvalue histograms against the Marchenko–Pastur law, outliers, fit quality.",
        description="Without --data, plot the spectra a compression saved (rmt_kd_spectra.json or "
        "rmt_kd_report.json in MODEL_DIR_OR_ID). With --data, calibrate the model on that text and preview what "
        "RMT-KD would keep (no weight is changed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    report.add_argument("model", metavar="MODEL_DIR_OR_ID", help="Local directory or hub id of the model.")
    report.add_argument("--data", default=None, help="Calibration text: a .csv, .json or .jsonl file.")
    report.add_argument("--text_column", default="sentence", help="Column of --data holding the text.")
    report.add_argument("--text_pair_column", default=None, help="Second text column (sentence-pair tasks).")
    report.add_argument("--max_samples", type=int, default=512, help="Rows of --data used for calibration.")
    report.add_argument("--max_length", type=int, default=128, help="Tokens per row (truncation).")
    report.add_argument("--batch_size", type=int, default=32, help="Calibration batch size.")
    report.add_argument("--sigma_quantile", type=float, default=0.5, help="Eigenvalue quantile that starts σ².")
    report.add_argument("--no_refine", action="store_true", help="Keep σ² at the quantile (no MP bulk refit).")
    report.add_argument(
        "--ks_warning_threshold", type=float, default=POOR_FIT_KS_DISTANCE, help="Warn above this bulk KS distance."
    )
    report.add_argument("--no_plots", action="store_true", help="Write the JSON only (no matplotlib needed).")
    report.add_argument("--output_dir", default="rmt_kd_spectral_report", help="Where the PNGs and JSON go.")
    report.add_argument("--trust_remote_code", action="store_true", help="Allow the model repo's own code.")
    bench = commands.add_parser(
        "bench",
        help="Teacher vs compressed: parameters, safetensors MB and CPU latency, measured one after the other.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument("teacher", metavar="TEACHER", help="Directory or hub id of the teacher.")
    bench.add_argument("compressed", metavar="COMPRESSED", help="Directory or hub id of the compressed model.")
    bench.add_argument("--auto_class", default="AutoModelForSequenceClassification", help="transformers Auto class.")
    bench.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32], help="Batch sizes to time.")
    bench.add_argument("--sequence_length", type=int, default=128, help="Tokens per row.")
    bench.add_argument("--repeats", type=int, default=10, help="Timed forward passes per batch size (median).")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores).")
    bench.add_argument("--output", default=None, help="Also write the results to this JSON file.")
    bench.add_argument(
        "--onnx", action="store_true", help="Also export both (local folders), time them in ONNX Runtime (fp32, int8)."
    )
    bench.add_argument("--trust_remote_code", action="store_true", help="Allow the model repo's own code.")
    export = commands.add_parser(
        "export",
        help="ONNX (and int8) for ONNX Runtime: model.onnx, model_quantized.onnx, config and tokenizer, in the folder "
        "layout optimum's ORTModel classes read.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    export.add_argument("model", metavar="MODEL_DIR", help="A save_pretrained folder (compressed or not).")
    export.add_argument("--output", required=True, help="Folder to write (new, or --overwrite).")
    export.add_argument("--quantize", choices=["int8"], default=None, help="Also write an int8 model_quantized.onnx.")
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset.")
    defaults = Int8Settings()
    export.add_argument("--per_tensor", action="store_true", help="int8: one scale per weight (default: per channel).")
    export.add_argument("--reduce_range", action="store_true", help="int8: 7-bit weights (CPUs without VNNI).")
    export.add_argument(
        "--float_embeddings", action="store_true", help="int8: leave the embedding tables in fp32 (a larger file)."
    )
    export.add_argument(
        "--keep_float",
        nargs="*",
        default=list(defaults.keep_float),
        help="int8: module-name substrings whose matrix products stay fp32 (e.g. LayerNorm classifier).",
    )
    export.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output folder.")
    export.add_argument("--trust_remote_code", action="store_true", help="Allow the model folder's own code.")
    return parser


def _calibration_dataloader(args: argparse.Namespace, tokenizer):
    extension = os.path.splitext(args.data)[1].lstrip(".").lower()
    builder = {"csv": "csv", "json": "json", "jsonl": "json"}.get(extension)
    if builder is None:
        raise ValueError(f"--data must be a .csv, .json or .jsonl file, got {args.data!r}")
    if not os.path.exists(args.data):
        raise FileNotFoundError(f"--data {args.data} does not exist")
    dataset = load_dataset(builder, data_files=args.data, split="train")
    columns = [args.text_column] + ([args.text_pair_column] if args.text_pair_column else [])
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{args.data} has no column {missing[0]!r} (columns: {dataset.column_names}).")
    dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    texts = [str(text) for text in dataset[args.text_column]]
    pairs = [str(text) for text in dataset[args.text_pair_column]] if args.text_pair_column else None
    return text_dataloader(texts, tokenizer, args.batch_size, args.max_length, text_pairs=pairs)


def _saved_spectra(model: str) -> str:
    """A local directory, or the spectra file downloaded from the hub."""
    if os.path.exists(model):
        return model
    from huggingface_hub import hf_hub_download

    return hf_hub_download(model, SPECTRA_FILENAME)


def run_report(args: argparse.Namespace) -> dict:
    if args.data is None:
        source, dataloader = _saved_spectra(args.model), None
    else:
        from transformers import AutoModel, AutoTokenizer  # RMTBert is registered: this imports rmt_kd_hf

        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        source = load_checkpoint(AutoModel, args.model, trust_remote_code=args.trust_remote_code).eval()
        dataloader = _calibration_dataloader(args, tokenizer)
    return spectral_report(
        source,
        dataloader,
        output_dir=args.output_dir,
        sigma_quantile=args.sigma_quantile,
        refine=not args.no_refine,
        ks_warning_threshold=args.ks_warning_threshold,
        plots=not args.no_plots,
    )


def run_bench(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    auto_class = getattr(transformers, args.auto_class, None)
    if auto_class is None or not args.auto_class.startswith("AutoModel"):
        raise ValueError(f"--auto_class {args.auto_class!r} is not a transformers AutoModel class.")
    models = {  # a head initialised anew is timed like a trained one
        name: load_checkpoint(auto_class, path, allow_new_head=True, trust_remote_code=args.trust_remote_code).eval()
        for name, path in (("teacher", args.teacher), ("compressed", args.compressed))
    }
    result = {"sequence_length": args.sequence_length, "threads": torch.get_num_threads()}
    for name, model in models.items():
        path = getattr(args, name)
        result[name] = {
            **parameter_counts(model),
            "safetensors_mb": safetensors_size_mb(path) if os.path.isdir(path) else None,
            "latency_seconds": {
                str(batch): cpu_latency(model, batch, args.sequence_length, repeats=args.repeats)
                for batch in args.batch_sizes
            },
        }
    if args.onnx:
        with tempfile.TemporaryDirectory() as scratch:
            for name, model in models.items():
                threads, scratch_dir = torch.get_num_threads(), os.path.join(scratch, name)
                result[name]["runtimes"] = _onnx_rows(model, getattr(args, name), args, threads, scratch_dir)
    result["parameter_ratio"] = result["compressed"]["total"] / result["teacher"]["total"]
    result["speedup"] = {
        batch: result["teacher"]["latency_seconds"][batch] / result["compressed"]["latency_seconds"][batch]
        for batch in result["teacher"]["latency_seconds"]
    }
    if args.output:
        with open(args.output, "w") as file:
            json.dump(result, file, indent=2)
    return result


def _onnx_rows(model, path: str, args: argparse.Namespace, threads: int, scratch: str) -> dict[str, dict]:
    """``{"ort-fp32": row, "ort-int8": row}``: ONNX file MB and ONNX Runtime latency of the model saved in ``path``,
    on the inputs ``cpu_latency`` gives ``model``."""
    if not os.path.isdir(path):
        raise ValueError(f"--onnx needs local model folders; {path!r} is not one (download it first).")
    exported = export_onnx(path, scratch, quantize="int8", trust_remote_code=args.trust_remote_code)
    surgery = get_surgery(model)
    inputs = {str(batch): surgery.example_inputs(model, batch, args.sequence_length) for batch in args.batch_sizes}
    rows = {}
    for precision, file in (("fp32", exported.onnx_path), ("int8", exported.quantized_path)):
        session = ort_session(file, threads)
        latency = {
            batch: ort_latency(session, batch_inputs, repeats=args.repeats) for batch, batch_inputs in inputs.items()
        }
        rows[f"ort-{precision}"] = {"onnx_mb": os.path.getsize(file) / 1e6, "latency_seconds": latency}
    return rows


def _print_bench(result: dict) -> None:
    print(
        f"{'':<12}{'params':>13}{'non-emb':>12}{'MB':>8}" + "".join(f"{'b' + b + ' ms':>10}" for b in result["speedup"])
    )
    for name in ("teacher", "compressed"):
        row = result[name]
        megabytes = "-" if row["safetensors_mb"] is None else f"{row['safetensors_mb']:.1f}"
        timings = "".join(f"{1e3 * seconds:>10.1f}" for seconds in row["latency_seconds"].values())
        print(f"{name:<12}{row['total']:>13,}{row['non_embedding']:>12,}{megabytes:>8}{timings}")
        for runtime, runtime_row in row.get("runtimes", {}).items():
            timings = "".join(f"{1e3 * seconds:>10.1f}" for seconds in runtime_row["latency_seconds"].values())
            label = f"  {runtime}"
            print(f"{label:<12}{'':>13}{'':>12}{runtime_row['onnx_mb']:>8.1f}{timings}")
    speedups = ", ".join(f"{value:.2f}x at batch {batch}" for batch, value in result["speedup"].items())
    print(f"compressed: {result['parameter_ratio']:.1%} of the parameters, {speedups} (PyTorch vs PyTorch)")


def run_export(args: argparse.Namespace):
    """``rmt-kd export``: :func:`rmt_kd_hf.export.export_onnx` with the command line's settings."""
    int8 = Int8Settings(
        per_channel=not args.per_tensor,
        reduce_range=args.reduce_range,
        quantize_embeddings=not args.float_embeddings,
        keep_float=tuple(args.keep_float),
    )
    return export_onnx(
        args.model,
        args.output,
        quantize=args.quantize,
        opset=args.opset,
        int8=int8,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )


def run_compress(argv: list[str]) -> dict:
    """``rmt-kd compress``: the arguments of ``examples/text-classification/run_glue.py``."""
    return run_text_classification(argv, prog="rmt-kd compress")


# Errors that come from the user's input or the environment: reported in one line. Anything else is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError, OutputFolderBusyError)


def error_line(error: BaseException) -> str:
    """One line naming the problem (and, where the error does not already, the fix)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" while writing {error.filename}" if error.filename else ""
        return f"no space left on the disk{where}: free some space, or choose an output folder on another disk."
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    message = " ".join(str(error).split()) or type(error).__name__
    return message if isinstance(error, (ValueError, OutputFolderBusyError)) else f"{type(error).__name__}: {message}"


def _pop_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Remove a bare ``--debug`` from ``argv``; ``--debug VALUE`` is left to TrainingArguments' own ``debug``."""
    debug = os.environ.get("RMT_KD_DEBUG", "") not in ("", "0")
    kept = []
    for index, argument in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else "--"
        if argument == "--debug" and following.startswith("--"):
            debug = True
        else:
            kept.append(argument)
    return kept, debug


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rmt-kd``; returns the process exit status."""
    argv, debug = _pop_debug_flag(list(sys.argv[1:] if argv is None else argv))
    command = argv[0] if argv else None
    try:
        if command == "compress":  # its options come from dataclasses (HfArgumentParser), as in run_glue.py
            payload = run_compress(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            commands = {"report": run_report, "bench": run_bench, "export": run_export}
            payload = commands[command](args)
    except USER_ERRORS as error:
        if debug:
            traceback.print_exc()
        print(f"rmt-kd {command}: error: {error_line(error)}", file=sys.stderr)
        return 2
    if command == "compress":
        for key, value in sorted(payload.items()):
            print(f"{key}: {value}")
    elif command == "export":
        written = ", ".join(sorted(os.listdir(payload.output_dir)))
        print(f"{payload.output_dir}: {written} (fp32: max |ONNX - PyTorch| = {payload.max_abs_difference:.2g})")
    elif command == "bench":
        _print_bench(payload)
    else:
        _print_report(payload, args)
    return 0


def _print_report(payload: dict, args: argparse.Namespace) -> None:
    poor = [f"{site['group']}/{site['site']}" for site in payload["sites"] if site["fit_quality"] == "poor"]
    print(f"{len(payload['sites'])} sites -> {os.path.abspath(args.output_dir)}")
    for site in payload["sites"]:
        print(
            f"  {site['group']}/{site['site']:<12} d={site['dim']:<5} n={site['num_samples']:<7} "
            f"outliers={site['num_outliers']:<5} λ+={site['lambda_plus']:.4g}  KS={site['bulk_ks_distance']:.3f}"
        )
    if "preview" in payload:
        preview = payload["preview"]
        print(f"RMT-KD would keep {preview['num_parameters_if_compressed']} of {preview['num_parameters']} parameters")
    if poor:
        print(f"poor Marchenko–Pastur fit (KS > {args.ks_warning_threshold}) at: {', '.join(poor)}")


if __name__ == "__main__":
    sys.exit(main())
