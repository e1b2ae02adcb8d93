"""The correlated synthetic generator (sae/bench/correlated.py): marginal firing rates are the
geometric probabilities asked for, features co-fire as their copula loadings say (and do not at rho = 0),
tokens are normalised, and one seed gives one data set."""
import dataclasses
import math

import pytest
import torch

from sae.bench.correlated import (CHUNK, MAX_CHUNK_ELEMENTS, CopulaFeatures, correlated_activations, correlated_chunk_rows,
                                  firing_probabilities, scale_to_mean_square)

N = 60_000


def test_probabilities_are_geometric_with_the_spread_and_mean_asked_for():
    p = firing_probabilities(1024, 12, 50)
    assert math.isclose(p.sum().item(), 12, rel_tol=1e-9) and math.isclose((p[0] / p[-1]).item(), 50, rel_tol=1e-9)
    assert torch.all(p[1:] < p[:-1])
    with pytest.raises(ValueError, match="probability of .* >= 1"):
        firing_probabilities(16, 12, 50)


@pytest.mark.parametrize("rho", [0.0, 0.6])
def test_each_feature_fires_at_its_probability_whatever_the_correlation(rho):
    truth = CopulaFeatures(16, 64, 4, 50, 4, rho, torch.Generator().manual_seed(0))
    rate = truth.fires(N, torch.Generator().manual_seed(1)).double().mean(dim=0)
    sigma = (truth.p * (1 - truth.p) / N).sqrt()
    assert torch.all((rate - truth.p).abs() < 5 * sigma), (rate - truth.p).abs().div(sigma).max()


def indicator_correlations(fires: torch.Tensor) -> torch.Tensor:
    f = fires.double()
    f = (f - f.mean(dim=0)) / f.std(dim=0)
    return f.t() @ f / (len(f) - 1)


def test_features_co_fire_as_their_loadings_say_and_not_without_correlation():
    generator = torch.Generator().manual_seed(0)
    truth = CopulaFeatures(16, 48, 6, 10, 2, 0.8, generator)
    observed = indicator_correlations(truth.fires(N, torch.Generator().manual_seed(2)))
    latent = truth.loadings @ truth.loadings.t()  # the correlation of z_i and z_j
    pairs = torch.triu_indices(48, 48, offset=1)
    strong = latent[pairs[0], pairs[1]].abs().argsort(descending=True)[:30]
    i, j = pairs[0][strong], pairs[1][strong]
    assert torch.all(observed[i, j].sign() == latent[i, j].sign())
    assert observed[i, j].abs().min() > 5 / math.sqrt(N)
    independent = CopulaFeatures(16, 48, 6, 10, 2, 0.0, torch.Generator().manual_seed(0))
    off = indicator_correlations(independent.fires(N, torch.Generator().manual_seed(2)))[pairs[0], pairs[1]]
    assert off.abs().max() < 5 / math.sqrt(N)


def test_tokens_are_normalised_and_one_seed_gives_one_data_set():
    x, features, p = correlated_activations(32, 256, 6, 20_000, seed=3)
    assert x.shape == (20_000, 32) and features.shape == (256, 32) and math.isclose(p.sum().item(), 6, rel_tol=1e-5)
    assert math.isclose(x.pow(2).sum(dim=1).mean().item(), 32, rel_tol=1e-4)
    again, _, _ = correlated_activations(32, 256, 6, 20_000, seed=3)
    assert torch.equal(x, again) and not torch.equal(x, correlated_activations(32, 256, 6, 20_000, seed=4)[0])


def test_the_benchmark_trains_on_the_correlated_data_when_asked(tmp_path):
    import json

    from sae.bench.synthetic import main

    results = main(["--sizes", "16,128,8", "--impls", "topk", "--tokens", "8192", "--batch", "512", "--threads", "1",
                    "--data", "correlated", "--token-features", "6", "--json", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())[0]
    assert saved["data"] == "correlated" and saved["token_features"] == 6 and math.isfinite(results[0]["fvu"])
    from sae.bench.synthetic import Case, synthetic_data

    case = Case("topk", 16, 128, 8, 512, 8192, 2e-3, "cpu", 1, "float32", data="correlated", token_features=6)
    x, features, _ = synthetic_data(case, 1000)
    expected, expected_features, _ = correlated_activations(16, 128, 6, 1000, seed=0)
    assert torch.equal(x, expected) and torch.equal(features, expected_features)
    tighter = dataclasses.replace(case, copula_rank=2, copula_rho=0.9)  # --copula-rank 2 --copula-rho 0.9
    x_tight, _, _ = synthetic_data(tighter, 1000)
    assert torch.equal(x_tight, correlated_activations(16, 128, 6, 1000, seed=0, rank=2, rho=0.9)[0])
    assert not torch.equal(x_tight, x)


@pytest.mark.parametrize("flags", [["--copula-rho", "1.0"], ["--copula-rank", "0"]])
def test_a_copula_outside_its_range_is_refused(flags, capsys):
    from sae.bench.synthetic import main

    with pytest.raises(SystemExit):
        main(["--data", "correlated", *flags])
    assert "--copula-rank must be >= 1 and --copula-rho in [0, 1)" in capsys.readouterr().err


def test_several_seeds_give_one_row_each_named_by_seed(capsys):
    from sae.bench.synthetic import main

    results = main(["--sizes", "8,32,2", "--impls", "topk", "--tokens", "2048", "--batch", "256", "--threads", "1",
                    "--seeds", "0,5"])
    assert [r["seed"] for r in results] == [0, 5] and results[0]["fvu"] != results[1]["fvu"]
    out = capsys.readouterr().out
    assert "| topk (seed 0) |" in out and "| topk (seed 5) |" in out


def test_many_features_are_drawn_in_smaller_chunks_and_up_to_1024_as_always():
    """Up to 1024 features every chunk is CHUNK rows (the stream all recorded results were drawn from);
    beyond, a chunk's [rows, n_true] float64 temporaries stay bounded (d_sae 65536 at 0.5 features per latent)."""
    assert correlated_chunk_rows(1024) == correlated_chunk_rows(12) == CHUNK
    assert correlated_chunk_rows(32768) * 32768 <= MAX_CHUNK_ELEMENTS and correlated_chunk_rows(10**9) == 1


def test_scaling_in_place_is_the_formula():
    x = torch.randn(3 * CHUNK + 5, 7, dtype=torch.float64) * 3
    expected = x * (7 / x.pow(2).sum(dim=1).mean()).sqrt()
    assert torch.allclose(scale_to_mean_square(x.clone(), 7), expected, rtol=1e-12)
