"""The SAE/crosscoder training loop: setup, resume, steps, logging, eval, checkpoints, in that order."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sae.config import TrainConfig
from sae.errors import UserInputError
from sae.metrics.evaluate import evaluate, headline
from sae.saes import build_sae
from sae.saes.base import WEIGHTS_FORMAT, SparseCoder
from sae.tracking import check_tracking, make_tracker, truncate_jsonl
from sae.training.activations import ActivationData, check_inputs, load_any_activation_data
from sae.training.batches import BatchStream, ShardedTable, column_mean
from sae.training.checkpoint import latest_checkpoint, load_train_state, save_sae_checkpoint, write_json
from sae.training.hardware import apply_threads, check_hardware, host_dtype
from sae.training.signals import deferred_stop_signals
from sae.training.step import DeadLatents, make_optimizer, optimisation_step
from sae.training.schedules import crosses_flop_boundary, lr_at, sparsity_coef_at

# Keys a resumed run may change: they do not alter the trained weights.
RESUMABLE_CHANGES = ("hardware", "tracking", "log_every", "eval_every", "checkpoint_every")


def config_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def check_resumable(checkpoint: Path, cfg: TrainConfig) -> None:
    """Refuse to resume from a checkpoint of a different run instead of silently mixing them."""
    saved = json.loads((checkpoint / "config.json").read_text())
    current = config_dict(cfg)
    for key in set(saved) | set(current):
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key):
            raise UserInputError(f"{checkpoint.parent.parent} holds a checkpoint of a different run ('{key}' differs: "
                             f"saved {saved.get(key)}, now {current.get(key)}); use a new output dir "
                             f"(hydra.run.dir=...) or the saved config")


def flops_per_step(cfg: TrainConfig, n_sources: int, d_in: int) -> int:
    """Dense encoder + decoder, forward and backward: 3 x (2 + 2) x batch x S x d_in x d_sae."""
    return 12 * cfg.batch_size * n_sources * d_in * cfg.sae.sparse_dim


def run_training(cfg: TrainConfig, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    check_hardware(cfg.hardware)  # every check that can fail comes before any work
    check_tracking(cfg.tracking)
    checked = check_inputs(cfg.task, cfg.host_model, cfg.hardware.device.value, host_dtype(cfg.hardware))
    previous = latest_checkpoint(run_dir)
    if previous is not None:
        check_resumable(previous, cfg)
    apply_threads(cfg.hardware)
    device = cfg.hardware.device.value
    state = load_train_state(previous, device) if previous is not None else None
    if state is not None:
        truncate_jsonl(run_dir / "metrics.jsonl", state["step"])
    tracker = make_tracker(cfg.tracking, run_dir, config_dict(cfg))  # W&B fails here, before the work
    data = load_any_activation_data(cfg.task, cfg.host_model, cfg.sae.normalize, device,
                                    host_dtype(cfg.hardware), checked)
    _, n_sources, d_in = data.train.shape

    torch.manual_seed(cfg.seed)
    sae = build_sae(cfg.sae, n_sources, d_in).to(device)
    sae.init_b_dec(column_mean(data.train).to(device))
    optimizer = make_optimizer(sae.parameters(), cfg.lr)
    batch_generator = torch.Generator().manual_seed(cfg.seed)
    dead_latents = DeadLatents(sae.d_sae, cfg.sae.dead_window, device)
    step, flops = 0, 0
    if state is not None:
        sae.load_state_dict(state["sae"])
        optimizer.load_state_dict(state["optimizer"])
        batch_generator.set_state(state["batch_generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        dead_latents.load(state)
        step, flops = state["step"], state["flops"]
        print(f"Resuming from {previous} (step {step}/{cfg.num_steps})", flush=True)
    # a sharded (larger-than-memory) table is gathered in a background thread while the step runs
    batches = BatchStream(data.train, cfg.batch_size, batch_generator, device,
                          prefetch=isinstance(data.train, ShardedTable))
    forward = torch.compile(sae) if cfg.hardware.compile else sae
    write_json(run_dir / "config.json", config_dict(cfg))
    step_flops = flops_per_step(cfg, n_sources, d_in)

    def save(at_step: int) -> None:
        train_state = {
            "step": at_step, "flops": flops, "sae": sae.state_dict(), "optimizer": optimizer.state_dict(),
            "batch_generator": batches.generator_state(), "torch_rng": torch.get_rng_state(),
            **dead_latents.state(),
        }
        save_sae_checkpoint(run_dir, at_step, folded_state(sae, data), sae_meta(cfg, data, at_step, flops),
                            config_dict(cfg), train_state)

    progress = tqdm(total=cfg.num_steps, initial=step, desc="sae", dynamic_ncols=True, mininterval=1.0)
    started = time.time()
    with deferred_stop_signals() as pending:
        while step < cfg.num_steps:
            # -- one optimisation step (no host syncs here) --
            lr = lr_at(step, cfg.lr, cfg.num_steps, cfg.scheduler)
            for group in optimizer.param_groups:
                group["lr"] = lr
            coef = sparsity_coef_at(step, cfg.sae.sparsity_coef, cfg.sae.sparsity_warmup_steps)
            x = batches.next()
            out, loss = optimisation_step(sae, forward, optimizer, x, dead_latents.dead, coef, cfg.grad_clip,
                                          cfg.hardware)
            step, flops = step + 1, flops + step_flops
            dead_latents.update(out, cfg.batch_size, step)
            progress.update(1)

            # -- logging, eval and checkpoints at their intervals --
            if step % cfg.log_every == 0 or step == cfg.num_steps:
                metrics = train_metrics(out, x, loss, lr, coef, dead_latents.mask())
                tracker.log(metrics, step)
                progress.set_postfix(loss=f"{metrics['train/loss']:.3g}", fvu=f"{metrics['train/fvu']:.3f}",
                                     l0=f"{metrics['train/l0']:.1f}")
            if step % cfg.eval_every == 0 or step == cfg.num_steps:
                tracker.log(evaluate(sae, data), step)
            on_schedule = crosses_flop_boundary(flops - step_flops, flops)
            periodic = cfg.checkpoint_every is not None and step % cfg.checkpoint_every == 0
            if on_schedule or periodic or step == cfg.num_steps or pending:
                save(step)
            if pending:  # SLURM's time-limit / preemption warning: checkpoint saved, now let submitit requeue
                print(f"Stop signal at step {step}: checkpoint saved, handing over to the scheduler", flush=True)
                tracker.finish()
                pending.deliver()
    progress.close()
    batches.close()

    final = evaluate(sae, data)
    summary = {**final, "step": step, "flops": flops, "train_wall_time_s": round(time.time() - started, 1),
               "sources": data.source_names, **{k: v for k, v in data.meta().items() if k != "sources"}}
    write_json(run_dir / "final_metrics.json", summary)
    tracker.log(final, step)
    tracker.finish()
    print(headline(final, data.source_names, data.row_unit), flush=True)
    print(f"Run dir: {run_dir}", flush=True)
    return summary


def train_metrics(out, x: torch.Tensor, loss: torch.Tensor, lr: float, coef: float, dead_mask: torch.Tensor) -> dict:
    with torch.no_grad():
        total = (x - x.mean(dim=0)).pow(2).sum()
        return {
            "train/loss": loss.item(), "train/mse": out.mse.item(), "train/aux": out.aux.item(),
            "train/sparsity": out.sparsity.item(),
            "train/fvu": ((out.x_hat.float() - x).pow(2).sum() / total.clamp_min(1e-12)).item(),
            "train/l0": out.l0().mean().item(),
            "train/dead_frac": dead_mask.float().mean().item(), "train/lr": lr, "train/sparsity_coef": coef,
        }


def folded_state(sae: SparseCoder, data: ActivationData) -> dict:
    """Weights that take raw activations (the training-time normalisation folded in)."""
    folded = build_sae(sae.cfg, sae.n_sources, sae.d_in).to(data.scale.device)
    folded.load_state_dict(sae.state_dict())
    folded.fold_input_scale(data.scale)
    return folded.state_dict()


def sae_meta(cfg: TrainConfig, data: ActivationData, step: int, flops: int) -> dict:
    return {
        "sae": json.loads(json.dumps(dataclasses.asdict(cfg.sae), default=str)),
        "n_sources": len(data.sources), "d_in": data.train.shape[-1], "step": step, "flops": flops,
        "weights_format": WEIGHTS_FORMAT,
        "input_scale": data.scale.tolist(), **data.meta(),
    }
