"""Before vs after grokking with a crosscoder over the two checkpoints (the cc_first notebooks).

1. `phase_accuracies`: the host's accuracy at the pre- and post-grokking checkpoints.
2. `generalisation_latents`: the latents the post checkpoint owns most (largest relative decoder
   norm r) among those that fire on held-out pairs: candidates for what generalisation relies on.
3. `clamp_at_evaluation`: the post-grokking host with those latents clamped (0 = ablated), its
   test accuracy next to the same number of random firing latents clamped.
4. `clamp_during_training`: a host retrained from the same initialisation and data order with the
   latents clamped at every step, its grokking step next to the control's and the unclamped run's.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from sae.analysis.diffing import relative_decoder_norms
from sae.analysis.latents import latent_grid
from sae.analysis.runs import SaeRun
from sae.analysis.steering import random_control, source_view, steered_metrics, train_host_with_clamp

PRE, POST = 0, 1  # source order of host_model.checkpoints=[pre_grok, post_grok]


def phase_accuracies(run: SaeRun) -> list[dict]:
    """One row per source: checkpoint label, host step, train and test accuracy at that checkpoint."""
    return [{"source": s.name, "checkpoint": s.checkpoint, "step": s.record.get("step"),
             "train_acc": s.record.get("train/acc"), "test_acc": s.record.get("test/acc")} for s in run.data.sources]


def firing_latents(run: SaeRun) -> torch.Tensor:
    """Latents that fire on at least one pair (train or test)."""
    fires = torch.cat([(run.sae.encode(x) > 0).any(dim=0, keepdim=True) for x in (run.data.train, run.data.test)])
    return torch.where(fires.any(dim=0))[0]


def generalisation_latents(run: SaeRun, n: int) -> torch.Tensor:
    """The n latents most owned by the post-grokking checkpoint (largest relative decoder norm r)
    among those that fire on held-out pairs. Check their r (`relative_decoder_norms`): with phases
    that overlap, even the top ones may be shared (r < 0.7) rather than post-only."""
    r = relative_decoder_norms(run.sae, PRE, POST, run.input_scale)  # in the units training saw
    grid = latent_grid(run.sae, run.data)
    fires_on_test = (grid.values[grid.split_mask("test")] > 0).any(dim=0)
    candidates = torch.where(fires_on_test)[0]
    return candidates[r[candidates].argsort(descending=True, stable=True)[:n]]  # ties by index, on any CPU


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
    from sae.analysis.diffing import latent_scaling

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


def arm_generalisation_effect(run: SaeRun, n: int = 8, value: float = 0.0, pool: torch.Tensor | None = None) -> dict:
    """(b) The n latents whose clamp (one at a time, post-grok host) raises test CE most beyond what
    it raises train CE: effect = (test CE - clean test CE) - (train CE - clean train CE).
    pool: the latents to score (default: those firing on held-out pairs). {"latents", "effect"}."""
    view_pool = test_firing(run) if pool is None else pool
    clean = steered_metrics(run.sae, run.data, torch.zeros(0, dtype=torch.long), value, source=POST)
    effects = []
    for latent in view_pool.tolist():
        steered = steered_metrics(run.sae, run.data, torch.tensor([latent]), value, source=POST)
        effects.append((steered["test/ce"] - clean["test/ce"]) - (steered["train/ce"] - clean["train/ce"]))
    effects = torch.tensor(effects)
    order = effects.argsort(descending=True, stable=True)[:n]
    return {"latents": view_pool[order], "effect": effects[order].tolist()}


def arm_largest(run: SaeRun, n: int = 8) -> dict:
    """(c) The n latents with the largest mean contribution f x ||d_post|| on all pairs, whatever
    their post-specificity: the arm a post-specific selection must beat. {"latents", "contribution"}."""
    from sae.analysis.controls import latent_statistics

    _, contribution = latent_statistics(run.sae, torch.cat([run.data.train, run.data.test]), POST)
    order = contribution.argsort(descending=True, stable=True)[:n]
    return {"latents": order, "contribution": contribution[order].tolist()}


def clamp_at_evaluation(run: SaeRun, latents: torch.Tensor, value: float = 0.0, seed: int = 0) -> dict:
    """Post-grokking host accuracy (train/test, per operation) unclamped, with `latents` clamped, and
    with as many random firing latents clamped: {"none" | "selected" | "random": {metric: value, "latents": [...]}}."""
    control = random_control(run.sae.d_sae, latents, seed, pool=firing_latents(run))
    empty = torch.zeros(0, dtype=torch.long)
    return {name: {**steered_metrics(run.sae, run.data, chosen, value, source=POST), "latents": chosen.tolist()}
            for name, chosen in (("none", empty), ("selected", latents), ("random", control))}


def clamp_during_training(run: SaeRun, latents: torch.Tensor, value: float = 0.0, num_steps: int | None = None,
                          seed: int = 0, out_dir: str | Path | None = None) -> dict:
    """Retrain the host from its own initialisation and data order with `latents` clamped at every
    step, and again with as many random firing latents clamped, at the crosscoder's hookpoint through
    its post-grokking source (`source_view`). "none" is the host's own run: an empty clamp is the
    identity, so retraining with it repeats that run (up to float rounding from the hooked forward
    computing every position; tested). Returns {name: {"memorisation_step",
    "grokking_step", "final_step", "latents", "history"}}; num_steps caps the clamped runs (default:
    the host's own recipe, which stops `steps_after_grok` after grokking)."""
    import dataclasses

    if run.data.positions.value != "answer":
        raise ValueError("clamping during training needs an SAE trained at token_positions=answer")
    host = run.config.host_model
    recipe = host.train if num_steps is None else dataclasses.replace(host.train, num_steps=num_steps)
    view = source_view(run.sae, POST)
    hook = run.data.sources[POST].hook
    control = random_control(run.sae.d_sae, latents, seed, pool=firing_latents(run))
    own = json.loads((run.data.host_run_dir / "summary.json").read_text())
    results = {"none": {"latents": [], "memorisation_step": own["memorisation_step"],
                        "grokking_step": own["grokking_step"], "final_step": own["final_step"],
                        "history": read_history(run.data.host_run_dir)}}
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(out_dir) if out_dir is not None else Path(scratch)
        for name, chosen in (("selected", latents), ("random", control)):
            run_dir = base / f"host_clamped_{name}"
            summary = train_host_with_clamp(run.config.task, host.architecture(), recipe, run_dir, view, hook,
                                            chosen, value)
            results[name] = {"latents": chosen.tolist(), "memorisation_step": summary["memorisation_step"],
                             "grokking_step": summary["grokking_step"], "final_step": summary["final_step"],
                             "history": read_history(run_dir)}
    return results


def read_history(host_run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(host_run_dir) / "history.jsonl").read_text().splitlines()]


def plot_clamped_training(results: dict, path: str | Path, title: str = "") -> Path:
    """Test accuracy over host training for each clamp condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = {"none": "no clamp", "selected": "selected latents clamped", "random": "random latents clamped"}
    for name, result in results.items():
        steps = [h["step"] for h in result["history"]]
        ax.plot(steps, [h["test/acc"] for h in result["history"]], label=labels.get(name, name))
    ax.set_xlabel("host training step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
