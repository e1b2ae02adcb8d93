"""Steering a host by clamping SAE/crosscoder latents at evaluation time.

The activation at the hookpoint is replaced by x + decode(f_clamped) - decode(f): the clamp moves
x along the clamped latents' decoder directions and keeps the SAE's reconstruction error, so an
empty clamp leaves the host exactly as it was. Compare every clamp with `random_control`: the
same number of latents drawn at random.
"""
from __future__ import annotations

import torch

from sae.metrics.downstream import answer_losses
from sae.host_models.training import run_host_training
from sae.saes import build_sae
from sae.tracking.base import NullTracker


def clamp_shift(sae, x: torch.Tensor, latents: torch.Tensor, value: float) -> torch.Tensor:
    """decode(f_clamped) - decode(f) for x: [batch, n_sources, d_in], same shape as x."""
    f = sae.encode(x)
    delta = torch.zeros_like(f)
    delta[:, latents] = value - f[:, latents]
    # decode(f + delta) - decode(f) = delta @ W_dec: b_dec cancels, and an empty clamp adds exactly 0
    return (delta @ sae.W_dec.flatten(1)).view_as(x)


@torch.no_grad()
def clamp_replacement(sae, x: torch.Tensor, latents: torch.Tensor, value: float) -> torch.Tensor:
    """x: [batch, n_sources, d_in] raw activations -> the same with `latents` clamped to `value`."""
    return x + clamp_shift(sae, x, latents, value)


def random_control(d_sae: int, chosen: torch.Tensor, seed: int = 0, pool: torch.Tensor | None = None) -> torch.Tensor:
    """As many latents as `chosen`, drawn uniformly from the others (from `pool` only when given,
    e.g. the latents that fire at all: clamping dead latents to 0 would be a control that cannot fail)."""
    others = torch.zeros(d_sae, dtype=torch.bool)
    others[pool if pool is not None else slice(None)] = True
    others[chosen] = False
    if int(others.sum()) < len(chosen):
        raise ValueError(f"random_control: only {int(others.sum())} latents to draw {len(chosen)} from")
    pool = torch.where(others)[0]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return pool[order[:len(chosen)]]


INTERVENTIONS = ("clamp", "project")


@torch.no_grad()
def steered_metrics(sae, data, latents: torch.Tensor, value: float, source: int = 0,
                    intervention: str = "clamp") -> dict[str, float]:
    """Answer accuracy and CE of source `source`'s host with the intervention spliced in, per split
    and per operation: {"<split>/acc", "<split>/ce", "<split>/acc_<op>", "<split>/ce_<op>"}. data: a modular
    ActivationData. intervention: "clamp" (the latents set to `value`, the SAE error kept) or
    "project" (the span of the latents' `source` decoders projected out around the source's mean
    activation over all pairs: a mean ablation along them; `value` unused)."""
    if intervention not in INTERVENTIONS:
        raise ValueError(f"intervention must be one of {list(INTERVENTIONS)}, got {intervention!r}")
    metrics = {}
    for split, x in (("train", data.train), ("test", data.test)):
        tokens, labels = data.dataset.train if split == "train" else data.dataset.test
        in_split = data.dataset.is_train if split == "train" else ~data.dataset.is_train
        raw = x / data.scale[:, None]
        if not len(latents):
            replacement = raw[:, source]
        elif intervention == "project":  # a mean ablation along the directions
            replacement = project_out(raw[:, source], sae.W_dec.detach()[latents, source], source_mean(data, source))
        else:
            replacement = (clamp_replacement(sae, x, latents, value) / data.scale[:, None])[:, source]
        model, hook = data.sources[source].model, data.sources[source].hook
        losses, correct = answer_losses(model, tokens, labels, hook, replacement, data.positions)
        metrics[f"{split}/acc"], metrics[f"{split}/ce"] = correct.mean().item(), losses.mean().item()
        op_ids = data.dataset.op_ids[in_split]
        for index, op in enumerate(data.dataset.operations):
            metrics[f"{split}/acc_{op.value}"] = correct[op_ids == index].mean().item()
            metrics[f"{split}/ce_{op.value}"] = losses[op_ids == index].mean().item()
    return metrics


def source_mean(data, source: int) -> torch.Tensor:
    """[d_in] mean raw activation of one source over every pair (train and test)."""
    return torch.cat([data.train[:, source], data.test[:, source]]).mean(dim=0) / data.scale[source]


def source_view(sae, source: int):
    """A one-source SAE reading and writing only `source` of a crosscoder (its encoder columns,
    decoder rows and bias for that source; b_enc shared). For clamping a crosscoder's latents in a
    host that has one stream: latents owned by that source (relative decoder norm near 1 for it)
    are encoded almost as in the crosscoder; shared latents lose the other source's input. Buffers
    (BatchTopK's threshold) and the train/eval mode are the crosscoder's."""
    if not 0 <= source < sae.n_sources:
        raise ValueError(f"source must be in [0, {sae.n_sources}), got {source}")
    view = build_sae(sae.cfg, 1, sae.d_in).to(sae.W_dec.device)
    with torch.no_grad():
        view.W_enc.copy_(sae.W_enc[:, source:source + 1])
        view.W_dec.copy_(sae.W_dec[:, source:source + 1])
        view.b_dec.copy_(sae.b_dec[source:source + 1])
        view.b_enc.copy_(sae.b_enc)
        for name, buffer in sae.named_buffers():  # e.g. BatchTopK's inference threshold
            getattr(view, name).copy_(buffer)
    return view.train(sae.training)


def clamp_hook(sae, latents: torch.Tensor, value: float, scale: float = 1.0, all_positions: bool = False):
    """A GrokTransformer hook ([batch, seq, d] -> same) that splices in the clamp of a frozen one-source
    SAE at the answer position (or every position). scale: the SAE's input scale (1 for a saved SAE,
    whose weights take raw activations). Gradients flow through the clamp into the host. An empty
    clamp runs the same path and adds exact zeros (the study's "none")."""
    if sae.n_sources != 1:
        raise ValueError(f"clamping during host training needs a one-source SAE; this one has {sae.n_sources}")
    for param in sae.parameters():
        param.requires_grad_(False)

    def clamp(resid: torch.Tensor) -> torch.Tensor:
        rows = resid if all_positions else resid[:, -1:]
        x = rows.reshape(-1, 1, rows.shape[-1]) * scale
        clamped = rows + clamp_shift(sae, x, latents, value).view_as(rows) / scale
        return clamped if all_positions else torch.cat([resid[:, :-1], clamped], dim=1)

    clamp.answer_position_only = not all_positions  # the host may then compute only that position
    return clamp


def train_host_with_clamp(task, arch_keys: dict, recipe, run_dir, sae, hook: str, latents: torch.Tensor,
                          value: float, device: str = "cpu") -> dict:
    """Train a host from scratch with `latents` clamped at `hook` throughout; returns its summary
    (memorisation / grokking steps, curves). Compare with the same call on random_control latents."""
    hooks = {hook: clamp_hook(sae.to(device), latents.to(device), value)}
    return run_host_training(task, arch_keys, recipe, run_dir, NullTracker(), device=device, quiet=True, hooks=hooks)


def clamp_per_operation(sae, data, chosen: dict[str, torch.Tensor], value: float = 0.0, controls: int = 5,
                        pool: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """On a host with several operations: for each operation's chosen latents (e.g. the ones most
    specific to it), the test accuracy of every operation with them clamped, and the mean over
    `controls` draws of as many random latents from `pool` (one draw is a noisy control).
    {"none" | "<op>" | "<op>/random": {"<op2>": test acc}}. A targeted drop shows as a low diagonal
    entry next to higher off-diagonal ones and controls."""
    ops = [op.value for op in data.dataset.operations]

    def per_op(latents: torch.Tensor) -> dict[str, float]:
        metrics = steered_metrics(sae, data, latents, value)
        return {op: metrics[f"test/acc_{op}"] for op in ops}

    table = {"none": per_op(torch.zeros(0, dtype=torch.long))}
    for op, latents in chosen.items():
        table[op] = per_op(latents)
        draws = [per_op(random_control(sae.d_sae, latents, seed, pool)) for seed in range(controls)]
        table[f"{op}/random"] = {o: sum(d[o] for d in draws) / controls for o in ops}
    return table


def project_out(x: torch.Tensor, directions: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., d] with its variation in span(directions: [J, d]) removed: the component of
    x - centre in the span is subtracted, so x keeps the centre's component there (a mean ablation
    along the directions; centre None = zero ablation). The continuous alternative to a clamp: no
    encoder, no threshold; a control of the same rank removes as many dimensions. An empty set of
    directions leaves x as it is."""
    if len(directions) == 0:
        return x
    basis, _ = torch.linalg.qr(directions.t().to(x.dtype))  # [d, J] orthonormal columns
    offset = x if centre is None else x - centre.to(x.dtype)
    return x - (offset @ basis) @ basis.t()


def projection_hook(directions: torch.Tensor, centre: torch.Tensor | None = None, all_positions: bool = False):
    """A GrokTransformer hook that projects `directions` (raw units) out of the stream around
    `centre` (see `project_out`) at the answer position (or every position), in evaluation or
    through host training."""
    directions = directions.detach()
    centre = None if centre is None else centre.detach()

    def project(resid: torch.Tensor) -> torch.Tensor:
        if all_positions:
            return project_out(resid, directions, centre)
        return torch.cat([resid[:, :-1], project_out(resid[:, -1:], directions, centre)], dim=1)

    project.answer_position_only = not all_positions
    return project
