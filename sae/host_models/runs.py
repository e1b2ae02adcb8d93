"""Host training runs as SAE inputs: find or train the run, resolve checkpoint selectors, load.

Selectors (host_model.checkpoints entries):
    final       the last checkpoint of the run
    post_grok   the first checkpoint with test accuracy >= 99% (the grokking step)
    pre_grok    mid-plateau: among the checkpoints that have memorised (train acc >= 99%) while
                test accuracy is still below 50% (the plateau before grokking), the one nearest
                the middle step of that plateau (the earlier on a tie); with
                host_model.train.transition_checkpoint_every the plateau is densely sampled. If
                the run generalised too fast for a plateau, the memorised checkpoint before the
                grokking step with the lowest test accuracy
    step_N      the checkpoint saved at step N
    a path      a `.safetensors` file written by scripts/train_host.py (its run's arch.json is read)
"""
from __future__ import annotations

import logging

import dataclasses
import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file

from sae.atomic_io import remove_stale_temps
from sae.errors import UserInputError
from sae.host_models.config import STEP_SELECTOR, HostModelConfig
from sae.host_models.transformer import Activation, GrokTransformer, Norm, Positions, TransformerArch
from sae.run_lock import waiting_lock
from sae.tasks.modular import ModularTaskConfig
from sae.host_models.training import GROKKED, run_host_training
from sae.tracking.base import NullTracker

log = logging.getLogger(__name__)

PRE_GROK_MAX_TEST_ACC = 0.5


class HostRunError(UserInputError):
    """A host run or checkpoint the config points at is missing or does not fit."""


class NeverGrokkedError(HostRunError):
    """pre_grok / post_grok asked of a host that never reached 99% test accuracy."""


# Recipe keys added after hosts were first cached: left out of the hash while unset (they change
# nothing then), so hosts trained before they existed keep their cache dir.
LATER_RECIPE_KEYS = ("grad_clip", "transition_checkpoint_every")


def host_run_key(task: ModularTaskConfig, host: HostModelConfig) -> str:
    """Readable name + hash of everything that changes the trained host."""
    recipe = {k: v for k, v in dataclasses.asdict(host.train).items() if not (k in LATER_RECIPE_KEYS and v is None)}
    identity = json.dumps(
        {"task": dataclasses.asdict(task), "arch": host.architecture(), "recipe": recipe}, sort_keys=True, default=str
    )
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    return f"{task.name}_p{task.p}_{digest}"


def check_host_inputs(task: ModularTaskConfig, host: HostModelConfig) -> None:
    """Every file and run dir the config names exists and fits, checked before any training."""
    for selector in host.checkpoints:
        if selector.endswith(".safetensors") and not Path(selector).is_file():
            raise HostRunError(f"host_model.checkpoints: file not found: {selector}")
    if host.run_dir is not None:
        check_task_matches(read_summary(Path(host.run_dir)), task, Path(host.run_dir))


def ensure_host_run(task: ModularTaskConfig, host: HostModelConfig, device: str = "cpu") -> Path:
    """The host run dir for this config: the given one (checked), or the cached one, trained if missing.

    A file lock makes concurrent sweep jobs train a shared host once.
    """
    if host.run_dir is not None:
        run_dir = Path(host.run_dir)
        summary = read_summary(run_dir)
        check_task_matches(summary, task, run_dir)
        return run_dir
    run_dir = Path(host.cache_dir) / host_run_key(task, host)
    run_dir.mkdir(parents=True, exist_ok=True)
    with waiting_lock(run_dir / ".lock", f"the host model {run_dir} (another run is training it)"):
        if not _is_complete(run_dir):
            for directory in (run_dir, run_dir / "checkpoints"):
                remove_stale_temps(directory)  # a host training killed mid-write
            log.info("Training host model for task=%s into %s (cached for later runs)", task.name, run_dir)
            run_host_training(task, host.architecture(), host.train, run_dir, NullTracker(), device=device)
    return run_dir


def _is_complete(run_dir: Path) -> bool:
    path = run_dir / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("complete", False)


def read_summary(run_dir: Path) -> dict:
    if not _is_complete(run_dir):
        raise HostRunError(f"host_model.run_dir={run_dir} holds no finished host run (no complete summary.json): "
                           f"train one first with `python scripts/train_host.py task=...`")
    return json.loads((run_dir / "summary.json").read_text())


def check_task_matches(summary: dict, task: ModularTaskConfig, run_dir: Path) -> None:
    trained = summary["task"]
    if trained["p"] != task.p or [str(o) for o in trained["operations"]] != [o.value for o in task.operations]:
        raise HostRunError(
            f"host_model.run_dir={run_dir} was trained on operations={trained['operations']} p={trained['p']}, "
            f"but task has operations={[o.value for o in task.operations]} p={task.p}: pick the matching task"
        )


def resolve_checkpoint(run_dir: Path, selector: str) -> tuple[str, Path, dict]:
    """(label, path, record) for a selector; the record holds the checkpoint's step and accuracies."""
    if selector.endswith(".safetensors"):
        path = Path(selector)
        if not path.is_file():
            raise HostRunError(f"host_model.checkpoints: file not found: {path}")
        return path.stem, path, {"file": str(path)}
    summary = read_summary(run_dir)
    records = summary["checkpoints"]
    record = _select(summary, records, selector, run_dir)
    return selector, run_dir / record["file"], record


def _select(summary: dict, records: list[dict], selector: str, run_dir: Path) -> dict:
    if selector == "final":
        final = records[-1]
        grok = summary.get("grokking_step")
        if grok is not None and final.get("test/acc", 1.0) < GROKKED:
            log.warning(f"host_model.checkpoints=final: the host in {run_dir} grokked at step {grok} but its final "
                        f"checkpoint (step {final['step']}) fell back to test acc {final['test/acc']:.3f}; "
                        "post_grok selects the first grokked checkpoint")
        return final
    step_match = STEP_SELECTOR.match(selector)
    if step_match:
        step = int(step_match.group(1))
        for record in records:
            if record["step"] == step:
                return record
        raise HostRunError(f"host_model.checkpoints: no checkpoint at step {step} in {run_dir}; "
                           f"saved steps: {[r['step'] for r in records]}")
    grok = summary["grokking_step"]
    if grok is None:
        raise NeverGrokkedError(f"host_model.checkpoints={selector}: the host in {run_dir} never grokked "
                           f"(test acc < 99% after {summary['final_step']} steps): train it longer")
    if selector == "post_grok":
        return next(r for r in records if r["step"] >= grok)
    memorised = [r for r in records if r["train/acc"] >= 0.99 and r["step"] < grok]
    clear = [r for r in memorised if r["test/acc"] < PRE_GROK_MAX_TEST_ACC]
    if not (clear or memorised):
        raise HostRunError(f"host_model.checkpoints=pre_grok: the host in {run_dir} has no memorised checkpoint "
                           f"before grokking at step {grok}")
    if clear:
        middle = (clear[0]["step"] + clear[-1]["step"]) / 2
        return min(clear, key=lambda r: (abs(r["step"] - middle), r["step"]))  # mid-plateau, earlier on a tie
    return min(memorised, key=lambda r: r["test/acc"])  # the least generalised of the memorised ones


def load_host(path: Path, device: str = "cpu") -> GrokTransformer:
    """Rebuild a host from a checkpoint file and its run's arch.json."""
    if not path.is_file():
        raise HostRunError(f"host checkpoint {path} is missing: retrain the host (delete its run dir and rerun "
                           f"scripts/train.py or scripts/train_host.py) or restore the file")
    candidates = [path.parent / "arch.json", path.parent.parent / "arch.json"]
    arch_file = next((c for c in candidates if c.is_file()), None)
    if arch_file is None:
        raise HostRunError(f"no arch.json beside {path} or in its run dir: not a checkpoint of scripts/train_host.py")
    keys = json.loads(arch_file.read_text())
    arch = TransformerArch(**{**keys, "activation": Activation(keys["activation"]), "norm": Norm(keys["norm"]),
                              "positions": Positions(keys["positions"])})
    model = GrokTransformer(arch)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval().requires_grad_(False)
