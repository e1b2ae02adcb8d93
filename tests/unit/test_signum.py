"""sae.training.signum: SignSGD's step against its formula, and schedule-free's two iterates."""
import pytest
import torch

from sae.training.signum import SignSGD, iterates, schedule_free_signum


def test_signsgd_moves_each_weight_by_lr_against_its_gradient_sign():
    weights = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    weights.grad = torch.tensor([0.3, -7.0, 0.0, -1e-9])
    SignSGD([weights], lr=0.1).step()
    torch.testing.assert_close(weights.data, torch.tensor([0.9, -1.9, 3.0, 0.6]))  # float32 tolerance


def test_signsgd_refuses_a_non_positive_lr():
    with pytest.raises(ValueError, match="lr must be > 0, got 0"):
        SignSGD([torch.nn.Parameter(torch.zeros(1))], lr=0)


@pytest.mark.compare  # schedulefree comes with the [compare] extra (sparsify's optimiser)
def test_iterates_visit_the_average_and_end_on_the_training_weights():
    torch.manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(16))
    optimizer = schedule_free_signum([weights], lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        ((weights - 3.0) ** 2).sum().backward()
        optimizer.step()
    training = weights.detach().clone()
    seen = {name: weights.detach().clone() for name in iterates(optimizer)}
    assert list(seen) == ["averaged", "training"]
    assert torch.equal(seen["training"], training) and torch.equal(weights.detach(), training)
    assert not torch.equal(seen["averaged"], training)
    # the average lags the iterate it averages: further from the optimum at 3 after a few steps from N(0, 1)
    assert (seen["averaged"] - 3).abs().mean() > (training - 3).abs().mean()


def test_a_plain_optimizer_has_one_iterate():
    assert list(iterates(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))) == ["training"]
