"""MoE connector forward + backward: grouped dispatch vs the official per-sample, per-expert loop.

Ours (``MoEConnector``) routes all ``B * N`` tokens at once, runs each expert once on the rows
routed to it and adds its weighted rows onto their tokens in place; the official code loops over
samples and experts (``B * E`` expert calls, one ``torch.where`` host sync each). Note the
official loop already runs an expert only on the tokens routed to it (not every expert on every
token), so both sides do the same expert FLOPs:
on a CPU, where the step is compute-bound, the reachable speed-up is bounded by the baseline's
time over the experts' own compute (``expert_floor``, reported), plus the loss both steps
compute (``loss_term``, reported). Both run on the same module's
weights; one step is forward,
``loss = <output, probe> + balance + z``, backward. Outputs, both losses and every parameter
gradient must agree before anything is timed.

Real size is 16 images x 576 tokens (CLIP ViT-L/14-336) with widths 1024 -> 2560 (Phi-2); the
widths are scaled down here so that a step takes well under a second on a CPU core.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from benchmarks.harness import BenchmarkResult, check_close, time_interleaved
from benchmarks.reference import official_moe_forward
from mocha.model.connector import MoEConnector

NAME = "moe_connector"


@dataclass(frozen=True)
class MoESize:
    images: int
    tokens: int
    in_features: int
    out_features: int
    num_experts: int = 4
    top_k: int = 2


SIZES = {
    "tiny": MoESize(images=2, tokens=16, in_features=16, out_features=32),
    "small": MoESize(images=16, tokens=576, in_features=64, out_features=160),
    "full": MoESize(images=16, tokens=576, in_features=256, out_features=640),
}


def _step(moe: MoEConnector, x: torch.Tensor, probe: torch.Tensor, official: bool):
    """One forward + backward; returns (output, balance, z, grads) detached."""
    moe.zero_grad(set_to_none=True)
    if official:
        out, balance, z = official_moe_forward(moe, x)
    else:
        out, balance, z, _ = moe(x)
    ((out * probe).sum() + balance + z).backward()
    grads = {name: p.grad.detach().clone() for name, p in moe.named_parameters() if p.grad is not None}
    return out.detach(), balance.detach(), z.detach(), grads


def _expert_floor(moe: MoEConnector, rows: tuple[torch.Tensor, ...], output_grads: tuple[torch.Tensor, ...]) -> None:
    """The experts alone, forward + backward from given output gradients (no loss to compute), on
    as many rows as routing gives them (T * k, split evenly): the compute no MoE implementation
    can avoid, so baseline time / this time bounds every implementation's speed-up."""
    moe.zero_grad(set_to_none=True)
    outputs = [expert(chunk) for expert, chunk in zip(moe.experts, rows)]
    torch.autograd.backward(outputs, list(output_grads))


def _loss_term(output: torch.Tensor, probe: torch.Tensor) -> None:
    """``<output, probe>`` forward + backward on an output-shaped leaf: part of both sides' step
    (the loss every step computes), absent from ``expert_floor``."""
    output.grad = None
    (output * probe).sum().backward()


def _check_same(moe: MoEConnector, x: torch.Tensor, probe: torch.Tensor) -> float:
    ours = _step(moe, x, probe, official=False)
    base = _step(moe, x, probe, official=True)
    worst = check_close("output", ours[0], base[0], atol=1e-5, rtol=1e-5)
    check_close("balance loss", ours[1], base[1], atol=1e-6, rtol=1e-5)
    check_close("z-loss", ours[2], base[2], atol=1e-6, rtol=1e-5)
    if ours[3].keys() != base[3].keys():
        raise AssertionError(f"different parameters got gradients: {sorted(ours[3])} vs {sorted(base[3])}")
    for name in ours[3]:
        check_close(f"grad {name}", ours[3][name], base[3][name], atol=1e-4, rtol=1e-4)
    return worst


def run(size: str, repeats: int) -> BenchmarkResult:
    s = SIZES[size]
    torch.manual_seed(0)
    moe = MoEConnector(s.in_features, s.out_features, s.num_experts, s.top_k)
    x = torch.randn(s.images, s.tokens, s.in_features)
    probe = torch.randn(s.images, s.tokens, s.out_features)
    worst = _check_same(moe, x, probe)
    rows = x.reshape(-1, s.in_features).repeat(s.top_k, 1).chunk(s.num_experts)
    output_grads = tuple(torch.randn(len(chunk), s.out_features) for chunk in rows)
    output = torch.zeros(s.images, s.tokens, s.out_features, requires_grad=True)
    timing = time_interleaved({"ours": lambda: _step(moe, x, probe, official=False),
                               "baseline": lambda: _step(moe, x, probe, official=True),
                               "expert_floor": lambda: _expert_floor(moe, rows, output_grads),
                               "loss_term": lambda: _loss_term(output, probe)}, repeats)
    bound = timing.median("baseline") / timing.median("expert_floor")
    bound_with_loss = timing.median("baseline") / (timing.median("expert_floor") + timing.median("loss_term"))
    return BenchmarkResult(
        name=NAME,
        what="MoE connector forward+backward (grouped dispatch: one call per expert for the whole batch)",
        baseline="official MLPMoE.forward: loop over samples x experts, torch.where + indexed += per pair",
        metric="speed-up = baseline time / our time",
        ratio=timing.speedup, goal_op=">=", goal_value=5.0,
        sizes=asdict(s), repeats=repeats,
        seconds=timing.medians(),
        extra={"max_abs_output_diff": worst, "expert_calls_ours": s.num_experts,
               "expert_calls_baseline": s.images * s.num_experts,
               "ours_over_expert_floor": timing.median("ours") / timing.median("expert_floor"),
               "baseline_over_expert_floor": bound,
               "baseline_over_floor_plus_loss": bound_with_loss},
        notes="real widths 1024 -> 2560 scaled down for CPU; same weights; outputs, losses and grads checked equal. "
              "expert_floor = the experts' own forward + backward on the T*k routed rows from given output "
              "gradients (no routing, no combine, no loss): both sides must do at least that, so no "
              f"implementation can beat baseline/floor = {bound:.2f} here; both sides' step also computes the "
              "loss <out, probe> (loss_term: its forward + backward alone), so not even baseline/(floor + "
              f"loss_term) = {bound_with_loss:.2f}. ours_over_expert_floor is what our routing, dispatch, "
              "combine and that loss add on top. The official loop runs each expert only on its routed tokens "
              "(same FLOPs as ours), so on a compute-bound CPU core the gap is its per-(sample, expert) call "
              "and sync overhead: a ratio >= 5 would need routing, gather, weighting and combine for free and "
              "the loss at almost no cost. History: 2.48 with concatenated expert rows, one weighting and "
              "index_add over all T*k rows (commit 297561c; ours 1.63x the then floor, which also computed "
              "a loss); 3.35 (1.55x the floor) with the per-expert in-place combine (commit 90d71c2); the "
              "combine's own backward (the gathered output gradient scaled in place, the weights' gradient "
              "as batched row dots, no [n, out] products) cut our step time by about 8% in a same-process "
              "A/B against 90d71c2.",
    )
