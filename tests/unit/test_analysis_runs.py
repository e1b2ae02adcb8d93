"""Runs as analysis inputs (compose, train or reuse, load), the before/after-grokking study's
pieces, and latent-space maps; on a tiny host and a tiny crosscoder."""
import json
import shutil

import numpy as np
import pytest
import torch

from sae.analysis.grokking import PRE, POST, phase_accuracies
from sae.analysis.diffing import relative_decoder_norms
from sae.analysis.maps import embed_2d
from sae.analysis.runs import RunDirError, compose_train_config, load_sae_run, train_or_reuse
from sae.analysis.steering import random_control, source_view, train_host_with_clamp
from sae.errors import UserInputError
from sae.saes import build_sae
from sae.atomic_io import write_manifest
from sae.training.checkpoint import latest_checkpoint, load_train_state
from sae.host_models.training import run_host_training
from sae.tracking.base import NullTracker

TINY = ["task.p=23", "task.train_fraction=0.6", "host_model.d_model=32", "host_model.n_heads=2", "host_model.kv_heads=2",
        "host_model.d_mlp=64", "host_model.train.num_steps=60", "host_model.train.steps_after_grok=null",
        "sae.sparse_dim=64", "sae.k=8", "batch_size=64", "num_steps=40", "scheduler.warmup_steps=5",
        "eval_every=20", "log_every=10", "tracking=disabled", "hardware.threads=1"]


@pytest.fixture(scope="module")
def overrides(host_cache):
    return [*TINY, f"host_model.cache_dir={host_cache}", "host_model.checkpoints=[step_20,final]"]


@pytest.fixture(scope="module")
def crosscoder_dir(tmp_path_factory, overrides):
    return train_or_reuse(overrides, tmp_path_factory.mktemp("runs") / "crosscoder")


@pytest.fixture(scope="module")
def crosscoder(crosscoder_dir):
    return load_sae_run(crosscoder_dir, task="addition", crosscoder=True)


def test_compose_applies_overrides_and_checks_them_like_the_command_line():
    cfg = compose_train_config(["task=division", "sae=topk", "sae.k=50"])
    assert cfg.task.name == "division" and cfg.sae.k == 50
    with pytest.raises(UserInputError, match="sae.k"):
        compose_train_config(["sae.k=5000"])


def test_a_finished_run_is_reused_and_a_different_config_in_its_dir_is_refused(crosscoder_dir, overrides):
    before = {p: p.stat().st_mtime_ns for p in crosscoder_dir.rglob("*") if p.is_file()}
    assert train_or_reuse(overrides, crosscoder_dir) == crosscoder_dir
    assert {p: p.stat().st_mtime_ns for p in crosscoder_dir.rglob("*") if p.is_file()} == before
    with pytest.raises(UserInputError, match="'lr' differs"):
        train_or_reuse([*overrides, "lr=0.01"], crosscoder_dir)
    assert {p: p.stat().st_mtime_ns for p in crosscoder_dir.rglob("*") if p.is_file()} == before


def test_a_loaded_run_encodes_raw_activations_as_training_encoded_normalised_ones(crosscoder):
    """The saved SAE has the normalisation folded in; the trainer's own weights see scaled inputs."""
    state = load_train_state(latest_checkpoint(crosscoder.run_dir), "cpu")
    trained = build_sae(crosscoder.config.sae, 2, crosscoder.data.train.shape[-1])
    trained.load_state_dict(state["sae"])
    scale = torch.tensor(json.loads((latest_checkpoint(crosscoder.run_dir) / "sae.json").read_text())["input_scale"])
    raw = crosscoder.data.test
    torch.testing.assert_close(crosscoder.sae.encode(raw), trained.encode(raw * scale[:, None]), rtol=1e-4, atol=1e-5)
    assert crosscoder.data.scale.tolist() == [1.0, 1.0]
    assert [row["checkpoint"] for row in phase_accuracies(crosscoder)] == ["step_20", "final"]


def test_run_dirs_lacking_what_an_analysis_needs_say_what_to_run(tmp_path, crosscoder_dir, overrides):
    with pytest.raises(RunDirError, match="no config.json.*python scripts/train.py"):
        load_sae_run(tmp_path)
    with pytest.raises(RunDirError, match="trained on task=addition, not task=division.*task=division"):
        load_sae_run(crosscoder_dir, task="division")
    one_source = train_or_reuse([o for o in overrides if "checkpoints" not in o], tmp_path / "one_source")
    with pytest.raises(RunDirError, match="one-source SAE.*experiment=crosscoder_pre_post_grok task=addition"):
        load_sae_run(one_source, crosscoder=True)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(crosscoder_dir / "config.json", unfinished)
    with pytest.raises(RunDirError, match="no finished SAE"):
        load_sae_run(unfinished)
    moved = tmp_path / "moved"
    shutil.copytree(crosscoder_dir, moved)
    checkpoint = latest_checkpoint(moved)
    meta_path = checkpoint / "sae.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "host_run_dir": str(tmp_path / "gone")}))
    write_manifest(checkpoint)  # as if the run had been trained against a host dir that is gone now
    with pytest.raises(RunDirError, match="which is gone"):
        load_sae_run(moved)


def test_source_view_encodes_and_decodes_one_source_of_a_crosscoder(crosscoder):
    sae, x = crosscoder.sae, crosscoder.data.test[:50]
    view = source_view(sae, POST)
    pre = (x[:, POST] - sae.b_dec[POST]) @ sae.W_enc[:, POST].T + sae.b_enc
    torch.testing.assert_close(view.encode(x[:, POST:POST + 1]), sae.activation(pre))
    f = view.encode(x[:, POST:POST + 1])
    torch.testing.assert_close(view.decode(f)[:, 0], f @ sae.W_dec[:, POST] + sae.b_dec[POST])


def test_random_control_draws_from_the_pool_without_the_chosen():
    chosen, pool = torch.tensor([1, 2]), torch.tensor([1, 2, 5, 7, 9])
    control = random_control(16, chosen, seed=3, pool=pool)
    assert len(control) == 2 and set(control.tolist()) <= {5, 7, 9}
    with pytest.raises(ValueError, match="only 1 latents to draw 2"):
        random_control(16, chosen, pool=torch.tensor([1, 2, 5]))


def test_an_empty_clamp_trains_the_host_as_without_it(tmp_path, crosscoder):
    """Exactly equal: the empty clamp adds exact zeros at the answer position, and since it touches
    only that position the host still computes only that position in its last block."""
    task, host = crosscoder.config.task, crosscoder.config.host_model
    recipe = host.train.__class__(**{**host.train.__dict__, "num_steps": 15, "eval_every": 5})
    plain = run_host_training(task, host.architecture(), recipe, tmp_path / "plain", NullTracker(), quiet=True)
    view = source_view(crosscoder.sae, POST)
    clamped = train_host_with_clamp(task, host.architecture(), recipe, tmp_path / "empty", view,
                                    crosscoder.data.sources[POST].hook, torch.zeros(0, dtype=torch.long), 0.0)
    histories = [[json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()]
                 for name in ("plain", "empty")]
    assert len(histories[0]) == len(histories[1]) > 3
    assert histories[0] == histories[1]
    assert plain["grokking_step"] == clamped["grokking_step"]


def test_tsne_keeps_separated_clusters_apart():
    generator = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(40, 10, generator=generator), torch.randn(40, 10, generator=generator) + 20])
    coords = embed_2d(points, "tsne", neighbours=5)
    labels = np.array([0] * 40 + [1] * 40)
    distances = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    assert (labels[distances.argmin(axis=1)] == labels).all()
    with pytest.raises(ValueError, match="method must be one of tsne, umap"):
        embed_2d(points, "pca")


def test_selection_arms_match_brute_force(crosscoder):
    from sae.analysis.diffing import latent_scaling
    from sae.analysis.grokking import arm_generalisation_effect, arm_largest, arm_post_specific
    from sae.analysis.steering import steered_metrics

    sae, data = crosscoder.sae, crosscoder.data
    r = relative_decoder_norms(sae, PRE, POST, crosscoder.input_scale)
    fires = (sae.encode(data.test) > 0).any(dim=0)
    x = torch.cat([data.train, data.test])
    candidates = [i for i in range(sae.d_sae) if fires[i] and r[i] >= 0.5]
    nu = latent_scaling(sae, x, torch.tensor(candidates))["nu_error"].tolist() if candidates else []
    expected = sorted((i for i, v in zip(candidates, nu) if abs(v) <= 0.5), key=lambda i: -r[i].item())[:3]
    arm_a = arm_post_specific(crosscoder, n=3, r_min=0.5, nu_max=0.5)
    assert arm_a["latents"].tolist() == expected and arm_a["candidates"] == len(candidates)

    pool = torch.where(fires)[0][:6]
    clean = steered_metrics(sae, data, torch.zeros(0, dtype=torch.long), 0.0, source=POST)
    effect = {}
    for latent in pool.tolist():
        one = steered_metrics(sae, data, torch.tensor([latent]), 0.0, source=POST)
        effect[latent] = (one["test/ce"] - clean["test/ce"]) - (one["train/ce"] - clean["train/ce"])
    arm_b = arm_generalisation_effect(crosscoder, n=2, pool=pool)
    assert arm_b["latents"].tolist() == sorted(effect, key=lambda i: -effect[i])[:2]

    f = sae.encode(x)
    contribution = (f * sae.W_dec[:, POST].norm(dim=-1)).mean(dim=0)
    arm_c = arm_largest(crosscoder, n=4)
    assert sorted(arm_c["contribution"], reverse=True) == arm_c["contribution"]
    fifth = contribution.sort(descending=True).values[4].item()
    assert all(contribution[i].item() >= fifth - 1e-6 for i in arm_c["latents"].tolist())  # the top 4, near-ties aside
