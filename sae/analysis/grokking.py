"""Before vs after grokking with a crosscoder over the two checkpoints: the pieces of the study
in `sae.analysis.study` (the cc_first notebooks).

- `phase_accuracies`: the host's accuracy at the pre- and post-grokking checkpoints.
- `firing_latents` / `test_firing`: the latents a clamp or a control may be drawn from.
- three selection arms of n latents: `arm_post_specific` (relative decoder norm in training units
  + latent scaling), `arm_generalisation_effect` (clamp effect on test CE minus train CE),
  `arm_largest` (mean contribution, ignoring post-specificity: the arm the others must beat).
"""
from __future__ import annotations

import torch

from sae.analysis.controls import latent_statistics
from sae.analysis.diffing import latent_scaling, relative_decoder_norms
from sae.analysis.runs import SaeRun
from sae.analysis.steering import steered_metrics

PRE, POST = 0, 1  # source order of host_model.checkpoints=[pre_grok, post_grok]


def phase_accuracies(run: SaeRun) -> list[dict]:
    """One row per source: checkpoint label, host step, train and test accuracy at that checkpoint."""
    return [{"source": s.name, "checkpoint": s.checkpoint, "step": s.record.get("step"),
             "train_acc": s.record.get("train/acc"), "test_acc": s.record.get("test/acc")} for s in run.data.sources]


def firing_latents(run: SaeRun) -> torch.Tensor:
    """Latents that fire on at least one pair (train or test)."""
    fires = torch.cat([(run.sae.encode(x) > 0).any(dim=0, keepdim=True) for x in (run.data.train, run.data.test)])
    return torch.where(fires.any(dim=0))[0]


# -- selection arms (issue 13): three ways to pick the latents a clamp tests --------------------------

POST_ONLY_R = 0.9  # r above which a latent counts as post-specific by its decoder norms
MAX_NU_ERROR = 0.3  # latent scaling: above this the pre checkpoint holds the direction (shrinkage)


def test_firing(run: SaeRun) -> torch.Tensor:
    """Latents that fire on at least one held-out pair."""
    return torch.where((run.sae.encode(run.data.test) > 0).any(dim=0))[0]


def arm_post_specific(run: SaeRun, n: int = 8, r_min: float = POST_ONLY_R, nu_max: float = MAX_NU_ERROR) -> dict:
    """(a) Post-specific latents: firing on held-out pairs, r >= r_min in training units, and latent
    scaling's nu_error <= nu_max (not a pre direction the crosscoder shrank away); the n highest r.
    Fewer than n (even none) is a finding, reported as such: {"latents", "r", "nu_error", "candidates"}."""
    r = relative_decoder_norms(run.sae, PRE, POST, run.input_scale)
    firing = test_firing(run)
    candidates = firing[r[firing] >= r_min]
    x = torch.cat([run.data.train, run.data.test])
    nu = latent_scaling(run.sae, x, candidates, PRE, POST)["nu_error"] if len(candidates) else torch.zeros(0)
    kept = candidates[nu.abs() <= nu_max]
    order = r[kept].argsort(descending=True, stable=True)[:n]
    chosen = kept[order]
    nu_of = dict(zip(candidates.tolist(), nu.tolist()))
    return {"latents": chosen, "r": r[chosen].tolist(), "nu_error": [nu_of[i] for i in chosen.tolist()],
            "candidates": len(candidates)}


def arm_generalisation_effect(run: SaeRun, n: int = 8, value: float = 0.0, pool: torch.Tensor | None = None,
                              operation: str | None = None) -> dict:
    """(b) The n latents whose clamp (one at a time, post-grok host) raises test CE most beyond what
    it raises train CE: effect = (test CE - clean test CE) - (train CE - clean train CE).
    pool: the latents to score (default: those firing on held-out pairs). operation: score on that
    operation's pairs only (a mixed host; per-operation targeting). {"latents", "effect"}."""
    return arms_by_generalisation_effect(run, [operation], n, value, pool)[operation]


def arms_by_generalisation_effect(run: SaeRun, operations: list[str | None], n: int = 8, value: float = 0.0,
                                  pool: torch.Tensor | None = None) -> dict:
    """`arm_generalisation_effect` for several operations (None: all pairs) from one clamp of each
    latent: {operation: {"latents", "effect"}}."""
    view_pool = test_firing(run) if pool is None else pool
    clean = steered_metrics(run.sae, run.data, torch.zeros(0, dtype=torch.long), value, source=POST)
    steered = [steered_metrics(run.sae, run.data, torch.tensor([latent]), value, source=POST)
               for latent in view_pool.tolist()]
    arms = {}
    for operation in operations:
        suffix = "" if operation is None else f"_{operation}"
        test_ce, train_ce = f"test/ce{suffix}", f"train/ce{suffix}"
        effects = torch.tensor([(m[test_ce] - clean[test_ce]) - (m[train_ce] - clean[train_ce]) for m in steered])
        order = effects.argsort(descending=True, stable=True)[:n]
        arms[operation] = {"latents": view_pool[order], "effect": effects[order].tolist()}
    return arms


def arm_largest(run: SaeRun, n: int = 8) -> dict:
    """(c) The n latents with the largest mean contribution f x ||d_post|| on all pairs, whatever
    their post-specificity: the arm a post-specific selection must beat. {"latents", "contribution"}."""
    _, contribution = latent_statistics(run.sae, torch.cat([run.data.train, run.data.test]), POST)
    order = contribution.argsort(descending=True, stable=True)[:n]
    return {"latents": order, "contribution": contribution[order].tolist()}
