"""`host_model.*`: the grokking transformer's architecture, its training recipe, and which of its
activations (checkpoints x layers at one hookpoint) the SAE reads."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from sae.host_models.transformer import Activation, Norm, Positions
from sae.host_models.training import HostRecipe

CHECKPOINT_SELECTORS = ("pre_grok", "post_grok", "final", "step_N")
STEP_SELECTOR = re.compile(r"step_(\d+)$")


class Hookpoint(str, Enum):
    """Where in each block the SAE reads (sae/host_models/transformer.py lists them in order)."""

    resid_mid = "resid_mid"
    mlp_hidden = "mlp_hidden"
    mlp_out = "mlp_out"
    resid_post = "resid_post"


class TokenPositions(str, Enum):
    answer = "answer"  # the `=` position, where the answer is read out
    all = "all"


@dataclass
class HostModelConfig:
    name: str = "transformer"
    # architecture
    n_layers: int = 1
    d_model: int = 128
    n_heads: int = 4
    kv_heads: int = 4
    d_mlp: int = 512
    activation: Activation = Activation.relu
    norm: Norm = Norm.none
    positional: Positions = Positions.learned
    train: HostRecipe = field(default_factory=HostRecipe)
    # where the host comes from: a host training run (scripts/train_host.py), or null to train
    # (or reuse) the cached run for this task + architecture + recipe under cache_dir
    run_dir: Optional[str] = None
    cache_dir: str = "outputs/hosts"
    # which activations: every (checkpoint, layer) pair is one source; >1 source = crosscoder
    checkpoint: Optional[str] = None  # shorthand for checkpoints=[<checkpoint>]
    checkpoints: list[str] = field(default_factory=lambda: ["final"])
    layers: list[int] = field(default_factory=lambda: [0])
    hookpoint: Hookpoint = Hookpoint.resid_post
    # a transcoder's target (each source's layer): set from sae.target_hookpoint, not by hand
    target_hookpoint: Optional[Hookpoint] = None
    token_positions: TokenPositions = TokenPositions.answer

    def __post_init__(self) -> None:
        for key in ("n_layers", "d_model", "n_heads", "kv_heads", "d_mlp"):
            if getattr(self, key) <= 0:
                raise ValueError(f"host_model.{key} must be > 0, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"host_model.d_model={self.d_model} must be divisible by "
                             f"host_model.n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"host_model.n_heads={self.n_heads} must be divisible by "
                             f"host_model.kv_heads={self.kv_heads}")
        if self.positional is Positions.rotary and (self.d_model // self.n_heads) % 2:
            raise ValueError("host_model.positional=rotary needs an even head dimension (d_model / n_heads)")
        if self.checkpoint is not None:
            self.checkpoints = [self.checkpoint]
        if not self.checkpoints:
            raise ValueError("host_model.checkpoints must name at least one checkpoint")
        for selector in self.checkpoints:
            check_checkpoint_selector(selector)
        if not self.layers:
            raise ValueError("host_model.layers must name at least one layer")
        for layer in self.layers:
            if not 0 <= layer < self.n_layers:
                raise ValueError(f"host_model.layers: layer {layer} out of range [0, n_layers={self.n_layers})")
        if len(set(self.layers)) != len(self.layers) or len(set(self.checkpoints)) != len(self.checkpoints):
            raise ValueError("host_model.layers and host_model.checkpoints must not repeat an entry")

    def architecture(self) -> dict:
        """The keys TransformerArch takes (vocab and outputs come from the task)."""
        return dict(n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads, kv_heads=self.kv_heads,
                    d_mlp=self.d_mlp, activation=self.activation, norm=self.norm, positions=self.positional)


def check_checkpoint_selector(selector: str) -> None:
    """A selector is pre_grok | post_grok | final | step_N, or a path to a .safetensors file."""
    if selector in CHECKPOINT_SELECTORS[:3] or STEP_SELECTOR.match(selector):
        return
    if selector.endswith(".safetensors"):
        return  # a path; its existence is checked before any work, when sources are resolved
    raise ValueError(
        f"host_model.checkpoints: invalid entry '{selector}', expected one of "
        f"[{', '.join(CHECKPOINT_SELECTORS)}] or a path to a host .safetensors checkpoint"
    )


ESM2_LAYER_COUNT = re.compile(r"^esm2_t(\d+)_")


@dataclass
class ESM2HostConfig:
    """`host_model=esm2_*`: an ESM-2 model from fair-esm; layer L is the residual after block L
    (0 = embedding; see sae/host_models/esm2.py for the exact convention at 0 and at the last layer)."""

    name: str = "esm2_t6_8M"
    pretrained: str = "esm2_t6_8M_UR50D"  # fair-esm's name, loaded by its hub loader
    # each entry: `pretrained` (the model above) or a local esm2*.pt file read with fair-esm's local
    # loader; several entries of one width = a crosscoder across models
    checkpoint: Optional[str] = None  # shorthand for checkpoints=[<checkpoint>]
    checkpoints: list[str] = field(default_factory=lambda: ["pretrained"])
    layers: list[int] = field(default_factory=lambda: [3])

    def __post_init__(self) -> None:
        if self.checkpoint is not None:
            self.checkpoints = [self.checkpoint]
        if not self.checkpoints or not self.layers:
            raise ValueError("host_model.checkpoints and host_model.layers must each name at least one entry")
        if len(set(self.layers)) != len(self.layers) or len(set(self.checkpoints)) != len(self.checkpoints):
            raise ValueError("host_model.layers and host_model.checkpoints must not repeat an entry")
        for entry in self.checkpoints:
            if entry != "pretrained" and not entry.endswith(".pt"):
                raise ValueError(f"host_model.checkpoints: invalid entry '{entry}', expected 'pretrained' or a "
                                 "path to a fair-esm esm2*.pt file")
        found = ESM2_LAYER_COUNT.match(self.pretrained)
        if found is None:
            raise ValueError(f"host_model.pretrained: '{self.pretrained}' is not an ESM-2 name (esm2_t<layers>_...)")
        if "pretrained" in self.checkpoints:
            n_layers = int(found.group(1))
            for layer in self.layers:
                if not 0 <= layer <= n_layers:
                    raise ValueError(f"host_model.layers: layer {layer} out of range [0, {n_layers}] "
                                     f"for {self.pretrained}")
