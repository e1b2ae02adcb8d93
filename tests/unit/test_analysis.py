"""Analysis library: latent tables, Fourier view, model diffing; against brute-force references."""
import math

import pytest
import torch

from sae.analysis.diffing import (decoder_cosines, exclusivity_check, plot_relative_norms, relative_decoder_norms,
                                  split_latents)
from sae.analysis.fourier import dominant_frequencies, grid_power, key_frequencies
from sae.analysis.latents import firing_frequency, latent_grid, top_activating
from sae.errors import UserInputError
from sae.host_models.config import TokenPositions
from sae.saes import build_sae
from sae.saes.topk import TopKSAEConfig
from sae.saes.vanilla import VanillaSAEConfig
from sae.tasks.modular import Operation
from sae.activations.modular import load_activation_data
from tests.conftest import TINY_P, tiny_host, tiny_task


@pytest.fixture(scope="module")
def mixed_data(host_cache):
    task = tiny_task(name="mixed", operations=[Operation.addition, Operation.division])
    return load_activation_data(task, tiny_host(host_cache), normalize=False, device="cpu")


def test_latent_grid_holds_each_pairs_codes_at_its_a_and_b(mixed_data):
    torch.manual_seed(0)
    sae = build_sae(TopKSAEConfig(sparse_dim=16, k=3), 1, mixed_data.train.shape[-1])
    grid = latent_grid(sae, mixed_data)
    p = TINY_P
    assert grid.values.shape == (2, p, p, 16)
    assert int(grid.exists[0].sum()) == p * p and int(grid.exists[1].sum()) == p * (p - 1)  # b = 0 has no division
    assert not grid.exists[1, :, 0].any()
    dataset = mixed_data.dataset
    tokens = dataset.tokens[~dataset.is_train][5]  # a held-out pair, found through the dataset
    op = int(dataset.op_ids[~dataset.is_train][5])
    expected = sae.encode(mixed_data.test[5:6])[0]
    torch.testing.assert_close(grid.values[op, tokens[0], tokens[2]], expected.detach(), rtol=0, atol=1e-6)
    assert not grid.is_train[op, tokens[0], tokens[2]]
    assert int(grid.is_train.sum()) == int(dataset.is_train.sum())


def test_firing_frequency_and_top_inputs_match_brute_force(mixed_data):
    torch.manual_seed(1)
    sae = build_sae(VanillaSAEConfig(sparse_dim=8), 1, mixed_data.train.shape[-1])
    grid = latent_grid(sae, mixed_data)
    freq = firing_frequency(grid, "test")
    for op in range(2):
        mask = grid.exists[op] & ~grid.is_train[op]
        for latent in range(8):
            brute = sum(1 for a in range(TINY_P) for b in range(TINY_P)
                        if mask[a, b] and grid.values[op, a, b, latent] > 0) / int(mask.sum())
            assert freq[op, latent].item() == pytest.approx(brute)
    top = top_activating(grid, latent=3, n=4)
    values = [row["value"] for row in top]
    assert values == sorted(values, reverse=True)
    assert values[0] == grid.values[..., 3].masked_fill(~grid.exists, -1e9).max().item()
    assert top[0]["op"] in ("addition", "division")


def test_latent_grid_refuses_data_from_all_positions(mixed_data):
    import dataclasses

    all_positions = dataclasses.replace(mixed_data, positions=TokenPositions.all)
    sae = build_sae(TopKSAEConfig(sparse_dim=8, k=2), 1, mixed_data.train.shape[-1])
    with pytest.raises(UserInputError, match="token_positions=answer"):
        latent_grid(sae, all_positions)


def test_fourier_finds_the_frequency_of_a_periodic_grid():
    p, k = 23, 5
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    grid = torch.cos(2 * math.pi * k * (a + b) / p) + 3.0
    power = grid_power(grid)
    assert power.sum().item() == pytest.approx(1.0)
    (ka, kb, share), *_ = dominant_frequencies(power)
    assert (ka, kb) == (k, k) and share == pytest.approx(1.0, abs=1e-6)
    assert grid_power(torch.ones(p, p)).sum().item() == 0.0


def test_key_frequencies_of_an_embedding_built_from_two_frequencies():
    p, d = 23, 16
    n = torch.arange(p)[:, None].double()
    W_E = torch.cat([torch.cos(2 * math.pi * 3 * n / p), torch.sin(2 * math.pi * 3 * n / p),
                     0.7 * torch.cos(2 * math.pi * 7 * n / p), torch.zeros(p, d - 3)], dim=1)
    assert key_frequencies(W_E) == [3, 7]


def crosscoder_with_norms(norms: list[tuple[float, float]]):
    sae = build_sae(TopKSAEConfig(sparse_dim=len(norms), k=1), n_sources=2, d_in=4)
    with torch.no_grad():
        direction = torch.nn.functional.normalize(torch.randn(len(norms), 4), dim=-1)
        for i, (pre, post) in enumerate(norms):
            sae.W_dec[i, 0], sae.W_dec[i, 1] = pre * direction[i], post * direction[i]
    return sae


def test_relative_decoder_norms_split_and_cosines(tmp_path):
    sae = crosscoder_with_norms([(1.0, 0.0), (1.0, 1.0), (0.1, 0.9), (0.6, 0.4)])
    r = relative_decoder_norms(sae)
    assert torch.allclose(r, torch.tensor([0.0, 0.5, 0.9, 0.4]))
    groups = split_latents(r)
    assert groups["pre_only"].tolist() == [0] and groups["shared"].tolist() == [1, 3]
    assert groups["post_only"].tolist() == [2]
    assert torch.allclose(decoder_cosines(sae, groups["shared"]), torch.ones(2))
    report = exclusivity_check(sae, crosscoder_with_norms([(1.0, 1.0)] * 4))
    assert report["l1/shared"] == 0.5 and report["topk/shared"] == 1.0
    among_two = exclusivity_check(sae, crosscoder_with_norms([(1.0, 1.0)] * 4), l1_latents=torch.tensor([0, 1]))
    assert among_two["l1/pre_only"] == 0.5 and among_two["l1/shared"] == 0.5 and among_two["l1/post_only"] == 0.0
    assert plot_relative_norms(r, tmp_path / "r.png").stat().st_size > 0
    with pytest.raises(ValueError, match="needs a crosscoder"):
        relative_decoder_norms(build_sae(TopKSAEConfig(sparse_dim=4, k=1), 1, 4))


def test_clamping_moves_x_along_the_decoder_and_an_empty_clamp_changes_nothing(mixed_data):
    from sae.analysis.steering import clamp_replacement, random_control, steered_metrics
    from sae.metrics.downstream import answer_losses

    torch.manual_seed(2)
    sae = build_sae(VanillaSAEConfig(sparse_dim=12), 1, mixed_data.train.shape[-1])
    x = mixed_data.test[:50]
    assert torch.equal(clamp_replacement(sae, x, torch.tensor([], dtype=torch.long), 5.0), x)
    f = sae.encode(x)
    moved = clamp_replacement(sae, x, torch.tensor([4]), 3.0)
    expected = x + (3.0 - f[:, 4])[:, None, None] * sae.W_dec[4][None].detach()
    torch.testing.assert_close(moved, expected, rtol=1e-5, atol=1e-5)

    clean = steered_metrics(sae, mixed_data, torch.tensor([], dtype=torch.long), 0.0)
    tokens, labels = mixed_data.dataset.test
    _, correct = answer_losses(mixed_data.sources[0].model, tokens, labels)
    assert clean["test/acc"] == pytest.approx(correct.mean().item())
    assert {"test/acc_addition", "test/acc_division", "train/ce"} <= set(clean)
    steered = steered_metrics(sae, mixed_data, torch.arange(12), 50.0)
    assert steered["test/ce"] > clean["test/ce"]

    control = random_control(12, torch.tensor([1, 2, 3]), seed=0)
    assert len(control) == 3 and not set(control.tolist()) & {1, 2, 3}


def test_ablation_attribution_matches_a_brute_force_loop(mixed_data):
    from sae.analysis.attribution import ablation_attribution, latent_codes
    from sae.tasks.modular import op_token

    torch.manual_seed(3)
    sae = build_sae(VanillaSAEConfig(sparse_dim=6), 1, mixed_data.train.shape[-1])
    tokens = mixed_data.dataset.tokens[:3]
    latents = torch.tensor([0, 4])
    attribution = ablation_attribution(sae, mixed_data, tokens, latents)
    assert attribution.shape == (3, 3, 2)
    row, latent = 1, 4
    base = latent_codes(sae, mixed_data, tokens[row:row + 1])[0, latent]
    ops = [op_token(TINY_P, op) for op in mixed_data.dataset.operations]
    for position, candidates in ((0, range(TINY_P)), (1, ops), (2, range(TINY_P))):
        total = 0.0
        for candidate in candidates:
            variant = tokens[row:row + 1].clone()
            variant[0, position] = candidate
            total += latent_codes(sae, mixed_data, variant)[0, latent].item()
        expected = base.item() - total / len(candidates)
        assert attribution[row, position, 1].item() == pytest.approx(expected, abs=1e-5)


def test_clamp_hook_edits_only_the_answer_position_and_needs_one_source():
    from sae.analysis.steering import clamp_hook

    torch.manual_seed(4)
    sae = build_sae(VanillaSAEConfig(sparse_dim=6), 1, 8)
    resid = torch.randn(5, 4, 8)
    assert torch.equal(clamp_hook(sae, torch.tensor([], dtype=torch.long), 1.0)(resid), resid)
    out = clamp_hook(sae, torch.tensor([2]), 4.0)(resid)
    assert torch.equal(out[:, :-1], resid[:, :-1]) and not torch.allclose(out[:, -1], resid[:, -1])
    f = sae.encode(resid[:, -1:].reshape(5, 1, 8))
    torch.testing.assert_close(out[:, -1], resid[:, -1] + (4.0 - f[:, 2])[:, None] * sae.W_dec[2, 0])
    with pytest.raises(ValueError, match="one-source SAE"):
        clamp_hook(build_sae(VanillaSAEConfig(sparse_dim=6), 2, 8), torch.tensor([0]), 1.0)


def test_clamping_every_latent_during_host_training_blocks_learning(tmp_path, host_cache):
    from sae.analysis.steering import train_host_with_clamp
    from sae.host_models.transformer import hook_name
    from sae.host_models.training import HostRecipe

    host = tiny_host(host_cache)
    recipe = HostRecipe(lr=1e-2, num_steps=60, eval_every=10, steps_after_grok=None)
    torch.manual_seed(5)
    sae = build_sae(VanillaSAEConfig(sparse_dim=16), 1, host.d_model)
    free = train_host_with_clamp(tiny_task(), host.architecture(), recipe, tmp_path / "free", sae,
                                 hook_name(1, "resid_post"), torch.tensor([], dtype=torch.long), 0.0)
    clamped = train_host_with_clamp(tiny_task(), host.architecture(), recipe, tmp_path / "clamped", sae,
                                    hook_name(1, "resid_post"), torch.arange(16), 30.0)
    assert free["final"]["train/acc"] > 0.6
    assert clamped["final"]["train/acc"] < free["final"]["train/acc"] - 0.3
    assert (tmp_path / "clamped" / "summary.json").is_file()


def test_neuron_grid_holds_the_hosts_activation_at_each_pair(mixed_data):
    from sae.analysis.latents import neuron_grid

    source = mixed_data.sources[0]
    grid = neuron_grid(source.model, mixed_data.dataset, source.hook)
    dataset = mixed_data.dataset
    tokens, op = dataset.tokens[7], int(dataset.op_ids[7])
    expected = source.model.capture(tokens[None], [source.hook])[source.hook][0, -1]
    torch.testing.assert_close(grid[op, tokens[0], tokens[2]], expected)
    assert grid[1, :, 0].abs().sum() == 0  # division by 0 does not exist


def test_operation_latents_rank_by_firing_on_the_operation_beyond_the_others():
    from sae.analysis.latents import LatentGrid, operation_latents, operation_selectivity

    p, ops = 5, [Operation.addition, Operation.subtraction]
    values = torch.zeros(2, p, p, 4)
    values[0, :, :, 0] = 1.0  # fires on every addition pair only
    values[0, :2, :, 1] = 1.0  # rarely, and only on addition: selective but barely used
    values[:, :, :, 2] = 1.0  # fires on both
    values[1, :, :, 3] = 1.0  # subtraction only
    grid = LatentGrid(values, torch.ones(2, p, p, dtype=torch.bool), torch.ones(2, p, p, dtype=torch.bool), ops)
    assert operation_latents(grid, 0, 2).tolist() == [0, 1]
    assert operation_latents(grid, 1, 1).tolist() == [3]
    selectivity = operation_selectivity(grid)
    assert selectivity[:, 2].tolist() == [0.5, 0.5] and selectivity[0, 1].item() == 1.0


def test_clamp_per_operation_reports_every_operation_for_chosen_and_random_latents(mixed_data):
    from sae.analysis.steering import clamp_per_operation

    torch.manual_seed(4)
    sae = build_sae(TopKSAEConfig(sparse_dim=16, k=4), 1, mixed_data.train.shape[-1])
    table = clamp_per_operation(sae, mixed_data, {"addition": torch.tensor([0, 1])}, controls=2)
    assert set(table) == {"none", "addition", "addition/random"}
    assert set(table["none"]) == {"addition", "division"}
    dataset = mixed_data.dataset
    from sae.host_models.training import evaluate_host

    clean = evaluate_host(mixed_data.sources[0].model, dataset)
    assert table["none"]["division"] == pytest.approx(clean["test/acc_division"], abs=1e-6)


def test_latent_frequencies_find_each_latents_wave():
    from sae.analysis.fourier import latent_frequencies

    p = 23
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    values = torch.stack([torch.cos(2 * math.pi * 3 * (a + b) / p), torch.cos(2 * math.pi * 7 * a / p)], dim=-1)
    rows = latent_frequencies(values, torch.tensor([0, 1]))
    assert (rows[0]["k_a"], rows[0]["k_b"]) == (3, 3) and rows[0]["share"] == pytest.approx(1.0, abs=1e-5)
    assert (rows[1]["k_a"], rows[1]["k_b"]) == (7, 0)


def scaling_crosscoder(seed: int = 0):
    """A crosscoder over (pre, post, driver) whose codes read only the driver source, so the pre
    and post activations can be built from the codes afterwards; latent 0 has no pre decoder."""
    torch.manual_seed(seed)
    sae = build_sae(VanillaSAEConfig(sparse_dim=6), 3, 5)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn_like(sae.W_dec))
        sae.W_enc.copy_(torch.randn_like(sae.W_enc))
        sae.W_enc[:, :2] = 0.0
        sae.W_dec[0, 0] = 0.0
        sae.b_enc.fill_(0.5)
    return sae


@pytest.mark.parametrize("pre_holds_it", [True, False])
def test_latent_scaling_tells_complete_shrinkage_from_a_post_only_latent(pre_holds_it):
    from sae.analysis.diffing import latent_scaling

    sae = scaling_crosscoder()
    x = torch.randn(400, 3, 5)
    f = sae.encode(x).detach()
    x_hat = sae.decode(f).detach()
    x[:, 1] = x_hat[:, 1]  # post: reconstructed exactly
    x[:, 0] = x_hat[:, 0] + (f[:, :1] * sae.W_dec[0, 1].detach() if pre_holds_it else 0.0)  # pre: j's direction, undecoded
    assert torch.equal(sae.encode(x), f)  # the codes did not move
    scaling = latent_scaling(sae, x, torch.tensor([0, 3]))
    assert scaling["beta_error_post"][0].item() == pytest.approx(1.0, abs=1e-4)
    assert scaling["nu_error"][0].item() == pytest.approx(1.0 if pre_holds_it else 0.0, abs=1e-4)


def test_latent_scaling_betas_equal_a_least_squares_solver():
    from sae.analysis.diffing import latent_scaling

    sae = scaling_crosscoder(seed=3)
    x = torch.randn(300, 3, 5, dtype=torch.float64)
    sae = sae.double()
    f = sae.encode(x)
    x_hat = sae.decode(f)
    scaling = latent_scaling(sae, x, torch.tensor([2]), chunk=64)
    d = sae.W_dec[2, 1]
    for m, source in ((0, "pre"), (1, "post")):
        design = (f[:, 2:3] * d).reshape(-1, 1)  # b f_j d_j, stacked over rows and dimensions
        for target, y in (("error", x[:, m] - x_hat[:, m] + f[:, 2:3] * sae.W_dec[2, m]),
                          ("reconstruction", x_hat[:, m] - sae.b_dec[m] - f[:, 2:3] * sae.W_dec[2, m])):
            expected = torch.linalg.lstsq(design, y.reshape(-1, 1).detach()).solution.item()
            assert scaling[f"beta_{target}_{source}"].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_relative_norms_in_training_units_undo_the_folded_input_scale():
    sae = build_sae(TopKSAEConfig(sparse_dim=8, k=2), 2, 4)
    r_training = relative_decoder_norms(sae)
    sae.fold_input_scale(torch.tensor([0.5, 4.0]))  # what saving does: W_dec[:, s] / c_s
    assert not torch.allclose(relative_decoder_norms(sae), r_training)  # raw units: biased towards pre
    torch.testing.assert_close(relative_decoder_norms(sae, input_scale=[0.5, 4.0]), r_training)


def test_projecting_out_a_full_span_is_mean_ablation(mixed_data):
    """Directions spanning the whole stream: every row becomes the source's mean activation."""
    from sae.analysis.steering import source_mean, steered_metrics
    from sae.metrics.downstream import spliced_metrics

    d = mixed_data.train.shape[-1]
    torch.manual_seed(4)
    sae = build_sae(VanillaSAEConfig(sparse_dim=2 * d), 1, d)
    full = steered_metrics(sae, mixed_data, torch.arange(d), 0.0, intervention="project")  # d random decoders span R^d
    tokens, labels = mixed_data.dataset.test
    mean = source_mean(mixed_data, 0).expand_as(mixed_data.test[:, 0])
    reference = spliced_metrics(mixed_data.sources[0].model, tokens, labels, mixed_data.sources[0].hook,
                                mean, mixed_data.test[:, 0], mixed_data.positions)
    assert full["test/acc"] == pytest.approx(reference["acc_spliced"], abs=1e-6)
    none = steered_metrics(sae, mixed_data, torch.zeros(0, dtype=torch.long), 0.0, intervention="project")
    assert none == steered_metrics(sae, mixed_data, torch.zeros(0, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="intervention must be one of"):
        steered_metrics(sae, mixed_data, torch.arange(2), 0.0, intervention="ablate")


def discrete_log_reference(p: int) -> dict[int, int]:
    """{v: k with g^k = v} for the smallest primitive root g, from pow() alone."""
    g = next(g for g in range(2, p) if all(pow(g, (p - 1) // q, p) != 1 for q in range(2, p) if (p - 1) % q == 0
                                           and all(q % r for r in range(2, q))))
    return {pow(g, k, p): k for k in range(p - 1)}


@pytest.mark.parametrize("operation, sign", [("addition", 1), ("subtraction", -1),
                                             ("multiplication", 1), ("division", -1)])
def test_restricted_logits_keep_exactly_the_key_frequency_components(operation, sign):
    """Logits built from key-frequency waves on the operation's group (residues for + and -, the
    discrete log for * and /, from pow()) plus waves at other frequencies: restricted keeps the
    first exactly, excluded the rest."""
    from sae.analysis.fourier import restricted_and_excluded_logits

    p, keys = 13, [2, 5]
    multiplicative = operation in ("multiplication", "division")
    log = discrete_log_reference(p)
    coordinate = (lambda v: log[v]) if multiplicative else (lambda v: v)
    n = p - 1 if multiplicative else p
    a, b = torch.cartesian_prod(torch.arange(1 if multiplicative else 0, p), torch.arange(1, p)).unbind(1)
    xa = torch.tensor([coordinate(v) for v in a.tolist()], dtype=torch.float64)
    xb = torch.tensor([coordinate(v) for v in b.tolist()], dtype=torch.float64)
    xc = torch.tensor([coordinate(c) if (c or not multiplicative) else 0 for c in range(p)], dtype=torch.float64)
    s = (xa + sign * xb)[:, None]
    signal = 3 * torch.cos(2 * torch.pi * 2 * (s - xc) / n + 0.4) + 2 * torch.cos(2 * torch.pi * 5 * (s - xc) / n - 1.0)
    if multiplicative:
        signal[:, 0] = 0.0  # the answer 0 is outside the group: no component there
    noise = 0.7 * torch.cos(2 * torch.pi * 3 * (s - xc) / n) + 0.5 * torch.cos(2 * torch.pi * 4 * xa[:, None] / n)
    restricted, excluded = restricted_and_excluded_logits(signal + noise, a, b, p, keys, operation)
    torch.testing.assert_close(restricted, signal)  # the key components whatever their phase, nothing else
    torch.testing.assert_close(excluded, noise)
    with pytest.raises(ValueError, match="not conditional"):
        restricted_and_excluded_logits(signal, a, b, p, keys, "conditional")


def test_group_ordered_embedding_puts_a_multiplicative_wave_on_one_frequency():
    """An embedding that is a wave in the discrete log (what a grokked multiplication host learns)
    has one key frequency once its rows are put in group order, and none in residue order."""
    from sae.analysis.fourier import key_frequencies, operation_key_frequencies

    p = 23
    log = discrete_log_reference(p)
    x = torch.tensor([log.get(v, 0) for v in range(p)], dtype=torch.float64)
    W_E = torch.stack([torch.cos(2 * torch.pi * 4 * x / (p - 1)), torch.sin(2 * torch.pi * 4 * x / (p - 1))], dim=1)
    W_E[0] = 0.0
    assert operation_key_frequencies(W_E.float(), "multiplication", min_share=0.5) == [4]
    assert key_frequencies(W_E.float(), min_share=0.5) == []


def test_progress_measures_on_a_grokked_host_show_the_circuit(tmp_path):
    """Nanda et al.'s finding on a small host trained to grokking (about 7 s here): its key
    frequencies alone give near-zero loss on held-out pairs (restricted loss), and without them
    it does worse than guessing uniformly on the very pairs it was trained on (excluded loss)."""
    from sae.analysis.fourier import key_frequencies, progress_measures
    from sae.host_models.runs import load_host
    from sae.tasks.modular import build_dataset
    from sae.host_models.training import HostRecipe, run_host_training
    from sae.tracking.base import NullTracker

    task = tiny_task(p=23, train_fraction=0.6)
    recipe = HostRecipe(lr=1e-2, num_steps=3000, eval_every=20, steps_after_grok=200)
    summary = run_host_training(task, dict(n_layers=1, d_model=64, n_heads=4, kv_heads=4, d_mlp=128), recipe,
                                tmp_path, NullTracker(), quiet=True)
    assert summary["grokking_step"] is not None
    model = load_host(tmp_path / summary["checkpoints"][-1]["file"])
    frequencies = key_frequencies(model.embed.weight[:23].detach(), min_share=0.1)
    assert 1 <= len(frequencies) <= 4
    metrics = progress_measures(model, build_dataset(task), frequencies)
    assert metrics["test/full_loss"] < 0.1 and metrics["test/restricted_loss"] < 0.1
    assert metrics["train/excluded_loss"] > math.log(23)


def test_projection_removes_the_variation_along_the_directions_around_the_centre():
    """A mean ablation along the span: the component of x - centre in span(D) goes, the rest of x
    stays; projecting a full basis leaves the centre itself. Checked against a least-squares fit."""
    from sae.analysis.steering import project_out

    torch.manual_seed(0)
    x, directions, centre = torch.randn(50, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    coefficients = torch.linalg.lstsq(directions.t(), (x - centre).t()).solution  # [2, 50]
    expected = x - (directions.t() @ coefficients).t()
    torch.testing.assert_close(project_out(x, directions, centre), expected)
    torch.testing.assert_close(project_out(x, torch.eye(6, dtype=torch.float64), centre), centre.expand_as(x))
    assert torch.equal(project_out(x, directions[:0], centre), x)
