"""Write the results: ``results.json`` (every field), ``RESULTS.md`` (the table the README links to)
and a rich table on the terminal."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import BenchmarkResult

RESULTS_JSON = "results.json"
RESULTS_MD = "RESULTS.md"


def _verdict(entry: dict[str, Any]) -> str:
    if entry.get("error"):
        return "error"
    return {True: "pass", False: "miss", None: "-"}[entry["passed"]]


def _ratio(entry: dict[str, Any]) -> str:
    return "-" if entry.get("ratio") is None else f"{entry['ratio']:.3g}"


def merge_results(path: Path, new: Sequence[BenchmarkResult], order: Sequence[str]) -> list[dict[str, Any]]:
    """Entries of ``path`` (if any) updated with ``new`` by name, in benchmark ``order``."""
    entries: dict[str, dict[str, Any]] = {}
    if path.exists():
        entries = {e["name"]: e for e in json.loads(path.read_text())["benchmarks"]}
    entries.update({r.name: r.to_dict() for r in new})
    return [entries[name] for name in order if name in entries]


def write_json(path: Path, entries: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    path.write_text(json.dumps({"machine": machine, "benchmarks": entries}, indent=1, default=str) + "\n")


def _details(entry: dict[str, Any]) -> str:
    parts = [f"{k.removesuffix('_median')}: {v:.4g} s" for k, v in entry["seconds"].items() if isinstance(v, float)]
    return "; ".join(parts)


def write_markdown(path: Path, entries: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    lines = [
        "# Benchmark results",
        "",
        "Ratios of two measurements taken in the same process on the same machine (warm-up first, interleaved",
        "rounds, medians); absolute times on a shared machine are noise. Regenerate with",
        "`python -m benchmarks --size small` (or `mocha bench`); every field is in `results.json`.",
        "",
        f"Machine: {machine.get('platform')}, {machine.get('cpu_count')} CPUs, torch {machine.get('torch')}, "
        f"Python {machine.get('python')}.",
        "",
        "| benchmark | what | baseline | ratio | goal | result | size | repeats | torch threads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        lines.append(f"| `{e['name']}` | {e['what']} | {e['baseline']} | {_ratio(e)} | {e['goal']} | {_verdict(e)} "
                     f"| {e['size']} | {e['repeats']} | {e['torch_threads']} |")
    lines += ["", "## Details", ""]
    for e in entries:
        lines += [f"### `{e['name']}`", "", f"- ratio: {e['metric']} = **{_ratio(e)}** (goal {e['goal']}: "
                  f"{_verdict(e)})", f"- sizes: `{json.dumps(e['sizes'], default=str)}`",
                  f"- times (medians): {_details(e)}"]
        if e["extra"]:
            lines.append(f"- measured besides: `{json.dumps(e['extra'], default=str)}`")
        if e["notes"]:
            lines.append(f"- notes: {e['notes']}")
        if e.get("error"):
            lines.append(f"- error: `{e['error']}`")
        lines.append("")
    path.write_text("\n".join(lines))


def print_table(results: Sequence[BenchmarkResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mocha benchmarks (ratios, same process)")
    for column in ("benchmark", "metric", "ratio", "goal", "result", "size", "repeats"):
        table.add_column(column, overflow="fold")
    for r in results:
        e = r.to_dict()
        table.add_row(r.name, r.metric, _ratio(e), r.goal, _verdict(e), r.size, str(r.repeats))
    Console().print(table)
