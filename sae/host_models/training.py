"""Train a grokking host model: full-batch AdamW with strong weight decay (Nanda et al. 2023).

A run dir holds
    arch.json                      architecture to rebuild the model
    checkpoints/step_XXXXXXX.safetensors   log-spaced, plus the memorisation and grokking steps
    summary.json                   task, recipe, memorisation/grokking steps, every checkpoint's accuracies
    curves.png                     train/test loss and accuracy
`summary.json` is written last and marks the run complete (a cached host is reused only then).
"""
from __future__ import annotations

import logging

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from sae.host_models.transformer import GrokTransformer, TransformerArch
from sae.tasks.modular import ModularDataset, ModularTaskConfig, build_dataset, vocab_size
from sae.atomic_io import atomic_file, write_json
from sae.errors import UserInputError
from sae.hardware import apply_threads, check_hardware
from sae.run_lock import exclusive_dir
from sae.signals import deferred_stop_signals
from sae.tracking import check_tracking, make_tracker
from sae.tracking.base import Tracker

log = logging.getLogger(__name__)

MEMORISED = GROKKED = 0.99  # accuracy thresholds on train / test pairs


@dataclass
class HostRecipe:
    """`host_model.train.*`: the host's training recipe."""

    lr: float = 1e-2
    weight_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = 10
    num_steps: int = 5000
    batch_size: Optional[int] = None  # null = full batch (Nanda et al.); e.g. 512 = Power et al.'s minibatches
    grad_clip: Optional[float] = None  # clip the gradient's global norm to this (null = off)
    eval_every: int = 10
    steps_after_grok: int | None = 100  # stop this many steps after grokking; null = all num_steps
    # between memorisation and grokking, also evaluate and checkpoint every this many steps (dense
    # checkpoints through the transition, for studies of the phases); null = the log-spaced schedule only
    transition_checkpoint_every: Optional[int] = None
    seed: int = 0
    # Grokfast (Lee et al. 2024): add grokfast_lambda x an EMA (decay grokfast_alpha) of past
    # gradients to each gradient, amplifying the slow component that drives generalisation.
    grokfast_alpha: float | None = None
    grokfast_lambda: float = 2.0

    def __post_init__(self) -> None:
        if self.num_steps <= 0:
            raise ValueError(f"host_model.train.num_steps must be > 0, got {self.num_steps}")
        if not 0 <= self.warmup_steps < self.num_steps:
            raise ValueError(
                f"host_model.train.warmup_steps must be in [0, num_steps={self.num_steps}), got {self.warmup_steps}"
            )
        if self.batch_size is not None and self.batch_size <= 0:
            raise ValueError(f"host_model.train.batch_size must be > 0 or null, got {self.batch_size}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"host_model.train.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.eval_every <= 0:
            raise ValueError(f"host_model.train.eval_every must be > 0, got {self.eval_every}")
        if self.transition_checkpoint_every is not None and self.transition_checkpoint_every <= 0:
            raise ValueError("host_model.train.transition_checkpoint_every must be > 0 or null, "
                             f"got {self.transition_checkpoint_every}")
        if self.grokfast_alpha is not None and not 0.0 < self.grokfast_alpha < 1.0:
            raise ValueError(f"host_model.train.grokfast_alpha must be in (0, 1) or null, got {self.grokfast_alpha}")


def log_spaced_steps(num_steps: int) -> set[int]:
    """0, 1, 2, 5, 10, 20, 50, ... up to num_steps (the 1-2-5 series) and num_steps itself."""
    steps, decade = {0, num_steps}, 1
    while decade <= num_steps:
        steps.update(m * decade for m in (1, 2, 5) if m * decade <= num_steps)
        decade *= 10
    return steps


def minibatches(n_rows: int, batch_size: int | None, seed: int, device: str) -> Iterator[torch.Tensor]:
    """Row indices per step: every row (full batch), or shuffled epochs cut into batch_size pieces."""
    if batch_size is None or batch_size >= n_rows:
        everything = torch.arange(n_rows, device=device)
        while True:
            yield everything
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n_rows, generator=generator).to(device)
        for start in range(0, n_rows - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def build_host(task: ModularTaskConfig, arch_keys: dict) -> GrokTransformer:
    arch = TransformerArch(vocab_size=vocab_size(task.p), n_outputs=task.p, **arch_keys)
    return GrokTransformer(arch)


@torch.no_grad()
def evaluate_host(model: GrokTransformer, data: ModularDataset, hooks=None) -> dict[str, float]:
    """Loss and accuracy on train and test pairs, and test accuracy per operation."""
    logits = model(data.tokens, hooks)
    losses = F.cross_entropy(logits, data.labels, reduction="none")
    correct = (logits.argmax(-1) == data.labels).float()
    metrics = {}
    for split, mask in (("train", data.is_train), ("test", ~data.is_train)):
        metrics[f"{split}/loss"] = losses[mask].mean().item()
        metrics[f"{split}/acc"] = correct[mask].mean().item()
    if len(data.operations) > 1:
        for index, op in enumerate(data.operations):
            mask = ~data.is_train & (data.op_ids == index)
            metrics[f"test/acc_{op.value}"] = correct[mask].mean().item()
    return metrics


def lr_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


@torch.no_grad()
def amplify_slow_gradients(model: torch.nn.Module, ema: dict[str, torch.Tensor], alpha: float, lam: float) -> None:
    """Grokfast-EMA: ema <- alpha * ema + (1 - alpha) * grad; grad <- grad + lam * ema."""
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if name not in ema:
            ema[name] = param.grad.clone()
        else:
            ema[name].mul_(alpha).add_(param.grad, alpha=1 - alpha)
        param.grad.add_(ema[name], alpha=lam)


def save_host_checkpoint(model: GrokTransformer, path: Path) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))


def run_host_training(
    task: ModularTaskConfig, arch_keys: dict, recipe: HostRecipe, run_dir: Path, tracker: Tracker,
    device: str = "cpu", quiet: bool = False, hooks=None, measure=None,
) -> dict:
    """Train to grokking (or num_steps); returns the summary that is also written to summary.json.
    hooks: {hookpoint name: fn} applied in every forward, training and evaluation (e.g. a frozen
    SAE with clamped latents spliced in, sae.analysis.steering.clamp_hook). measure: (model, step)
    -> dict of extra numbers for that evaluation's history row (e.g. restricted/excluded loss)."""
    run_dir = Path(run_dir)
    torch.manual_seed(recipe.seed)
    data = build_dataset(task)
    model = build_host(task, arch_keys).to(device)
    data = dataclasses.replace(data, **{f: getattr(data, f).to(device)
                                        for f in ("tokens", "labels", "op_ids", "is_train")})
    train_tokens, train_labels = data.train
    write_json(run_dir / "arch.json", dataclasses.asdict(model.arch))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(recipe.beta1, recipe.beta2)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, recipe.warmup_steps))
    save_at = log_spaced_steps(recipe.num_steps)
    slow_gradients: dict[str, torch.Tensor] = {}
    batches = minibatches(len(train_labels), recipe.batch_size, recipe.seed, device)
    history, checkpoints = [], []
    memorisation_step = grokking_step = None
    last_step = recipe.num_steps
    started = time.time()
    progress = tqdm(total=recipe.num_steps, desc="host training", unit="step", disable=quiet, dynamic_ncols=True,
                    mininterval=1.0)
    try:  # a stop or an error leaves the terminal on a fresh line for its message
        for step in range(recipe.num_steps + 1):
            in_transition = (recipe.transition_checkpoint_every is not None and memorisation_step is not None
                             and grokking_step is None and step % recipe.transition_checkpoint_every == 0)
            is_eval = step % recipe.eval_every == 0 or step in save_at or step == recipe.num_steps or in_transition
            if is_eval:
                model.eval()
                metrics = evaluate_host(model, data, hooks)
                if measure is not None:
                    metrics.update(measure(model, step))
                model.train()
                history.append({"step": step, **metrics})
                tracker.log(metrics, step)
                event = False
                if memorisation_step is None and metrics["train/acc"] >= MEMORISED:
                    memorisation_step, event = step, True
                if grokking_step is None and metrics["test/acc"] >= GROKKED:
                    grokking_step, event = step, True
                    if recipe.steps_after_grok is not None:
                        last_step = min(recipe.num_steps, step + recipe.steps_after_grok)
                if not quiet and (event or step % (recipe.eval_every * 50) == 0):
                    log.info(f"host step {step:6d}  train acc {metrics['train/acc']:.3f}  "
                             f"test acc {metrics['test/acc']:.3f}  "
                          f"({time.time() - started:.0f}s)")
                if step in save_at or event or in_transition or step >= last_step:
                    name = f"step_{step:07d}.safetensors"
                    save_host_checkpoint(model, run_dir / "checkpoints" / name)
                    checkpoints.append({"step": step, "file": f"checkpoints/{name}", **metrics})
            if step >= last_step:
                break
            if is_eval:
                progress.set_postfix_str(f"train acc {metrics['train/acc']:.3f}, test acc {metrics['test/acc']:.3f}",
                                         refresh=False)
            rows = next(batches)
            loss = F.cross_entropy(model(train_tokens[rows], hooks), train_labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grokfast_alpha is not None:
                amplify_slow_gradients(model, slow_gradients, recipe.grokfast_alpha, recipe.grokfast_lambda)
            if recipe.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            progress.update(1)
    finally:
        progress.close()
    summary = {
        "complete": True,
        "task": dataclasses.asdict(task),
        "recipe": dataclasses.asdict(recipe),
        "memorisation_step": memorisation_step,
        "grokking_step": grokking_step,
        "final_step": last_step,
        "wall_time_s": round(time.time() - started, 1),
        "final": history[-1],
        "checkpoints": checkpoints,
    }
    (run_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    plot_host_curves(history, summary, run_dir / "curves.png")
    write_json(run_dir / "summary.json", summary)
    return summary


def plot_host_curves(history: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for split in ("train", "test"):
        ax_loss.plot(steps, [max(h[f"{split}/loss"], 1e-8) for h in history], label=split)
        ax_acc.plot(steps, [h[f"{split}/acc"] for h in history], label=split)
    ax_loss.set_yscale("log")
    for ax, name in ((ax_loss, "cross-entropy"), (ax_acc, "accuracy")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        for key, style in (("memorisation_step", ":"), ("grokking_step", "--")):
            if summary[key] is not None:
                ax.axvline(summary[key], color="grey", linestyle=style, label=key.replace("_", " "))
        ax.legend()
    ops = "+".join(op for op in summary["task"]["operations"])
    fig.suptitle(f"host training: {ops}, p={summary['task']['p']}")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run_host_job(cfg, run_dir: Path, on_start=None) -> dict:
    """scripts/train_host.py's job. cfg: sae.config.HostTrainConfig. Checks, then `on_start`, then work."""
    run_dir = Path(run_dir)
    with exclusive_dir(run_dir) as lock:
        check_hardware(cfg.hardware)
        check_tracking(cfg.tracking)
        if (run_dir / "summary.json").is_file():
            raise UserInputError(f"{run_dir} already holds a finished host run; choose another hydra.run.dir")
        lock.claim()
        if on_start is not None:
            on_start()
        apply_threads(cfg.hardware)
        config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
        tracker = make_tracker(cfg.tracking, run_dir, config)
        with deferred_stop_signals("during host training (it does not resume)"):  # Ctrl-C, SIGTERM: one line
            summary = run_host_training(cfg.task, cfg.host_model.architecture(), cfg.host_model.train, run_dir,
                                        tracker, device=cfg.hardware.device.value)
        tracker.log_image("curves", run_dir / "curves.png", step=summary["final_step"])
        tracker.summarize({key: summary[key] for key in ("memorisation_step", "grokking_step", "final_step")})
        tracker.finish()
    log.info(f"memorised at step {summary['memorisation_step']}, grokked at step {summary['grokking_step']}; "
          f"final train acc {summary['final']['train/acc']:.3f}, test acc {summary['final']['test/acc']:.3f}\n"
          f"Run dir: {run_dir}  (use it with scripts/train.py host_model.run_dir={run_dir})")
    return summary
