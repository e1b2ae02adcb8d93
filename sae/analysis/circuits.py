"""Attribution graphs through a cross-layer transcoder (Ameisen et al. 2025, "Circuit Tracing").

For inputs (a, b) the host runs once (the clean run). The *local replacement model* then replays it
linearly: attention patterns and normalisation scales frozen at their clean values, every MLP output
replaced by the CLT's prediction at the answer position plus an error node holding what the CLT
misses there (and the whole MLP output at the other positions, where the CLT does not run). With the
errors added the replay reproduces the clean run exactly, and every quantity downstream is linear
in the nodes' activations:

    nodes: token embeddings (one per position), CLT latents (their clean activations), error nodes
           (layer x position), constants per layer (normalisation β, the CLT's b_dec) and of the final norm
    targets: each active latent's pre-activation (its stream part, W_enc x) and the answer logit

An edge s -> t is s's direct effect on t: d t / d s times s's activation, with every other node held
at its value (effects pass through attention and the residual stream, never through another
latent). Because the replay is linear, a target's incoming edges sum to it exactly (completeness).
`attribution_graph` builds the graph of one input, `prune` keeps the nodes and edges that carry a
chosen fraction of the effect on the logit, `plot_graph` draws it, and `logit_effects` gives every
node's direct effect on the answer logit for many inputs at once (the aggregate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sae.errors import ReportedError

# the replay must reproduce the host's own forward to this (relative to the logit's scale): else reported
REPLAY_TOLERANCE = 1e-4


class ReplacementMismatch(ReportedError):
    """The frozen linear replay of an input does not reproduce the host's forward."""


@dataclass
class CleanRun:
    """What the replay freezes, for B inputs: per layer the attention patterns [B, H, seq, seq] and the
    norms' scales, the CLT's latents at the answer position and the error nodes."""

    tokens: torch.Tensor
    answers: torch.Tensor
    embeddings: torch.Tensor  # [B, seq, d]
    patterns: list[torch.Tensor]
    attn_norm_scales: list[torch.Tensor | None]  # [B, seq, 1] 1/σ (layernorm, rmsnorm) or None
    final_norm_scale: torch.Tensor | None  # [B, 1]
    latents: list[torch.Tensor]  # [B, m] per layer
    errors: list[torch.Tensor]  # [B, seq, d] per layer: MLP output minus the CLT's part (all of it off the answer)
    logits: torch.Tensor  # [B] the host's own answer logit


def norm_scale(norm: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """1/σ (layernorm) or 1/rms (rmsnorm) of x [..., d], None for no norm."""
    if isinstance(norm, nn.LayerNorm):
        return (x.var(dim=-1, keepdim=True, unbiased=False) + norm.eps).rsqrt()
    if isinstance(norm, nn.RMSNorm):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return (x.pow(2).mean(dim=-1, keepdim=True) + eps).rsqrt()
    return None


def frozen_norm(norm: nn.Module, x: torch.Tensor, scale: torch.Tensor | None, constant: torch.Tensor) -> torch.Tensor:
    """The norm with its scale frozen: linear in x; its bias β enters times `constant` (a node)."""
    if scale is None:
        return x
    if isinstance(norm, nn.LayerNorm):
        centred = x - x.mean(dim=-1, keepdim=True)
        out = centred * scale * norm.weight
        return out + constant[..., None, None] * norm.bias if norm.bias is not None else out
    return x * scale * norm.weight


def attention_pattern(attn, h: torch.Tensor) -> torch.Tensor:
    """[B, H, seq, seq] softmax pattern of the host's attention on its normalised input h [B, seq, d]."""
    from sae.host_models.transformer import _rotate

    batch, seq, _ = h.shape
    q = attn.W_q(h).view(batch, seq, attn.n_heads, attn.d_head).transpose(1, 2)
    k = attn.W_k(h).view(batch, seq, attn.kv_heads, attn.d_head).transpose(1, 2)
    if attn.rotary:
        q, k = _rotate(q, attn.cos[:seq], attn.sin[:seq]), _rotate(k, attn.cos[:seq], attn.sin[:seq])
    k = k.repeat_interleave(attn.n_heads // attn.kv_heads, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.d_head)
    future = torch.ones(seq, seq, dtype=torch.bool, device=h.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def frozen_attention(attn, h: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """The attention output with its pattern fixed: linear in h (the value and output maps)."""
    batch, seq, _ = h.shape
    v = attn.W_v(h).view(batch, seq, attn.kv_heads, attn.d_head).transpose(1, 2)
    v = v.repeat_interleave(attn.n_heads // attn.kv_heads, dim=1)
    return attn.W_o((pattern @ v).transpose(1, 2).reshape(batch, seq, -1))


def embed(host, tokens: torch.Tensor) -> torch.Tensor:
    x = host.embed(tokens)
    return x + host.pos_embed[: tokens.shape[1]] if host.pos_embed is not None else x


@torch.no_grad()
def clean_run(host, clt, tokens: torch.Tensor, answers: torch.Tensor) -> CleanRun:
    """The host's forward on tokens [B, seq] block by block, recording what the replay freezes. host
    and clt in one dtype (float64 for exact completeness), the CLT in raw units (sae.saes.load)."""
    x = embed(host, tokens)
    embeddings, patterns, scales, latents, errors = x, [], [], [], []
    for layer, block in enumerate(host.blocks):
        scales.append(norm_scale(block.norm_attn, x))
        h = block.norm_attn(x)
        patterns.append(attention_pattern(block.attn, h))
        mid = x + frozen_attention(block.attn, h, patterns[-1])
        mlp_out = block.mlp.W_out(block.mlp.hidden(block.norm_mlp(mid)))
        latents.append(clt.layer_latents(layer, mid[:, -1]))
        error = mlp_out.clone()
        error[:, -1] -= clt.layer_output(layer, latents, mid[:, -1])
        errors.append(error)
        x = mid + mlp_out
    final = x[:, -1]
    logits = host.unembed(host.norm_final(final)).gather(1, answers[:, None])[:, 0]
    return CleanRun(tokens, answers, embeddings, patterns, scales, norm_scale(host.norm_final, final), latents,
                    errors, logits)


@dataclass
class Leaves:
    """The replay's node activations, each a leaf tensor (gradients give the direct effects)."""

    embedding: torch.Tensor  # [B, seq]: 1
    latents: list[torch.Tensor]  # [B, m] per layer: the clean activations
    errors: torch.Tensor  # [B, L, seq]: 1
    constants: torch.Tensor  # [B, L + 1]: 1 (per layer, then the final norm)

    def all(self) -> list[torch.Tensor]:
        return [self.embedding, *self.latents, self.errors, self.constants]


def replay(host, clt, run: CleanRun, leaves: Leaves, centred: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The local replacement model: (per layer the stream part of every latent's pre-activation at the
    answer position [B, m], the answer logit [B]; `centred`: minus the mean logit over the outputs),
    linear in the leaves."""
    x = leaves.embedding[..., None] * run.embeddings
    latent_inputs = []
    for layer, block in enumerate(host.blocks):
        h = frozen_norm(block.norm_attn, x, run.attn_norm_scales[layer], leaves.constants[:, layer])
        mid = x + frozen_attention(block.attn, h, run.patterns[layer])
        rows = clt.block(layer)
        latent_inputs.append(mid[:, -1] @ clt.W_enc[rows, layer].t())
        answer = leaves.constants[:, layer, None] * clt.b_dec[layer] + sum(
            leaves.latents[j] @ clt.W_dec[clt.block(j), layer] for j in range(layer + 1))
        if clt.cfg.skip:
            answer = answer + mid[:, -1] @ clt.W_skip[layer].t()
        mlp_out = leaves.errors[:, layer, :, None] * run.errors[layer]
        mlp_out = torch.cat([mlp_out[:, :-1], (mlp_out[:, -1] + answer)[:, None]], dim=1)
        x = mid + mlp_out
    final = frozen_norm(host.norm_final, x[:, -1:], None if run.final_norm_scale is None
                        else run.final_norm_scale[:, None], leaves.constants[:, -1])[:, 0]
    readout = host.unembed.weight[run.answers]
    if centred:
        readout = readout - host.unembed.weight.mean(dim=0)
    return latent_inputs, (final * readout).sum(dim=-1)


def make_leaves(run: CleanRun, n_layers: int) -> Leaves:
    batch, seq = run.tokens.shape
    dtype = run.embeddings.dtype
    ones = lambda *shape: torch.ones(*shape, dtype=dtype, requires_grad=True)  # noqa: E731
    return Leaves(ones(batch, seq), [f.detach().clone().requires_grad_() for f in run.latents],
                  ones(batch, n_layers, seq), ones(batch, n_layers + 1))


def direct_effects(target: torch.Tensor, leaves: Leaves) -> list[torch.Tensor]:
    """target [B] (inputs independent) -> each leaf's direct effect on it: gradient x activation."""
    grads = torch.autograd.grad(target.sum(), leaves.all(), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(leaf) if grad is None else grad * leaf.detach()
            for grad, leaf in zip(grads, leaves.all())]


def check_replay(run: CleanRun, replayed: torch.Tensor, host) -> None:
    """The replay must give the host's own logit (its forward, not this module's block loop)."""
    with torch.no_grad():
        own = host(run.tokens).gather(1, run.answers[:, None])[:, 0].to(replayed.dtype)
    gap = (replayed.detach() - own).abs()
    scale = own.abs().clamp_min(1.0)
    worst = int((gap / scale).argmax())
    if gap[worst] > REPLAY_TOLERANCE * scale[worst]:
        a, b = run.tokens[worst, 0].item(), run.tokens[worst, 2].item()
        raise ReplacementMismatch(f"input (a={a}, b={b}): the frozen replay gives logit {replayed[worst].item():.6g}, "
                                  f"the host's forward {own[worst].item():.6g} (gap {gap[worst].item():.3g} > "
                                  f"{REPLAY_TOLERANCE:g} x scale): the host is not what the replacement model assumes")


# -- one input's graph ----------------------------------------------------------------------------

@dataclass
class AttributionGraph:
    """nodes: dicts with kind (embedding | latent | error | constant | logit), layer, position, latent,
    activation. edges[t, s]: node s's direct effect on target t (targets: the active latents, then the
    logit, as node indices in `targets`). target_values[t]: the stream part of a latent's
    pre-activation, or the logit; the incoming edges sum to it."""

    a: int
    b: int
    answer: int
    nodes: list[dict]
    targets: list[int]
    edges: torch.Tensor
    target_values: torch.Tensor
    logit: float
    kept: list[int] = field(default_factory=list)  # after `prune`: the nodes kept

    def completeness_gap(self) -> float:
        """max over targets of |sum of incoming edges - the target's value|."""
        return (self.edges.sum(dim=1) - self.target_values).abs().max().item()


def graph_nodes(run: CleanRun, row: int, n_layers: int, per_layer: int) -> tuple[list[dict], dict]:
    """The nodes of input `row` and where each one's activation sits in the leaves."""
    seq = run.tokens.shape[1]
    nodes, where = [], {}
    for position in range(seq):
        where[len(nodes)] = ("embedding", (row, position))
        nodes.append({"kind": "embedding", "layer": -1, "position": position, "latent": None,
                      "token": int(run.tokens[row, position]), "activation": 1.0})
    for layer in range(n_layers):
        for latent in torch.nonzero(run.latents[layer][row]).flatten().tolist():
            where[len(nodes)] = ("latent", (layer, row, latent))
            nodes.append({"kind": "latent", "layer": layer, "position": seq - 1, "latent": layer * per_layer + latent,
                          "activation": run.latents[layer][row, latent].item()})
    for layer in range(n_layers):
        for position in range(seq):
            where[len(nodes)] = ("error", (row, layer, position))
            nodes.append({"kind": "error", "layer": layer, "position": position, "latent": None,
                          "norm": run.errors[layer][row, position].norm().item(), "activation": 1.0})
    for layer in range(n_layers + 1):
        where[len(nodes)] = ("constant", (row, layer))
        nodes.append({"kind": "constant", "layer": layer if layer < n_layers else n_layers, "position": seq - 1,
                      "latent": None, "activation": 1.0})
    return nodes, where


def gather(effects: list[torch.Tensor], where: dict, n_nodes: int, n_layers: int) -> torch.Tensor:
    """One target's direct effects (per leaf) -> [n_nodes] in node order."""
    embedding, latents, errors, constants = effects[0], effects[1:1 + n_layers], effects[-2], effects[-1]
    out = torch.zeros(n_nodes, dtype=embedding.dtype)
    for node, (kind, index) in where.items():
        if kind == "embedding":
            out[node] = embedding[index]
        elif kind == "latent":
            layer, row, latent = index
            out[node] = latents[layer][row, latent]
        elif kind == "error":
            out[node] = errors[index]
        else:
            out[node] = constants[index]
    return out


def attribution_graph(host, clt, a: int, b: int, tokens: torch.Tensor, answer: int) -> AttributionGraph:
    """The graph of one input: tokens [seq] (the host's [a, op, b, =]), answer the label. host and
    clt in float64 for exact sums (`to_float64`). ReplacementMismatch if the replay is not the host."""
    run = clean_run(host, clt, tokens[None], torch.tensor([answer]))
    n_layers, per_layer = len(host.blocks), clt.per_layer
    leaves = make_leaves(run, n_layers)
    latent_inputs, logit = replay(host, clt, run, leaves)
    check_replay(run, logit, host)
    nodes, where = graph_nodes(run, 0, n_layers, per_layer)
    rows, values, targets = [], [], []
    for node_index, node in enumerate(nodes):
        if node["kind"] == "latent":
            layer, local = node["layer"], node["latent"] - node["layer"] * per_layer
            target = latent_inputs[layer][:, local]
            rows.append(gather(direct_effects(target, leaves), where, len(nodes) + 1, n_layers))
            values.append(target.detach()[0])
            targets.append(node_index)
    nodes.append({"kind": "logit", "layer": n_layers, "position": tokens.shape[0] - 1, "latent": None,
                  "token": answer, "activation": logit.item()})
    rows.append(gather(direct_effects(logit, leaves), where, len(nodes), n_layers))
    values.append(logit.detach()[0])
    targets.append(len(nodes) - 1)
    return AttributionGraph(a, b, answer, nodes, targets, torch.stack(rows), torch.stack(values), run.logits[0].item())


def to_float64(host, clt):
    """Copies of host and CLT in float64 (the graph's sums are then exact to ~1e-12)."""
    import copy

    return copy.deepcopy(host).double().eval(), copy.deepcopy(clt).double().eval()


# -- pruning and drawing -----------------------------------------------------------------------------

def influence_on_logit(graph: AttributionGraph) -> torch.Tensor:
    """[n_nodes] each node's total (direct + through other nodes) share of the logit's attribution:
    |edges| normalised per target, summed over every path to the logit (Ameisen et al.'s pruning)."""
    n = len(graph.nodes)
    adjacency = torch.zeros(n, n, dtype=graph.edges.dtype)
    weights = graph.edges.abs()
    adjacency[graph.targets] = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-300)
    total = torch.linalg.solve(torch.eye(n, dtype=adjacency.dtype) - adjacency, torch.eye(n, dtype=adjacency.dtype))
    return (total - torch.eye(n, dtype=adjacency.dtype))[graph.targets[-1]]


def prune(graph: AttributionGraph, fraction: float) -> AttributionGraph:
    """The graph restricted to the fewest nodes carrying `fraction` of the influence on the logit (the
    logit itself always kept); edges between them stay as they are. fraction in (0, 1]."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the attribution threshold must be in (0, 1], got {fraction}")
    influence = influence_on_logit(graph)
    order = influence.argsort(descending=True, stable=True)
    cumulative = influence[order].cumsum(0) / influence.sum().clamp_min(1e-300)
    count = int((cumulative < fraction).sum()) + 1
    kept = sorted(set(order[:count].tolist()) | {graph.targets[-1]})
    return AttributionGraph(graph.a, graph.b, graph.answer, graph.nodes, graph.targets, graph.edges,
                            graph.target_values, graph.logit, kept)


def node_label(node: dict) -> str:
    if node["kind"] == "embedding":
        return f"tok {node['token']}@{node['position']}"
    if node["kind"] == "latent":
        return f"L{node['layer']} #{node['latent']}"
    if node["kind"] == "error":
        return f"err L{node['layer']}@{node['position']}"
    if node["kind"] == "constant":
        return f"const L{node['layer']}"
    return f"logit {node['token']}"


def node_column(node: dict) -> float:
    """x position: embeddings at 0, layer l's latents at 2 l + 2 with its error and constant nodes just
    right of them, the logit (layer L) at 2 L + 2."""
    if node["kind"] == "embedding":
        return 0.0
    return 2.0 * node["layer"] + (2.6 if node["kind"] in ("error", "constant") else 2.0)


def plot_graph(graph: AttributionGraph, path: str | Path, max_edges: int = 60) -> Path:
    """Nodes by layer (embeddings left, logit right), edge width by |effect|, blue positive, red negative."""
    import matplotlib.pyplot as plt

    kept = graph.kept or list(range(len(graph.nodes)))
    columns: dict[float, list[int]] = {}
    for node in kept:
        columns.setdefault(node_column(graph.nodes[node]), []).append(node)
    position = {node: (x, i - (len(nodes) - 1) / 2) for x, nodes in columns.items() for i, node in enumerate(nodes)}
    kept_set = set(kept)
    edges = [(graph.edges[row, s].item(), s, t) for row, t in enumerate(graph.targets) if t in kept_set
             for s in kept if s != t and graph.edges[row, s] != 0]
    edges = sorted(edges, key=lambda e: -abs(e[0]))[:max_edges]
    fig, ax = plt.subplots(figsize=(9, 0.35 * max(len(v) for v in columns.values()) + 2))
    strongest = max((abs(e[0]) for e in edges), default=1.0)
    for effect, s, t in edges:
        (x0, y0), (x1, y1) = position[s], position[t]
        ax.plot([x0, x1], [y0, y1], color="tab:blue" if effect > 0 else "tab:red",
                linewidth=0.3 + 4 * abs(effect) / strongest, alpha=0.6)
    for node, (x, y) in position.items():
        ax.scatter([x], [y], s=30, color="black", zorder=3)
        ax.annotate(node_label(graph.nodes[node]), (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_title(f"({graph.a}, {graph.b}) -> {graph.answer}: logit {graph.logit:.2f}, {len(kept)} nodes")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# -- many inputs: every node's direct effect on the answer logit ------------------------------------

@dataclass
class LogitEffects:
    """Direct effects on the centred answer logit (logit[c] - mean over outputs) for B inputs: embeddings
    [B, seq], latents per layer [B, m], errors [B, L, seq], constants [B, L + 1]; they sum to `logits`."""

    embedding: torch.Tensor
    latents: list[torch.Tensor]
    errors: torch.Tensor
    constants: torch.Tensor
    logits: torch.Tensor

    def shares(self) -> dict[str, torch.Tensor]:
        """[B] each kind's part of the logit, as a fraction of it."""
        total = self.logits
        return {"latents": sum(l.sum(dim=1) for l in self.latents) / total,
                "errors": self.errors.sum(dim=(1, 2)) / total, "embeddings": self.embedding.sum(dim=1) / total,
                "constants": self.constants.sum(dim=1) / total}


def logit_effects(host, clt, tokens: torch.Tensor, answers: torch.Tensor, chunk: int = 1024) -> LogitEffects:
    """Every node's direct effect on the centred answer logit for many inputs (tokens [B, seq]), one
    backward per chunk (inputs do not interact). Checks each chunk's replay against the host."""
    parts = []
    for start in range(0, len(tokens), chunk):
        run = clean_run(host, clt, tokens[start:start + chunk], answers[start:start + chunk])
        leaves = make_leaves(run, len(host.blocks))
        _, raw = replay(host, clt, run, leaves)
        check_replay(run, raw, host)
        _, centred = replay(host, clt, run, leaves, centred=True)
        effects = direct_effects(centred, leaves)
        parts.append((effects, centred.detach()))
    n_layers = len(host.blocks)
    cat = lambda i: torch.cat([p[0][i] for p in parts])  # noqa: E731
    return LogitEffects(cat(0), [cat(1 + l) for l in range(n_layers)], cat(1 + n_layers), cat(2 + n_layers),
                        torch.cat([p[1] for p in parts]))
