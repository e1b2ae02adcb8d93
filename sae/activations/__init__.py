"""Host activations as SAE training data, one interface for every task family.

A family is a task schema with its loader: modular arithmetic (`modular.py`: the grokking
transformer's activations over every pair, in memory) and proteins (`protein.py`: ESM-2 residue
activations from a FASTA file, cached on disk, streamed when large). `batches.py` serves training
batches from either. The loop, the metrics and the analyses see only `Activations`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import torch

from sae.world import LOCAL, Collective

from sae.tasks.modular import ModularTaskConfig
from sae.tasks.protein import ProteinTaskConfig


class Activations(Protocol):
    """train: [rows, n_sources, d_in] (a tensor, or a ShardedTable read from disk batch by batch);
    test: the same for held-out rows; both already multiplied by `scale` ([n_sources])."""

    sources: list  # per source: name, checkpoint, layer, model, hook
    train: object
    test: torch.Tensor
    scale: torch.Tensor
    row_unit: str  # what one row is, for printed summaries ("pairs", "residues")

    @property
    def source_names(self) -> list[str]: ...

    def meta(self) -> dict:
        """What a saved SAE records about its inputs."""

    def eval_table(self, split: str) -> torch.Tensor:
        """The rows evaluate() scores for a split."""


class Family(NamedTuple):
    check: Callable  # (task, host, device, host_dtype) -> what loading may reuse; raises on bad input
    load: Callable  # (task, host, normalize, device, host_dtype, checked, group) -> Activations


def _modular() -> Family:
    from sae.activations.modular import load_activation_data
    from sae.host_models.runs import check_host_inputs

    return Family(lambda task, host, device, dtype: check_host_inputs(task, host),
                  lambda task, host, normalize, device, dtype, checked, group:
                  load_activation_data(task, host, normalize, device))


def _protein() -> Family:
    from sae.activations.protein import check_protein_inputs, load_protein_activation_data

    return Family(check_protein_inputs, load_protein_activation_data)


# keyed by task schema; the loaders import lazily (fair-esm is only needed for protein tasks)
FAMILIES: dict[type, Callable[[], Family]] = {ModularTaskConfig: _modular, ProteinTaskConfig: _protein}


def family(task) -> Family:
    for schema, make in FAMILIES.items():
        if isinstance(task, schema):
            return make()
    raise TypeError(f"no activation family for {type(task).__name__}; known: {[s.__name__ for s in FAMILIES]}")


def check_inputs(task, host, device: str = "cpu", host_dtype: torch.dtype = torch.float32) -> object:
    """Every file, run dir and data set the config names exists and fits, before any work.
    Returns what the check learnt that loading reuses (the FASTA scan for protein tasks)."""
    return family(task).check(task, host, device, host_dtype)


def load_activations(task, host, normalize: bool, device: str, host_dtype: torch.dtype = torch.float32,
                     checked=None, group: Collective = LOCAL) -> Activations:
    """The task family's activations for this host config. group: the processes of a multi-process
    run, which share the work of building an activation cache (every one must call this)."""
    return family(task).load(task, host, normalize, device, host_dtype, checked, group)
