"""Downstream metrics: splice the SAE's reconstruction into the host and read the answer.

For one source (checkpoint, layer) the activation at its hookpoint is replaced by the
reconstruction (answer position only, or every position, as the SAE was trained), and the
host's answer cross-entropy and accuracy are compared with the clean run and with zero-ablation:
    loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from sae.host_models.config import TokenPositions
from sae.host_models.transformer import GrokTransformer

CHUNK = 8192


def replacing_hook(replacement: torch.Tensor, positions: TokenPositions) -> Callable[[torch.Tensor], torch.Tensor]:
    """replacement: [n, d] (answer) or [n * seq, d] (all) for a chunk of n pairs."""

    def hook(activation: torch.Tensor) -> torch.Tensor:
        return with_rows(activation, replacement, positions)

    return hook


@torch.no_grad()
def answer_losses(model: GrokTransformer, tokens: torch.Tensor, labels: torch.Tensor,
                  hook_name: str | None = None, replacement: torch.Tensor | None = None,
                  positions: TokenPositions = TokenPositions.answer,
                  make_hooks: Callable[[], dict] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: (answer cross-entropy, correct) with `replacement` spliced in at `hook_name`, or
    with the hooks make_hooks() returns afresh for each chunk of pairs."""
    rows_per_pair = tokens.shape[1] if positions is TokenPositions.all else 1
    losses, correct = [], []
    for start in range(0, len(tokens), CHUNK):
        chunk = slice(start, start + CHUNK)
        hooks = make_hooks() if make_hooks is not None else {}
        if hook_name is not None:
            rows = replacement[start * rows_per_pair:(start + CHUNK) * rows_per_pair]
            hooks[hook_name] = replacing_hook(rows, positions)
        logits = model(tokens[chunk], hooks).float()
        losses.append(F.cross_entropy(logits, labels[chunk], reduction="none"))
        correct.append((logits.argmax(-1) == labels[chunk]).float())
    return torch.cat(losses), torch.cat(correct)


def spliced_metrics(model: GrokTransformer, tokens: torch.Tensor, labels: torch.Tensor, hook_name: str,
                    x_hat: torch.Tensor, x: torch.Tensor, positions: TokenPositions,
                    groups: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """x_hat, x: [rows, d] for one source, in the host's raw units.

    `groups` (name -> boolean mask over pairs, e.g. one per operation of a mixed task) adds
    `acc_clean_<name>`, `acc_spliced_<name>`, `acc_zero_<name>`.
    """
    return loss_metrics({
        "clean": answer_losses(model, tokens, labels),
        "spliced": answer_losses(model, tokens, labels, hook_name, x_hat, positions),
        "zero": answer_losses(model, tokens, labels, hook_name, torch.zeros_like(x), positions),
    }, groups)


def loss_metrics(runs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 groups: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """ce_/acc_{clean,spliced,zero} (+ per group) and loss_recovered from each run's per-pair losses."""
    metrics = {}
    for run, (losses, correct) in runs.items():
        metrics[f"ce_{run}"] = losses.mean().item()
        metrics[f"acc_{run}"] = correct.mean().item()
        for name, mask in (groups or {}).items():
            metrics[f"acc_{run}_{name}"] = correct[mask].mean().item()
    gap = metrics["ce_zero"] - metrics["ce_clean"]
    metrics["loss_recovered"] = (metrics["ce_zero"] - metrics["ce_spliced"]) / gap if abs(gap) > 1e-9 else float("nan")
    return metrics


def split_inputs(data, split: str):
    """(tokens, labels, per-operation masks or None) of a modular split."""
    tokens, labels = data.dataset.train if split == "train" else data.dataset.test
    in_split = data.dataset.is_train if split == "train" else ~data.dataset.is_train
    op_ids = data.dataset.op_ids[in_split]
    groups = ({op.value: op_ids == i for i, op in enumerate(data.dataset.operations)}
              if len(data.dataset.operations) > 1 else None)
    return tokens, labels, groups


def at_positions(activation: torch.Tensor, positions: TokenPositions) -> torch.Tensor:
    """The rows a hooked activation [n, seq, d] contributes: its answer position, or every position."""
    return activation[:, -1] if positions is TokenPositions.answer else activation.flatten(0, 1)


def with_rows(activation: torch.Tensor, rows: torch.Tensor, positions: TokenPositions) -> torch.Tensor:
    """activation with `rows` written where at_positions read them."""
    if positions is TokenPositions.all:
        return rows.view_as(activation).to(activation.dtype)
    patched = activation.clone()
    patched[:, -1] = rows.to(activation.dtype)
    return patched


def replacement_hooks(clt, data, zero: bool = False) -> dict:
    """Hooks that replace every layer's MLP output by the cross-layer transcoder's prediction, computed
    layer by layer inside the host: at resid_mid of layer l its latents are read from the (already
    replaced) stream; at mlp_out of layer l the output comes from the latents of layers 0..l. zero:
    every MLP output zeroed instead (the baseline). `data.scale`: the units the CLT takes."""
    n_layers, positions = len(data.sources), data.positions
    c_in, c_out = data.scale[:n_layers], data.scale[n_layers:]
    latents, inputs, hooks = {}, {}, {}

    def read(layer):
        def hook(activation):
            inputs[layer] = at_positions(activation, positions).to(c_in.dtype) * c_in[layer]
            latents[layer] = clt.layer_latents(layer, inputs[layer])
            return activation
        return hook

    def write(layer):
        def hook(activation):
            if zero:
                return with_rows(activation, torch.zeros_like(at_positions(activation, positions)), positions)
            out = clt.layer_output(layer, [latents[j] for j in range(layer + 1)], inputs[layer]) / c_out[layer]
            return with_rows(activation, out, positions)
        return hook

    for layer, (source, target) in enumerate(zip(data.sources, data.targets)):
        if not zero:
            hooks[source.hook] = read(layer)
        hooks[target.hook] = write(layer)
    for hook in hooks.values():
        hook.answer_position_only = positions is TokenPositions.answer
    return hooks


def all_layers_replaced_metrics(clt, data, split: str) -> dict[str, float]:
    """The host with every MLP replaced by the cross-layer transcoder at once: answer CE/accuracy
    against the clean host and every MLP output zeroed, as `<checkpoint>.all_layers/...`."""
    tokens, labels, groups = split_inputs(data, split)
    model = data.sources[0].model
    metrics = loss_metrics({
        "clean": answer_losses(model, tokens, labels),
        "spliced": answer_losses(model, tokens, labels, make_hooks=lambda: replacement_hooks(clt, data)),
        "zero": answer_losses(model, tokens, labels, make_hooks=lambda: replacement_hooks(clt, data, zero=True)),
    }, groups)
    return {f"{data.sources[0].checkpoint}.all_layers/{k}": v for k, v in metrics.items()}


def spliced_source_metrics(data, split: str, raw_x: torch.Tensor, raw_x_hat: torch.Tensor) -> dict[str, float]:
    """Per source of a modular host: the reconstruction spliced in, answer CE/accuracy (per
    operation too). data: sae.activations.modular.ActivationData; raw_*: [rows, n_sources, d_in], the
    reconstructed columns (a transcoder's targets: its prediction replaces the target hook, computed from
    the clean input, and zero-ablation zeroes that hook)."""
    tokens, labels, groups = split_inputs(data, split)
    metrics = {}
    for s, source in enumerate(data.sources):
        spliced_at = data.targets[s] if data.targets else source  # a transcoder replaces its target hook
        spliced = spliced_metrics(source.model, tokens, labels, spliced_at.hook, raw_x_hat[:, s], raw_x[:, s],
                                  data.positions, groups)
        metrics.update({f"{source.name}/{k}": v for k, v in spliced.items()})
    return metrics
