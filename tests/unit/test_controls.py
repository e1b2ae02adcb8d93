"""Matched controls, the projection intervention and the study statistics, against brute force."""
import pytest
import torch

from sae.analysis.controls import (accuracy_auc, empirical_p_value, latent_statistics, matched_control,
                                   steps_to)
from sae.analysis.steering import project_out, projection_hook
from sae.saes import build_sae
from sae.saes.topk import TopKSAEConfig


def brute_force_ranks(values):
    """Rank = how many values are strictly smaller, over n - 1."""
    return [sum(other < v for other in values) / (len(values) - 1) for v in values]


def test_matched_controls_are_among_the_nearest_unused_latents_in_rank_space():
    generator = torch.Generator().manual_seed(0)
    frequency, contribution = torch.rand(60, generator=generator), torch.rand(60, generator=generator) * 10
    frequency[7] = frequency[8]  # a tie, ranked the same on any CPU
    chosen, pool = torch.tensor([3, 11, 40]), torch.arange(50)  # latents 50..59 are not in the pool
    neighbours = 4
    control = matched_control(frequency, contribution, chosen, pool, seed=1, neighbours=neighbours)
    assert len(set(control.tolist())) == 3 and not set(control.tolist()) & set(chosen.tolist())
    assert all(0 <= c < 50 for c in control.tolist())
    everyone = [i for i in range(50) if i not in (3, 11, 40)] + chosen.tolist()
    f_rank = dict(zip(everyone, brute_force_ranks([frequency[i].item() for i in everyone])))
    c_rank = dict(zip(everyone, brute_force_ranks([contribution[i].item() for i in everyone])))
    used = set()
    for latent, drawn in zip(chosen.tolist(), control.tolist()):
        distance = {j: abs(f_rank[j] - f_rank[latent]) + abs(c_rank[j] - c_rank[latent])
                    for j in everyone[:-3] if j not in used}
        nearest = sorted(distance.values())[neighbours - 1]
        assert distance[drawn] <= nearest + 1e-12
        used.add(drawn)
    assert torch.equal(matched_control(frequency, contribution, chosen, pool, seed=1, neighbours=neighbours), control)
    draws = {tuple(matched_control(frequency, contribution, chosen, pool, seed=s).tolist()) for s in range(10)}
    assert len(draws) > 1  # different seeds, different draws
    with pytest.raises(ValueError, match="2 pool latents for 3 chosen ones"):
        matched_control(frequency, contribution, chosen, torch.tensor([3, 11, 40, 1, 2]))


def test_latent_statistics_match_a_loop():
    torch.manual_seed(0)
    sae = build_sae(TopKSAEConfig(sparse_dim=12, k=3), 2, 4)
    x = torch.randn(50, 2, 4)
    frequency, contribution = latent_statistics(sae, x, source=1, chunk=7)
    f = sae.encode(x)
    for i in range(12):
        assert frequency[i].item() == pytest.approx(sum(f[n, i].item() > 0 for n in range(50)) / 50)
        expected = sum(f[n, i].item() * sae.W_dec[i, 1].norm().item() for n in range(50)) / 50
        assert contribution[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_projection_removes_exactly_the_span():
    torch.manual_seed(0)
    directions = torch.randn(3, 8)
    x = torch.randn(20, 8)
    projected = project_out(x, directions)
    torch.testing.assert_close(projected @ directions.t(), torch.zeros(20, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(project_out(projected, directions), projected, atol=1e-5, rtol=0)  # idempotent
    orthogonal = torch.linalg.qr(torch.cat([directions.t(), torch.randn(8, 5)], dim=1))[0][:, 3:].t()  # [5, 8]
    inside = torch.randn(4, 5) @ orthogonal
    torch.testing.assert_close(project_out(inside, directions), inside, atol=1e-5, rtol=0)  # nothing to remove
    assert torch.equal(project_out(x, torch.zeros(0, 8)), x)
    resid = torch.randn(6, 4, 8)
    hooked = projection_hook(directions)(resid)
    assert torch.equal(hooked[:, :-1], resid[:, :-1])  # only the answer position
    torch.testing.assert_close(hooked[:, -1], project_out(resid[:, -1], directions))


def test_accuracy_auc_steps_to_and_p_values_by_hand():
    history = [{"step": 0, "test/acc": 0.0}, {"step": 10, "test/acc": 0.5}, {"step": 20, "test/acc": 1.0}]
    assert accuracy_auc(history, horizon=20) == pytest.approx((2.5 + 7.5) / 20)
    assert accuracy_auc(history, horizon=40) == pytest.approx((2.5 + 7.5 + 20) / 40)  # last value held
    assert steps_to(history, 0.9) == 20 and steps_to(history, 0.5) == 10 and steps_to(history, 1.1) is None
    assert empirical_p_value(0.2, [0.5, 0.6, 0.7, 0.8]) == pytest.approx(1 / 5)  # below every control
    assert empirical_p_value(0.65, [0.5, 0.6, 0.7, 0.8]) == pytest.approx(3 / 5)
    assert empirical_p_value(0.9, [0.5, 0.6], alternative="greater") == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="alternative"):
        empirical_p_value(0.1, [0.2], alternative="two-sided")
