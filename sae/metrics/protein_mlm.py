"""Downstream metric for ESM-2 hosts: masked-LM cross-entropy with the SAE spliced in.

BERT-style masking (Devlin et al. 2019) of `task.mask_prob` of each record's residues: of the
chosen positions 80% become <mask>, 10% a random residue, 10% stay. Cross-entropy is taken on the
chosen positions only, for the clean host, with every residue position of a source's layer
replaced by the SAE's reconstruction (cls/eos/padding keep their activations: the SAE never saw
them), and with those positions zero-ablated:
    loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)
The masks come from a generator seeded by task.seed, so every evaluation sees the same masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sae.activations.protein import batch_tokens
from sae.activations.sources import capture_sources
from sae.host_models.esm2 import residue_mask
from sae.tasks.protein import token_batches

RESIDUE_TOKENS = "ACDEFGHIKLMNPQRSTVWY"


def bert_mask(tokens: torch.Tensor, residues: torch.Tensor, alphabet, mask_prob: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked tokens, chosen [B, T] bool). At least one position per record is chosen."""
    draw = torch.rand(tokens.shape, generator=generator)
    chosen = (draw < mask_prob) & residues.cpu()
    for row in range(len(tokens)):  # a short record may draw none: choose its lowest draw
        if not chosen[row].any():
            candidates = torch.where(residues[row].cpu(), draw[row], torch.inf)
            chosen[row, candidates.argmin()] = True
    action = torch.rand(tokens.shape, generator=generator)
    random_ids = torch.tensor([alphabet.get_idx(a) for a in RESIDUE_TOKENS])
    random_tokens = random_ids[torch.randint(len(random_ids), tokens.shape, generator=generator)]
    masked = tokens.cpu().clone()
    masked[chosen & (action < 0.8)] = alphabet.mask_idx
    replace = chosen & (action >= 0.8) & (action < 0.9)
    masked[replace] = random_tokens[replace]
    return masked.to(tokens.device), chosen.to(tokens.device)


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor, chosen: torch.Tensor) -> float:
    return F.cross_entropy(logits[chosen].float(), targets[chosen], reduction="sum").item()


@torch.no_grad()
def masked_lm_metrics(sae, data, split: str) -> dict[str, float]:
    """Per source: <source>/{ce_clean, ce_spliced, ce_zero, loss_recovered} on `split`'s eval records."""
    generator = torch.Generator().manual_seed(data.task.seed + (1 if split == "test" else 0))
    sources, alphabet = data.sources, data.alphabet
    totals = {s.name: {"clean": 0.0, "spliced": 0.0, "zero": 0.0} for s in sources}
    n_targets = 0
    for batch in token_batches(iter(data.eval_records(split)), data.task.tokens_per_batch):
        tokens = batch_tokens(batch, alphabet, sources[0].model)
        residues = residue_mask(tokens, alphabet)
        masked, chosen = bert_mask(tokens, residues, alphabet, data.task.mask_prob, generator)
        n_targets += int(chosen.sum())
        resid = capture_sources(sources, masked)  # all sources first: a crosscoder encodes them jointly
        x = torch.stack([activation[residues].float() for activation in resid], dim=1)
        scale = data.scale[:, None]
        x_hat = sae.decode(sae.encode(x * scale)) / scale
        clean_logits = {}
        for s, source in enumerate(sources):
            model, layer = source.model, source.layer
            if id(model) not in clean_logits:
                clean_logits[id(model)] = model.model(masked)["logits"]
            activation = resid[s]
            spliced, zeroed = activation.clone(), activation.clone()
            spliced[residues] = x_hat[:, s].to(activation.dtype)
            zeroed[residues] = 0.0
            totals[source.name]["clean"] += _ce_sum(clean_logits[id(model)], tokens, chosen)
            totals[source.name]["spliced"] += _ce_sum(model.head(spliced, masked, layer), tokens, chosen)
            totals[source.name]["zero"] += _ce_sum(model.head(zeroed, masked, layer), tokens, chosen)
    metrics = {}
    for name, total in totals.items():
        ce = {k: v / max(n_targets, 1) for k, v in total.items()}
        metrics.update({f"{name}/ce_{k}": v for k, v in ce.items()})
        gap = ce["zero"] - ce["clean"]
        metrics[f"{name}/loss_recovered"] = (ce["zero"] - ce["spliced"]) / gap if abs(gap) > 1e-12 else float("nan")
    metrics["mlm_targets"] = float(n_targets)
    return metrics
