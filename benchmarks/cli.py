"""Run the ratio benchmarks and write benchmarks/results.json and benchmarks/RESULTS.md.

  python -m benchmarks [--only NAME ...] [--size tiny|small|full] [--repeats N]
  mocha bench          (same options)

Each benchmark compares ours with a baseline in the same process (warm-up first, interleaved
rounds, medians) and reports the ratio, its goal and pass/miss. Results of benchmarks not run
this time are kept from the previous results.json. `small` takes about 10 minutes on 2 CPUs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

#: Benchmark modules (under ``benchmarks.``), in the order they run and are reported.
BENCHMARKS: tuple[str, ...] = (
    "moe_connector", "hga_graph", "shard_build", "feature_precompute",
    "train_from_features", "train_data_wait", "expert_parallel", "checkpoint_memory", "trainer_memory",
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--size", choices=("tiny", "small", "full"), default="small",
                        help="problem sizes: tiny (smoke), small (default, ~10 min on 2 CPUs), full")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per side (default: 2 tiny, 5 small, 7 full); the median is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the benchmark process (default 1: stable on a shared machine)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT,
                        help="where results.json and RESULTS.md go (default: the benchmarks package)")


def run_benchmark(name: str, size: str, repeats: int):
    """Run one benchmark; a failure becomes an entry with its error instead of stopping the run."""
    from benchmarks.harness import BenchmarkResult, machine

    module = importlib.import_module(f"benchmarks.{name}")
    try:
        result = module.run(size, repeats)
    except Exception as e:  # recorded in the results and in the exit status
        traceback.print_exc()
        result = BenchmarkResult(name=name, what=(module.__doc__ or name).strip().splitlines()[0], baseline="-",
                                 metric="-", ratio=None, error=f"{type(e).__name__}: {e}")
    result.size = size
    info = machine()
    result.torch_threads = info["torch_threads"]
    result.machine = info
    return result


def run(args: argparse.Namespace) -> int:
    import torch

    from benchmarks.harness import DEFAULT_REPEATS, machine
    from benchmarks.report import RESULTS_JSON, RESULTS_MD, merge_results, print_table, write_json, write_markdown

    if args.repeats is not None and args.repeats < 1:
        print("--repeats must be >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or DEFAULT_REPEATS[args.size]
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
    results = []
    for name in names:
        start = time.perf_counter()
        print(f"[bench] {name} ({args.size}, {repeats} repeats) ...", flush=True)
        results.append(run_benchmark(name, args.size, repeats))
        r = results[-1]
        status = r.error or f"ratio {r.ratio:.3g} (goal {r.goal})"
        print(f"[bench] {name}: {status} in {time.perf_counter() - start:.0f} s", flush=True)
    print_table(results)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    entries = merge_results(args.output_dir / RESULTS_JSON, results, BENCHMARKS)
    write_json(args.output_dir / RESULTS_JSON, entries, machine())
    write_markdown(args.output_dir / RESULTS_MD, entries, machine())
    print(f"[bench] wrote {args.output_dir / RESULTS_JSON} and {args.output_dir / RESULTS_MD}")
    return 1 if any(r.error for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
