"""The grokking host: a small pre-norm transformer over `[a, op, b, =]`, with hookpoints.

Hookpoints (names used by configs, caches and splicing), in the order a block computes them:
    blocks.{L}.resid_mid    residual stream after block L's attention, before its MLP  [batch, seq, d_model]
    blocks.{L}.mlp_hidden   MLP hidden activations of block L                          [batch, seq, d_mlp]
    blocks.{L}.mlp_out      what block L's MLP adds to the residual stream             [batch, seq, d_model]
    blocks.{L}.resid_post   residual stream after block L                              [batch, seq, d_model]
A hook is a function `activation -> activation`: returning its input reads, returning something
else replaces (used to splice in SAE reconstructions and to clamp latents).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

Hook = Callable[[torch.Tensor], torch.Tensor]
HOOKPOINTS = ("resid_mid", "mlp_hidden", "mlp_out", "resid_post")


class Activation(str, Enum):
    relu = "relu"
    gelu = "gelu"
    geglu = "geglu"


class Norm(str, Enum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"
    none = "none"


class Positions(str, Enum):
    learned = "learned"
    rotary = "rotary"


@dataclass
class TransformerArch:
    """Architecture only (what a checkpoint needs to be rebuilt)."""

    vocab_size: int
    n_outputs: int
    n_layers: int = 1
    d_model: int = 128
    n_heads: int = 4
    kv_heads: int = 4
    d_mlp: int = 512
    activation: Activation = Activation.relu
    norm: Norm = Norm.none
    positions: Positions = Positions.learned
    seq_len: int = 4


def hook_name(layer: int, hookpoint: str) -> str:
    return f"blocks.{layer}.{hookpoint}"


def hook_width(arch: TransformerArch, hookpoint: str) -> int:
    return arch.d_mlp if hookpoint == "mlp_hidden" else arch.d_model


def _make_norm(kind: Norm, d: int) -> nn.Module:
    if kind is Norm.layernorm:
        return nn.LayerNorm(d)
    if kind is Norm.rmsnorm:
        return nn.RMSNorm(d)
    return nn.Identity()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the last dim of x [batch, heads, seq, d_head] (half-split convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Plain softmax attention. For 4-token sequences this is several times faster on CPU than
    F.scaled_dot_product_attention, whose flash backward spends its time in cat/fill/copy."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        future = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(n_k - n_q + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    def __init__(self, arch: TransformerArch):
        super().__init__()
        assert arch.d_model % arch.n_heads == 0 and arch.n_heads % arch.kv_heads == 0
        self.n_heads, self.kv_heads = arch.n_heads, arch.kv_heads
        self.d_head = arch.d_model // arch.n_heads
        self.W_q = nn.Linear(arch.d_model, arch.d_model, bias=False)
        self.W_k = nn.Linear(arch.d_model, self.kv_heads * self.d_head, bias=False)
        self.W_v = nn.Linear(arch.d_model, self.kv_heads * self.d_head, bias=False)
        self.W_o = nn.Linear(arch.d_model, arch.d_model, bias=False)
        self.rotary = arch.positions is Positions.rotary
        if self.rotary:
            inv_freq = 1.0 / (10000 ** (torch.arange(0, self.d_head, 2).float() / self.d_head))
            angles = torch.outer(torch.arange(arch.seq_len).float(), inv_freq)
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, last_query_only: bool = False) -> torch.Tensor:
        """x: [batch, seq, d_model] -> [batch, seq or 1, d_model].

        `last_query_only` computes the output at the last position alone (all that the answer
        logits need in the final block): same keys and values, one query.
        """
        batch, seq, _ = x.shape
        x_q = x[:, -1:] if last_query_only else x
        q = self.W_q(x_q).view(batch, x_q.shape[1], self.n_heads, self.d_head).transpose(1, 2)
        k = self.W_k(x).view(batch, seq, self.kv_heads, self.d_head).transpose(1, 2)
        v = self.W_v(x).view(batch, seq, self.kv_heads, self.d_head).transpose(1, 2)
        if self.rotary:
            cos, sin = self.cos[:seq], self.sin[:seq]
            q = _rotate(q, cos[seq - x_q.shape[1]:], sin[seq - x_q.shape[1]:])
            k = _rotate(k, cos, sin)
        if self.kv_heads != self.n_heads:
            repeat = self.n_heads // self.kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = _attend(q, k, v, causal=not last_query_only)
        return self.W_o(out.transpose(1, 2).reshape(batch, x_q.shape[1], -1))


class MLP(nn.Module):
    def __init__(self, arch: TransformerArch):
        super().__init__()
        self.activation = arch.activation
        gated = arch.activation is Activation.geglu
        self.W_in = nn.Linear(arch.d_model, arch.d_mlp * (2 if gated else 1))
        self.W_out = nn.Linear(arch.d_mlp, arch.d_model)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.W_in(x)
        if self.activation is Activation.geglu:
            gate, up = pre.chunk(2, dim=-1)
            return F.gelu(gate) * up
        return F.relu(pre) if self.activation is Activation.relu else F.gelu(pre)


class Block(nn.Module):
    def __init__(self, arch: TransformerArch):
        super().__init__()
        self.norm_attn = _make_norm(arch.norm, arch.d_model)
        self.attn = Attention(arch)
        self.norm_mlp = _make_norm(arch.norm, arch.d_model)
        self.mlp = MLP(arch)


class GrokTransformer(nn.Module):
    def __init__(self, arch: TransformerArch):
        super().__init__()
        self.arch = arch
        self.embed = nn.Embedding(arch.vocab_size, arch.d_model)
        learned = arch.positions is Positions.learned
        self.pos_embed = nn.Parameter(torch.zeros(arch.seq_len, arch.d_model)) if learned else None
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.n_layers))
        self.norm_final = _make_norm(arch.norm, arch.d_model)
        self.unembed = nn.Linear(arch.d_model, arch.n_outputs, bias=False)
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(arch.d_model))
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=1 / math.sqrt(arch.d_model))

    def forward(
        self,
        tokens: torch.Tensor,
        hooks: Mapping[str, Hook] | None = None,
        stop_after_layer: int | None = None,
    ) -> torch.Tensor:
        """tokens: [batch, seq] -> answer logits [batch, n_outputs] read at the last position.

        With `stop_after_layer=L` it returns the residual stream after block L instead
        (callers that only read activations skip the rest of the model).
        """
        hooks = hooks or {}
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed[: tokens.shape[1]]
        last_layer = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            # The answer is read at the last position and attention is causal, so the final
            # block needs only that position, unless a hook reads or edits other positions of
            # the block (hooks that touch only the answer position say so: `answer_position_only`).
            last_only = layer == last_layer and stop_after_layer is None and all(
                getattr(hook, "answer_position_only", False) for name, hook in hooks.items()
                if name.startswith(f"blocks.{layer}."))
            attn_out = block.attn(block.norm_attn(x), last_query_only=last_only)
            x = (x[:, -1:] if last_only else x) + attn_out
            x = self._hooked(hooks, layer, "resid_mid", x)
            hidden = self._hooked(hooks, layer, "mlp_hidden", block.mlp.hidden(block.norm_mlp(x)))
            x = x + self._hooked(hooks, layer, "mlp_out", block.mlp.W_out(hidden))
            x = self._hooked(hooks, layer, "resid_post", x)
            if layer == stop_after_layer:
                return x
        return self.unembed(self.norm_final(x[:, -1]))

    @staticmethod
    def _hooked(hooks: Mapping[str, Hook], layer: int, hookpoint: str, activation: torch.Tensor) -> torch.Tensor:
        hook = hooks.get(hook_name(layer, hookpoint))
        return activation if hook is None else hook(activation)

    @torch.no_grad()
    def capture(self, tokens: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named hookpoints in one forward pass that stops after the deepest one."""
        cache: dict[str, torch.Tensor] = {}

        def reader(name: str) -> Hook:
            def read(activation: torch.Tensor) -> torch.Tensor:
                cache[name] = activation
                return activation

            return read

        deepest = max(int(name.split(".")[1]) for name in names)
        self.forward(tokens, {name: reader(name) for name in names}, stop_after_layer=deepest)
        return cache
