"""The benchmark on real activations (scripts/benchmark_real.py), on a tiny grokking host and the
tiny ESM-2 of the test fixtures: every implementation on the same rows, scored by one evaluation."""
import pytest
import torch

from sae.bench.real import as_our_sae, main
from tests.e2e.test_scripts import SAE_TINY, TINY


def tiny(tmp_path) -> list[str]:
    return [*TINY, f"host_model.cache_dir={tmp_path / 'hosts'}", *SAE_TINY]


def test_ours_on_the_grokking_host_reports_reconstruction_and_loss_recovered(tmp_path, capsys):
    rows = main(["--host", "grokking", "--impls", "topk", "--steps", "12", "--workdir", str(tmp_path), *tiny(tmp_path)])
    (row,) = rows
    assert row["steps"] == 12 and row["batch"] == 64 and row["tokens_per_s"] > 0
    assert 0 < row["test_fvu"] < 1 and row["test_l0"] <= 8 and 0 <= row["test_dead"] <= 1
    assert {"train_loss_recovered", "test_loss_recovered"} <= set(row)
    assert "| grokking | topk | 12 x 64 |" in capsys.readouterr().out


def test_ours_in_another_architecture_is_labelled_by_it(tmp_path, capsys):
    """--impls topk alone trains the config's architecture (BatchTopK here, θ calibrated as the
    trainer does: the train rows keep about k a row at inference)."""
    rows = main(["--host", "grokking", "--impls", "topk", "--steps", "12", "--workdir", str(tmp_path),
                 *tiny(tmp_path), "sae=batchtopk", "sae.sparse_dim=64", "sae.k=4", "sae.k_aux=16"])
    (row,) = rows
    assert row["impl"] == "batchtopk" and row["train_l0"] == pytest.approx(4, abs=0.05)
    assert "| grokking | batchtopk | 12 x 64 |" in capsys.readouterr().out


@pytest.mark.compare
@pytest.mark.parametrize("impl", ["sparsify", "saelens"])
def test_another_library_read_back_reconstructs_as_it_did(impl, tmp_path):
    """Their SAE, saved in their format and loaded as ours, gives their reconstruction (so the one
    evaluation scores their model, not a conversion of it)."""
    pytest.importorskip({"saelens": "sae_lens", "sparsify": "sparsify"}[impl])
    from sae.bench.external import build_external

    adapter = build_external(impl, 16, 48, 4, "cpu")
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(0.1 * torch.randn_like(param))
    if impl == "sparsify":
        adapter.make_optimizer()
    x = torch.randn(128, 1, 16)
    with torch.no_grad():
        theirs = adapter.reconstruct(x)
        ours = as_our_sae(adapter)(x).x_hat[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.compare
def test_every_library_on_the_esm2_stand_in(tmp_path, tiny_esm2_files, monkeypatch):
    """The ESM-2 path end to end, the tiny fair-esm checkpoint standing in for the t6-8M one."""
    import sae.bench.real

    protein = ["task=protein_mlm", "host_model=esm2_t6_8M", f"task.fasta={sae.bench.real.ROOT}/tests/data/proteins.fasta",
               f"host_model.checkpoints=[{tiny_esm2_files[0]}]", "host_model.layers=[2]",
               f"task.activation_cache={tmp_path / 'cache'}", "task.max_train_tokens=3000",
               "task.max_test_tokens=800", "task.eval_sequences=4"]
    monkeypatch.setattr(sae.bench.real, "host_overrides", lambda host, workdir: protein)
    rows = main(["--host", "esm2", "--steps", "10", "--workdir", str(tmp_path), "hardware.threads=1", *SAE_TINY])
    assert [r["impl"] for r in rows] == ["topk", "saelens", "sparsify"]
    assert all(0 < r["test_fvu"] < 2 and r["test_l0"] <= 8 + 1e-6 for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--impls", "topk,sae_vis"], "unknown ['sae_vis']"),
    (["--impls", "topk", "--steps", "3"], "--steps must be >= 8"),
    (["--host", "grokking", "--impls", "topk,sparsify", "sae=vanilla"], "sae=vanilla"),
])
def test_bad_arguments_are_refused_before_any_training(argv, message, capsys, tmp_path, monkeypatch):
    import sae.bench.real

    monkeypatch.setattr(sae.bench.real, "external_available", lambda impl: True)  # with or without the extra
    with pytest.raises(SystemExit):
        main([*argv, "--workdir", str(tmp_path), f"host_model.cache_dir={tmp_path / 'hosts'}"])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "hosts").exists()  # no host was trained
