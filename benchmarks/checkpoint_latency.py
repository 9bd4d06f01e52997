#!/usr/bin/env python
"""CPU latency of saved checkpoints against the converged teacher and against dense BERTs of their widths.

The latency half of ``frontier.py`` for checkpoints that are not frontier points (a recipe compared at one
target), every model alternating round by round in one process (sequence length 128, batch 1 and 32):

    python benchmarks/checkpoint_latency.py --name quantile_shift_latency \\
        --checkpoints outputs/bench/frontier_t0.34_s0_... outputs/bench/frontier_t0.34_s0_..._shift-ffn+0.3

Writes ``results/NAME.json``: per checkpoint the speedup over the teacher and the ratio to its dense equivalent.
Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from frontier import RESULTS_DIR, latencies  # noqa: E402
from frontier_point import converged_teacher  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--name", required=True, help="results/NAME.json")
    parser.add_argument("--work_dir", default="outputs/bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    missing = [path for path in args.checkpoints if not os.path.exists(os.path.join(path, "config.json"))]
    if missing:
        raise SystemExit(f"not a saved checkpoint (no config.json): {', '.join(missing)}")
    _, teacher = converged_teacher(args.work_dir)
    load_before = os.getloadavg()[0]
    timing = latencies(teacher, args.checkpoints, args.threads, args.rounds)
    result = {
        "checkpoints": timing,
        "threads": args.threads,
        "rounds": args.rounds,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "command": shlex.join(["python", "benchmarks/checkpoint_latency.py", *(argv or sys.argv[1:])]),
    }
    with open(os.path.join(RESULTS_DIR, f"{args.name}.json"), "w") as file:
        json.dump(result, file, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
