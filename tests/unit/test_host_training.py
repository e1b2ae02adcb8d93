import json

import pytest
import torch

from sae.tasks.modular import ModularTaskConfig, Operation
from sae.host_models.training import HostRecipe, amplify_slow_gradients, run_host_training
from sae.tracking.base import NullTracker


def test_grokfast_ema_matches_hand_computation():
    model = torch.nn.Linear(2, 1, bias=False)
    ema: dict = {}
    grads = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    amplified = []
    for grad in grads:
        model.weight.grad = grad.clone()
        amplify_slow_gradients(model, ema, alpha=0.9, lam=2.0)
        amplified.append(model.weight.grad.clone())
    assert torch.allclose(amplified[0], torch.tensor([[3.0, 0.0]]))  # ema starts at the first gradient
    ema_2 = 0.9 * torch.tensor([[1.0, 0.0]]) + 0.1 * torch.tensor([[0.0, 2.0]])
    assert torch.allclose(amplified[1], grads[1] + 2.0 * ema_2)


def test_host_run_records_checkpoints_with_accuracies(tmp_path):
    task = ModularTaskConfig(name="addition", operations=[Operation.addition], p=13, train_fraction=0.6)
    recipe = HostRecipe(num_steps=30, eval_every=5, steps_after_grok=None)
    summary = run_host_training(task, dict(n_layers=1, d_model=16, n_heads=2, kv_heads=2, d_mlp=32), recipe,
                                tmp_path, NullTracker(), quiet=True)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    steps = [c["step"] for c in saved["checkpoints"]]
    assert steps[:5] == [0, 1, 2, 5, 10] and steps[-1] == 30
    assert all((tmp_path / c["file"]).is_file() for c in saved["checkpoints"])
    assert (tmp_path / "curves.png").stat().st_size > 0
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 1, 2, 5, 10, 15, 20, 25, 30]


@pytest.mark.parametrize("keys, message", [
    (dict(num_steps=0), "host_model.train.num_steps must be > 0"),
    (dict(num_steps=10, warmup_steps=10), r"host_model.train.warmup_steps must be in \[0, num_steps=10\)"),
    (dict(grokfast_alpha=1.5), r"host_model.train.grokfast_alpha must be in \(0, 1\)"),
    (dict(grad_clip=0.0), "host_model.train.grad_clip must be > 0 or null"),
])
def test_bad_recipe_is_refused(keys, message):
    with pytest.raises(ValueError, match=message):
        HostRecipe(**keys)


def test_minibatches_cover_every_row_once_per_epoch_and_full_batch_is_every_row():
    from sae.host_models.training import minibatches

    stream = minibatches(10, 3, seed=0, device="cpu")
    epoch = torch.cat([next(stream) for _ in range(3)])  # 3 batches of 3; the last row waits for the next epoch
    assert len(set(epoch.tolist())) == 9
    assert torch.equal(next(minibatches(10, None, seed=0, device="cpu")), torch.arange(10))
    assert torch.equal(next(minibatches(10, 64, seed=0, device="cpu")), torch.arange(10))
    with pytest.raises(ValueError, match="host_model.train.batch_size must be > 0 or null"):
        HostRecipe(batch_size=0)


def test_grad_clip_bounds_the_gradient_norm_the_optimiser_steps_with(tmp_path, monkeypatch):
    def norms_seen(grad_clip):
        seen, adamw_step = [], torch.optim.AdamW.step

        def recording_step(self, *args, **kwargs):
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            return adamw_step(self, *args, **kwargs)

        monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
        task = ModularTaskConfig(name="addition", operations=[Operation.addition], p=13, train_fraction=0.6)
        recipe = HostRecipe(num_steps=8, warmup_steps=2, eval_every=8, steps_after_grok=None, grad_clip=grad_clip)
        run_host_training(task, dict(n_layers=1, d_model=16, n_heads=2, kv_heads=2, d_mlp=32), recipe,
                          tmp_path / str(grad_clip), NullTracker(), quiet=True)
        return seen

    unclipped = norms_seen(None)
    clip = min(unclipped) / 2
    assert len(unclipped) == 8 and max(norms_seen(clip)) <= clip * (1 + 1e-5)


def test_transition_checkpoints_are_dense_between_memorisation_and_grokking(tmp_path):
    task = ModularTaskConfig(name="addition", operations=[Operation.addition], p=13, train_fraction=0.6)
    arch = dict(n_layers=1, d_model=32, n_heads=2, kv_heads=2, d_mlp=64)
    recipe = HostRecipe(lr=1e-2, num_steps=400, eval_every=50, steps_after_grok=None, transition_checkpoint_every=7)
    summary = run_host_training(task, arch, recipe, tmp_path, NullTracker(), quiet=True)
    memorised, grokked = summary["memorisation_step"], summary["grokking_step"]
    assert memorised is not None, "the tiny host must memorise for this test to mean anything"
    end = grokked if grokked is not None else recipe.num_steps
    steps = {c["step"] for c in summary["checkpoints"]}
    expected = {s for s in range(memorised + 1, end) if s % 7 == 0}
    assert expected and expected <= steps
    sparse = run_host_training(task, arch, HostRecipe(lr=1e-2, num_steps=400, eval_every=50, steps_after_grok=None),
                               tmp_path / "sparse", NullTracker(), quiet=True)
    assert not expected & {c["step"] for c in sparse["checkpoints"]} - {memorised, grokked}
    assert sparse["memorisation_step"] == memorised  # extra checkpoints change nothing in training
