"""Per-token HGA gate values of a model on a set of images, grouped by encoder.

The model concatenates its connectors' outputs in encoder order before HGA, so columns
``[offset_k, offset_k + N_k)`` of the gate ``[B, N_vis]`` belong to encoder ``k``. What
:func:`mocha.report.plots.hga_gate_figure` plots.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def split_by_encoder(gate: torch.Tensor, encoder_tokens: dict[str, int], encoder_kinds: Sequence[str]
                     ) -> dict[str, np.ndarray]:
    """Split a gate ``[B, N_vis]`` into ``{kind: [B * N_k]}`` in encoder order."""
    widths = [encoder_tokens[k] for k in encoder_kinds]
    if gate.shape[-1] != sum(widths):
        raise ValueError(f"gate has {gate.shape[-1]} tokens per image, encoders {dict(encoder_tokens)} give {sum(widths)}")
    parts = torch.split(gate.detach().float().cpu(), widths, dim=-1)
    return {kind: part.reshape(-1).numpy() for kind, part in zip(encoder_kinds, parts)}


@torch.no_grad()
def collect_hga_gates(model, images: Sequence, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Gate values of every visual token of ``images`` (PIL), grouped by encoder."""
    if not images:
        raise ValueError("no images to collect HGA gates from")
    device = next(model.parameters()).device
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in model.encoder_kinds}
    for start in range(0, len(images), batch_size):
        pixels = [model.preprocess(image) for image in images[start:start + batch_size]]
        pixel_values = {k: torch.stack([p[k] for p in pixels]).to(device) for k in pixels[0]}
        visual = model.project(model.encode_images(pixel_values))
        if visual.hga_gate is None:
            raise ValueError("this model's HGA returns no gate")
        for kind, values in split_by_encoder(visual.hga_gate, model.encoder_tokens, model.encoder_kinds).items():
            chunks[kind].append(values)
    return {kind: np.concatenate(parts) for kind, parts in chunks.items()}
