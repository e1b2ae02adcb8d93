"""All run schemas, their registration with Hydra, and the guard that turns a composed DictConfig
into typed dataclasses. Code below this module never sees a DictConfig.

Schemas live in the ConfigStore under `schema/<group>/<name>`; YAML options in conf/<group>/
extend them (Hydra's "structured configs" pattern: schema in a separate group, options on top).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from sae.errors import UserInputError
from sae.host_models.config import ESM2HostConfig, Hookpoint, HostModelConfig
from sae.saes import SAE_TYPES, SAEConfig
from sae.tasks.modular import ModularTaskConfig
from sae.tasks.protein import ProteinTaskConfig
from sae.hardware import HardwareConfig
from sae.training.schedules import SchedulerConfig, lr_for_sum, lr_problem, lr_sum_problem
from sae.tracking.wandb_tracker import TrackingConfig


@dataclass
class HostTrainConfig:
    """scripts/train_host.py: train a grokking host model. The groups every run has."""

    task: ModularTaskConfig = field(default_factory=ModularTaskConfig)
    host_model: HostModelConfig = field(default_factory=HostModelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class TrainConfig(HostTrainConfig):
    """scripts/train.py: an SAE or crosscoder on a host model's activations.

    task and host_model hold one of several schemas (modular task + grokking transformer, or
    protein_mlm + ESM-2); each YAML option brings its schema, so the fields are typed Any here
    and the pairing is checked in __post_init__.
    """

    task: Any = MISSING
    host_model: Any = MISSING
    sae: SAEConfig = field(default_factory=SAEConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lr: float = 1e-3  # the peak per-step lr (after warm-up); ignored when lr_sum is set
    lr_sum: Optional[float] = None  # the run's sum of per-step lrs; sets lr = lr_sum / sum of the schedule's factors
    batch_size: int = 1024
    num_steps: int = 2000
    seed: int = 0
    grad_clip: Optional[float] = 1.0  # max global grad norm; null = no clipping
    log_every: int = 100  # train metrics (the only host syncs in the loop)
    eval_every: int = 500  # full eval on train and test pairs, spliced metrics included
    checkpoint_every: Optional[int] = 1000  # extra resumable checkpoints (besides the FLOP schedule); null = none

    def __post_init__(self) -> None:
        check_task_host_pair(self.task, self.host_model)
        read_transcoder_hooks(self.sae, self.host_model)
        check_cross_layer(self.sae, self.host_model)
        for key in ("batch_size", "num_steps", "log_every", "eval_every"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if problem := lr_problem(self.lr):
            raise ValueError(problem)
        if self.scheduler.warmup_steps is not None and self.scheduler.warmup_steps >= self.num_steps:
            raise ValueError(f"scheduler.warmup_steps must be < num_steps={self.num_steps}, "
                             f"got {self.scheduler.warmup_steps} (or null: scheduler.warmup_fraction of the run)")
        if self.lr_sum is not None and (problem := lr_sum_problem(self.lr_sum, self.num_steps, self.scheduler)):
            raise ValueError(problem)
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be > 0 or null, got {self.checkpoint_every}")

    def peak_lr(self) -> float:
        """The lr the schedule scales: `lr`, or the one lr_sum gives for this num_steps and schedule."""
        return self.lr if self.lr_sum is None else lr_for_sum(self.lr_sum, self.num_steps, self.scheduler)


TASK_HOSTS = ((ModularTaskConfig, HostModelConfig, "the grokking transformer (host_model=transformer)"),
              (ProteinTaskConfig, ESM2HostConfig, "an ESM-2 model (host_model=esm2_t6_8M, esm2_t12_35M, ...)"))


def check_task_host_pair(task: Any, host: Any) -> None:
    for task_cls, host_cls, host_text in TASK_HOSTS:
        if isinstance(task, task_cls) and not isinstance(host, host_cls):
            raise ValueError(f"task={task.name} needs {host_text}, got host_model={host.name}")


def read_transcoder_hooks(sae: SAEConfig, host: Any) -> None:
    """A transcoder names its hooks in sae.input_hookpoint / sae.target_hookpoint; the host config reads
    them from there (host_model.hookpoint, host_model.target_hookpoint). One-line refusals for hooks the
    host lacks, a target not after the input, or widths that differ."""
    if not sae.transcoder:
        if getattr(host, "target_hookpoint", None) is not None:
            raise ValueError(f"host_model.target_hookpoint={host.target_hookpoint.value} is set from "
                             "sae.target_hookpoint (a transcoder, e.g. sae=transcoder); leave it null")
        return
    if not isinstance(host, HostModelConfig):
        raise ValueError(f"sae.target_hookpoint={sae.target_hookpoint}: transcoders need a host with MLP input and "
                         f"output hooks; {host.name} exposes only its residual stream (layers.L.resid) here. "
                         "Supported: host_model=transformer")
    order = [hook.value for hook in Hookpoint]
    for key in ("input_hookpoint", "target_hookpoint"):
        if getattr(sae, key) not in order:
            raise ValueError(f"sae.{key}={getattr(sae, key)} is not a hook of the transformer host; "
                             f"allowed: {', '.join(order)}")
    source, target = sae.input_hookpoint, sae.target_hookpoint
    if order.index(target) <= order.index(source):
        raise ValueError(f"sae.target_hookpoint={target} must come after sae.input_hookpoint={source} in the block "
                         f"({' -> '.join(order)}): a transcoder predicts a later hook from an earlier one")
    widths = {hook: host.d_mlp if hook == Hookpoint.mlp_hidden.value else host.d_model for hook in (source, target)}
    if widths[source] != widths[target]:
        raise ValueError(f"sae.input_hookpoint={source} (width {widths[source]}) and sae.target_hookpoint={target} "
                         f"(width {widths[target]}) differ: a transcoder maps between hooks of one width "
                         "(e.g. resid_mid -> mlp_out)")
    if host.hookpoint.value not in (Hookpoint.resid_post.value, source):
        raise ValueError(f"host_model.hookpoint={host.hookpoint.value} and sae.input_hookpoint={source} disagree: "
                         "a transcoder reads sae.input_hookpoint; drop host_model.hookpoint")
    if host.target_hookpoint is not None and host.target_hookpoint.value != target:
        raise ValueError(f"host_model.target_hookpoint={host.target_hookpoint.value} is set from "
                         f"sae.target_hookpoint={target}; leave it null")
    host.hookpoint, host.target_hookpoint = Hookpoint(source), Hookpoint(target)


def check_cross_layer(sae: SAEConfig, host: Any) -> None:
    """A cross-layer transcoder reads every layer of one host checkpoint (one CLT per checkpoint)."""
    if sae.type != "clt":
        return
    if host.n_layers < 2:
        raise ValueError(f"sae=clt on a 1-layer host (host_model.n_layers={host.n_layers}) is a plain transcoder: "
                         "use sae=transcoder, or a deeper host (host_model.n_layers=2 host_model.layers=[0,1])")
    every = list(range(host.n_layers))
    if list(host.layers) != every:
        raise ValueError(f"sae=clt reads every layer of the host: host_model.layers must be {every} "
                         f"(host_model.n_layers={host.n_layers}), got {list(host.layers)}")
    if len(host.checkpoints) != 1:
        raise ValueError(f"sae=clt takes one host checkpoint (train one CLT per checkpoint, e.g. pre_grok and "
                         f"post_grok apart), got host_model.checkpoints={list(host.checkpoints)}")


class ConfigError(UserInputError):
    """A user-facing config problem; its message is one line naming the key."""


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="train_host_schema", node=HostTrainConfig)
    store.store(group="schema/task", name="modular", node=ModularTaskConfig)
    store.store(group="schema/task", name="protein", node=ProteinTaskConfig)
    store.store(group="schema/host_model", name="transformer", node=HostModelConfig)
    store.store(group="schema/host_model", name="esm2", node=ESM2HostConfig)
    for name, (config_cls, _) in SAE_TYPES.items():
        store.store(group="schema/sae", name=name, node=config_cls)
    store.store(group="schema/scheduler", name="base", node=SchedulerConfig)
    store.store(group="schema/hardware", name="base", node=HardwareConfig)
    store.store(group="schema/tracking", name="base", node=TrackingConfig)


def reject_unknown_keys(node: Any, path: str = "") -> None:
    """Hydra lets `+group.key=value` add keys a schema lacks; walk the tree and refuse them."""
    if isinstance(node, DictConfig):
        schema = OmegaConf.get_type(node)
        allowed = {f.name for f in fields(schema)} if is_dataclass(schema) else None
        for key in node.keys():
            full = f"{path}.{key}" if path else str(key)
            if allowed is not None and key not in allowed:
                raise ConfigError(f"Key '{key}' not in '{schema.__name__}' (full key: {full}); "
                                  f"allowed keys: {', '.join(sorted(allowed))}")
            reject_unknown_keys(node._get_node(key), full)
    elif isinstance(node, ListConfig):
        for index, item in enumerate(node._iter_ex(resolve=False)):
            reject_unknown_keys(item, f"{path}[{index}]")


def to_dataclass(cfg: DictConfig) -> Any:
    """Composed config -> typed dataclasses, or ConfigError with a one-line message."""
    reject_unknown_keys(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"Missing mandatory value: {missing[0]}; set it on the command line, e.g. {missing[0]}=...")
    try:
        return OmegaConf.to_object(cfg)
    except Exception as error:
        raise ConfigError(_innermost_message(error)) from error


def _innermost_message(error: BaseException) -> str:
    """OmegaConf wraps __post_init__ errors with context lines; keep the first line of the cause."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error).strip().splitlines()[0]


def config_dict(cfg: TrainConfig) -> dict:
    """The resolved config as plain JSON values (what a run writes to config.json)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_from_dict(saved: dict) -> TrainConfig:
    """A TrainConfig from a run's config.json, for either task family (the saved task names its
    schema: a FASTA file means protein_mlm + ESM-2), enums and nested schemas restored."""
    task_cls, host_cls = ((ProteinTaskConfig, ESM2HostConfig) if "fasta" in saved["task"]
                          else (ModularTaskConfig, HostModelConfig))
    schemas = {"task": task_cls, "host_model": host_cls, "sae": SAE_TYPES[saved["sae"]["type"]][0],
               "scheduler": SchedulerConfig, "hardware": HardwareConfig, "tracking": TrackingConfig}
    node = OmegaConf.structured(TrainConfig)
    for key, schema in schemas.items():
        node[key] = OmegaConf.merge(OmegaConf.structured(schema), saved[key])
    return to_dataclass(OmegaConf.merge(node, {k: v for k, v in saved.items() if k not in schemas}))


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig of a run of scripts/train.py, from its config.json."""
    return config_from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
