"""The SAE/crosscoder training loop: setup, resume, steps, logging, eval, checkpoints, in that order."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from sae.atomic_io import write_json
from sae.config import TrainConfig, config_dict
from sae.errors import ReportedError, UserInputError
from sae.metrics.evaluate import evaluate, headline
from sae.saes import build_sae
from sae.saes.base import WEIGHTS_FORMAT, SparseCoder, total_variance
from sae.activations import Activations, check_inputs, load_activations
from sae.run_lock import exclusive_dir
from sae.tracking import NullTracker, check_tracking, make_tracker, truncate_jsonl
from sae.activations.batches import BatchStream, ShardedTable, calibration_sample, column_mean
from sae.training.checkpoint import (Resume, newest_valid_checkpoint, non_finite_tensor,
                                     remove_stale_checkpoint_temps, save_sae_checkpoint)
from sae.hardware import apply_threads, host_dtype
from sae.parallel import batch_part, check_parallel, split_axes, spread
from sae.parallel.group import joined
from sae.parallel.latents import full_optimizer_state, full_sae_state, local_optimizer_state, local_sae_state
from sae.signals import ENDING_SIGNALS, STOP_SIGNALS, PendingSignals, StopRequested, deferred_stop_signals
from sae.world import LOCAL, Collective, launched_world
from sae.training.resample import resample_dead_latents, resample_due
from sae.training.step import DeadLatents, make_optimizer, optimisation_step
from sae.training.schedules import Schedule, crosses_flop_boundary, lr_at, sparsity_coef_at

log = logging.getLogger(__name__)

# what a stop before the loop interrupts (a finished host or activation cache is kept and reused)
BEFORE_TRAINING = "before the first SAE step (set-up, host training or activation extraction)"

# Keys a resumed run may change: they do not alter the trained weights.
RESUMABLE_CHANGES = ("hardware", "tracking", "log_every", "eval_every", "checkpoint_every")


def check_resumable(checkpoint: Path, cfg: TrainConfig, step: int | None = None) -> None:
    """Refuse to resume from a checkpoint of a different run instead of silently mixing them.
    num_steps may grow (`extension_problem` says when); step: the checkpoint's step."""
    saved = json.loads((checkpoint / "config.json").read_text())
    current = config_dict(cfg)
    for key in set(saved) | set(current):
        if key in RESUMABLE_CHANGES or saved.get(key) == current.get(key):
            continue
        if key == "num_steps":
            problem = extension_problem(saved, cfg, step)
            if problem is None:
                continue
            raise UserInputError(f"{checkpoint.parent.parent}: num_steps differs (saved {saved['num_steps']}, now "
                                 f"{cfg.num_steps}) and {problem}; use a new output dir (hydra.run.dir=...)")
        raise UserInputError(f"{checkpoint.parent.parent} holds a checkpoint of a different run ('{key}' differs: "
                             f"saved {saved.get(key)}, now {current.get(key)}); use a new output dir "
                             f"(hydra.run.dir=...) or the saved config")


def extension_problem(saved: dict, cfg: TrainConfig, step: int | None) -> str | None:
    """Why this run cannot continue to cfg.num_steps from a checkpoint at `step` of a run saved
    with saved["num_steps"], or None. It can when the learning rate of every step does not depend
    on num_steps (a constant schedule whose warm-up is the same for both lengths): then the
    continued run equals a fresh run of the new length, bit for bit."""
    old = saved["num_steps"]
    if step is not None and cfg.num_steps < step:
        return f"its checkpoint is at step {step}, past the new num_steps"
    if cfg.scheduler.name is not Schedule.constant:
        return (f"scheduler={cfg.scheduler.name.value} depends on num_steps (only scheduler=constant runs can be "
                "extended)")
    if cfg.lr_sum is not None:
        return f"lr_sum={cfg.lr_sum} spreads over num_steps (a longer run gets a lower lr; give a fixed lr to extend)"
    if cfg.sae.resample_every is not None:
        return ("dead-latent resampling's schedule depends on num_steps (sae.resample_until, and none in the "
                "last interval)")
    if cfg.scheduler.warmup_for(old) != cfg.scheduler.warmup_for(cfg.num_steps):
        return (f"the warm-up depends on num_steps ({cfg.scheduler.warmup_for(old)} vs "
                f"{cfg.scheduler.warmup_for(cfg.num_steps)} steps): set scheduler.warmup_steps to a fixed count "
                "from the start to make a run extendable")
    return None


def flops_per_step(cfg: TrainConfig, n_sources: int, d_in: int) -> int:
    """Dense encoder + decoder, forward and backward: 3 x (2 + 2) x batch x S x d_in x d_sae."""
    return 12 * cfg.batch_size * n_sources * d_in * cfg.sae.sparse_dim


class TrainingDivergedError(ReportedError):
    """A non-finite (or exploded) loss or weight: the run stops without checkpointing it."""


# A train FVU this large is divergence, not a bad fit: predicting the batch mean gives 1.
DIVERGED_FVU = 1e3


def ineffective_settings(cfg: TrainConfig) -> list[str]:
    """Settings that cannot take effect in this run, each as one line that says how to fix it."""
    notes = []
    if cfg.sae.sparsity_coef > 0 and cfg.sae.sparsity_warmup_steps > cfg.num_steps:
        reached = cfg.num_steps / cfg.sae.sparsity_warmup_steps
        notes.append(f"sae.sparsity_warmup_steps={cfg.sae.sparsity_warmup_steps} > num_steps={cfg.num_steps}: "
                     f"the sparsity penalty only reaches {reached:.0%} of sae.sparsity_coef; lower "
                     "sae.sparsity_warmup_steps or raise num_steps")
    return notes


def run_training(cfg: TrainConfig, run_dir: Path, on_start: Callable[[], None] | None = None) -> dict:
    """Train in `run_dir`, resuming from its newest valid checkpoint. Everything that can refuse
    the run (a second process in the dir, bad input, a checkpoint of another config) happens
    before anything is written; then `on_start` runs (the scripts record the job there).

    Launched as several processes (torchrun, a SLURM job of several tasks) they join one process
    group first; rank 0 takes the run dir and does the checks, and tells the others the outcome."""
    world = launched_world()
    check_parallel(cfg.hardware, world, cfg.batch_size, cfg.sae.sparse_dim, cfg.sae.type)
    with joined(cfg.hardware, world) as group:
        run_dir = Path(group.broadcast_object(str(run_dir)))  # torchrun ranks may have composed other timestamps
        if world.is_main:
            return run_as_main(cfg, run_dir, on_start, group)
        return run_as_follower(cfg, run_dir, group)


def run_as_main(cfg: TrainConfig, run_dir: Path, on_start, group: Collective) -> dict:
    with contextlib.ExitStack() as held:
        try:
            lock = held.enter_context(exclusive_dir(run_dir))
            checked, resume = checked_start(cfg, run_dir)
            lock.claim()
        except ReportedError as refusal:
            group.broadcast_object(str(refusal))  # the other ranks stop with the same line
            raise
        group.broadcast_object(None)
        if on_start is not None:
            on_start()
        finished = finished_summary(run_dir, resume, cfg)
        if finished is not None:  # a rerun of a finished run: no second eval line, no second W&B run
            log.info("%s already finished %d steps with this config; nothing to do", run_dir, cfg.num_steps)
            log.info("Run dir: %s", run_dir)
            return finished
        remove_stale_checkpoint_temps(run_dir)
        for note in ineffective_settings(cfg) + (resume.skipped if resume else []):
            log.warning(note)
        with deferred_stop_signals(BEFORE_TRAINING) as pending:  # Ctrl-C/SIGTERM from here on end the job cleanly
            return train(cfg, run_dir, checked, resume, pending, group)


class RefusedByMainRank(ReportedError):
    """Rank 0 refused the run; the other ranks stop with its reason."""


def run_as_follower(cfg: TrainConfig, run_dir: Path, group: Collective) -> dict:
    """A rank other than 0: reads what rank 0 checked, writes nothing."""
    refusal = group.broadcast_object(None)
    if refusal is not None:
        raise RefusedByMainRank(refusal)
    checked, resume = checked_start(cfg, run_dir)
    finished = finished_summary(run_dir, resume, cfg)
    if finished is not None:
        return finished
    with deferred_stop_signals(BEFORE_TRAINING) as pending:
        return train(cfg, run_dir, checked, resume, pending, group)


def checked_start(cfg: TrainConfig, run_dir: Path):
    """The read-only checks of a start: (checked inputs, the checkpoint to resume or None)."""
    check_tracking(cfg.tracking)
    checked = check_inputs(cfg.task, cfg.host_model, cfg.hardware.device.value, host_dtype(cfg.hardware))
    resume = newest_valid_checkpoint(run_dir, cfg.hardware.device.value)
    if resume is not None:
        check_resumable(resume.checkpoint, cfg, resume.state["step"])
    return checked, resume


def finished_summary(run_dir: Path, resume: Resume | None, cfg: TrainConfig) -> dict | None:
    """final_metrics.json when the run already ended at cfg.num_steps, else None."""
    path = run_dir / "final_metrics.json"
    if resume is None or resume.state["step"] != cfg.num_steps or not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("step") == cfg.num_steps else None


def train(cfg: TrainConfig, run_dir: Path, checked, resume: Resume | None, pending: PendingSignals,
          group: Collective = LOCAL) -> dict:
    apply_threads(cfg.hardware)
    device = cfg.hardware.device.value
    main = group.rank == 0
    rows, shards = split_axes(cfg.hardware.parallel, group)
    if resume is not None and main:
        truncate_jsonl(run_dir / "metrics.jsonl", resume.state["step"])
    # W&B fails here, before the work; only rank 0 records anything
    tracker = make_tracker(cfg.tracking, run_dir, config_dict(cfg)) if main else NullTracker()
    data = load_activations(cfg.task, cfg.host_model, cfg.sae.normalize, device, host_dtype(cfg.hardware), checked,
                            group)  # every rank extracts a share of a new activation cache
    if resume is None:
        log_host_record(tracker, data.meta().get("host_run_dir"))
    n_sources, d_in = len(data.sources), data.train.shape[-1]  # (a transcoder's rows hold its targets too)

    torch.manual_seed(cfg.seed)
    sae = build_sae(cfg.sae, n_sources, d_in).to(device)  # the whole dictionary on every rank: same init
    sae.init_b_dec(column_mean(data.train).to(device))
    sample = calibration_sample(data.train).to(device)  # fixed training rows, for what is set from data
    sae.init_from_data(sample)  # JumpReLU: θ from the data
    forward = spread(sae, rows, shards)
    peak_lr = cfg.peak_lr()
    if cfg.lr_sum is not None:
        log.info("lr_sum=%g over %d steps (scheduler=%s): peak lr %.4g", cfg.lr_sum, cfg.num_steps,
                 cfg.scheduler.name.value, peak_lr)
    optimizer = make_optimizer(sae.parameters(), peak_lr)
    batch_generator = torch.Generator().manual_seed(cfg.seed)
    dead_latents = DeadLatents(sae.d_sae, cfg.sae.dead_window, device, rows, shards)
    step, flops = 0, 0
    if resume is not None:  # whatever world size wrote it: checkpoints hold the whole dictionary
        state = resume.state
        sae.load_state_dict(local_sae_state(sae, state["sae"]))
        optimizer.load_state_dict(local_optimizer_state(state["optimizer"], sae))
        batch_generator.set_state(state["batch_generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        dead_latents.load(state)
        step, flops = state["step"], state["flops"]
        log.info("Resuming from %s (step %d/%d)", resume.checkpoint, step, cfg.num_steps)
    # a sharded (larger-than-memory) table is gathered in a background thread while the step runs
    batches = BatchStream(data.train, cfg.batch_size, batch_generator, device,
                          prefetch=isinstance(data.train, ShardedTable), part=batch_part(cfg.batch_size, rows))
    forward = torch.compile(forward) if cfg.hardware.compile else forward
    if main:
        write_json(run_dir / "config.json", config_dict(cfg))
    step_flops = flops_per_step(cfg, n_sources, d_in)
    last_saved = resume.state["step"] if resume is not None else None

    def whole_sae() -> SparseCoder:
        """The dictionary in one single-process module (gathered from the shards: every rank calls it),
        ready for inference: what is evaluated and saved (BatchTopK: θ calibrated on `sample`)."""
        whole = sae
        if group.size > 1:
            whole = build_sae(cfg.sae, n_sources, d_in).to(device)
            whole.load_state_dict(full_sae_state(sae))
        whole.calibrate_for_inference(sample)
        return whole

    def save(at_step: int) -> None:
        nonlocal last_saved
        whole = whole_sae()
        train_state = {
            "step": at_step, "flops": flops, "sae": whole.state_dict(),
            "optimizer": full_optimizer_state(optimizer, sae),
            "batch_generator": batches.generator_state(), "torch_rng": torch.get_rng_state(),
            **dead_latents.state(),
        }
        on_main_rank(group, lambda: write_checkpoint(whole, at_step, cfg, last_saved, run_dir, data, flops,
                                                     train_state))
        last_saved = at_step

    progress = tqdm(total=cfg.num_steps, initial=step, desc="sae", dynamic_ncols=True, mininterval=1.0,
                    disable=not main)
    started = time.time()
    pending.deferring = True  # from here a stop signal waits for the end of the current step
    try:
        while step < cfg.num_steps:
            # -- one optimisation step (no host syncs here) --
            lr = lr_at(step, peak_lr, cfg.num_steps, cfg.scheduler)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            coef = sparsity_coef_at(step, cfg.sae.sparsity_coef, cfg.sae.sparsity_warmup_steps)
            x = batches.next()
            with rows.guarded("the step's gradient all-reduce"):  # DDP's, in backward
                out, loss = optimisation_step(sae, forward, optimizer, x, dead_latents.dead, coef, cfg.grad_clip,
                                              cfg.hardware)
            step, flops = step + 1, flops + step_flops
            dead_latents.update(out, cfg.batch_size, step)
            if resample_due(step, cfg.sae.resample_every, cfg.sae.resample_until, cfg.num_steps):
                restarted = resample_dead_latents(sae, optimizer, dead_latents, x, cfg.seed, step,
                                                  cfg.sae.resample_encoder_scale)
                tracker.log({"train/resampled": restarted}, step)
            progress.update(1)

            # -- logging, eval and checkpoints at their intervals --
            if step % cfg.log_every == 0 or step == cfg.num_steps:
                metrics = train_metrics(out, x, loss, lr, coef, dead_latents.dead_fraction(), sae)
                check_finite_loss(metrics, step, cfg, last_saved)  # before the metrics reach any record
                tracker.log(metrics, step)
                progress.set_postfix(loss=f"{metrics['train/loss']:.3g}", fvu=f"{metrics['train/fvu']:.3f}",
                                     l0=f"{metrics['train/l0']:.1f}")
            if step % cfg.eval_every == 0 and step != cfg.num_steps:  # the last step's eval is the final one
                whole = whole_sae()
                if main:
                    tracker.log(evaluate(whole, data), step)
            on_schedule = crosses_flop_boundary(flops - step_flops, flops)
            periodic = cfg.checkpoint_every is not None and step % cfg.checkpoint_every == 0
            stopping = agree_on_stop(pending, group, device)
            if on_schedule or periodic or step == cfg.num_steps or stopping:
                save(step)
            if stopping:
                tracker.finish()
                progress.close()
                hand_over(pending, step, run_dir)
    finally:  # a stop or an error leaves the terminal on a fresh line for its message
        progress.close()
        batches.close()

    whole = whole_sae()
    if not main:
        group.barrier()  # rank 0 evaluates and writes; stay in the group until it is done
        return {"step": step, "rank": group.rank}
    log.info(f"final evaluation: train and test {data.row_unit}, reconstructions spliced into the host ...")
    final = evaluate(whole, data)
    summary = {**final, "step": step, "flops": flops, "train_wall_time_s": round(time.time() - started, 1),
               "sources": data.source_names, **{k: v for k, v in data.meta().items() if k != "sources"},
               **({"world_size": group.size, "parallel": cfg.hardware.parallel.value} if group.size > 1 else {})}
    write_json(run_dir / "final_metrics.json", summary)
    tracker.log(final, step)
    tracker.summarize({f"final/{key}": value for key, value in final.items()})  # beside each metric's best
    tracker.finish()
    log.info(headline(final, data.source_names, data.row_unit, [t.hook for t in getattr(data, "targets", [])]))
    log.info("Run dir: %s", run_dir)
    group.barrier()
    return summary


def log_host_record(tracker, host_run_dir: str | None) -> None:
    """The grokking host's own training, in the SAE run's W&B: curves, history table, key steps."""
    if host_run_dir is None:
        return
    host = Path(host_run_dir)
    if (host / "curves.png").is_file():
        tracker.log_image("host/curves", host / "curves.png", step=0)
    if (host / "history.jsonl").is_file():
        history = [json.loads(line) for line in (host / "history.jsonl").read_text().splitlines()]
        tracker.log_table("host/history", history, step=0)
    if (host / "summary.json").is_file():
        summary = json.loads((host / "summary.json").read_text())
        tracker.summarize({f"host/{key}": summary.get(key) for key in ("memorisation_step", "grokking_step",
                                                                        "final_step")})


def on_main_rank(group: Collective, work: Callable[[], None]) -> None:
    """Run `work` on rank 0; a reported error there is raised on every rank (all stop together)."""
    problem = None
    if group.rank == 0:
        try:
            work()
        except ReportedError as error:
            problem = error
    if group.size > 1:
        message = group.broadcast_object(None if problem is None else str(problem))
        if problem is None and message is not None:
            problem = RefusedByMainRank(message)
    if problem is not None:
        raise problem


def agree_on_stop(pending: PendingSignals, group: Collective, device: str) -> bool:
    """Whether any rank got a stop signal before this step's agreement; every rank then holds the
    union of the signals agreed on (one small all-reduce per step, none for one process; on the
    run's device, where NCCL can reduce it). A signal that arrives while the all-reduce waits is
    kept for the next step's agreement: deciding on it now would split the ranks."""
    if group.size == 1:
        return bool(pending)
    offered = list(pending.received)
    flags = group.max(torch.tensor([signum in offered for signum in STOP_SIGNALS], dtype=torch.int32, device=device))
    agreed = [signum for signum, flag in zip(STOP_SIGNALS, flags.tolist()) if flag]
    arrived_meanwhile = pending.received[len(offered):]
    pending.received = agreed + [signum for signum in arrived_meanwhile if signum not in agreed]
    return bool(agreed)


def write_checkpoint(whole: SparseCoder, step: int, cfg: TrainConfig, last_saved: int | None, run_dir: Path,
                     data: Activations, flops: int, train_state: dict) -> None:
    check_finite_weights(whole, step, cfg, last_saved)  # one sync per save, never a non-finite checkpoint
    save_sae_checkpoint(run_dir, step, folded_state(whole, data), sae_meta(cfg, data, step, flops),
                        config_dict(cfg), train_state)


def hand_over(pending, step: int, run_dir: Path) -> None:
    """The checkpoint of `step` is saved: stop as the signal asked. Ctrl-C and SIGTERM (scancel;
    SLURM before a requeue) end the run as cancelled; USR1/USR2 (SLURM's time-limit/preemption
    warning) go to the original handler, i.e. submitit's, which requeues and exits on rank 0. On
    other ranks it returns (it leaves requeueing to rank 0), so they exit here."""
    ending = [signum for signum in ENDING_SIGNALS if signum in pending.received]
    if ending:
        pending.restore()
        raise StopRequested(f"{ENDING_SIGNALS[ending[0]]} at step {step}; checkpoint saved in {run_dir}: rerun the "
                            "same command to resume", signum=ending[0])
    log.info("Stop signal at step %d: checkpoint saved, handing over to the scheduler", step)
    pending.deliver()
    raise SystemExit(0)  # reached only where the handler returned: rank 0 requeues the job


def divergence_hint(cfg: TrainConfig, last_saved: int | None) -> str:
    kept = f"the last checkpoint (step {last_saved}) is finite" if last_saved else "no checkpoint was written"
    lr = f"lr={cfg.lr:g}" if cfg.lr_sum is None else f"lr={cfg.peak_lr():g} (from lr_sum={cfg.lr_sum:g})"
    return (f"likely cause: {lr} too high for this SAE (or non-finite activations); {kept}. "
            "Rerun with a lower lr in a new output dir")


def check_finite_loss(metrics: dict, step: int, cfg: TrainConfig, last_saved: int | None) -> None:
    loss, fvu = metrics["train/loss"], metrics["train/fvu"]
    if not math.isfinite(loss) or not math.isfinite(fvu) or fvu > DIVERGED_FVU:
        raise TrainingDivergedError(f"training diverged at step {step}: train/loss={loss:.3g}, train/fvu={fvu:.3g}; "
                                    + divergence_hint(cfg, last_saved))


def check_finite_weights(sae: SparseCoder, step: int, cfg: TrainConfig, last_saved: int | None) -> None:
    bad = non_finite_tensor(dict(sae.named_parameters()))
    if bad:
        raise TrainingDivergedError(f"training diverged at step {step}: non-finite values in {bad}, not saved; "
                                    + divergence_hint(cfg, last_saved))


def train_metrics(out, x: torch.Tensor, loss: torch.Tensor, lr: float, coef: float, dead_frac: float,
                  sae: SparseCoder) -> dict:
    """Over the global batch and the whole dictionary, whichever part this process holds."""
    rows, shards = sae.rows, sae.latent_shards
    with torch.no_grad():
        means = torch.stack([loss, out.mse, out.aux, out.sparsity]).detach().float()
        l0 = shards.sum(out.l0().mean().reshape(1))  # a shard counts its own latents
        means = rows.sum(torch.cat([means, l0])) / rows.size  # equal slices: the mean of means
        target = sae.targets_of(x)  # x itself for an SAE
        squared_error = rows.sum((out.x_hat.float() - target).pow(2).sum())
        fvu = squared_error / total_variance(target, rows)
        loss_value, mse, aux, sparsity, l0_value = means.tolist()
        return {
            "train/loss": loss_value, "train/mse": mse, "train/aux": aux, "train/sparsity": sparsity,
            "train/fvu": fvu.item(), "train/l0": l0_value,
            "train/dead_frac": dead_frac, "train/lr": lr, "train/sparsity_coef": coef,
        }


def folded_state(sae: SparseCoder, data: Activations) -> dict:
    """Weights that take raw activations (the training-time normalisation folded in)."""
    folded = build_sae(sae.cfg, sae.n_sources, sae.d_in).to(data.scale.device)
    folded.load_state_dict(sae.state_dict())
    folded.fold_input_scale(data.scale)
    return folded.state_dict()


def sae_meta(cfg: TrainConfig, data: Activations, step: int, flops: int) -> dict:
    return {
        "sae": json.loads(json.dumps(dataclasses.asdict(cfg.sae), default=str)),
        "n_sources": len(data.sources), "d_in": data.train.shape[-1], "step": step, "flops": flops,
        "weights_format": WEIGHTS_FORMAT,
        "input_scale": data.scale.tolist(), **data.meta(),
    }
