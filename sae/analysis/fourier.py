"""Fourier view of modular arithmetic (Nanda et al. 2023): a latent's activation over the p x p
grid of (a, b) in frequency space, its dominant frequencies, and the host's key frequencies."""
from __future__ import annotations

import torch


def grid_power(grid: torch.Tensor) -> torch.Tensor:
    """grid: [..., n, n] maps over (a, b) -> the same shape: power |DFT2|^2 of each map with the
    constant (0, 0) term removed, normalised to sum to 1 (a constant map gives all zeros)."""
    power = torch.fft.fft2(grid.double()).abs().pow(2)
    constant = power[..., 0, 0].clone()
    power[..., 0, 0] = 0.0
    total = power.sum(dim=(-2, -1))
    flat = total <= 1e-12 * constant.clamp_min(1e-300)  # a (numerically) constant map has no frequencies
    return (power / torch.where(flat, 1.0, total)[..., None, None]).masked_fill(flat[..., None, None], 0.0).float()


def folded_power(power: torch.Tensor) -> torch.Tensor:
    """power: [..., n, n] -> [..., n // 2 + 1, n // 2 + 1]: k and n - k summed into min(k, n - k) on
    each axis (a real map's spectrum is symmetric), so entry (k_a, k_b) is that frequency pair's share."""
    n = power.shape[-1]
    fold = torch.minimum(torch.arange(n), n - torch.arange(n)).to(power.device)
    size = n // 2 + 1
    rows = torch.zeros(*power.shape[:-2], size, n, dtype=power.dtype, device=power.device)
    rows.index_add_(-2, fold, power)
    out = torch.zeros(*power.shape[:-2], size, size, dtype=power.dtype, device=power.device)
    return out.index_add_(-1, fold, rows)


def dominant_frequencies(power: torch.Tensor, n: int = 3) -> list[tuple[int, int, float]]:
    """The n strongest folded (k_a, k_b) of one [p, p] power map with their share of the power (ties
    broken by the smaller (k_a, k_b))."""
    return strongest_folded(folded_power(power), n)


def strongest_folded(folded: torch.Tensor, n: int = 3) -> list[tuple[int, int, float]]:
    """The n largest entries (k_a, k_b, share) of one folded power map, ties by the smaller (k_a, k_b)."""
    size = folded.shape[-1]
    shares, flat = folded.flatten().double().sort(descending=True, stable=True)
    return [(int(i) // size, int(i) % size, float(share)) for share, i in zip(shares[:n], flat[:n])]


def operation_grid(grid: torch.Tensor, operation: str) -> torch.Tensor:
    """grid: [..., p, p] over (a, b) -> the map whose Fourier modes the host uses: as it is for additive
    operations (and conditional), re-indexed on both axes by the discrete log (the pairs with a or b =
    0 left out: [..., p - 1, p - 1]) for multiplication and division, whose key frequencies live on
    the cyclic group of nonzero residues (see `group_coordinates`)."""
    if operation not in MULTIPLICATIVE:
        return grid
    p = grid.shape[-1]
    coordinates, order = group_coordinates(p, operation)
    residue_at = torch.empty(order, dtype=torch.long)
    residue_at[coordinates[1:]] = torch.arange(1, p)
    residue_at = residue_at.to(grid.device)
    return grid[..., residue_at, :][..., residue_at]


def embedding_frequency_norms(W_E: torch.Tensor) -> torch.Tensor:
    """W_E: [p, d] number-token embeddings -> [p // 2 + 1] norm of each frequency k (cos and sin
    together) of the embedding along the token axis, normalised to sum to 1."""
    spectrum = torch.fft.rfft(W_E.double(), dim=0).abs().pow(2).sum(dim=1)
    spectrum[0] = 0.0
    return (spectrum / spectrum.sum()).float()


def key_frequencies(W_E: torch.Tensor, min_share: float = 0.05) -> list[int]:
    """Frequencies holding at least min_share of the embedding's (non-constant) power, strongest
    first: the handful a grokked host uses (Nanda et al. find 3-7)."""
    norms = embedding_frequency_norms(W_E)
    order = norms.argsort(descending=True, stable=True)
    return [int(k) for k in order if norms[k] >= min_share]


def latent_frequencies(values: torch.Tensor, latents: torch.Tensor) -> list[dict]:
    """values: [p, p, d_sae] one operation's latent grid -> per latent its strongest folded
    frequency pair (k_a, k_b) and that pair's share of the latent's non-constant power."""
    rows = []
    for latent in latents.tolist():
        (ka, kb, share), = dominant_frequencies(grid_power(values[..., latent]), n=1)
        rows.append({"latent": latent, "k_a": ka, "k_b": kb, "share": share})
    return rows


# -- progress measures (Nanda et al. 2023): restricted and excluded loss --------------------------
# A grokked host's answer logits over the p number tokens are close to
#     logit(a, b, c) = sum_{w in K} alpha_w cos(2 pi w (s(a, b) - x(c)) / n + phi_w)
# with K the key frequencies, for additive operations x = the residue, n = p, s = a + b (a - b for
# subtraction); for multiplicative ones the same on the cyclic group of nonzero residues: x = the
# discrete log to a primitive root g, n = p - 1, s = x(a) + x(b) (x(a) - x(b) for division), and
# pairs or answers involving 0 are outside the group (left out of the basis and of the losses).
# Restricted loss keeps only those components of the logits (it falls as the circuit forms, before
# test accuracy rises); excluded loss removes them and is measured on training pairs (it rises as
# the host stops relying on memorisation). Components: cos and sin for each w in K, i.e. every
# phase, projected over the (pair, c) grid given.

PHASE_SIGN = {"addition": 1, "subtraction": -1, "multiplication": 1, "division": -1}
MULTIPLICATIVE = ("multiplication", "division")


def primitive_root(p: int) -> int:
    """The smallest generator of the multiplicative group mod the prime p."""
    for g in range(1, p):
        if len({pow(g, k, p) for k in range(p - 1)}) == p - 1:
            return g
    raise ValueError(f"no primitive root mod {p} (is it prime?)")


def group_coordinates(p: int, operation: str) -> tuple[torch.Tensor, int]:
    """([p] the coordinate x(v) of each residue v on the operation's cyclic group, -1 where v is
    outside it (0 for multiplicative operations), the group's order n)."""
    if operation not in PHASE_SIGN:
        raise ValueError(f"restricted/excluded loss is defined for {sorted(PHASE_SIGN)}, not {operation}")
    if operation not in MULTIPLICATIVE:
        return torch.arange(p), p
    g, coordinates = primitive_root(p), torch.full((p,), -1, dtype=torch.long)
    for k in range(p - 1):
        coordinates[pow(g, k, p)] = k  # discrete log: g^k = v
    return coordinates, p - 1


def group_ordered_embedding(W_E: torch.Tensor, operation: str) -> torch.Tensor:
    """W_E: [p, d] number-token embeddings -> the rows in group order (x = 0, 1, ..., n - 1): the
    residues themselves for additive operations, g^0, g^1, ... for multiplicative ones (whose
    frequencies live on the discrete log)."""
    coordinates, order = group_coordinates(W_E.shape[0], operation)
    residue_at = torch.empty(order, dtype=torch.long)
    defined = coordinates >= 0
    residue_at[coordinates[defined]] = torch.where(defined)[0]
    return W_E[residue_at]


def operation_key_frequencies(W_E: torch.Tensor, operation: str, min_share: float = 0.05) -> list[int]:
    """`key_frequencies` on the operation's group (see `group_ordered_embedding`)."""
    return key_frequencies(group_ordered_embedding(W_E, operation), min_share)


def key_frequency_basis(a: torch.Tensor, b: torch.Tensor, p: int, frequencies: list[int],
                        operation: str) -> torch.Tensor:
    """[n * p, 2 |K|] orthonormal basis of the key-frequency components over the grid of the n
    pairs (a, b) x the p answers c (row index pair * p + c); zero where a, b or c is outside the
    operation's group."""
    coordinates, order = group_coordinates(p, operation)
    xa, xb, xc = coordinates[a].double(), coordinates[b].double(), coordinates.double()
    inside = ((coordinates[a] >= 0) & (coordinates[b] >= 0))[:, None] & (coordinates >= 0)[None, :]
    s = (xa + PHASE_SIGN[operation] * xb)[:, None]
    columns = []
    for w in frequencies:
        angle = 2 * torch.pi * w * (s - xc[None, :]) / order  # [n, p]
        columns += [(angle.cos() * inside).flatten(), (angle.sin() * inside).flatten()]
    basis, _ = torch.linalg.qr(torch.stack(columns, dim=1))
    return basis


def restricted_and_excluded_logits(logits: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: int,
                                   frequencies: list[int], operation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [n, p] over the number tokens for pairs (a, b) -> (only the key-frequency components,
    everything but them), each [n, p]."""
    if not frequencies:
        raise ValueError("restricted/excluded loss needs at least one key frequency")
    basis = key_frequency_basis(a, b, p, frequencies, operation)
    flat = logits.double().flatten()
    kept = basis @ (basis.t() @ flat)
    return kept.view_as(logits).to(logits.dtype), (flat - kept).view_as(logits).to(logits.dtype)


@torch.no_grad()
def progress_measures(model, dataset, frequencies: list[int], hooks=None) -> dict[str, float]:
    """Cross-entropy over the p answer tokens on train and test pairs of a one-operation host: full,
    restricted (key frequencies only) and excluded (key frequencies removed). Multiplicative
    operations: over the pairs inside the group (a, b != 0). hooks: as in the host's forward (e.g.
    a clamp spliced in while it trains)."""
    import torch.nn.functional as F

    if len(dataset.operations) != 1:
        raise ValueError("progress_measures takes a host trained on one operation")
    operation, p = dataset.operations[0].value, dataset.p
    coordinates, _ = group_coordinates(p, operation)
    logits = model(dataset.tokens, hooks)[:, :p]  # answer logits over the number tokens
    a, b = dataset.tokens[:, 0], dataset.tokens[:, 2]
    inside = (coordinates[a] >= 0) & (coordinates[b] >= 0)
    metrics = {}
    for split, in_split in (("train", dataset.is_train), ("test", ~dataset.is_train)):
        mask = in_split & inside
        restricted, excluded = restricted_and_excluded_logits(logits[mask], a[mask], b[mask], p, frequencies, operation)
        labels = dataset.labels[mask]
        for name, values in (("full", logits[mask]), ("restricted", restricted), ("excluded", excluded)):
            metrics[f"{split}/{name}_loss"] = F.cross_entropy(values.float(), labels).item()
    return metrics
