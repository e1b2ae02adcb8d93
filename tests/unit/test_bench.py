"""The training benchmark: synthetic data with known features, and ours vs the dense reference."""
import dataclasses

import pytest
import torch

from sae.bench import synthetic
from sae.bench.synthetic import Case, DenseTopKReference, best_quality, main, quality, run_case, synthetic_activations


def test_synthetic_activations_are_normalised_sums_of_unit_features():
    x, features = synthetic_activations(d_in=16, n_true=40, k_true=3, n=5000, seed=0)
    assert x.shape == (5000, 16) and features.shape == (40, 16)
    assert torch.allclose(features.norm(dim=1), torch.ones(40))
    assert x.pow(2).sum(dim=1).mean().item() == pytest.approx(16, rel=1e-4)
    again, _ = synthetic_activations(d_in=16, n_true=40, k_true=3, n=5000, seed=0)
    assert torch.equal(x, again)


def test_varied_complexity_spreads_the_feature_count_per_token_past_k():
    """Features fewer than d_in are linearly independent: least squares reads each token's
    coefficients back, and the tokens' counts of clearly active features show the spread (small
    magnitudes and repeated draws hide some features, so counts read low in both modes)."""
    counts = {}
    for varied in (False, True):
        x, features = synthetic_activations(d_in=64, n_true=16, k_true=4, n=4000, seed=0, varied=varied)
        coefficients = torch.linalg.lstsq(features.t(), x.t()).solution.t()  # [tokens, features]
        counts[varied] = (coefficients.abs() > 0.1 * coefficients.abs().max()).sum(dim=1).float()
    assert counts[False].max() <= 4  # exactly 4 drawn
    assert counts[True].max() > 8  # more than 2 k_true (the benchmark's k) on some tokens: 12 here
    assert (counts[True] >= 5).float().mean() > 0.05  # 13% here
    assert (counts[True] <= 1).float().mean() > 2 * (counts[False] <= 1).float().mean()  # 43% vs 7% here
    assert abs(counts[True].mean() - counts[False].mean()) < 0.6  # the same mean drawn (read: 2.3 vs 2.8)
    again, _ = synthetic_activations(d_in=64, n_true=16, k_true=4, n=4000, seed=0, varied=True)
    assert torch.equal(again, synthetic_activations(d_in=64, n_true=16, k_true=4, n=4000, seed=0, varied=True)[0])


def test_quality_recovers_a_dictionary_that_holds_the_true_features():
    x, features = synthetic_activations(d_in=16, n_true=20, k_true=2, n=2000, seed=1)
    sae = DenseTopKReference(16, 24, k=2, k_aux=4, aux_coef=0.0)
    with torch.no_grad():
        sae.W_dec[:20] = features
        sae.W_dec[20:] = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    scores = quality(sae, x, features)
    assert scores["recovered"] == 1.0 and scores["mean_max_cos"] == pytest.approx(1.0)
    sae.W_dec.data = torch.nn.functional.normalize(torch.randn(24, 16), dim=1)
    assert quality(sae, x, features)["recovered"] < 0.5


def test_quality_in_chunks_scores_as_one_product(monkeypatch):
    """Tokens and true features are scored EVAL_CHUNK rows at a time (memory at large d_sae): the
    same recovered fraction and cosines as the whole product at once."""
    x, features = synthetic_activations(d_in=16, n_true=20, k_true=2, n=500, seed=1)
    sae = DenseTopKReference(16, 24, k=2, k_aux=4, aux_coef=0.0)
    whole = quality(sae, x, features)
    monkeypatch.setattr(synthetic, "EVAL_CHUNK", 3)
    chunked = quality(sae, x, features)
    best_cos = (features @ torch.nn.functional.normalize(sae.W_dec.detach(), dim=1).t()).amax(dim=1)
    assert chunked["recovered"] == whole["recovered"] == (best_cos > 0.9).float().mean().item()
    assert chunked["mean_max_cos"] == pytest.approx(best_cos.mean().item(), abs=1e-6)
    assert chunked["fvu"] == pytest.approx(whole["fvu"], rel=1e-5) and chunked["l0"] == whole["l0"]


def test_a_size_that_does_not_fit_memory_is_refused_before_any_run(monkeypatch, capsys):
    monkeypatch.setattr(synthetic, "available_memory_gib", lambda device: 8.0)
    monkeypatch.setattr(synthetic, "process_memory_gib", lambda: 0.5)
    monkeypatch.setattr(synthetic, "run_isolated", lambda case: pytest.fail("a run started"))
    with pytest.raises(SystemExit):
        main(["--sizes", "128,2048,16", "512,65536,64", "--tokens", "4096000", "--impls", "topk"])
    (line,) = [l for l in capsys.readouterr().err.splitlines() if "error:" in l]
    assert "size 512,65536,64 (topk, --tokens 4096000, --batch 4096) needs about 23.4 GiB" in line
    assert "data 15.9" in line and "process 0.5" in line and "but 8.0 GiB is available on cpu" in line


def test_the_memory_estimate_counts_rows_weights_a_step_and_the_process(monkeypatch):
    monkeypatch.setattr(synthetic, "process_memory_gib", lambda: 0.5)
    case = Case("topk", d_in=512, d_sae=65536, k=64, batch=4096, tokens=4096000, lr=1e-3, device="cpu", threads=1,
                dtype="float32")
    need = synthetic.memory_estimate(case)
    rows = 4096000 + synthetic.EVAL_TOKENS
    assert need["data"] == pytest.approx(2 * rows * 512 * 4 / 2**30)
    assert need["sae_and_adam"] == pytest.approx(4 * 2 * 512 * 65536 * 4 / 2**30)  # weights, grads, 2 moments
    assert need["step"] == pytest.approx(4 * 4096 * 65536 * 4 / 2**30)
    assert need["process"] == 0.5 and need["total"] == pytest.approx(
        need["data"] + need["step"] + need["evaluation"] + need["sae_and_adam"] + 0.5)
    transcoder = synthetic.memory_estimate(dataclasses.replace(case, impl="transcoder"))
    assert transcoder["data"] == pytest.approx(2 * need["data"])  # input and target columns
    assert synthetic.too_big(case, available_gib=1000.0) is None


def test_the_process_part_is_this_process_resident_memory():
    before = synthetic.process_memory_gib()
    block = torch.ones(64 * 2**20)  # 256 MiB, written, so resident
    assert 0.05 < before and synthetic.process_memory_gib() - before > 0.2
    del block


def test_sparse_topk_trains_like_the_dense_reference():
    """Same init, same data, same recipe: the sparse kernels follow the dense reference's trajectory."""
    common = dict(d_in=16, d_sae=64, k=4, batch=256, tokens=256 * 24, lr=3e-3, device="cpu", threads=1,
                  dtype="float32")
    ours, dense = run_case(Case("topk", **common)), run_case(Case("dense_topk", **common))
    assert ours["steps"] == dense["steps"] == 24 and ours["tokens_per_s"] > 0
    for key in ("fvu", "l0", "mean_max_cos"):
        assert ours[key] == pytest.approx(dense[key], rel=1e-3, abs=1e-4), key
    assert ours["fvu"] < 0.9


def test_command_line_runs_each_implementation_in_its_own_process(tmp_path, capsys):
    results = main(["--sizes", "8,32,2", "--tokens", "4096", "--batch", "256", "--threads", "1",
                    "--json", str(tmp_path / "r.json")])
    assert [r["impl"] for r in results] == ["topk", "batchtopk", "matryoshka", "jumprelu", "dense_topk", "vanilla"]
    assert "| (8, 32, 2) | topk |" in capsys.readouterr().out and (tmp_path / "r.json").is_file()


def test_bad_arguments_are_refused_before_any_work(capsys, monkeypatch):
    import sae.bench.synthetic

    with pytest.raises(SystemExit):
        main(["--sizes", "8,32,64"])
    with pytest.raises(SystemExit):
        main(["--impls", "topk,sae_vis"])
    assert "unknown ['sae_vis']" in capsys.readouterr().err
    monkeypatch.setattr(sae.bench.synthetic, "external_available", lambda impl: False)
    with pytest.raises(SystemExit):
        main(["--impls", "topk,sparsify"])
    assert "pip install -e '.[compare]'" in capsys.readouterr().err


@pytest.mark.compare
@pytest.mark.parametrize("impl", ["saelens", "sparsify"])
def test_other_libraries_train_as_benchmark_columns(impl):
    pytest.importorskip({"saelens": "sae_lens", "sparsify": "sparsify"}[impl])
    common = dict(d_in=16, d_sae=64, k=4, batch=256, tokens=256 * 40, lr=3e-3, device="cpu", threads=1,
                  dtype="float32")
    theirs, ours = run_case(Case(impl, **common)), run_case(Case("topk", **common))
    assert theirs["steps"] == 40 and theirs["tokens_per_s"] > 0
    assert theirs["l0"] <= 4 + 1e-6 and 0 <= theirs["dead_frac"] <= 1
    assert theirs["fvu"] < 1.0  # it learned something from the same activations
    assert set(theirs) - {"iterate"} == set(ours)
    if impl == "sparsify":  # schedule-free: scored at whichever of its two iterates reconstructs better
        assert theirs["iterate"] in ("training", "averaged")


def test_best_quality_scores_every_iterate_and_keeps_the_lowest_fvu():
    x, features = synthetic_activations(d_in=16, n_true=20, k_true=2, n=2000, seed=1)
    sae = DenseTopKReference(16, 24, k=2, k_aux=4, aux_coef=0.0)
    good = torch.nn.functional.normalize(torch.cat([features, torch.randn(4, 16)]), dim=1)
    bad = torch.nn.functional.normalize(torch.randn(24, 16), dim=1)

    def iterates():
        for name, rows in (("averaged", bad), ("training", good)):
            with torch.no_grad():
                sae.W_dec.copy_(rows)
                sae.W_enc.copy_(rows.t())
            yield name

    sae.iterates = iterates
    chosen = best_quality(sae, x, features)
    assert sae.training  # left ready to train on
    assert chosen["iterate"] == "training" and chosen["fvu"] == quality(sae, x, features)["fvu"]


def test_quality_curves_against_tokens_and_seconds_and_their_plot(tmp_path, capsys):
    results = main(["--sizes", "8,32,2", "--impls", "topk,dense_topk", "--tokens", "8192", "--batch", "256",
                    "--threads", "1", "--curve-every", "8", "--plot", str(tmp_path / "curves.png")])
    for result in results:
        curve = result["curve"]
        assert [p["step"] for p in curve] == [8, 16, 24, 32]
        assert all(a["seconds"] < b["seconds"] for a, b in zip(curve, curve[1:]))
        assert curve[-1]["fvu"] == result["fvu"] and curve[-1]["seconds"] == result["train_seconds"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| (8, 32, 2) | dense_topk |" in capsys.readouterr().out.split("at seconds")[1]
    with pytest.raises(SystemExit):
        main(["--plot", str(tmp_path / "no_curves.png")])
    assert not (tmp_path / "no_curves.png").exists()


def test_parallel_benchmark_reports_both_modes_with_a_communication_share():
    from sae.bench.parallel import main

    report = main(["--sizes", "16,64,4", "--steps", "2"])
    rows = [line for line in report.splitlines() if line.startswith("| (16, 64, 4)")]
    assert [row.split("|")[3].strip() for row in rows] == ["data", "latents"]
    assert all(row.rstrip(" |").endswith("%") for row in rows)
