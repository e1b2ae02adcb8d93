"""Signum: SignSGD under schedule-free averaging (Defazio et al. 2024), the optimiser EleutherAI's
sparsify trains with by default (momentum 0.95, no lr schedule). Here for the recipe study
(sae/bench/recipe.py, `--vary optimizer=signum`); the trainer keeps AdamW (docs/recipe.md).

Schedule-free keeps two iterates: gradients are taken at one ("training") and the other is a
running average ("averaged", what its authors evaluate). `iterates` lets an evaluation score both.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from sae.errors import UserInputError

MOMENTUM = 0.95  # sparsify's


class SignSGD(torch.optim.Optimizer):
    """p <- p - lr * sign(grad): steepest descent in the max norm (Bernstein et al. 2018)."""

    def __init__(self, params, lr: float) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("SignSGD takes no closure")
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad.sign(), alpha=-group["lr"])


def schedule_free_signum(params, lr: float) -> torch.optim.Optimizer:
    """SignSGD wrapped in schedulefree's ScheduleFreeWrapper, in training mode."""
    try:
        from schedulefree import ScheduleFreeWrapper
    except ImportError:
        raise UserInputError("optimizer=signum needs the schedulefree package: "
                             "pip install -e '.[compare]' (make .venv/.compare)") from None
    optimizer = ScheduleFreeWrapper(SignSGD(params, lr), momentum=MOMENTUM)
    optimizer.train()
    return optimizer


def iterates(optimizer) -> Iterator[str]:
    """Sets the weights to each iterate of a schedule-free optimiser in turn and yields its name;
    ends on the training iterate, where training continues. Other optimisers: "training" only."""
    if not hasattr(optimizer, "eval"):
        yield "training"
        return
    optimizer.eval()
    yield "averaged"
    optimizer.train()
    yield "training"
