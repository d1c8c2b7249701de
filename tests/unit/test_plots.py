"""Plots and report.md: the files are written and the plotted data is exactly the input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from mocha.eval.gates import collect_hga_gates, split_by_encoder
from mocha.report.plots import (GATE_BINS, expert_load_figure, hga_gate_figure, loss_figure,
                                write_training_plots)
from mocha.report.report import ReportSection, score_sections, write_report
from mocha.report.tables import pope_table


def _records():
    rng = np.random.default_rng(0)
    records = []
    for stage, steps in ((1, 5), (2, 4)):
        for step in range(1, steps + 1):
            r = {"step": step, "stage": stage, "loss": 5.0 / step + stage, "lm_loss": 4.0 / step + stage,
                 "balance_loss": 1.0 + 0.01 * step, "lr": 1e-3, "tokens_per_s": 100.0, "data_wait_fraction": 0.1,
                 "expert_load/clip": list(rng.dirichlet(np.ones(4))),
                 "expert_load/siglip": list(rng.dirichlet(np.ones(2)))}
            if stage == 2:
                r["z_loss"] = 0.5 / step
            records.append(r)
    return list(reversed(records))  # order in the file must not matter


def _axis(fig, title):
    matches = [ax for ax in fig.axes if ax.get_title() == title]
    assert len(matches) == 1, [ax.get_title() for ax in fig.axes]
    return matches[0]


def test_loss_curves_plot_each_term_per_stage():
    records = _records()
    fig = loss_figure(records)
    for stage in (1, 2):
        recs = sorted((r for r in records if r["stage"] == stage), key=lambda r: r["step"])
        for key, label in (("loss", "total loss"), ("lm_loss", "LM loss"), ("balance_loss", "balance loss")):
            (line,) = _axis(fig, f"stage {stage}: {label}").lines
            np.testing.assert_allclose(line.get_xydata(), [(r["step"], r[key]) for r in recs])
    (z_line,) = _axis(fig, "stage 2: router z-loss").lines
    np.testing.assert_allclose(z_line.get_ydata(), [0.5 / s for s in range(1, 5)])
    assert not _axis(fig, "stage 1: router z-loss").lines  # never logged in stage 1: a "no data" panel


def test_expert_load_heat_map_is_experts_by_steps():
    records = _records()
    fig = expert_load_figure(records)
    for stage in (1, 2):
        recs = sorted((r for r in records if r["stage"] == stage), key=lambda r: r["step"])
        for kind, experts in (("clip", 4), ("siglip", 2)):
            (image,) = _axis(fig, f"stage {stage}: {kind} connector").images
            expected = np.array([r[f"expert_load/{kind}"] for r in recs]).T
            assert image.get_array().shape == (experts, len(recs))
            np.testing.assert_allclose(image.get_array(), expected)
            assert image.get_extent() == [0.5, len(recs) + 0.5, experts - 0.5, -0.5]


def test_expert_count_change_is_an_error():
    records = [{"step": 1, "stage": 1, "expert_load/clip": [0.5, 0.5]},
               {"step": 2, "stage": 1, "expert_load/clip": [0.2, 0.3, 0.5]}]
    with pytest.raises(ValueError, match="3 experts at step 2"):
        expert_load_figure(records)


def test_gate_histograms_count_the_input():
    rng = np.random.default_rng(1)
    gates = {"siglip": rng.uniform(0, 1, 500), "clip": rng.beta(2, 5, 300)}
    fig = hga_gate_figure(gates)
    for kind, values in gates.items():
        ax = _axis(fig, f"{kind} tokens")
        heights = [patch.get_height() for patch in ax.patches]
        np.testing.assert_array_equal(heights, np.histogram(values, bins=GATE_BINS)[0])
        (mean_line,) = ax.lines
        assert mean_line.get_xdata()[0] == pytest.approx(values.mean())


def test_split_gate_by_encoder_follows_encoder_order():
    gate = torch.arange(2 * 7, dtype=torch.float32).reshape(2, 7)
    parts = split_by_encoder(gate, {"clip": 3, "siglip": 4}, ("siglip", "clip"))
    np.testing.assert_array_equal(parts["siglip"], [0, 1, 2, 3, 7, 8, 9, 10])
    np.testing.assert_array_equal(parts["clip"], [4, 5, 6, 11, 12, 13])


def test_collect_hga_gates_on_a_tiny_model(tmp_path):
    from tests.eval_models import build_tiny_model, write_images
    from PIL import Image

    model, _ = build_tiny_model(tmp_path / "tok")
    images = [Image.open(tmp_path / "img" / n).convert("RGB") for n in write_images(tmp_path / "img", 3)]
    gates = collect_hga_gates(model, images, batch_size=2)
    assert list(gates) == list(model.encoder_kinds)
    for kind, values in gates.items():
        assert values.shape == (3 * model.encoder_tokens[kind],)
        assert ((values >= 0) & (values <= 1)).all()


def test_plots_and_report_files(tmp_path):
    rng = np.random.default_rng(2)
    written = write_training_plots(_records(), tmp_path / "plots", gates={"clip": rng.uniform(0, 1, 50)})
    assert sorted(written) == ["expert_load", "hga_gates", "losses"]
    for path in written.values():
        pixels = imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0  # a real, non-blank PNG

    scores = {"pope": {"random": {"num_questions": 8, "tp": 3, "fp": 2, "tn": 2, "fn": 1, "accuracy": 0.625,
                                  "precision": 0.6, "recall": 0.75, "f1": 2 / 3, "yes_ratio": 0.625}},
              "mme": {"subtasks": {"existence": {"num_questions": 6, "num_images": 3, "accuracy": 5 / 6,
                                                 "accuracy_plus": 2 / 3, "score": 150.0, "other": 1}},
                      "totals": {"perception": 150.0}}}
    report = write_report(tmp_path / "run", *score_sections(scores, "after stage 2"),
                          ReportSection("Training", "Loss curves.", images=list(written.values())))
    text = report.read_text()
    assert "## POPE (after stage 2)" in text and "## MME (after stage 2)" in text
    assert "| random | 8 | 62.5 | 60.0 | 75.0 | 66.7 | 62.5 |" in text
    assert "| existence | perception | 6 | 83.3 | 66.7 | 150.0 |" in text
    assert "![losses](../plots/losses.png)" in text
    assert (report.parent / "../plots/losses.png").is_file()
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_report(tmp_path / "run", ReportSection("x", images=[tmp_path / "missing.png"]))


def test_pope_table_header_and_alignment():
    table = pope_table({"adversarial": {"num_questions": 2, "accuracy": 1.0, "precision": 1.0, "recall": 1.0,
                                        "f1": 1.0, "yes_ratio": 0.5}}).splitlines()
    assert table[0] == "| split | questions | accuracy % | precision % | recall % | F1 % | yes % |"
    assert table[1] == "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    assert table[2] == "| adversarial | 2 | 100.0 | 100.0 | 100.0 | 100.0 | 50.0 |"
