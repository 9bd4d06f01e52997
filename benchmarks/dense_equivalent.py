#!/usr/bin/env python
"""CPU latency of a compressed RMTBert checkpoint against a plain BERT with the same widths.

The dense equivalent is a ``Bert*`` model of the same head, depth, heads and vocabulary whose hidden size is the
mean residual width of the checkpoint (rounded to a multiple of lcm(heads, 8)) and whose FFN width is the mean
FFN width (rounded to a multiple of 8); its weights are random (latency does not depend on them). Both run in
this process, alternating round by round so that a change in machine load hits both alike; the ratio
compressed / dense is reported per batch size with the thread count and the load average before and after (a
load above the thread count means the machine was contended).

    python benchmarks/dense_equivalent.py outputs/q05_heads_w8 --threads 1 --rounds 9 --format_1_reference
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)

import rmt_kd_hf  # noqa: F401  (registers the RMTBert auto classes)
from rmt_kd_hf.reports import cpu_latency, parameter_counts


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="directory of a compressed RMTBert checkpoint")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--sequence_length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median round is reported")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per model per round (batch 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    parser.add_argument(
        "--format_1_reference",
        action="store_true",
        help="also time the checkpoint re-expressed in format 1 (uncentred lifted LayerNorm, as before the fusion)",
    )
    return parser.parse_args(argv)


def dense_equivalent_config(config) -> BertConfig:
    """A ``BertConfig`` with the checkpoint's mean residual and FFN widths, rounded to the nearest multiple of
    ``lcm(heads, 8)`` and of 8 (widths that are multiples of 8 run faster: the dense model gets that too)."""
    heads = config.num_attention_heads
    step = math.lcm(heads, 8)
    hidden = max(step, step * round(statistics.mean(config.boundary_sizes) / step))
    intermediate = max(8, 8 * round(statistics.mean(config.intermediate_sizes) / 8))
    fields = {key: value for key, value in config.to_dict().items() if key in BertConfig().to_dict()}
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    fields.update(hidden_size=hidden, intermediate_size=intermediate)
    return BertConfig(**fields)


def load_pair(checkpoint: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The compressed model from ``checkpoint`` and a randomly initialised dense equivalent of the same head."""
    config = AutoConfig.from_pretrained(checkpoint)
    classifier = any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
    auto_class, dense_class = (
        (AutoModelForSequenceClassification, BertForSequenceClassification) if classifier else (AutoModel, BertModel)
    )
    compressed = auto_class.from_pretrained(checkpoint).eval()
    dense = dense_class(dense_equivalent_config(config)).eval()
    return compressed, dense


def format_1_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same function in format 1: ``W = W_centred + g cᵀ/d`` with ``g = 0`` computes ``(W u - m g) / s + b``
    exactly as format 2 does, at format 1's cost."""
    config = type(model.config).from_dict({**model.config.to_dict(), "rmt_kd_format_version": 1})
    reference = type(model)(config).eval()
    state = dict(model.state_dict())
    for name in list(state):
        if name.endswith(".mean_direction"):
            state[name.replace(".mean_direction", ".gain_direction")] = torch.zeros_like(
                state[name.replace(".mean_direction", ".bias")]
            )
    reference.load_state_dict(state, strict=True)
    return reference


def alternating_latency(models: dict, batch_size: int, sequence_length: int, rounds: int, repeats: int) -> dict:
    """Median over ``rounds`` of each model's median latency (seconds), the models alternating every round."""
    per_round = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            per_round[name].append(cpu_latency(model, batch_size, sequence_length, repeats=repeats, warmup=2))
    return {name: statistics.median(values) for name, values in per_round.items()}


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    compressed, dense = load_pair(args.checkpoint)
    models = {"compressed": compressed, "dense_equivalent": dense}
    if args.format_1_reference:
        models["compressed_format_1"] = format_1_copy(compressed)
    load_before = os.getloadavg()
    results = {}
    for batch_size in args.batch_sizes:
        repeats = args.repeats if batch_size == 1 else max(2, args.repeats // 4)
        latency = alternating_latency(models, batch_size, args.sequence_length, args.rounds, repeats)
        ratio = latency["compressed"] / latency["dense_equivalent"]
        results[f"batch_{batch_size}"] = {**latency, "ratio": ratio}
        line = (
            f"batch {batch_size:>3}, seq {args.sequence_length}: compressed {1e3 * latency['compressed']:.2f} ms, "
            f"dense equivalent {1e3 * latency['dense_equivalent']:.2f} ms, ratio {ratio:.3f}"
        )
        if args.format_1_reference:
            format_1_ratio = latency["compressed_format_1"] / latency["dense_equivalent"]
            results[f"batch_{batch_size}"]["format_1_ratio"] = format_1_ratio
            line += f"; format 1 {1e3 * latency['compressed_format_1']:.2f} ms, ratio {format_1_ratio:.3f}"
        print(line, flush=True)
    config = compressed.config
    result = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "compressed_widths": {
            "boundary_sizes": config.boundary_sizes,
            "intermediate_sizes": config.intermediate_sizes,
            "query_key_head_sizes": config.query_key_head_sizes,
            "value_head_sizes": config.value_head_sizes,
        },
        "dense_equivalent": {
            "hidden_size": dense.config.hidden_size,
            "intermediate_size": dense.config.intermediate_size,
            "num_attention_heads": dense.config.num_attention_heads,
        },
        "parameters": {"compressed": parameter_counts(compressed), "dense_equivalent": parameter_counts(dense)},
        "latency_seconds": results,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "contended": max(load_before[0], os.getloadavg()[0]) > torch.get_num_threads(),
        "command": "python benchmarks/dense_equivalent.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(f"threads {result['threads']}, load average before {load_before}, after {result['load_average_after']}")
    if args.output:
        with open(args.output, "w") as file:
            json.dump(result, file, indent=2)
    return result


if __name__ == "__main__":
    main()
