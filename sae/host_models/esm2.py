"""ESM-2 protein language models (fair-esm) as SAE hosts, split into a trunk and a head at any layer.

Layer convention (`host_model.layers`), the residual stream an SAE at layer L sees, shape [B, T, E]:
    L = 0         the token embedding as fair-esm's `repr_layers=[0]` returns it: scaled by the
                  token-dropout factor (x0.88 without masks, more when masks are present)
    0 < L < n     the residual after block L, equal to fair-esm's `repr_layers=[L]`
    L = n         the raw residual after the last block, *before* `emb_layer_norm_after`
                  (fair-esm's `repr_layers=[n]` applies that norm; ours is its input, so an SAE
                  at the last layer sees the stream the blocks wrote, like every other layer)
`trunk(tokens, L)` stops after block L; `head(resid, tokens, L)` runs blocks L+1..n, the final
norm and the LM head, so `head(trunk(x, L), x, L)` equals fair-esm's logits (tested).

Weights load through fair-esm's own loaders only: by pretrained name (fair-esm's hub loader,
which reads torch's hub cache first and so works offline once the file is there), or from a
local `esm2*.pt` file with its `<stem>-contact-regression.pt` beside it.
"""
from __future__ import annotations

import re

import argparse
import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from sae.atomic_io import atomic_file
from sae.errors import UserInputError

ESM2_PRETRAINED = {
    "esm2_t6_8M": "esm2_t6_8M_UR50D",
    "esm2_t12_35M": "esm2_t12_35M_UR50D",
    "esm2_t30_150M": "esm2_t30_150M_UR50D",
    "esm2_t33_650M": "esm2_t33_650M_UR50D",
    "esm2_t36_3B": "esm2_t36_3B_UR50D",
}
HUB_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
# (layers, embedding dim, attention heads) of the published models: random-weight stand-ins of
# the same shapes for speed/memory benchmarks and offline pipeline checks
ESM2_ARCHITECTURES = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
}


class ESM2LoadError(UserInputError):
    """A pretrained name that cannot be fetched, or a local file fair-esm cannot read."""


@contextlib.contextmanager
def _fair_esm_checkpoints_allowed() -> Iterator[None]:
    """fair-esm checkpoints pickle an argparse.Namespace; torch >= 2.6 loads weights_only by default."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        yield


def is_fair_esm_filename(path: str | Path) -> bool:
    """fair-esm's local loader reads a file as ESM-2 only if its name starts with 'esm2' and ends in '.pt'."""
    return Path(path).name.startswith("esm2") and Path(path).suffix == ".pt"


def check_local_checkpoint(path: str) -> None:
    """What fair-esm's local loader needs, checked before any work: the file, an `esm2` stem, the
    contact-regression file beside it."""
    file = Path(path)
    if not file.is_file():
        raise ESM2LoadError(f"host_model.checkpoints: file not found: {path}")
    if not is_fair_esm_filename(file):
        raise ESM2LoadError(f"host_model.checkpoints: {path}: fair-esm reads an ESM-2 file only if its name "
                            "starts with 'esm2' and ends in '.pt' (e.g. esm2_t6_8M_UR50D.pt)")
    regression = file.with_name(f"{file.stem}-contact-regression.pt")
    if not regression.is_file():
        raise ESM2LoadError(f"host_model.checkpoints: {path}: fair-esm's local loader needs {regression} beside it")


def load_fair_esm(source: str, pretrained_name: str):
    """(fair-esm ESM2 model in eval mode, alphabet). source: 'pretrained' or a local .pt path."""
    import esm

    with _fair_esm_checkpoints_allowed():
        if source == "pretrained":
            try:
                model, alphabet = esm.pretrained.load_model_and_alphabet(pretrained_name)
            except OSError as error:  # URLError / HTTPError are OSErrors
                url = HUB_URL.format(name=pretrained_name)
                raise ESM2LoadError(
                    f"host_model: cannot fetch pretrained '{pretrained_name}' ({type(error).__name__}: {error}); "
                    f"without network, download {url} and its -contact-regression.pt into one folder and set "
                    f"host_model.checkpoints=[/path/to/{pretrained_name}.pt], or put both in "
                    f"{torch.hub.get_dir()}/checkpoints/") from None
        else:
            check_local_checkpoint(source)
            model, alphabet = esm.pretrained.load_model_and_alphabet_local(source)
    if type(model).__name__ != "ESM2":
        raise ESM2LoadError(f"host_model.checkpoints: {source} is not an ESM-2 model ({type(model).__name__})")
    return model.eval(), alphabet


class ESM2Host(nn.Module):
    """fair-esm's ESM2 with a trunk/head split; the blocks and weights are fair-esm's own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.n_layers = model.num_layers
        self.d_model = model.embed_dim

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, T] -> [B, T, E], exactly fair-esm's embedding (token-dropout scaling, padding zeroed)."""
        m = self.model
        padding_mask = tokens.eq(m.padding_idx)
        x = m.embed_scale * m.embed_tokens(tokens)
        if m.token_dropout:
            is_mask = tokens == m.mask_idx
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            mask_ratio_train = 0.15 * 0.8
            mask_ratio_observed = is_mask.sum(-1).to(x.dtype) / (~padding_mask).sum(-1)
            x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[:, None, None]
        return x * (1 - padding_mask.unsqueeze(-1).type_as(x))

    def _blocks(self, x: torch.Tensor, tokens: torch.Tensor, start: int, stop: int,
                on_layer: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
        """Run blocks start+1..stop on the residual x [B, T, E] (layer numbering as in the module doc).
        on_layer(L, resid) is called after block L for start < L <= stop and may return a replacement."""
        padding_mask = tokens.eq(self.model.padding_idx)
        padding_mask = padding_mask if padding_mask.any() else None
        x = x.transpose(0, 1)  # fair-esm's blocks take [T, B, E]
        for index in range(start, stop):
            x, _ = self.model.layers[index](x, self_attn_padding_mask=padding_mask)
            if on_layer is not None:
                replaced = on_layer(index + 1, x.transpose(0, 1))
                if replaced is not None:
                    x = replaced.transpose(0, 1)
        return x.transpose(0, 1)

    def trunk(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        """tokens [B, T] -> residual stream at `layer` [B, T, E]; no block after it runs."""
        self._check_layer(layer)
        return self._blocks(self.embed(tokens), tokens, 0, layer)

    def head(self, resid: torch.Tensor, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        """The rest of the forward pass from the residual at `layer`: -> logits [B, T, vocab]."""
        self._check_layer(layer)
        x = self._blocks(resid, tokens, layer, self.n_layers)
        return self.model.lm_head(self.model.emb_layer_norm_after(x))

    def capture(self, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        """Residuals at the named hookpoints (`esm2_hook_name(L)`) from one forward pass that stops
        at the deepest one: {hook: [B, T, E]} (the capture contract both host families share)."""
        wanted = {layer_of_hook(hook): hook for hook in hooks}
        for layer in wanted:
            self._check_layer(layer)
        captured = {}
        x = self.embed(tokens)
        if 0 in wanted:
            captured[wanted[0]] = x

        def keep(layer: int, resid: torch.Tensor) -> None:
            if layer in wanted:
                captured[wanted[layer]] = resid

        self._blocks(x, tokens, 0, max(wanted), keep)
        return captured

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer <= self.n_layers:
            raise ValueError(f"host_model.layers: layer {layer} out of range [0, {self.n_layers}] for this ESM-2")


def residue_mask(tokens: torch.Tensor, alphabet) -> torch.Tensor:
    """[B, T] bool: positions holding residues, i.e. not cls / eos / padding (those never reach an SAE)."""
    special = torch.tensor([alphabet.cls_idx, alphabet.eos_idx, alphabet.padding_idx], device=tokens.device)
    return ~torch.isin(tokens, special)


def random_esm2(pretrained_name: str, seed: int = 0) -> nn.Module:
    """fair-esm's ESM2 with a published model's shapes and random weights (eval mode)."""
    import esm

    if pretrained_name not in ESM2_ARCHITECTURES:
        raise ValueError(f"unknown ESM-2 model '{pretrained_name}'; known: {', '.join(ESM2_ARCHITECTURES)}")
    layers, width, heads = ESM2_ARCHITECTURES[pretrained_name]
    with torch.random.fork_rng():  # seeded init without resetting the caller's global RNG
        torch.manual_seed(seed)
        return esm.model.esm2.ESM2(num_layers=layers, embed_dim=width, attention_heads=heads, alphabet="ESM-1b").eval()


def save_fair_esm_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Write a fair-esm ESM2 module as fair-esm's local loader reads it (the published files'
    layout): `{"model": state dict with an "encoder." prefix and without the contact-regression
    keys, "cfg": {"model": Namespace(...)}}` plus `<stem>-contact-regression.pt` beside it.
    The name must start with 'esm2'. Used to test the real loading path on tiny models."""
    path = Path(path)
    if not is_fair_esm_filename(path):
        raise ValueError(f"{path}: fair-esm needs a name that starts with 'esm2' and ends in '.pt'")
    state = model.state_dict()
    regression = {k: v for k, v in state.items() if k.startswith("contact_head.regression.")}
    cfg = argparse.Namespace(encoder_layers=model.num_layers, encoder_embed_dim=model.embed_dim,
                             encoder_attention_heads=model.attention_heads, token_dropout=model.token_dropout)
    body = {f"encoder.{k}": v for k, v in state.items() if k not in regression}
    with atomic_file(path.with_name(f"{path.stem}-contact-regression.pt")) as tmp:
        torch.save({"model": regression}, tmp)
    with atomic_file(path) as tmp:
        torch.save({"model": body, "cfg": {"model": cfg}}, tmp)
    return path


def esm2_hook_name(layer: int) -> str:
    """The hookpoint name of the residual after block `layer` (0 = the embedding)."""
    return f"layers.{layer}.resid"


def layer_of_hook(hook: str) -> int:
    match = re.fullmatch(r"layers\.(\d+)\.resid", hook)
    if match is None:
        raise ValueError(f"not an ESM-2 hookpoint: {hook!r} (expected layers.<L>.resid)")
    return int(match.group(1))
