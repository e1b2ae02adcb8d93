import math

import pytest
import torch

from sae.metrics.reconstruction import dead_fraction, fvu, fvu_all_sources
from sae.host_models.training import log_spaced_steps
from sae.training.schedules import (Schedule, SchedulerConfig, crosses_flop_boundary, lr_at, lr_for_sum, lr_sum_problem,
                                    sparsity_coef_at)


@pytest.mark.parametrize("name", list(Schedule))
def test_warmup_is_linear_from_zero(name):
    cfg = SchedulerConfig(name=name, warmup_steps=10)
    assert lr_at(0, 1.0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(4, 1.0, 100, cfg) == pytest.approx(0.5)
    assert lr_at(9, 1.0, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 100, cfg) == pytest.approx(1.0)


def test_constant_stays_at_lr():
    cfg = SchedulerConfig(name=Schedule.constant, warmup_steps=0)
    assert [lr_at(s, 0.3, 50, cfg) for s in (0, 25, 49)] == [0.3, 0.3, 0.3]


@pytest.mark.parametrize("name", [Schedule.cosine, Schedule.linear_decay])
def test_decays_end_at_min_ratio_and_pass_the_midpoint(name):
    cfg = SchedulerConfig(name=name, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(99, 2.0, 100, cfg) == pytest.approx(0.2)
    middle = lr_at(10 + 89 / 2, 2.0, 100, cfg)
    assert middle == pytest.approx(0.2 + 1.8 * 0.5)  # both shapes are halfway at the midpoint
    quarter = lr_at(10 + 89 / 4, 2.0, 100, cfg)
    expected = 0.5 * (1 + math.cos(math.pi / 4)) if name is Schedule.cosine else 0.75
    assert quarter == pytest.approx(0.2 + 1.8 * expected)


@pytest.mark.parametrize("name", list(Schedule))
@pytest.mark.parametrize("warmup_steps", [0, 17])
def test_lr_sum_gives_the_peak_lr_whose_per_step_lrs_add_up_to_it(name, warmup_steps):
    cfg = SchedulerConfig(name=name, warmup_steps=warmup_steps, min_lr_ratio=0.1)
    peak = lr_for_sum(0.3, 200, cfg)
    assert math.fsum(lr_at(step, peak, 200, cfg) for step in range(200)) == pytest.approx(0.3, rel=1e-12)
    assert lr_sum_problem(0.3, 200, cfg) is None


def test_lr_sum_of_a_constant_run_is_lr_times_steps():
    assert lr_for_sum(0.3, 1000, SchedulerConfig(warmup_steps=0)) == pytest.approx(3e-4, rel=1e-12)


@pytest.mark.parametrize("lr_sum, message", [
    (0.0, "lr_sum must be a positive finite number (the sum of the per-step lrs over the run) or null, got 0.0"),
    (-0.3, "lr_sum must be a positive finite number"),
    (math.nan, "got nan"),
    (math.inf, "got inf"),
    (1e-323, "lr_sum=1e-323 over num_steps=10 with scheduler=linear_decay gives lr=0.0: not a positive finite number"),
])
def test_an_lr_sum_that_gives_no_usable_lr_is_refused_in_one_line(lr_sum, message):
    problem = lr_sum_problem(lr_sum, 10, SchedulerConfig(name=Schedule.linear_decay, warmup_steps=0))
    assert message in problem and "\n" not in problem


def test_sparsity_warmup():
    assert sparsity_coef_at(0, 5.0, 100) == 0.0
    assert sparsity_coef_at(50, 5.0, 100) == pytest.approx(2.5)
    assert sparsity_coef_at(100, 5.0, 100) == 5.0
    assert sparsity_coef_at(1000, 5.0, 100) == 5.0
    assert sparsity_coef_at(0, 5.0, 0) == 5.0


@pytest.mark.parametrize("before, after, expected", [
    (0, 1, True), (0.5, 0.9, False), (2e9, 3e9, True), (3e9, 3.5e9, False), (9e9, 1e10, True),
    (1.1e10, 2.9e10, False), (1e5, 5e7, True), (3e11, 3e11 + 1, False),
])
def test_flop_boundaries_are_1eN_and_3eN(before, after, expected):
    assert crosses_flop_boundary(before, after) is expected


def test_log_spaced_host_checkpoints():
    assert sorted(log_spaced_steps(600)) == [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 600]


def test_fvu_is_0_for_perfect_and_1_for_the_mean():
    x = torch.randn(50, 2, 8)
    assert torch.allclose(fvu(x, x), torch.zeros(2))
    mean = x.mean(dim=0, keepdim=True).expand_as(x)
    assert torch.allclose(fvu(x, mean), torch.ones(2))
    assert fvu_all_sources(x, mean).item() == pytest.approx(1.0)
    half = x.clone()
    half[:, 1] = mean[:, 1]  # source 0 perfect, source 1 the mean
    assert torch.allclose(fvu(x, half), torch.tensor([0.0, 1.0]), atol=1e-6)


def test_dead_fraction():
    latents = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    assert dead_fraction((latents != 0).sum(0)).item() == 0.5
