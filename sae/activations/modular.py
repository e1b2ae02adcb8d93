"""Modular-arithmetic host activations as SAE training data: computed once for the whole (tiny)
task, kept in memory.

Sources are every (checkpoint, layer) pair, checkpoint-major. Rows are pairs (token_positions=answer)
or pairs x positions (token_positions=all); train and test pairs are kept apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae.host_models.config import HostModelConfig, TokenPositions
from sae.activations.batches import normalisation_scale
from sae.activations.sources import capture_sources, sources_meta
from sae.host_models.runs import HostRunError, ensure_host_run, load_host, resolve_checkpoint
from sae.host_models.transformer import GrokTransformer, hook_name, hook_width
from sae.tasks.modular import ModularDataset, ModularTaskConfig, build_dataset

EXTRACT_CHUNK = 8192  # pairs per forward pass


@dataclass
class Source:
    name: str  # e.g. "post_grok.L0"
    checkpoint: str
    layer: int
    model: GrokTransformer
    hook: str  # hookpoint name in the host, e.g. "blocks.0.resid_post"
    record: dict  # the host checkpoint's step and accuracies


@dataclass
class ActivationData:
    """train/test: [rows, n_sources, d_in], already multiplied by `scale` ([n_sources])."""

    sources: list[Source]  # the columns of a table row; a transcoder's rows then hold `targets`' columns
    dataset: ModularDataset
    positions: TokenPositions
    train: torch.Tensor
    test: torch.Tensor
    scale: torch.Tensor
    host_run_dir: Path
    targets: list[Source] = field(default_factory=list)  # a transcoder's target per source (same order)
    row_unit = "pairs"  # what one row of train/test is, for printed summaries

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def meta(self) -> dict:
        """What a saved SAE records about its inputs."""
        meta = {**sources_meta(self.sources), "token_positions": self.positions.value,
                "host_run_dir": str(Path(self.host_run_dir).resolve())}
        for entry, source in zip(meta["sources"], self.sources):
            entry["step"] = source.record.get("step")  # what the selector (final, pre_grok, ...) resolved to
        if self.targets:
            meta["targets"] = sources_meta(self.targets)["sources"]
        return meta

    def eval_table(self, split: str) -> torch.Tensor:
        """The rows evaluate() scores for a split: all of them."""
        return self.train if split == "train" else self.test


def load_sources(task: ModularTaskConfig, host: HostModelConfig,
                 device: str) -> tuple[list[Source], list[Source], Path]:
    """(sources, a transcoder's target per source or [], the host run dir)."""
    run_dir = ensure_host_run(task, host, device)
    sources, targets = [], []
    for selector in host.checkpoints:
        label, path, record = resolve_checkpoint(run_dir, selector)
        model = load_host(path, device)
        for layer in host.layers:
            if layer >= model.arch.n_layers:
                raise HostRunError(f"host_model.layers: layer {layer} out of range for {path} "
                                   f"(n_layers={model.arch.n_layers})")
            hook = hook_name(layer, host.hookpoint.value)
            sources.append(Source(f"{label}.L{layer}", label, layer, model, hook, record))
            if host.target_hookpoint is not None:
                target = hook_name(layer, host.target_hookpoint.value)
                targets.append(Source(f"{label}.L{layer}.{host.target_hookpoint.value}", label, layer, model, target,
                                      record))
    hookpoints = [host.hookpoint.value] + ([host.target_hookpoint.value] if targets else [])
    widths = {hook_width(s.model.arch, hookpoint) for s in sources for hookpoint in hookpoints}
    if len(widths) > 1:
        raise HostRunError(f"host_model: the sources{' and targets' if targets else ''} have different widths "
                           f"{sorted(widths)}; a crosscoder or transcoder needs one d_in")
    return sources, targets, run_dir


@torch.no_grad()
def extract(sources: list[Source], tokens: torch.Tensor, positions: TokenPositions) -> torch.Tensor:
    """tokens: [n, seq] -> [n (x seq if positions=all), n_sources, d_in], one pass per checkpoint."""
    chunks = [capture_sources(sources, chunk) for chunk in tokens.split(EXTRACT_CHUNK)]
    columns = []
    for i in range(len(sources)):
        acts = torch.cat([chunk[i] for chunk in chunks])  # [n, seq, d]
        columns.append(acts[:, -1] if positions is TokenPositions.answer else acts.flatten(0, 1))
    return torch.stack(columns, dim=1)


def load_activation_data(task: ModularTaskConfig, host: HostModelConfig, normalize: bool,
                         device: str) -> ActivationData:
    sources, targets, run_dir = load_sources(task, host, device)
    dataset = build_dataset(task)
    dataset.tokens, dataset.labels = dataset.tokens.to(device), dataset.labels.to(device)
    dataset.is_train, dataset.op_ids = dataset.is_train.to(device), dataset.op_ids.to(device)
    positions = host.token_positions
    columns = sources + targets  # a transcoder's rows: inputs, then targets (each column its own scale)
    train = extract(columns, dataset.train[0], positions)
    test = extract(columns, dataset.test[0], positions)
    scale = normalisation_scale(train) if normalize else torch.ones(len(columns), device=train.device)
    return ActivationData(sources, dataset, positions, train * scale[:, None], test * scale[:, None], scale, run_dir,
                          targets)
