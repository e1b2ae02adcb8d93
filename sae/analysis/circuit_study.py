"""Graphs over every input of a modular task: which CLT latents carry the answer, and whether they
are the known algorithm's (Nanda et al. 2023: key frequencies w of a and b in, products cos(w (a + b))
in the MLP, cos(w (a + b - c)) read out).

For each latent: its *input* frequencies (the Fourier power of its activation over (a, b), as
`sae.analysis.transcoders`) and *output* frequencies (its decoder writes into the final stream,
read by the unembedding as logits over c; their power over c, on the operation's group). A latent
is on the known algorithm when both put at least a threshold of their power on the host's key
frequencies. `circuit_summary` says how much of the centred answer logit (direct effects,
`sae.analysis.circuits.logit_effects`) such latents carry, on train and test pairs, next to the
errors, embeddings and constants.
"""
from __future__ import annotations

import torch

from sae.analysis.circuits import logit_effects, to_float64
from sae.analysis.fourier import group_ordered_embedding
from sae.analysis.transcoders import host_key_frequencies, key_frequency_alignment


def output_key_shares(clt, host, operation: str, keys: list[int], p: int) -> torch.Tensor:
    """[d_sae] share of each latent's direct logit pattern over c (its decoders summed over the layers it
    writes, through the unembedding, centred) whose Fourier power is on the key frequencies."""
    writes = clt.decoder().detach().sum(dim=1).double()  # [d_sae, d]: what a latent adds to the final stream
    logits = writes @ host.unembed.weight.detach()[:p].double().t()  # [d_sae, p]
    ordered = group_ordered_embedding(logits.t(), operation).t()  # [d_sae, n] on the operation's group
    power = torch.fft.rfft(ordered - ordered.mean(dim=1, keepdim=True), dim=1).abs().pow(2)
    power[:, 0] = 0.0
    on_key = power[:, [k for k in keys if k < power.shape[1]]].sum(dim=1)
    return on_key / power.sum(dim=1).clamp_min(1e-300)


def circuit_summary(run, input_threshold: float = 0.5, output_threshold: float = 0.5) -> dict:
    """run: sae.analysis.runs.SaeRun of a CLT (sae=clt) on a one-operation modular task."""
    dataset = run.data.dataset
    operation = dataset.operations[0].value
    keys = host_key_frequencies(run, operation)
    alignment = key_frequency_alignment(run, keys=keys)
    input_share, product_share, single_share = (torch.zeros(run.sae.d_sae, dtype=torch.float64) for _ in range(3))
    for row in alignment["latents"]:
        input_share[row["latent"]] = row["key_share"]
        product_share[row["latent"]] = row["product_share"]
        single_share[row["latent"]] = row["single_share"]
    host, clt = to_float64(run.data.sources[0].model, run.sae)
    output_share = output_key_shares(clt, host, operation, keys, dataset.p)
    known = (input_share >= input_threshold) & (output_share >= output_threshold)
    tokens, labels = dataset.tokens.cpu(), dataset.labels.cpu()
    effects = logit_effects(host, clt, tokens, labels)
    per_latent = torch.cat(effects.latents, dim=1)  # [pairs, d_sae]
    summary = {"operation": operation, "keys": keys, "latents_on_known_algorithm": int(known.sum()),
               "alive": alignment["alive"], "d_sae": clt.d_sae}
    for split, mask in (("train", dataset.is_train.cpu()), ("test", ~dataset.is_train.cpu())):
        total = effects.logits[mask].sum()
        summary[split] = {
            "mean_centred_logit": effects.logits[mask].mean().item(),
            "latents": per_latent[mask].sum().item() / total.item(),
            "known_algorithm_latents": per_latent[mask][:, known].sum().item() / total.item(),
            "other_latents": per_latent[mask][:, ~known].sum().item() / total.item(),
            "errors": effects.errors[mask].sum().item() / total.item(),
            "embeddings": effects.embedding[mask].sum().item() / total.item(),
            "constants": effects.constants[mask].sum().item() / total.item(),
        }
    carried = per_latent.abs().mean(dim=0)
    summary["known_by_layer"] = known_input_terms(known, carried, product_share, single_share, clt.per_layer)
    top = carried.argsort(descending=True)[:10].tolist()
    summary["top_latents"] = [{"latent": i, "layer": i // clt.per_layer, "mean_abs_logit_effect": carried[i].item(),
                               "input_key_share": input_share[i].item(), "output_key_share": output_share[i].item()}
                              for i in top]
    return summary


def known_input_terms(known: torch.Tensor, carried: torch.Tensor, product_share: torch.Tensor,
                      single_share: torch.Tensor, per_layer: int) -> list[dict]:
    """Per layer, the known-algorithm latents' input power split into products of a and b at one key
    frequency ((w, w): what the MLP is to compute) and terms of one input alone ((w, 0), (0, w): what
    attention hands it), each a mean over the layer's known latents weighted by |logit effect|."""
    rows = []
    for layer in range(len(known) // per_layer):
        span = slice(layer * per_layer, (layer + 1) * per_layer)
        mask = known[span]
        weight = carried[span][mask]
        total = weight.sum().clamp_min(1e-300)
        rows.append({"layer": layer, "latents": int(mask.sum()),
                     "product_share": (weight * product_share[span][mask]).sum().item() / total.item(),
                     "single_share": (weight * single_share[span][mask]).sum().item() / total.item()})
    return rows
