#!/usr/bin/env python
"""Did making RMTBert exportable (issue #17) cost eager speed? The two changes against the code they replaced.

* mask: an all-ones attention mask is now added in every layer (no branch on its values); before, it was skipped;
* QKV: the fused query/key/value weight is concatenated at every inference call; before, it was cached until a
  weight changed (keyed on ``data_ptr``/``_version``, which broke ``torch.export`` and went stale under ``.data``).

The replaced versions are reproduced below and swapped in; each pair alternates over ``--rounds`` rounds on a saved
RMTBert checkpoint (2 threads, seq 128, batch 1 and 32), median.

    python benchmarks/eager_fast_paths.py --checkpoint outputs/bench/frontier_q0.5_s0_steps600_...
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys

import torch
from transformers import AutoModelForSequenceClassification

import rmt_kd_hf  # noqa: F401  (registers the RMTBert auto classes)
from rmt_kd_hf.models.rmt_bert import modeling_rmt_bert
from rmt_kd_hf.reports import median_seconds

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "eager_fast_paths.json")


def skipped_all_ones_mask(attention_mask, dtype):
    """The replaced mask: ``None`` (nothing added) when every token is real."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def cached_projection(self, hidden_states):
    """The replaced QKV path: the concatenated weight cached until a weight's pointer or version changes."""
    layers = (self.query, self.key, self.value)
    stamp = tuple((t.data_ptr(), t._version, t.dtype) for layer in layers for t in (layer.weight, layer.bias))
    cache = getattr(self, "_benchmark_cache", None)
    if cache is None or cache[0] != stamp:
        weight = torch.cat([layer.weight for layer in layers])
        cache = (stamp, weight, torch.cat([layer.bias for layer in layers]))
        self._benchmark_cache = cache
    sizes = [layer.out_features for layer in layers]
    return torch.nn.functional.linear(hidden_states, cache[1], cache[2]).split(sizes, dim=-1)


def compare(model, variants: dict, batch_size: int, rounds: int) -> dict[str, float]:
    """Median over rounds of each variant's median latency (ms), variants alternating."""
    input_ids = torch.randint(1, 1000, (batch_size, 128), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    timings = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (target, attribute, replacement) in variants.items():
            original = getattr(target, attribute)
            setattr(target, attribute, replacement or original)
            try:
                with torch.inference_mode():
                    seconds = median_seconds(lambda: model(**inputs), 20 if batch_size == 1 else 3, warmup=2)
            finally:
                setattr(target, attribute, original)
            timings[name].append(1e3 * seconds)
    return {name: statistics.median(values) for name, values in timings.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a saved RMTBert sequence classifier")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = AutoModelForSequenceClassification.from_pretrained(args.checkpoint).eval()
    if type(model).__module__ != modeling_rmt_bert.__name__:  # the swaps below patch this package's module
        raise SystemExit(f"{args.checkpoint} did not load as {modeling_rmt_bert.__name__} ({type(model).__module__})")
    attention = modeling_rmt_bert.RMTBertSelfAttention
    pairs = {
        "mask": {
            "skipped when all ones (before)": (modeling_rmt_bert, "_additive_attention_mask", skipped_all_ones_mask),
            "always added (now)": (modeling_rmt_bert, "_additive_attention_mask", None),
        },
        "qkv": {
            "cached (before)": (attention, "_project", cached_projection),
            "concatenated per call (now)": (attention, "_project", None),
        },
    }
    result = {
        "checkpoint": args.checkpoint,
        "threads": args.threads,
        "rounds": args.rounds,
        "latency_ms": {
            pair: {f"b{batch}": compare(model, variants, batch, args.rounds) for batch in (1, 32)}
            for pair, variants in pairs.items()
        },
        "command": shlex.join(["python", "benchmarks/eager_fast_paths.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    with open(RESULTS, "w") as file:
        json.dump(result, file, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
