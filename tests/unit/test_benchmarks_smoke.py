"""Every benchmark runs at ``tiny`` size and returns a well-formed result.

Not a performance test: nothing here depends on how fast anything is. Each benchmark itself
raises when ours and the baseline produce different outputs, so a passing run also means they
agreed. The baselines are checked against our implementations on their own as well, and the
harness pieces (interleaved timing, peak memory, the report files) are checked directly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.cli import BENCHMARKS, main, run_benchmark
from benchmarks.harness import BenchmarkResult, OutputMismatch, check_close, time_interleaved
from benchmarks.memory import peak_rss_during

FAST = ("moe_connector", "hga_graph")
RAY = tuple(name for name in BENCHMARKS if name not in FAST)


def _check_structure(result: BenchmarkResult, name: str) -> None:
    entry = result.to_dict()
    assert result.error is None, result.error
    assert entry["name"] == name and entry["size"] == "tiny"
    assert isinstance(result.ratio, float) and math.isfinite(result.ratio) and result.ratio > 0
    assert entry["what"] and entry["baseline"] and entry["metric"]
    assert entry["passed"] in (True, False, None)
    assert (entry["passed"] is None) == (not result.goal_op)
    assert result.repeats >= 1 and result.sizes and result.seconds
    assert result.torch_threads >= 1 and result.machine["cpu_count"] >= 1
    json.dumps(entry, default=str)  # serialisable as written to results.json


@pytest.mark.parametrize("name", FAST)
def test_in_process_benchmarks_run_and_agree(name):
    _check_structure(run_benchmark(name, "tiny", repeats=1), name)


@pytest.mark.slow
def test_ray_and_training_benchmarks_run_and_agree():
    for name in RAY:
        _check_structure(run_benchmark(name, "tiny", repeats=1), name)


def test_official_moe_baseline_matches_connector_and_detects_differences():
    from benchmarks.moe_connector import SIZES, _check_same
    from mocha.model.connector import MoEConnector

    s = SIZES["tiny"]
    torch.manual_seed(1)
    moe = MoEConnector(s.in_features, s.out_features, s.num_experts, s.top_k)
    x, probe = torch.randn(s.images, s.tokens, s.in_features), torch.randn(s.images, s.tokens, s.out_features)
    assert _check_same(moe, x, probe) < 1e-5
    with torch.no_grad():
        moe.experts[0][2].bias.add_(1.0)
    from benchmarks.reference import official_moe_forward

    changed = official_moe_forward(moe, x)[0]
    with torch.no_grad():
        moe.experts[0][2].bias.sub_(1.0)
    with pytest.raises(OutputMismatch):
        check_close("output", moe(x).hidden_states, changed, atol=1e-5)


def test_official_hga_baseline_matches_batched_graph():
    from benchmarks.reference import official_hga_per_image
    from mocha.model.hga import group_ids_from_sizes, hga_graph_batched

    torch.manual_seed(2)
    for sizes, k in (((6, 3, 5, 4), 10), ((1, 4, 1, 3), 10), ((7,), 5), ((2, 3), 4)):
        group_ids = group_ids_from_sizes(sizes)
        x = torch.randn(3, len(group_ids), 8)
        ours, ours_gate = hga_graph_batched(x, group_ids, k)
        ref, ref_gate = official_hga_per_image(x, group_ids, k)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_gate, ref_gate, atol=1e-5, rtol=0)


def test_time_interleaved_rotates_order_and_counts_rounds():
    calls = []
    timing = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert len(timing.runs["a"]) == len(timing.runs["b"]) == 3
    with pytest.raises(ValueError):
        time_interleaved({"a": lambda: None}, repeats=0)


def test_peak_rss_sees_a_large_temporary_allocation():
    size = 64 * 2**20
    peak = peak_rss_during(lambda: torch.ones(size // 4).sum())
    assert peak >= 0.9 * size
    assert peak_rss_during(lambda: None) < 0.5 * size  # freed memory left the resident set


def test_results_are_merged_and_written(tmp_path):
    assert main(["--only", "moe_connector", "--size", "tiny", "--repeats", "1", "--output-dir", str(tmp_path)]) == 0
    assert main(["--only", "hga_graph", "--size", "tiny", "--repeats", "1", "--output-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [e["name"] for e in data["benchmarks"]] == ["moe_connector", "hga_graph"]  # first run's entry kept
    assert data["machine"]["cpu_count"] >= 1
    markdown = (tmp_path / "RESULTS.md").read_text()
    assert "| `moe_connector` |" in markdown and "| `hga_graph` |" in markdown
