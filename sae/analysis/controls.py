"""Controls matched to what they control for, and the statistics a steering claim is judged by.

A clamp of chosen latents is only evidence if it hurts more than a clamp of latents that are like
them in everything but the property claimed. `matched_control` draws, for each chosen latent, a
latent of similar firing frequency and mean contribution (f x ||decoder||): the two things that
decide how much clamping any latent moves the stream. Uniform draws among firing latents are not
a control: selected latents sit in the top percentiles of both, a typical random one moves the
stream ~30x less.

Statistics: `accuracy_auc` (mean test accuracy over a fixed horizon: the primary metric of a
training-time clamp), `steps_to` (first step at a threshold), `empirical_p_value` (where an
observed value falls among control draws).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def latent_statistics(sae, x: torch.Tensor, source: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """([d_sae] firing frequency, [d_sae] mean contribution f_i ||W_dec[i, source]||) over x: [N, S, d_in]."""
    fired = torch.zeros(sae.d_sae, device=x.device)
    contribution = torch.zeros(sae.d_sae, device=x.device)
    norms = sae.W_dec.detach()[:, source].norm(dim=-1)
    for rows in x.split(chunk):
        f = sae.encode(rows)
        fired += (f > 0).float().sum(dim=0)
        contribution += (f * norms).sum(dim=0)
    return fired / len(x), contribution / len(x)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks in [0, 1]; tied values share the lowest rank of their group (so ties never depend on
    the order a sort leaves them in, on any CPU)."""
    lowest = torch.searchsorted(values.sort().values, values)
    return lowest.to(values.dtype) / max(len(values) - 1, 1)


def matched_control(frequency: torch.Tensor, contribution: torch.Tensor, chosen: torch.Tensor,
                    pool: torch.Tensor, seed: int = 0, neighbours: int = 5) -> torch.Tensor:
    """For each chosen latent (in order), one latent drawn uniformly from the `neighbours` unused
    pool latents nearest to it in (rank of firing frequency, rank of mean contribution) over the
    pool, L1 distance. No latent is drawn twice or is one of the chosen. Returns [len(chosen)]."""
    candidates = torch.tensor(sorted(set(pool.tolist()) - set(chosen.tolist())), dtype=torch.long)
    if len(candidates) < len(chosen):
        raise ValueError(f"matched_control: {len(candidates)} pool latents for {len(chosen)} chosen ones")
    everyone = torch.cat([candidates, chosen])
    freq_rank, contribution_rank = _ranks(frequency[everyone].double()), _ranks(contribution[everyone].double())
    generator = torch.Generator().manual_seed(seed)
    available = torch.ones(len(candidates), dtype=torch.bool)
    drawn = []
    for position in range(len(candidates), len(everyone)):
        distance = ((freq_rank[:len(candidates)] - freq_rank[position]).abs()
                    + (contribution_rank[:len(candidates)] - contribution_rank[position]).abs())
        distance[~available] = float("inf")
        nearest = torch.argsort(distance, stable=True)[:min(neighbours, int(available.sum()))]
        pick = nearest[torch.randint(len(nearest), (1,), generator=generator)].item()
        available[pick] = False
        drawn.append(candidates[pick].item())
    return torch.tensor(drawn, dtype=torch.long)


def accuracy_auc(history: list[dict], horizon: int, key: str = "test/acc") -> float:
    """Mean of `key` over steps [0, horizon] (trapezoids between evaluations). A run that stopped
    before the horizon keeps its last value (host runs stop steps_after_grok after grokking)."""
    points = sorted((h["step"], h[key]) for h in history if h["step"] <= horizon)
    if not points:
        raise ValueError(f"accuracy_auc: no evaluation at or before step {horizon}")
    if points[-1][0] < horizon:
        points.append((horizon, points[-1][1]))
    if len(points) == 1:
        return float(points[0][1])
    area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def steps_to(history: list[dict], threshold: float, key: str = "test/acc") -> int | None:
    """The first evaluated step where `key` >= threshold, or None if it never gets there."""
    return next((h["step"] for h in sorted(history, key=lambda h: h["step"]) if h[key] >= threshold), None)


def empirical_p_value(observed: float, controls: list[float], alternative: str = "less") -> float:
    """P(a control is at least as extreme as the observed value), with the +1 correction that keeps
    it valid for few draws (Phipson & Smyth 2010): (1 + #{controls <= observed}) / (1 + n) for
    alternative="less" (the selected arm hurts more: a lower accuracy); "greater" mirrors it."""
    if alternative not in ("less", "greater"):
        raise ValueError(f"alternative must be 'less' or 'greater', got {alternative!r}")
    if not controls:
        raise ValueError("empirical_p_value needs at least one control")
    extreme = sum((c <= observed) if alternative == "less" else (c >= observed) for c in controls)
    return (1 + extreme) / (1 + len(controls))
