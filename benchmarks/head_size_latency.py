#!/usr/bin/env python
"""CPU latency of one compressed checkpoint's layout with other per-head attention sizes (random weights: latency
does not depend on them), against the dense BERT of the same mean widths, all alternating in one process.

    python benchmarks/head_size_latency.py \\
        outputs/bench/frontier_q0.35_s0_steps600_h1.0_lr0.0001_a0.7 --head_sizes 20 16

Writes ``benchmarks/results/<--output>`` (default ``head_size_latency.json``). Used to explain the q = 0.35
frontier point's dense ratio under the old rounding-up rule: its heads were rounded up to 24 (12 x 24 = 288
attention dimensions on a 224-wide residual).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, BertForSequenceClassification

import rmt_kd_hf  # noqa: F401  (registers the RMTBert auto classes)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dense_equivalent import alternating_latency, dense_equivalent_config  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--head_sizes", type=int, nargs="+", default=[20, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default="head_size_latency.json", help="file name under benchmarks/results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    saved = AutoModelForSequenceClassification.from_pretrained(args.checkpoint).eval()
    models = {f"heads of {saved.config.query_key_head_sizes[0]} (saved)": saved}
    for head_size in args.head_sizes:
        config = AutoConfig.from_pretrained(args.checkpoint)
        config.query_key_head_sizes = config.value_head_sizes = [head_size] * config.num_hidden_layers
        models[f"heads of {head_size}"] = type(saved)(config).eval()
    dense = BertForSequenceClassification(dense_equivalent_config(saved.config)).eval()
    models["dense equivalent"] = dense
    result = {
        "checkpoint": args.checkpoint,
        "dense_equivalent": {
            "hidden_size": dense.config.hidden_size,
            "intermediate_size": dense.config.intermediate_size,
        },
        "threads": args.threads,
        "load_average_before": os.getloadavg()[0],
    }
    for batch_size in (1, 32):
        timing = alternating_latency(models, batch_size, 128, args.rounds, 10 if batch_size == 1 else 3)
        result[f"batch_{batch_size}"] = {
            name: {"ms": 1e3 * seconds, "ratio_to_dense": seconds / timing["dense equivalent"]}
            for name, seconds in timing.items()
        }
    result["load_average_after"] = os.getloadavg()[0]
    result["command"] = "python benchmarks/head_size_latency.py " + " ".join(argv or sys.argv[1:])
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.output), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
