"""Training plots as PNG: loss curves, expert load per connector, HGA gate distribution.

Input is what training writes: ``metrics.jsonl`` records (one per optimizer step) with
``step``, ``stage``, ``loss``, ``lm_loss``, ``balance_loss``, ``z_loss`` and, per encoder,
``expert_load/<encoder>`` — the fraction of that connector's routed tokens each expert received
in the step (E values summing to 1). A collapsed router shows up in the heat map as one bright
row; a balanced one as an even field at 1/E.

Figures are built with matplotlib's object API (``Figure``, Agg canvas), never ``pyplot``: no
global state, no display needed, safe in worker processes. Each ``*_figure`` function returns
the figure (tests read the plotted data back); :func:`save_figure` writes the PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

LOSS_CURVES: tuple[tuple[str, str], ...] = (
    ("loss", "total loss"),
    ("lm_loss", "LM loss"),
    ("balance_loss", "balance loss"),
    ("z_loss", "router z-loss"),
)
EXPERT_LOAD_PREFIX = "expert_load/"
GATE_BINS = np.linspace(0.0, 1.0, 21)  # HGA gates are sigmoids in [0, 1]


def records_by_stage(records: Sequence[Mapping]) -> dict[int, list[Mapping]]:
    """Records grouped by ``stage`` (ascending), each group sorted by ``step``."""
    stages: dict[int, list[Mapping]] = {}
    for i, r in enumerate(records):
        if "step" not in r or "stage" not in r:
            raise ValueError(f"metrics record {i} lacks 'step' or 'stage': {sorted(r)}")
        stages.setdefault(int(r["stage"]), []).append(r)
    return {s: sorted(stages[s], key=lambda r: r["step"]) for s in sorted(stages)}


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def loss_figure(records: Sequence[Mapping]) -> Figure:
    """One row per stage, one panel per loss term (total, LM, balance, z) against step."""
    stages = records_by_stage(records)
    if not stages:
        raise ValueError("no metrics records to plot")
    fig = Figure(figsize=(4 * len(LOSS_CURVES), 2.8 * len(stages)), layout="constrained")
    axes = fig.subplots(len(stages), len(LOSS_CURVES), squeeze=False)
    for row, (stage, recs) in enumerate(stages.items()):
        for col, (key, label) in enumerate(LOSS_CURVES):
            ax = axes[row][col]
            points = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if not points:
                _no_data(ax, label)
            else:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="." if len(points) < 30 else None, label=label)
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
            ax.set_title(f"stage {stage}: {label}")
    return fig


def expert_load_series(records: Sequence[Mapping]) -> dict[str, tuple[list[int], np.ndarray]]:
    """Per encoder: (steps, load [E, steps]) over the records that log it."""
    series: dict[str, tuple[list[int], list[list[float]]]] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith(EXPERT_LOAD_PREFIX):
                steps, loads = series.setdefault(key[len(EXPERT_LOAD_PREFIX):], ([], []))
                if loads and len(value) != len(loads[0]):
                    raise ValueError(f"{key} has {len(value)} experts at step {r['step']} but {len(loads[0])} before")
                steps.append(int(r["step"]))
                loads.append([float(v) for v in value])
    return {kind: (steps, np.asarray(loads).T) for kind, (steps, loads) in series.items()}


def expert_load_figure(records: Sequence[Mapping]) -> Figure:
    """Heat maps of expert load (experts x steps), one panel per encoder's connector and one
    row per stage. The colour scale runs from 0 to the largest load seen (at least 2/E), so a
    balanced router (all rows at 1/E) reads as a flat mid tone."""
    stages = records_by_stage(records)
    per_stage = {stage: expert_load_series(recs) for stage, recs in stages.items()}
    kinds = list(dict.fromkeys(k for series in per_stage.values() for k in series))
    if not kinds:
        raise ValueError(f"no {EXPERT_LOAD_PREFIX}<encoder> values in the metrics records")
    fig = Figure(figsize=(4.2 * len(kinds), 2.6 * len(per_stage)), layout="constrained")
    axes = fig.subplots(len(per_stage), len(kinds), squeeze=False)
    for row, (stage, series) in enumerate(per_stage.items()):
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            ax.set_title(f"stage {stage}: {kind} connector")
            if kind not in series:
                _no_data(ax, "expert load")
                continue
            steps, load = series[kind]
            num_experts = load.shape[0]
            image = ax.imshow(load, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0,
                              vmax=max(float(load.max()), 2.0 / num_experts),
                              extent=(steps[0] - 0.5, steps[-1] + 0.5, num_experts - 0.5, -0.5))
            ax.set_xlabel("step")
            ax.set_ylabel("expert")
            ax.set_yticks(range(num_experts))
            fig.colorbar(image, ax=ax, label="fraction of tokens")
    return fig


def hga_gate_figure(gates: Mapping[str, np.ndarray]) -> Figure:
    """Histogram of per-token HGA gate values for each encoder group (gate 0: the token keeps
    its own features; 1: it takes the cross-group aggregate)."""
    if not gates:
        raise ValueError("no HGA gate values to plot")
    fig = Figure(figsize=(3.6 * len(gates), 3.0), layout="constrained")
    axes = fig.subplots(1, len(gates), squeeze=False)[0]
    for ax, (kind, values) in zip(axes, gates.items()):
        values = np.asarray(values, dtype=np.float64).ravel()
        ax.set_title(f"{kind} tokens")
        if values.size == 0:
            _no_data(ax, "gate values")
            continue
        ax.hist(values, bins=GATE_BINS)
        ax.axvline(float(values.mean()), color="black", linestyle="--", label=f"mean {values.mean():.2f}")
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("gate")
        ax.set_ylabel("tokens")
        ax.legend(loc="upper center")
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def write_training_plots(records: Sequence[Mapping], out_dir: str | Path,
                         gates: Mapping[str, np.ndarray] | None = None) -> dict[str, Path]:
    """Write ``losses.png``, ``expert_load.png`` (when the records log expert load) and
    ``hga_gates.png`` (when ``gates`` are given) into ``out_dir``; returns name -> path."""
    out_dir = Path(out_dir)
    written = {"losses": save_figure(loss_figure(records), out_dir / "losses.png")}
    if any(k.startswith(EXPERT_LOAD_PREFIX) for r in records for k in r):
        written["expert_load"] = save_figure(expert_load_figure(records), out_dir / "expert_load.png")
    if gates:
        written["hga_gates"] = save_figure(hga_gate_figure(gates), out_dir / "hga_gates.png")
    return written
