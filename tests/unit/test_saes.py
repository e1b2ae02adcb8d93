import pytest
import torch

from sae.saes import build_sae
from sae.saes.topk import TopKSAEConfig
from sae.saes.vanilla import VanillaSAEConfig


def random_sae(cfg, n_sources=1, d_in=6, seed=0):
    torch.manual_seed(seed)
    sae = build_sae(cfg, n_sources, d_in)
    with torch.no_grad():  # move away from the tied init so encoder and decoder differ
        for param in sae.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return sae


def naive_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, a Python loop: keep the k largest values (then ReLU), zero the rest."""
    out = torch.zeros_like(pre)
    for r, row in enumerate(pre.tolist()):
        order = sorted(range(len(row)), key=lambda i: row[i], reverse=True)[:k]
        for i in order:
            out[r, i] = max(row[i], 0.0)
    return out


def assert_same_topk(latents: torch.Tensor, expected: torch.Tensor, pre: torch.Tensor, k: int) -> None:
    """Equal to the naive reference up to float32 rounding. encode() recomputes the
    pre-activations, which may round differently on another CPU; a row whose k-th and (k+1)-th
    values are closer than that rounding may then keep either latent, so only its values are
    compared there."""
    tol = 1e-5 * max(1.0, pre.abs().max().item())
    top = pre.topk(k + 1).values
    clear_rows = (top[:, k - 1] - top[:, k]) > tol
    torch.testing.assert_close(latents[clear_rows], expected[clear_rows], rtol=0, atol=tol)
    torch.testing.assert_close(latents.sort(dim=1).values, expected.sort(dim=1).values, rtol=0, atol=tol)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_keeps_exactly_k_and_matches_naive(k):
    sae = random_sae(TopKSAEConfig(sparse_dim=16, k=k))
    x = torch.randn(20, 1, 6) + 3.0
    pre = sae.pre_activations(x)
    latents = sae.encode(x)
    assert_same_topk(latents, naive_topk(pre, k), pre, k)
    positive_rows = (pre.topk(k).values > 0).all(dim=1)
    assert ((latents != 0).sum(dim=1)[positive_rows] == k).all()


def test_vanilla_loss_matches_hand_computation():
    sae = random_sae(VanillaSAEConfig(sparse_dim=5), n_sources=1, d_in=3)
    x = torch.randn(4, 1, 3)
    out = sae(x)
    W_enc, b_enc, W_dec, b_dec = sae.W_enc[:, 0].t(), sae.b_enc, sae.W_dec[:, 0], sae.b_dec[0]
    mse_total, sparsity_total = 0.0, 0.0
    for row in x[:, 0]:
        f = torch.relu((row - b_dec) @ W_enc + b_enc)
        x_hat = f @ W_dec + b_dec
        mse_total += ((x_hat - row) ** 2).sum()
        sparsity_total += sum(f[i] * W_dec[i].norm() for i in range(5))
    assert torch.allclose(out.mse, mse_total / 4, atol=1e-6)
    assert torch.allclose(out.sparsity, sparsity_total / 4, atol=1e-6)


def test_crosscoder_loss_matches_hand_computation():
    """Anthropic's crosscoder: summed per-source encoders, per-source MSE summed, and
    lambda * sum_i f_i * sum_s ||W_dec[s, i]||."""
    n_sources, d_in, d_sae = 3, 4, 6
    sae = random_sae(VanillaSAEConfig(sparse_dim=d_sae), n_sources, d_in)
    x = torch.randn(5, n_sources, d_in)
    out = sae(x)
    mse_total, sparsity_total = 0.0, 0.0
    for row in x:
        pre = sae.b_enc.clone()
        for s in range(n_sources):
            pre += (row[s] - sae.b_dec[s]) @ sae.W_enc[:, s].t()
        f = torch.relu(pre)
        for s in range(n_sources):
            x_hat_s = f @ sae.W_dec[:, s] + sae.b_dec[s]
            mse_total += ((x_hat_s - row[s]) ** 2).sum()
        sparsity_total += sum(f[i] * sum(sae.W_dec[i, s].norm() for s in range(n_sources)) for i in range(d_sae))
    assert torch.allclose(out.mse, mse_total / 5, atol=1e-5)
    assert torch.allclose(out.sparsity, sparsity_total / 5, atol=1e-5)


@pytest.mark.parametrize("cfg", [VanillaSAEConfig(sparse_dim=8), TopKSAEConfig(sparse_dim=8, k=3)])
def test_one_source_crosscoder_is_the_plain_sae(cfg):
    """A plain SAE written with 2-D weights gives the same codes and reconstruction."""
    sae = random_sae(cfg, n_sources=1, d_in=5)
    x = torch.randn(7, 5)
    W_enc, W_dec, b_enc, b_dec = sae.W_enc[:, 0].t(), sae.W_dec[:, 0], sae.b_enc, sae.b_dec[0]
    pre = (x - b_dec) @ W_enc + b_enc
    f = torch.relu(pre) if cfg.type == "vanilla" else naive_topk(pre, cfg.k)
    out = sae(x[:, None])
    assert torch.allclose(out.dense_latents(8), f, atol=1e-6)
    assert torch.allclose(out.x_hat[:, 0], f @ W_dec + b_dec, atol=1e-6)


def test_init_ties_encoder_to_decoder_and_topk_decoder_rows_are_unit_norm():
    torch.manual_seed(0)
    sae = build_sae(TopKSAEConfig(sparse_dim=10, k=2), n_sources=2, d_in=3)
    assert torch.allclose(sae.W_enc, sae.W_dec)
    assert torch.allclose(sae.W_dec.flatten(1).norm(dim=1), torch.ones(10))


def test_topk_decoder_stays_unit_norm_after_a_step():
    sae = random_sae(TopKSAEConfig(sparse_dim=10, k=2), n_sources=2, d_in=3)
    sae.after_optimizer_step()
    optimizer = torch.optim.Adam(sae.parameters(), lr=0.1)
    out = sae(torch.randn(16, 2, 3))
    out.mse.backward()
    sae.before_optimizer_step()
    optimizer.step()
    sae.after_optimizer_step()
    assert torch.allclose(sae.W_dec.flatten(1).norm(dim=1), torch.ones(10), atol=1e-6)


def test_auxk_is_zero_without_dead_latents_and_trains_only_dead_ones():
    cfg = TopKSAEConfig(sparse_dim=12, k=2, k_aux=4, aux_coef=1.0)
    sae = random_sae(cfg, n_sources=1, d_in=4)
    x = torch.randn(32, 1, 4)
    assert sae(x, None).aux.item() == 0.0
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[1, 5, 7]] = True
    out = sae(x, torch.tensor([1, 5, 7]))
    assert out.aux.item() > 0
    sae.zero_grad()
    out.aux.backward()
    rows_with_grad = sae.W_dec.grad.flatten(1).abs().sum(dim=1) > 0
    assert rows_with_grad[dead].any() and not rows_with_grad[~dead].any()


def test_auxk_matches_hand_computation():
    cfg = TopKSAEConfig(sparse_dim=6, k=1, k_aux=2, aux_coef=0.5)
    sae = random_sae(cfg, n_sources=1, d_in=3)
    x = torch.randn(8, 1, 3)
    dead = torch.tensor([False, True, True, True, False, False])
    out = sae(x, torch.tensor([1, 2, 3]))
    pre = sae.pre_activations(x)
    e = (x - out.x_hat)[:, 0]
    e_hat = torch.zeros_like(e)
    for r in range(8):
        dead_values = {i: pre[r, i].item() for i in range(6) if dead[i]}
        for i in sorted(dead_values, key=dead_values.get, reverse=True)[:2]:
            e_hat[r] += max(dead_values[i], 0.0) * sae.W_dec[i, 0]
    expected = 0.5 * ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert torch.allclose(out.aux, expected, atol=1e-5)


def test_folding_the_input_scale_keeps_outputs_in_raw_units():
    sae = random_sae(TopKSAEConfig(sparse_dim=8, k=3), n_sources=2, d_in=4)
    scale = torch.tensor([0.5, 3.0])
    x_raw = torch.randn(10, 2, 4)
    x_hat_scaled = sae(x_raw * scale[:, None]).x_hat
    sae.fold_input_scale(scale)
    assert torch.allclose(sae(x_raw).x_hat, x_hat_scaled / scale[:, None], atol=1e-5)


@pytest.mark.parametrize("keys, message", [
    (dict(sparse_dim=2048, k=5000), r"sae.k must be in \(0, sae.sparse_dim=2048\], got 5000"),
    (dict(sparse_dim=16, k=0), r"sae.k must be in \(0, sae.sparse_dim=16\], got 0"),
    (dict(sparse_dim=0), "sae.sparse_dim must be > 0"),
    (dict(k_aux=0), "sae.k_aux must be > 0"),
])
def test_bad_sae_config_is_refused(keys, message):
    with pytest.raises(ValueError, match=message):
        TopKSAEConfig(**keys)


def dense_topk_reference(params: dict, x: torch.Tensor, k: int, k_aux: int, aux_coef: float, sparsity_coef: float,
                         dead: list[int]) -> torch.Tensor:
    """The whole TopK loss written densely from the parameters: [batch, d_sae] latents, dense decode."""
    W_enc, W_dec, b_enc, b_dec = params["W_enc"], params["W_dec"], params["b_enc"], params["b_dec"]
    d_sae = W_enc.shape[0]
    pre = (x - b_dec).flatten(1) @ W_enc.flatten(1).t() + b_enc
    values, indices = pre.topk(k, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    x_hat = (latents @ W_dec.flatten(1)).view_as(x) + b_dec
    loss = (x_hat - x).pow(2).sum(dim=(1, 2)).mean()
    loss = loss + sparsity_coef * (latents * W_dec.norm(dim=-1).sum(dim=1)).sum(dim=1).mean()
    if dead:
        mask = torch.zeros(d_sae, dtype=torch.bool)
        mask[dead] = True
        aux_values, aux_indices = pre.masked_fill(~mask, float("-inf")).topk(min(k_aux, len(dead)), dim=-1)
        aux_latents = torch.zeros_like(pre).scatter(-1, aux_indices, aux_values.relu())
        e = (x - x_hat).detach()
        e_hat = (aux_latents @ W_dec.flatten(1)).view_as(e)
        loss = loss + aux_coef * (e_hat - e).pow(2).sum() / (e - e.mean(dim=0)).pow(2).sum()
    return loss


@pytest.mark.parametrize("n_sources, dead, sparsity_coef", [
    (1, [], 0.0), (1, [0, 3, 5, 9, 17, 30], 0.0), (3, [2, 4, 8, 11, 40], 0.0), (2, [], 0.1),
])
def test_sparse_topk_step_matches_the_dense_computation(n_sources, dead, sparsity_coef):
    """Same loss and same gradients for every parameter (the kernels in sae/saes/sparse_ops.py)."""
    cfg = TopKSAEConfig(sparse_dim=48, k=5, k_aux=4, aux_coef=0.5, sparsity_coef=sparsity_coef)
    sae = random_sae(cfg, n_sources=n_sources, d_in=7, seed=3)
    x = torch.randn(64, n_sources, 7)
    out = sae(x, torch.tensor(dead) if dead else None)
    assert out.indices is not None  # the sparse path ran
    loss = out.mse + sparsity_coef * out.sparsity + out.aux
    sae.zero_grad()
    loss.backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    params = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
    reference = dense_topk_reference(params, x, cfg.k, cfg.k_aux, cfg.aux_coef, sparsity_coef, dead)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    for name, grad in sparse_grads.items():
        torch.testing.assert_close(grad, params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_sparse_path_records_fired_latents_and_l0_without_dense_codes():
    sae = random_sae(TopKSAEConfig(sparse_dim=20, k=3), n_sources=1, d_in=5)
    x = torch.randn(6, 1, 5)
    out = sae(x)
    dense = sae.encode(x)
    assert out.latents.shape == (6, 3) and torch.equal(out.dense_latents(20), dense)
    assert torch.equal(out.fired(20), (dense > 0).any(dim=0))
    assert torch.equal(out.l0(), (dense != 0).sum(dim=1).float())


def test_inputs_that_need_gradients_take_the_dense_path():
    sae = random_sae(TopKSAEConfig(sparse_dim=20, k=3), n_sources=1, d_in=5)
    x = torch.randn(6, 1, 5, requires_grad=True)
    out = sae(x)
    out.mse.backward()
    assert out.indices is None and x.grad is not None and x.grad.abs().sum() > 0


def test_an_unverified_checkpoint_must_be_adopted_and_the_early_layout_is_refused(tmp_path):
    import json

    from safetensors.torch import save_file

    from sae.atomic_io import write_manifest
    from sae.saes import InvalidCheckpointError, load

    sae = random_sae(TopKSAEConfig(sparse_dim=8, k=2), n_sources=2, d_in=3)
    save_file({k: v.detach().clone() for k, v in sae.state_dict().items()}, str(tmp_path / "sae.safetensors"))
    meta = {"sae": {"type": "topk", "sparse_dim": 8, "k": 2}, "n_sources": 2, "d_in": 3}
    (tmp_path / "sae.json").write_text(json.dumps({**meta, "weights_format": 2}))
    with pytest.raises(InvalidCheckpointError, match="no manifest.json .*adopt it with sae.atomic_io.write_manifest"):
        load(tmp_path)  # unverifiable until the user adopts it
    write_manifest(tmp_path)
    assert torch.equal(load(tmp_path).W_enc, sae.W_enc)
    (tmp_path / "sae.json").write_text(json.dumps(meta))  # no weights_format: the first sessions' layout
    write_manifest(tmp_path)
    with pytest.raises(InvalidCheckpointError, match="weights_format 1 \\(an early layout\\) is not read any more"):
        load(tmp_path)


def test_sparse_topk_under_bfloat16_autocast_gives_float32_gradients_close_to_float32():
    sae = random_sae(TopKSAEConfig(sparse_dim=48, k=5, k_aux=4), n_sources=2, d_in=7, seed=4)
    x = torch.randn(64, 2, 7)
    grads = []
    for dtype in (None, torch.bfloat16):
        sae.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = sae(x, torch.tensor([0, 1, 2, 3]))
        (out.mse + out.aux).backward()
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters()})
    for name, grad in grads[1].items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
        # bf16 may pick a different latent near a row's k-th value, so compare whole-tensor error
        assert (grad - grads[0][name]).norm() < 0.1 * grads[0][name].norm(), name


# -- BatchTopK -------------------------------------------------------------------------------------

def naive_batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """A Python loop over every entry of the batch: keep the k x batch largest (ReLU'd)."""
    entries = sorted(((value, r, i) for r, row in enumerate(pre.tolist()) for i, value in enumerate(row)),
                     reverse=True)[: k * len(pre)]
    out = torch.zeros_like(pre)
    for value, r, i in entries:
        out[r, i] = max(value, 0.0)
    return out


@pytest.mark.parametrize("n_sources", [1, 2])
def test_batchtopk_keeps_k_times_batch_over_the_whole_batch_and_matches_naive(n_sources):
    from sae.saes.batchtopk import BatchTopKSAEConfig

    k = 3
    sae = random_sae(BatchTopKSAEConfig(sparse_dim=16, k=k), n_sources=n_sources)
    x = torch.randn(20, n_sources, 6) + 3.0
    pre = sae.pre_activations(x)
    latents = sae(x).dense_latents(16)
    expected = naive_batch_topk(pre, k)
    tol = 1e-5 * max(1.0, pre.abs().max().item())
    flat = pre.relu().flatten().sort(descending=True).values
    if flat[k * 20 - 1] - flat[k * 20] > tol:  # no near-tie at the cut: the same entries
        torch.testing.assert_close(latents, expected, rtol=0, atol=tol)
    assert (latents != 0).sum() == k * 20  # the batch holds exactly k x batch active latents ...
    assert len(set((latents != 0).sum(dim=1).tolist())) > 1  # ... spread unevenly over the rows


def test_batchtopk_threshold_is_the_moving_average_of_the_smallest_kept_activation():
    from sae.saes.batchtopk import BatchTopKSAEConfig

    sae = random_sae(BatchTopKSAEConfig(sparse_dim=16, k=2, threshold_decay=0.9))
    expected = None
    for seed in range(3):
        x = torch.randn(10, 1, 6, generator=torch.Generator().manual_seed(seed)) + 3.0
        latents = sae(x).dense_latents(16)
        smallest = latents[latents > 0].min().item()
        expected = smallest if expected is None else 0.9 * expected + 0.1 * smallest
    assert sae.threshold.item() == pytest.approx(expected, rel=1e-6)
    sae.eval()  # inference: a JumpReLU at the threshold, whatever the batch
    x = torch.randn(7, 1, 6) + 3.0
    pre = sae.pre_activations(x)
    assert torch.equal(sae.encode(x), torch.where(pre > sae.threshold, pre, torch.zeros_like(pre)))
    before = sae.threshold.clone()
    sae(x)
    assert torch.equal(sae.threshold, before)  # evaluation never moves it


def test_batchtopk_saves_and_loads_its_threshold(tmp_path, host_cache):
    from sae.saes import load
    from sae.saes.batchtopk import BatchTopKSAEConfig
    from sae.training.checkpoint import checkpoint_dirs
    from sae.jobs import run_training
    from tests.conftest import tiny_train_config

    cfg = tiny_train_config(host_cache, sae=BatchTopKSAEConfig(sparse_dim=64, k=4, k_aux=16, dead_window=128))
    summary = run_training(cfg, tmp_path / "run")
    loaded = load(checkpoint_dirs(tmp_path / "run")[0])
    assert loaded.threshold.item() > 0 and loaded.threshold_updates.item() == cfg.num_steps
    # θ calibrated on the training rows (the tiny table is smaller than the calibration sample: all of
    # them): the train split keeps k latents a row on average, all but the entry at the cut
    assert summary["eval/train/l0"] == pytest.approx(cfg.sae.k, abs=0.05)
    assert 0 < summary["eval/test/l0"] < 64
    # loaded for inference: each row is encoded on its own (the threshold), not ranked against the batch
    assert not loaded.training
    x = torch.randn(32, 1, loaded.d_in)
    torch.testing.assert_close(loaded.encode(x)[:1], loaded.encode(x[:1]))
    from sae.analysis.steering import source_view

    view = source_view(loaded, 0)
    assert not view.training and view.threshold.item() == loaded.threshold.item()
    torch.testing.assert_close(view.encode(x), loaded.encode(x))  # one source: the view is the SAE


@pytest.mark.parametrize("config", [VanillaSAEConfig(sparse_dim=16), TopKSAEConfig(sparse_dim=16, k=3)],
                         ids=["vanilla", "topk"])
def test_a_one_source_sae_takes_2d_input_explicitly_and_refuses_other_shapes(config):
    torch.manual_seed(0)
    sae = build_sae(config, 1, 8)
    x = torch.randn(5, 8)
    flat, shaped = sae(x), sae(x[:, None])
    assert flat.x_hat.shape == (5, 8)
    torch.testing.assert_close(flat.x_hat, shaped.x_hat[:, 0])
    torch.testing.assert_close(flat.dense_latents(16), shaped.dense_latents(16))
    torch.testing.assert_close(sae.encode(x), sae.encode(x[:, None]))
    with pytest.raises(ValueError, match=r"input of shape \(5, 7\): this SAE takes \[batch, 1, 8\] or \[batch, 8\]"):
        sae(torch.randn(5, 7))
    crosscoder = build_sae(config, 2, 8)
    with pytest.raises(ValueError, match=r"input of shape \(5, 8\): this SAE takes \[batch, 2, 8\]$"):
        crosscoder.encode(x)


def test_load_takes_a_run_dir_and_skips_a_newer_corrupt_checkpoint(tmp_path, host_cache, caplog):
    from sae.saes import InvalidCheckpointError, checkpoint_dirs, load
    from sae.jobs import run_training
    from tests.conftest import tiny_train_config

    run_training(tiny_train_config(host_cache, num_steps=30, checkpoint_every=10), tmp_path / "run")
    newest, older = checkpoint_dirs(tmp_path / "run")[:2]
    torch.testing.assert_close(load(tmp_path / "run").W_dec, load(newest).W_dec)
    (newest / "sae.safetensors").write_bytes(b"not the weights")
    with caplog.at_level("WARNING"):
        assert torch.equal(load(tmp_path / "run").W_dec, load(older).W_dec)
    assert f"Skipping checkpoint {newest.name}" in caplog.text
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(InvalidCheckpointError, match="holds no valid checkpoint"):
        load(empty)


def test_batchtopk_keeps_both_copies_of_a_row_drawn_twice():
    """Batches are drawn with replacement: a duplicated row ties with itself at every entry. Every
    entry tied with the (k x batch)-th value is kept, so both copies get the same codes (the old
    rule kept whichever copy torch.topk picked, which a batch split over processes cannot repeat)."""
    from sae.saes.batchtopk import batch_topk

    torch.manual_seed(0)
    pre = torch.randn(8, 32)
    pre[5] = pre[2]
    cut = pre.relu().flatten().sort(descending=True).values[3 * 8 - 1]
    pre[2, 0] = pre[5, 0] = cut + 1e-3  # a duplicated entry just above the cut ...
    budget_value = pre.relu().flatten().sort(descending=True).values[3 * 8 - 1]
    pre[2, 1] = pre[5, 1] = budget_value  # ... and one exactly at it
    latents, _ = batch_topk(pre, k=3)
    assert torch.equal(latents[2], latents[5])
    assert latents[2, 1] == budget_value
    assert (latents != 0).sum() >= 3 * 8



@pytest.mark.parametrize("floor", [None, 0.0, 0.5, 1.5, 2.2, 10.0])
def test_largest_entries_from_candidates_above_a_floor_are_those_of_a_full_topk(floor):
    """Whether the floor leaves enough candidates (0.5, 1.5), too few (2.2, 10: the fallback) or is
    unset, the same multiset of values as a full topk."""
    from sae.saes.batchtopk import largest_entries

    flat = torch.randn(4000, generator=torch.Generator().manual_seed(1)).relu()
    budget = 200  # the 200th largest of 4000 standard normals is about 1.64
    expected = flat.topk(budget).values
    got = largest_entries(flat, budget, floor).sort(descending=True).values
    assert torch.equal(got, expected)


def test_batchtopk_training_steps_select_as_a_full_ranking_does():
    """Successive CPU forwards look for the batch's top entries above 0.9 x the last cut; the codes are
    those of the naive reference at every step, including a step whose data moved the cut far down
    (the candidates are too few and the full ranking is used)."""
    from sae.saes.batchtopk import BatchTopKSAEConfig

    sae = random_sae(BatchTopKSAEConfig(sparse_dim=16, k=3))
    generator = torch.Generator().manual_seed(4)
    for shift in (3.0, 3.0, 3.1, 0.5):
        x = torch.randn(20, 1, 6, generator=generator) + shift
        pre = sae.pre_activations(x)
        latents = sae(x).dense_latents(16)
        expected = naive_batch_topk(pre, 3)
        tol = 1e-5 * max(1.0, pre.abs().max().item())  # the step recomputes pre: another CPU may round it apart
        ranked = pre.relu().flatten().sort(descending=True).values
        if ranked[3 * 20 - 1] - ranked[3 * 20] > tol:  # no near-tie at the cut: the same entries
            assert torch.equal(latents != 0, expected != 0)
            torch.testing.assert_close(latents, expected, rtol=0, atol=tol)
        assert (latents != 0).sum() == 3 * 20
        assert sae.last_cut == pytest.approx(latents[latents > 0].min().item())


@pytest.mark.parametrize("chunk", [7, 512])
def test_batchtopk_calibration_sets_the_cut_of_the_sample_taken_as_one_batch(chunk, monkeypatch):
    """θ = the (k x rows)-th largest ReLU'd pre-activation of the sample, however it is chunked; at
    inference the sample's rows then keep k latents a row on average (all but the one at the cut)."""
    from sae.saes import batchtopk

    monkeypatch.setattr(batchtopk, "CALIBRATION_CHUNK", chunk)
    k, rows = 3, 50
    sae = random_sae(batchtopk.BatchTopKSAEConfig(sparse_dim=16, k=k), n_sources=2)
    sample = torch.randn(rows, 2, 6, generator=torch.Generator().manual_seed(2)) + 1.0
    sae.calibrate_for_inference(sample)
    pre = sae.pre_activations(sample)
    entries = sorted(max(value, 0.0) for row in pre.tolist() for value in row)
    tol = 1e-5 * max(1.0, pre.abs().max().item())  # chunks are multiplied apart: rounding may differ per CPU
    assert sae.threshold.item() == pytest.approx(entries[-k * rows], abs=tol)
    sae.eval()
    # θ is one of the entries: encode's recomputed copy of it (or of a near-tie) may round to either side
    near = sum(abs(value - sae.threshold.item()) <= tol for value in entries)
    assert abs((sae.encode(sample) != 0).sum().item() - (k * rows - 1)) <= near


def test_batchtopk_without_calibration_keeps_the_training_estimate():
    from sae.saes.batchtopk import BatchTopKSAEConfig

    sae = random_sae(BatchTopKSAEConfig(sparse_dim=16, k=3, calibrate_threshold=False))
    sae(torch.randn(20, 1, 6) + 3.0)
    estimate = sae.threshold.clone()
    sae.calibrate_for_inference(torch.randn(50, 1, 6))
    assert torch.equal(sae.threshold, estimate)



def loss_and_grads(sae, x, dead, sparsity_coef):
    out = sae(x, torch.tensor(dead, device=x.device) if dead else None)
    loss = out.mse + sparsity_coef * out.sparsity + out.aux
    sae.zero_grad()
    loss.backward()
    return out, loss.detach(), {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
@pytest.mark.parametrize("n_sources, dead, sparsity_coef", [
    (1, [], 0.0), (1, [0, 3, 5, 9, 17, 30], 0.0), (3, [2, 4, 8, 11, 40], 0.0), (2, [], 0.1),
])
def test_sparse_batchtopk_step_matches_the_dense_computation(architecture, n_sources, dead, sparsity_coef):
    """The sparse kernels (kept entries only, any number per row) against the dense forward, which
    an input that needs gradients takes: same codes, loss and gradient of every parameter."""
    from sae.saes import BatchTopKSAEConfig, MatryoshkaSAEConfig

    config = BatchTopKSAEConfig if architecture == "batchtopk" else MatryoshkaSAEConfig
    cfg = config(sparse_dim=48, k=5, k_aux=4, aux_coef=0.5, sparsity_coef=sparsity_coef)
    sae = random_sae(cfg, n_sources=n_sources, d_in=7, seed=3)
    x = torch.randn(64, n_sources, 7)
    sparse_out, sparse_loss, sparse_grads = loss_and_grads(sae, x, dead, sparsity_coef)
    assert sparse_out.rows is not None  # the sparse path ran
    dense_out, dense_loss, dense_grads = loss_and_grads(sae, x.clone().requires_grad_(), dead, sparsity_coef)
    assert dense_out.rows is None and dense_out.indices is None
    torch.testing.assert_close(sparse_out.dense_latents(48), dense_out.latents)
    torch.testing.assert_close(sparse_out.l0(), dense_out.l0())
    torch.testing.assert_close(sparse_out.fire_counts(48), dense_out.fire_counts(48))
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-5)
    for name, grad in sparse_grads.items():
        torch.testing.assert_close(grad, dense_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# -- JumpReLU --------------------------------------------------------------------------------------

def naive_jumprelu_grads(sae, x: torch.Tensor, coef: float) -> tuple[float, dict]:
    """The paper's estimators written out entry by entry (loops), for loss = mse + coef * L0."""
    eps = sae.cfg.bandwidth
    W_enc, W_dec, b_enc, b_dec = (sae.W_enc.detach().clone().requires_grad_(), sae.W_dec.detach(),
                                  sae.b_enc.detach().clone().requires_grad_(), sae.b_dec.detach())
    theta = sae.log_threshold.detach().exp()
    pre = (x - b_dec).flatten(1) @ W_enc.flatten(1).t() + b_enc
    gate = (pre > theta).float().detach()  # H: no gradient to z
    latents = pre * gate
    x_hat = (latents @ W_dec.flatten(1)).view_as(x) + b_dec
    mse = (x_hat - x).pow(2).sum(dim=(1, 2)).mean()
    l0 = gate.sum(dim=1).mean()
    mse.backward()
    grad_latents = (2 * (x_hat - x).flatten(1) @ W_dec.flatten(1).t() / len(x)).detach()
    grad_theta = torch.zeros_like(theta)
    z = pre.detach()
    for b in range(z.shape[0]):
        for i in range(z.shape[1]):
            if abs((z[b, i] - theta[i]) / eps) < 0.5:
                grad_theta[i] += grad_latents[b, i] * -(theta[i] / eps)  # through f
                grad_theta[i] += coef / len(x) * -(1 / eps)  # through L0
    return (mse + coef * l0).item(), {"W_enc": W_enc.grad, "b_enc": b_enc.grad,
                                      "log_threshold": grad_theta * theta}  # chain rule to log θ


@pytest.mark.parametrize("n_sources", [1, 2])
def test_jumprelu_matches_the_papers_estimators_written_out(n_sources):
    from sae.saes.jumprelu import JumpReLUSAEConfig

    cfg = JumpReLUSAEConfig(sparse_dim=24, bandwidth=0.5, init_threshold=0.3)
    sae = random_sae(cfg, n_sources=n_sources, d_in=6, seed=7)
    x = torch.randn(40, n_sources, 6)
    out = sae(x)
    pre, theta = sae.pre_activations(x), sae.threshold()  # (random_sae moved θ away from 0.3 per latent)
    torch.testing.assert_close(out.latents, pre * (pre > theta))
    coef = 0.7
    loss = out.mse + coef * out.sparsity
    sae.zero_grad()
    loss.backward()
    expected_loss, expected = naive_jumprelu_grads(sae, x, coef)
    assert abs(loss.item() - expected_loss) < 1e-4 * max(1.0, expected_loss)
    assert expected["log_threshold"].abs().sum() > 0, "some pre-activations must fall in the kernel's window"
    for name, grad in expected.items():
        torch.testing.assert_close(dict(sae.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-5, msg=name)
    assert out.sparsity.item() == (pre > theta).sum(dim=1).float().mean().item()


@pytest.mark.parametrize("n_sources", [1, 2])
def test_jumprelu_init_l0_sets_each_threshold_so_the_sample_has_that_l0(n_sources, monkeypatch):
    import sae.saes.jumprelu as jumprelu
    from sae.activations.batches import calibration_sample

    monkeypatch.setattr(jumprelu, "CALIBRATION_LATENTS", 7)  # several latent chunks, one of them partial
    sae = random_sae(jumprelu.JumpReLUSAEConfig(sparse_dim=24, init_l0=6), n_sources=n_sources, d_in=5, seed=2)
    table = torch.randn(1000, n_sources, 5) + 0.5
    sample = calibration_sample(table, n=400)
    assert len(sample) == 400 and torch.equal(sample, calibration_sample(table, n=400))  # same rows every time
    sae.init_from_data(sample)
    fires = (sae.pre_activations(sample) > sae.threshold()).float()
    # each latent fires on 400 x 6/24 = 100 rows, except where the floor θ >= 1e-3 binds
    floored = sae.threshold() <= 1e-3 + 1e-9
    assert (fires.sum(dim=0)[~floored] == 100).all() and floored.sum() < 24
    assert fires.sum(dim=1).mean().item() == pytest.approx(6, abs=0.5)
    untouched = random_sae(jumprelu.JumpReLUSAEConfig(sparse_dim=24), n_sources=n_sources, d_in=5, seed=2)
    before = untouched.log_threshold.clone()
    untouched.init_from_data(sample)  # init_l0 null: θ stays as initialised
    assert torch.equal(untouched.log_threshold, before)


# -- Matryoshka ------------------------------------------------------------------------------------

def test_matryoshka_loss_is_the_mean_of_each_prefix_reconstructing_alone():
    """Against a loop that decodes each prefix from scratch (dense), loss and every gradient."""
    from sae.saes.batchtopk import batch_topk
    from sae.saes.matryoshka import MatryoshkaSAEConfig

    cfg = MatryoshkaSAEConfig(sparse_dim=32, k=4, prefix_fractions=[0.125, 0.5, 1.0])
    sae = random_sae(cfg, n_sources=2, d_in=5, seed=8)
    x = torch.randn(30, 2, 5)
    out = sae(x)
    sae.zero_grad()
    out.mse.backward()
    params = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
    pre = (x - params["b_dec"]).flatten(1) @ params["W_enc"].flatten(1).t() + params["b_enc"]
    latents, _ = batch_topk(pre, 4)
    losses = []
    for m in (4, 16, 32):
        x_hat = (latents[:, :m] @ params["W_dec"][:m].flatten(1)).view_as(x) + params["b_dec"]
        losses.append((x_hat - x).pow(2).sum(dim=(1, 2)).mean())
    reference = sum(losses) / 3
    reference.backward()
    torch.testing.assert_close(out.mse, reference.detach())
    torch.testing.assert_close(out.x_hat, x_hat.detach())  # the full dictionary's reconstruction
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("fractions", [[0.5, 0.25, 1.0], [0.25, 0.5], [0.001, 1.0], []])
def test_matryoshka_refuses_prefixes_that_do_not_nest(fractions):
    from sae.saes.matryoshka import MatryoshkaSAEConfig

    with pytest.raises(ValueError, match="sae.prefix_fractions"):
        MatryoshkaSAEConfig(sparse_dim=64, prefix_fractions=fractions)


@pytest.mark.parametrize("n_sources", [1, 2])
def test_gated_matches_the_papers_equations_written_out(n_sources):
    """Rajamanoharan et al. 2024, eqs. (5)-(9), per source with W_mag built explicitly and the
    auxiliary decoder as detached copies: loss terms and every parameter's gradient."""
    from sae.saes.gated import GatedSAEConfig

    sae = random_sae(GatedSAEConfig(sparse_dim=16), n_sources=n_sources, d_in=5, seed=3).double()
    with torch.no_grad():
        sae.r_mag.copy_(torch.randn(16, dtype=torch.float64) * 0.5)
        sae.b_mag.copy_(torch.randn(16, dtype=torch.float64) * 0.3)
    x = torch.randn(30, n_sources, 5, dtype=torch.float64)
    coef = 0.3
    out = sae(x)
    sae.zero_grad()
    (out.mse + coef * out.sparsity + out.aux).backward()

    params = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    W_gate, b_gate, W_dec, b_dec = params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"]
    W_mag = params["r_mag"].exp()[:, None, None] * W_gate  # (W_mag)_ij = exp(r_mag)_i (W_gate)_ij
    pi_gate = sum((x[:, s] - b_dec[s]) @ W_gate[:, s].t() for s in range(n_sources)) + b_gate
    pi_mag = sum((x[:, s] - b_dec[s]) @ W_mag[:, s].t() for s in range(n_sources)) + params["b_mag"]
    f = (pi_gate > 0).double() * torch.relu(pi_mag)
    x_hat = torch.stack([f @ W_dec[:, s] + b_dec[s] for s in range(n_sources)], dim=1)
    gate = torch.relu(pi_gate)
    x_frozen = torch.stack([gate @ W_dec[:, s].detach() + b_dec[s].detach() for s in range(n_sources)], dim=1)
    mse = ((x - x_hat) ** 2).sum() / len(x)
    l1 = (gate * W_dec.norm(dim=-1).sum(dim=1)).sum() / len(x)  # decoder-norm weighted (module docstring)
    aux = ((x - x_frozen) ** 2).sum() / len(x)
    (mse + coef * l1 + aux).backward()
    torch.testing.assert_close(out.latents, f.detach())
    torch.testing.assert_close(sae.encode(x), f.detach())
    for ours, reference in ((out.mse, mse), (out.sparsity, l1), (out.aux, aux)):
        torch.testing.assert_close(ours, reference.detach())
    assert params["r_mag"].grad.abs().sum() > 0 and params["b_enc"].grad.abs().sum() > 0
    for name, param in sae.named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad, rtol=1e-10, atol=1e-12, msg=name)


def test_gated_folds_the_input_scale_and_restarts_its_magnitude_path():
    from sae.saes.gated import GatedSAEConfig

    sae = random_sae(GatedSAEConfig(sparse_dim=12), n_sources=2, d_in=4, seed=1)
    with torch.no_grad():
        sae.r_mag.normal_()
        sae.b_mag.normal_()
    x = torch.randn(20, 2, 4)
    scale = torch.tensor([0.5, 3.0])
    before = sae.encode(x * scale[:, None])
    sae.fold_input_scale(scale)
    torch.testing.assert_close(sae.encode(x), before, rtol=1e-5, atol=1e-6)
    sae.restart_latents(torch.tensor([2, 5]))
    assert sae.r_mag[[2, 5]].eq(0).all() and sae.b_mag[[2, 5]].eq(0).all() and sae.r_mag[0] != 0
