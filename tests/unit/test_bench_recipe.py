"""The recipe study (scripts/recipe_study.py): recipes are the base with one knob changed, every
recipe runs at every seed, and the table pairs each recipe with the base seed by seed."""
import argparse

import pytest

from sae.bench.recipe import main, parse_vary, recipes, summarise


def test_each_recipe_changes_one_knob_of_the_base():
    base = {"lr": 0.002, "schedule": "constant", "aux_coef": 0.03125}
    made = recipes(base, [("lr", [0.001, 0.002, 0.004]), ("schedule", ["linear_decay"])])
    assert made == [base, {**base, "lr": 0.001}, {**base, "lr": 0.004}, {**base, "schedule": "linear_decay"}]


@pytest.mark.parametrize("text, message", [("lrr=0.1", "knob one of"), ("lr=fast", "must be float"), ("lr=", "knob"),
                                           ("optimizer=adam,sgd", r"among \['adam', 'signum'\], got 'sgd'"),
                                           ("schedule=step", "among .*'linear_decay'.*got 'step'"),
                                           ("b_dec_init=median", r"among \['mean', 'zeros'\], got 'median'")])
def test_bad_vary_is_refused_with_the_allowed_knobs(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_vary(text)


def test_an_lr_recipe_replaces_the_base_lr_sum():
    base = {"lr": 0.002, "lr_sum": 0.3, "schedule": "constant"}
    made = recipes(base, [("lr", [0.001, 0.002])])
    assert made[1:] == [{"lr": 0.001, "lr_sum": None, "schedule": "constant"},
                        {"lr": 0.002, "lr_sum": None, "schedule": "constant"}]


def test_summary_pairs_seeds_with_the_base_and_gives_a_p_value():
    rows = []
    for seed, (base_fvu, other_fvu) in enumerate([(0.20, 0.10), (0.21, 0.12), (0.19, 0.09)]):
        for recipe, fvu in (("base", base_fvu), ("lr=0.004", other_fvu)):
            rows.append(dict(d_in=8, d_sae=32, k=2, recipe=recipe, seed=seed, fvu=fvu, recovered=1.0,
                             dead_frac=0.0, l0=2.0, mean_max_cos=1.0))
    table = summarise(rows)
    base_row, other_row = table.splitlines()[2:]
    assert "| base | 3 | 0.2000 ± 0.0100 |" in base_row and base_row.endswith("| - |")
    identical = summarise([{**row, "recipe": "same"} for row in rows if row["recipe"] == "base"] + rows)
    assert "= base" in identical.splitlines()[2]
    p = float(other_row.rstrip(" |").rsplit("|", 1)[1])
    assert 0 < p < 0.01  # consistently lower by ~0.1 against a spread of ~0.01


def test_study_runs_every_recipe_at_every_seed(capsys):
    results = main(["--sizes", "8,32,2", "--tokens", str(256 * 12), "--seeds", "0", "1", "--threads", "1",
                    "--vary", "lr=0.004", "--base", "schedule=linear_decay", "batch=256"])
    assert [(r["recipe"], r["seed"]) for r in results] == [("base", 0), ("base", 1), ("lr=0.004", 0), ("lr=0.004", 1)]
    assert all(r["schedule"] == "linear_decay" for r in results)
    assert "| (8, 32, 2) | lr=0.004 | 2 |" in capsys.readouterr().out


def test_jumprelu_knobs_reach_its_config(monkeypatch):
    """--impl jumprelu with its own knobs: the SAE that trains has them (init_l0 sets θ from the data)."""
    import sae.bench.synthetic

    built = []
    build = sae.bench.synthetic.build
    monkeypatch.setattr(sae.bench.synthetic, "build", lambda *args: built.append(build(*args)) or built[-1])
    (result,) = main(["--impl", "jumprelu", "--sizes", "8,32,2", "--tokens", str(256 * 12), "--seeds", "0",
                      "--threads", "1", "--base", "batch=256", "init_l0=4", "bandwidth=0.2", "jumprelu_coef=0.3"])
    (sae_,) = built
    assert (sae_.cfg.init_l0, sae_.cfg.bandwidth, sae_.cfg.sparsity_coef) == (4, 0.2, 0.3)
    assert result["impl"] == "jumprelu" and result["l0"] > 0


@pytest.mark.compare  # schedulefree comes with the [compare] extra
def test_signum_runs_are_scored_at_their_better_iterate():
    (base, signum), = [main(["--sizes", "8,32,2", "--tokens", str(256 * 12), "--seeds", "0", "--threads", "1",
                             "--vary", "optimizer=signum", "--base", "batch=256"])]
    assert base["recipe"] == "base" and "iterate" not in base
    assert signum["recipe"] == "optimizer=signum" and signum["iterate"] in ("averaged", "training")


def test_signum_without_schedulefree_is_refused_before_any_run(monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "schedulefree" else real(name, *rest))
    with pytest.raises(SystemExit):
        main(["--sizes", "8,32,2", "--seeds", "0", "--vary", "optimizer=signum"])
    err = capsys.readouterr()
    assert err.err.strip().splitlines()[-1].endswith("optimizer=signum needs the schedulefree package: "
                                                      "pip install -e '.[compare]'")
    assert "seed 0" not in err.out  # not even the base ran


def test_a_study_that_does_not_fit_memory_is_refused_before_any_run(monkeypatch, capsys):
    import sae.bench.recipe as recipe
    import sae.bench.synthetic as synthetic

    monkeypatch.setattr(synthetic, "available_memory_gib", lambda device: 2.0)
    monkeypatch.setattr(synthetic, "process_memory_gib", lambda: 0.5)
    monkeypatch.setattr(recipe, "run_case", lambda case: pytest.fail("a run started"))
    with pytest.raises(SystemExit):
        main(["--sizes", "128,2048,16", "--tokens", "4096000", "--data", "correlated"])
    (line,) = [l for l in capsys.readouterr().err.splitlines() if "error:" in l]
    assert "size 128,2048,16 (topk, --tokens 4096000, --batch 4096) needs about 4.9 GiB" in line
    assert "but 2.0 GiB is available" in line


@pytest.mark.parametrize("args, message", [
    (["--vary", "lr_sum=0.3,0"], "lr_sum must be a positive finite number (the sum of the per-step lrs over the run)"),
    (["--base", "lr_sum=1e-323"], "lr_sum=1e-323 over num_steps=200 with scheduler=constant gives lr=0.0"),
    (["--vary", "lr=-0.001"], "lr must be a positive finite number, got -0.001"),
])
def test_an_lr_or_lr_sum_that_gives_no_usable_lr_is_refused_before_any_run(monkeypatch, capsys, args, message):
    import sae.bench.recipe as recipe

    monkeypatch.setattr(recipe, "run_case", lambda case: pytest.fail("a run started"))
    with pytest.raises(SystemExit):
        main([*args, "--tokens", "819200"])
    (line,) = [l for l in capsys.readouterr().err.splitlines() if "error:" in l]
    assert message in line


def test_lr_sum_sets_the_study_lr_from_the_steps(monkeypatch):
    import sae.bench.synthetic as synthetic

    seen = []
    monkeypatch.setattr(synthetic, "lr_at", lambda step, lr, n, cfg: seen.append(lr) or lr)
    synthetic.run_case(synthetic.Case("topk", 16, 64, 4, 64, 64 * 40, 1.0, "cpu", 1, "float32", lr_sum=0.02))
    assert seen and all(lr == pytest.approx(0.02 / 40, rel=1e-12) for lr in seen)


def test_correlated_data_with_a_hierarchy_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--data", "correlated", "--children", "4"])
    assert "--data correlated draws its own data" in capsys.readouterr().err
