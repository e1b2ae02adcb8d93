"""Synthetic activations with a feature hierarchy, and feature absorption: what Matryoshka SAEs are for.

Each parent feature has `children` child features; a child is active only with its parent (Chanin et
al. 2024, "A is for absorption"; Bussmann et al. 2025, Matryoshka SAEs). A token holds
`parents_per_token` parents (uniform, U(0, 1) magnitudes), and each of them, with probability 1/2,
one of its children (uniform, U(0, 1)): about 1.5 x parents_per_token true features per token.
All directions are independent random unit vectors; 1% noise and the scaling of the flat benchmark.

Absorption: a parent's latent is the decoder row closest to the parent's direction. Over held-out
(token, parent) occurrences, its recall is the fraction where that latent fires; a dictionary that
absorbs the parent into child latents fires it when the parent is alone and not when a child is
there. `absorption` = recall alone - recall with a child (0: none; up to 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CHILD_PROBABILITY = 0.5


@dataclass
class HierarchicalData:
    x: torch.Tensor  # [n, d_in] tokens
    features: torch.Tensor  # [n_parents * (1 + children), d_in]: the parents, then parent 0's children, ...
    parents: torch.Tensor  # [n, parents_per_token] the parents each token holds (int32)
    has_child: torch.Tensor  # [n, parents_per_token] whether that parent came with one of its children
    n_parents: int


def parents_per_token(features_per_token: int) -> int:
    """Parents for about this many true features per token (1.5 per parent on average)."""
    return max(1, round(features_per_token / 1.5))


def hierarchical_activations(d_in: int, n_true: int, children: int, per_token: int, n: int,
                             seed: int) -> HierarchicalData:
    generator = torch.Generator().manual_seed(seed)
    n_parents = max(1, n_true // (1 + children))
    features = F.normalize(torch.randn(n_parents * (1 + children), d_in, generator=generator), dim=1)
    parents = torch.randint(n_parents, (n, per_token), generator=generator)
    has_child = torch.rand(n, per_token, generator=generator) < CHILD_PROBABILITY
    child = n_parents + parents * children + torch.randint(children, (n, per_token), generator=generator)
    magnitudes = torch.rand(n, 2 * per_token, generator=generator)
    magnitudes[:, per_token:] *= has_child
    x = F.embedding_bag(torch.cat([parents, child], dim=1), features, per_sample_weights=magnitudes, mode="sum")
    x = x + 0.01 * torch.randn(n, d_in, generator=generator)
    x = x * (d_in / x.pow(2).sum(dim=1).mean()).sqrt()
    return HierarchicalData(x, features, parents.int(), has_child, n_parents)


def recall_by_context(fired: torch.Tensor, has_child: torch.Tensor) -> dict[str, float]:
    """fired, has_child: [occurrences] bool (did the parent's latent fire; was a child there)."""
    alone, with_child = fired[~has_child].float().mean().item(), fired[has_child].float().mean().item()
    return {"parent_recall_alone": alone, "parent_recall_with_child": with_child, "absorption": alone - with_child}


@torch.no_grad()
def absorption(sae: nn.Module, data: HierarchicalData, rows: slice, decoder_rows: torch.Tensor) -> dict[str, float]:
    """Recall of each parent's latent on the tokens `rows`, alone and with a child; and the parents'
    and children's recovered fractions (best decoder cosine > 0.9), apart."""
    decoder = F.normalize(decoder_rows.float(), dim=1)
    cosines = data.features.to(decoder.device) @ decoder.t()
    best_cos, latent_of = cosines.amax(dim=1), cosines.argmax(dim=1)
    parent_latents = latent_of[:data.n_parents]
    fired = []
    for x, parents in zip(data.x[rows].split(4096), data.parents[rows].split(4096)):
        latents = sae.encode(x.to(decoder.device)[:, None])
        fired.append(latents.gather(1, parent_latents[parents.long().to(decoder.device)]) > 0)
    return {**recall_by_context(torch.cat(fired).flatten().cpu(), data.has_child[rows].flatten()),
            "parents_recovered": (best_cos[:data.n_parents] > 0.9).float().mean().item(),
            "children_recovered": (best_cos[data.n_parents:] > 0.9).float().mean().item()}
