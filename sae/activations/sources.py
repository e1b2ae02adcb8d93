"""What every activation family shares about its sources (a (checkpoint, layer) of a host model):
what a saved SAE records about them, and reading them with one forward pass per distinct model.

Both host families honour one capture contract: `model.capture(tokens, hooks) -> {hook: activation}`
with hook names from the model (`blocks.L.resid_post` for the transformer, `layers.L.resid` for ESM-2).
"""
from __future__ import annotations

import torch


def sources_meta(sources) -> dict:
    return {"sources": [{"name": s.name, "checkpoint": s.checkpoint, "layer": s.layer, "hook": s.hook}
                        for s in sources]}


@torch.no_grad()
def capture_sources(sources, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each source's activation for `tokens`, in source order: one forward per distinct model
    (a crosscoder over several layers of one checkpoint reads them all in one pass)."""
    by_model: dict[int, list[int]] = {}
    for index, source in enumerate(sources):
        by_model.setdefault(id(source.model), []).append(index)
    captured: list[torch.Tensor | None] = [None] * len(sources)
    for indices in by_model.values():
        activations = sources[indices[0]].model.capture(tokens, [sources[i].hook for i in indices])
        for i in indices:
            captured[i] = activations[sources[i].hook]
    return captured
