import math

import pytest
import torch

from sae.metrics.reconstruction import dead_fraction, fvu, fvu_all_sources
from sae.host_models.training import log_spaced_steps
from sae.training.schedules import Schedule, SchedulerConfig, crosses_flop_boundary, lr_at, sparsity_coef_at


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
