"""The before/after-grokking study (sae.analysis.study): its statistics against independent
references, the decision rule on built outcomes, and the whole pipeline end to end on a tiny host
and crosscoder (structure, matched controls, reuse)."""
import json
import math

import pytest
import torch

from sae.analysis.study import (StudyPlan, combined_p, fisher_combined_p, history_metrics, run_study, run_targeting_study,
                                targeting_index, training_horizon, verdict)
from tests.unit.test_analysis_runs import TINY


def test_fisher_combination_matches_the_chi_square_tail():
    """One p-value combines to itself; -2 sum ln p = 9.4877 is the 5% point of chi^2 with 4 df
    (tables), and for 3 p-values of 1/6 the exact chi^2(6) tail by numerical integration."""
    assert fisher_combined_p([0.3]) == pytest.approx(0.3)
    p = math.exp(-9.4877 / 4)  # two equal p-values with -2 * 2 ln p = 9.4877
    assert fisher_combined_p([p, p]) == pytest.approx(0.05, abs=1e-4)
    statistic = -2 * 3 * math.log(1 / 6)
    grid = torch.linspace(statistic, statistic + 200, 200001, dtype=torch.float64)
    density = grid ** 2 * torch.exp(-grid / 2) / (2 ** 3 * math.gamma(3))  # chi^2 density, k = 6
    assert fisher_combined_p([1 / 6] * 3) == pytest.approx(torch.trapezoid(density, grid).item(), rel=1e-6)


def test_exact_combination_of_empirical_p_values_against_enumeration():
    """Below all 5 controls in each of 3 seeds: (1/6)^3 exactly; otherwise the share of the 6^3
    equally likely null outcomes whose product of p-values is at most the observed one."""
    assert combined_p([1 / 6] * 3, [5] * 3) == pytest.approx((1 / 6) ** 3)
    observed = [2 / 6, 1 / 6, 4 / 6]
    levels = [k / 6 for k in range(1, 7)]
    brute = sum(a * b * c <= math.prod(observed) + 1e-12 for a in levels for b in levels for c in levels) / 216
    assert combined_p(observed, [5] * 3) == pytest.approx(brute)
    assert combined_p([1.0, 1.0], [5, 3]) == 1.0
    assert combined_p([0.01] * 5, [100] * 5) == pytest.approx(fisher_combined_p([0.01] * 5))  # too many: Fisher


def cell(arm_auc, control_aucs, arm_loss=0.1, control_losses=None):
    control_losses = control_losses or [0.1] * len(control_aucs)
    return {"arm": {"test_auc": arm_auc, "train_loss": arm_loss},
            "controls": [{"test_auc": a, "train_loss": l} for a, l in zip(control_aucs, control_losses)]}


def seeds_with(arm_cells, largest_cells):
    return [{"training": {"generalisation_effect": {"clamp": a}, "largest": {"clamp": c}}}
            for a, c in zip(arm_cells, largest_cells)]


def test_the_decision_rule_on_built_outcomes():
    controls = [0.8, 0.82, 0.85, 0.83, 0.81]
    largest = [cell(0.75, controls)] * 3
    below_everything = seeds_with([cell(0.5, controls)] * 3, largest)
    assert verdict(below_everything, "generalisation_effect", "clamp")["verdict"] == "confirmed"
    # below the controls but it breaks training too (train loss above every control's)
    breaks_training = seeds_with([cell(0.5, controls, arm_loss=2.0)] * 3, largest)
    assert verdict(breaks_training, "generalisation_effect", "clamp")["verdict"] == "inconclusive"
    # below the controls, not below the largest latents
    not_beyond_size = seeds_with([cell(0.78, controls)] * 3, [cell(0.5, controls)] * 3)
    assert verdict(not_beyond_size, "generalisation_effect", "clamp")["verdict"] == "inconclusive"
    inside = seeds_with([cell(0.82, controls)] * 3, largest)
    result = verdict(inside, "generalisation_effect", "clamp")
    assert result["verdict"] == "refuted" and result["p_values"] == [pytest.approx(4 / 6)] * 3  # 0.8, 0.81, 0.82 at least as low
    assert verdict(below_everything, "generalisation_effect", "clamp")["combined_p"] == pytest.approx(1 / 216)
    assert verdict([{"training": {}}] * 3, "post_specific", "clamp")["verdict"] == "no latents"
    one_seed_one_control = [{"training": {"generalisation_effect": {"clamp": cell(0.5, [0.8])},
                                          "largest": {"clamp": cell(0.75, [0.8])}}}]
    assert verdict(one_seed_one_control, "generalisation_effect", "clamp")["verdict"] == "refuted"  # p = 1/2


def test_horizon_history_metrics_and_targeting_index():
    plan = StudyPlan(horizon_factor=1.5, max_horizon=1000)
    assert training_horizon(333, plan, eval_every=10) == 500
    assert training_horizon(900, plan, eval_every=10) == 1000
    history = [{"step": s, "test/acc": a, "train/acc": 1.0, "train/loss": 0.5, "test/acc_addition": a,
                "test/acc_multiplication": 1.0} for s, a in ((0, 0.0), (10, 0.5), (20, 1.0))]
    metrics = history_metrics(history, horizon=40, frequencies=None)
    # trapezoids: (0 + 0.5) / 2 * 10 + (0.5 + 1) / 2 * 10 + 1 * 20 over 40 steps
    assert metrics["test_auc"] == pytest.approx((2.5 + 7.5 + 20) / 40)
    assert metrics["steps_to_90"] == 20 and metrics["train_loss"] == pytest.approx(0.5)
    none = {"test_auc_addition": 0.9, "test_auc_multiplication": 0.8}
    run = {"test_auc_addition": 0.5, "test_auc_multiplication": 0.7}
    assert targeting_index(run, none, "addition", ["multiplication"]) == pytest.approx(0.4 - 0.1)


def test_a_plan_with_an_unknown_arm_is_refused():
    with pytest.raises(ValueError, match="unknown arm or intervention.*'largest_ever'"):
        StudyPlan(arms=("largest_ever",))


@pytest.fixture(scope="module")
def tiny_overrides(host_cache):
    return [*TINY, f"host_model.cache_dir={host_cache}", "host_model.checkpoints=[step_20,final]"]


def test_the_whole_study_runs_on_a_tiny_host_with_matched_controls_and_reuses_its_runs(tmp_path, tiny_overrides):
    plan = StudyPlan(seeds=[0], n_latents=2, evaluation_controls=3, training_controls=2, max_horizon=20,
                     evaluation_interventions=("clamp", "project"), training_interventions=("clamp", "project"))
    study = run_study(tiny_overrides, "addition", plan, tmp_path)
    seed = study["seeds"][0]
    training = seed["training"]
    assert training["horizon"] <= 20 and training["none"]["test_auc"] > 0
    for arm in ("generalisation_effect", "largest"):
        chosen = seed["arms"][arm]["latents"]
        assert len(chosen) == 2
        for intervention in ("clamp", "project"):
            cells = training[arm][intervention]
            assert len(cells["controls"]) == 2
            assert all(not set(draw) & set(chosen) for draw in cells["control_latents"])
            assert len(seed["evaluation"][arm][intervention]["controls"]) == 3
    rows = {(r["when"], r["arm"], r["intervention"]) for r in study["summary"]}
    assert ("training", "largest", "project") in rows and ("evaluation", "generalisation_effect", "clamp") in rows
    assert json.loads((tmp_path / "study.json").read_text())["summary"] == study["summary"]
    # a second call reuses the crosscoder and every retrained host
    retrained = tmp_path / "seed0" / "retrained"
    before = {p: p.stat().st_mtime_ns for p in retrained.rglob("*") if p.is_file()}
    again = run_study(tiny_overrides, "addition", plan, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in retrained.rglob("*") if p.is_file()} == before
    assert again["summary"] == study["summary"]


def test_per_operation_targeting_runs_on_a_tiny_mixed_host(tmp_path, tiny_overrides):
    overrides = [o for o in tiny_overrides if not o.startswith("task.p")] + [
        "task=mixed", "task.operations=[addition,multiplication]", "task.p=23"]
    plan = StudyPlan(seeds=[0], n_latents=2, training_controls=2, max_horizon=20)
    study = run_targeting_study(overrides, "mixed", plan, tmp_path)
    assert set(study["verdicts"]) == {"addition/clamp", "multiplication/clamp"}
    row = study["seeds"][0]["targeting"]["addition/clamp"]
    assert len(row["control_indices"]) == 2 and set(row["test_auc"]) == {"addition", "multiplication"}
    assert study["verdicts"]["addition/clamp"]["verdict"] in ("targeted", "not targeted", "inconclusive")


def test_seeds_whose_host_never_grokked_are_skipped_and_named_until_enough_grokked():
    from sae.analysis.study import grokked_seeds
    from sae.host_models.runs import NeverGrokkedError

    def study_one(seed):
        if seed == 2:
            raise NeverGrokkedError("host_model.checkpoints=pre_grok: the host in X never grokked")
        return {"seed": seed}

    results, skipped = grokked_seeds(study_one, StudyPlan(seeds=[0, 1, 2, 3, 4], n_seeds=3))
    assert [r["seed"] for r in results] == [0, 1, 3]
    assert skipped == [{"seed": 2, "reason": "host_model.checkpoints=pre_grok: the host in X never grokked"}]
    with pytest.raises(NeverGrokkedError, match=r"only 2 of seeds \[0, 1, 2\] grokked; skipped: seed 2"):
        grokked_seeds(study_one, StudyPlan(seeds=[0, 1, 2], n_seeds=3))
