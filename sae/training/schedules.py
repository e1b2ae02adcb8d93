"""Schedules as pure functions of the step (no scheduler objects to save or restore)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Optional


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"
    linear_decay = "linear_decay"


@dataclass
class SchedulerConfig:
    """`scheduler.*`: linear warm-up from 0, then the named shape down to min_lr_ratio * lr.

    The warm-up is `warmup_fraction` of the run unless `warmup_steps` is set, so the default
    works for any num_steps (a fixed 100 steps refused every run of <= 100 steps)."""

    name: Schedule = Schedule.constant
    warmup_steps: Optional[int] = None  # null = warmup_fraction * num_steps
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.0  # cosine / linear_decay end at this fraction of lr

    def __post_init__(self) -> None:
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"scheduler.warmup_steps must be >= 0 or null, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"scheduler.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"scheduler.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def warmup_for(self, num_steps: int) -> int:
        """Warm-up steps of a run of num_steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(self.warmup_fraction * num_steps)


def lr_at(step: int, lr: float, num_steps: int, cfg: SchedulerConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `num_steps`."""
    warmup = cfg.warmup_for(num_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg.name is Schedule.constant:
        return lr
    progress = (step - warmup) / max(1, num_steps - 1 - warmup)
    progress = min(1.0, progress)
    if cfg.name is Schedule.cosine:
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def lr_for_sum(lr_sum: float, num_steps: int, cfg: SchedulerConfig) -> float:
    """The peak lr whose per-step lrs (lr_at, warm-up and decay included) add up to lr_sum over
    num_steps: the run's ∑lr, which set where a run ends on the synthetic data (docs/recipe.md)."""
    return lr_sum / math.fsum(lr_at(step, 1.0, num_steps, cfg) for step in range(num_steps))


def lr_problem(lr: float, key: str = "lr") -> str | None:
    """Why lr is not a usable learning rate (one line naming the key), or None."""
    if not math.isfinite(lr) or lr <= 0:
        return f"{key} must be a positive finite number, got {lr}"
    return None


def lr_sum_problem(lr_sum: float, num_steps: int, cfg: SchedulerConfig, key: str = "lr_sum") -> str | None:
    """Why lr_sum cannot set this run's lr (one line naming the keys), or None."""
    if not math.isfinite(lr_sum) or lr_sum <= 0:
        return (f"{key} must be a positive finite number (the sum of the per-step lrs over the run) or null, "
                f"got {lr_sum}")
    lr = lr_for_sum(lr_sum, num_steps, cfg)
    if not math.isfinite(lr) or lr <= 0:
        return (f"{key}={lr_sum} over num_steps={num_steps} with scheduler={cfg.name.value} gives lr={lr}: "
                f"not a positive finite number; pick a {key} nearer 0.1-1")
    return None


def sparsity_coef_at(step: int, coef: float, warmup_steps: int) -> float:
    """The sparsity penalty ramps linearly from 0 to `coef` over `warmup_steps`."""
    if warmup_steps == 0:
        return coef
    return coef * min(1.0, step / warmup_steps)


def crosses_flop_boundary(flops_before: float, flops_after: float) -> bool:
    """True when (flops_before, flops_after] holds a 1eN or 3eN boundary (the seed's schedule)."""
    if flops_after < 1:
        return False
    low = math.floor(math.log10(max(flops_before, 1.0)))
    high = math.floor(math.log10(flops_after))
    return any(
        flops_before < mantissa * 10.0**exponent <= flops_after
        for exponent in range(low, high + 1)
        for mantissa in (1, 3)
    )
