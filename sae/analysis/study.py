"""The before/after-grokking steering study (issue 13): does clamping the latents a crosscoder
calls post-grokking hurt generalisation more than clamping latents matched to them in size and
frequency? One implementation for every cc_first notebook and for `make notebooks-full`.

Per host seed (host init, batch order and crosscoder seed; the train/test split is fixed):
1. a crosscoder over the host at `pre_grok` (mid-plateau) and `post_grok` (`train_or_reuse`);
2. three selection arms of n latents (`sae.analysis.grokking`): (a) post-specific by relative
   decoder norm and latent scaling, (b) by clamp effect on test CE minus train CE, (c) the largest
   by contribution;
3. evaluation-time: each arm clamped (to 0) and projected out in the post-grok host, against
   `evaluation_controls` draws matched per latent on firing frequency and mean contribution;
4. training-time: the host retrained from its own initialisation and data order over a fixed
   horizon with each arm clamped at every step, against `training_controls` matched draws and
   "none" (the same hooked path with an empty clamp).

Primary metric: the mean test accuracy over the horizon (`accuracy_auc`); also train accuracy and
loss over the horizon (the specificity check), steps to 90% test accuracy, and restricted /
excluded loss (Nanda et al.) at fixed steps.

Decision rule, stated before the runs, per arm and intervention (training-time):
- confirmed: in every seed the arm's test AUC is below every matched control's, it is below
  arm (c)'s (the largest latents), and its train loss over the horizon is no higher than the
  highest control's (it does not just break the host), and the combined p is < 0.05 (with 5
  controls x 3 seeds, being below all of them everywhere has p = (1/6)^3 ~ 0.005);
- refuted: the exact combination of the per-seed empirical p-values (`combined_p`) is >= 0.05
  (the arm sits inside its control distribution);
- otherwise inconclusive; an arm with no latents in any seed is reported as "no latents".
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae.analysis.controls import accuracy_auc, empirical_p_value, latent_statistics, matched_control, steps_to
from sae.analysis.fourier import operation_key_frequencies, progress_measures
from sae.analysis.grokking import (POST, arm_generalisation_effect, arm_largest, arm_post_specific,
                                   arms_by_generalisation_effect, phase_accuracies)
from sae.analysis.runs import SaeRun, load_sae_run, train_or_reuse
from sae.analysis.steering import clamp_hook, projection_hook, source_mean, source_view, steered_metrics
from sae.atomic_io import write_json
from sae.host_models.runs import NeverGrokkedError
from sae.host_models.training import run_host_training
from sae.tasks.modular import build_dataset
from sae.tracking.base import NullTracker

log = logging.getLogger(__name__)

ARMS = ("post_specific", "generalisation_effect", "largest")
INTERVENTIONS = ("clamp", "project")
SIGNIFICANCE = 0.05


@dataclass
class StudyPlan:
    """How much of the study to run (the notebooks' small profile shrinks it to CI size)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_seeds: int | None = None  # stop once this many seeds' hosts grokked (None: every seed in `seeds`)
    n_latents: int = 8
    evaluation_controls: int = 100
    training_controls: int = 5
    arms: tuple[str, ...] = ARMS
    evaluation_interventions: tuple[str, ...] = INTERVENTIONS
    training_interventions: tuple[str, ...] = ("clamp",)
    horizon_factor: float = 1.5  # training-time horizon: this x the unclamped host's grokking step ...
    max_horizon: int = 1500  # ... capped here (rounded up to the host's eval interval)
    progress_every: int = 100  # restricted/excluded loss every this many steps (one-operation hosts)
    value: float = 0.0  # clamp value (0 ablates)

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS] + [i for i in (*self.evaluation_interventions,
                                                                          *self.training_interventions)
                                                             if i not in INTERVENTIONS]
        if unknown:
            raise ValueError(f"StudyPlan: unknown arm or intervention {unknown}; arms: {list(ARMS)}, "
                             f"interventions: {list(INTERVENTIONS)}")
        if not self.seeds or self.n_latents < 1 or self.training_controls < 1 or self.evaluation_controls < 1:
            raise ValueError("StudyPlan needs at least one seed, latent, training and evaluation control")


def seed_overrides(overrides: list[str], seed: int) -> list[str]:
    """The crosscoder overrides for one host seed: host init + batch order, crosscoder init, and
    dense checkpoints through the transition (so pre_grok can sit mid-plateau)."""
    return [*overrides, f"host_model.train.seed={seed}", f"seed={seed}",
            "host_model.train.transition_checkpoint_every=10"]


def select_arms(run: SaeRun, plan: StudyPlan) -> dict[str, dict]:
    """{arm: its selection record (latents and the scores that chose them)}."""
    makers = {"post_specific": arm_post_specific, "generalisation_effect": arm_generalisation_effect,
              "largest": arm_largest}
    arms = {}
    for name in plan.arms:
        record = makers[name](run, plan.n_latents)
        arms[name] = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        arms[name]["view_jaccard"] = view_agreement(run, record["latents"])
    return arms


@torch.no_grad()
def view_agreement(run: SaeRun, latents: torch.Tensor) -> float | None:
    """Jaccard overlap of where `latents` fire in the crosscoder (both checkpoints' activations) and
    in its post-only view (what a training-time clamp encodes): 1 = the clamp sees the latents the
    crosscoder found; lower = it clamps partly other events. None for an empty arm."""
    if not len(latents):
        return None
    x = torch.cat([run.data.train, run.data.test])
    crosscoder = run.sae.encode(x)[:, latents] > 0
    view = source_view(run.sae, POST).encode(x[:, POST:POST + 1])[:, latents] > 0
    union = (crosscoder | view).sum().item()
    return (crosscoder & view).sum().item() / union if union else None


def arms_with_draws(run: SaeRun, arms: dict[str, dict], count: int):
    """(arm, its latents, `count` control sets matched latent by latent on firing frequency and
    contribution, drawn among the latents that fire) for each arm that selected any latents."""
    frequency, contribution = latent_statistics(run.sae, torch.cat([run.data.train, run.data.test]), POST)
    pool = torch.where(frequency > 0)[0]  # the latents that fire on some pair
    for arm, record in arms.items():
        if record["latents"]:
            chosen = torch.tensor(record["latents"], dtype=torch.long)
            yield arm, record["latents"], [matched_control(frequency, contribution, chosen, pool, seed=draw).tolist()
                                           for draw in range(count)]


def evaluation_effects(run: SaeRun, arms: dict[str, dict], plan: StudyPlan) -> dict:
    """{arm: {intervention: {"arm": metrics, "controls": [test acc...], "controls_train": [...],
    "p_value": one-sided empirical p of the arm's test accuracy among the controls}}}."""
    none = steered_metrics(run.sae, run.data, torch.zeros(0, dtype=torch.long), plan.value, source=POST)
    results = {"none": none}
    for arm, chosen, draws in arms_with_draws(run, arms, plan.evaluation_controls):
        results[arm] = {}
        for intervention in plan.evaluation_interventions:
            def measure(latents):
                return steered_metrics(run.sae, run.data, torch.tensor(latents, dtype=torch.long), plan.value,
                                       source=POST, intervention=intervention)
            observed = measure(chosen)
            controls = [measure(draw) for draw in draws]
            test = [c["test/acc"] for c in controls]
            results[arm][intervention] = {
                "arm": observed, "controls": test, "controls_train": [c["train/acc"] for c in controls],
                "p_value": empirical_p_value(observed["test/acc"], test, "less")}
    return results


# -- training-time interventions ----------------------------------------------------------------------

def training_horizon(grokking_step: int, plan: StudyPlan, eval_every: int) -> int:
    steps = min(plan.max_horizon, math.ceil(plan.horizon_factor * grokking_step))
    return math.ceil(steps / eval_every) * eval_every


def intervention_hook(run: SaeRun, latents: list[int], intervention: str, value: float):
    """The hook that applies an intervention through host training (at the answer position)."""
    chosen = torch.tensor(latents, dtype=torch.long)
    if intervention == "project":
        return projection_hook(run.sae.W_dec.detach()[chosen, POST], centre=source_mean(run.data, POST))
    return clamp_hook(source_view(run.sae, POST), chosen, value)


def train_with_intervention(run: SaeRun, latents: list[int], intervention: str, plan: StudyPlan,
                            horizon: int, frequencies: list[int] | None, run_dir: Path) -> list[dict]:
    """Retrain the host from its own initialisation and data order for `horizon` steps with the
    intervention at every step; returns its evaluation history (with restricted/excluded loss every
    plan.progress_every steps when frequencies are given). Reused when run_dir already holds it."""
    spec = {"latents": latents, "intervention": intervention, "horizon": horizon, "value": plan.value,
            "frequencies": frequencies, "progress_every": plan.progress_every,
            "forward": "answer-position"}
    if intervention == "project":
        spec["projection_centre"] = "source mean"  # the hooked host computes only the answer position in its last block
    history_path = run_dir / "history.jsonl"
    if (run_dir / "spec.json").is_file() and json.loads((run_dir / "spec.json").read_text()) == spec \
            and (run_dir / "summary.json").is_file():
        return [json.loads(line) for line in history_path.read_text().splitlines()]
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted or different run: start it again
    host = run.config.host_model
    recipe = dataclasses.replace(host.train, num_steps=horizon, steps_after_grok=None,
                                 transition_checkpoint_every=None)
    hook_name = run.data.sources[POST].hook
    hook = intervention_hook(run, latents, intervention, plan.value)
    dataset = build_dataset(run.config.task)

    def measure(model, step):
        if frequencies and step % plan.progress_every == 0:
            return progress_measures(model, dataset, frequencies, hooks={hook_name: hook})
        return {}

    run_dir.mkdir(parents=True)
    write_json(run_dir / "spec.json", spec)
    run_host_training(run.config.task, host.architecture(), recipe, run_dir, NullTracker(), quiet=True,
                      hooks={hook_name: hook}, measure=measure)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only the curves are needed
    return [json.loads(line) for line in history_path.read_text().splitlines()]


def history_metrics(history: list[dict], horizon: int, frequencies: list[int] | None) -> dict:
    """The study's numbers from one training-time run."""
    metrics = {"test_auc": accuracy_auc(history, horizon, "test/acc"),
               "train_auc": accuracy_auc(history, horizon, "train/acc"),
               "train_loss": accuracy_auc(history, horizon, "train/loss"),
               "steps_to_90": steps_to(history, 0.9)}
    for key in history[-1]:
        if key.startswith("test/acc_"):  # per operation, on a mixed host
            metrics[f"test_auc_{key.removeprefix('test/acc_')}"] = accuracy_auc(history, horizon, key)
    if frequencies:
        metrics["progress"] = {h["step"]: {k: h[k] for k in h if k.endswith(("restricted_loss", "excluded_loss"))}
                               for h in history if "test/restricted_loss" in h}
    return metrics


def key_frequencies_of(run: SaeRun) -> list[int] | None:
    """The post-grok host's key frequencies on its operation's group (None for a mixed host)."""
    if len(run.config.task.operations) != 1:
        return None
    model = run.data.sources[POST].model
    operation = run.config.task.operations[0].value
    return operation_key_frequencies(model.embed.weight[:run.config.task.p].detach(), operation) or None


def training_effects(run: SaeRun, arms: dict[str, dict], plan: StudyPlan, out_dir: Path) -> dict:
    """{"horizon", "none": metrics, arm: {intervention: {"arm": metrics, "controls": [metrics...],
    "latents", "control_latents"}}, "curves": {...}} for one seed."""
    summary = json.loads((run.data.host_run_dir / "summary.json").read_text())
    grokked_at = summary["grokking_step"] or summary["final_step"]  # a host that never grokked: its whole run
    horizon = training_horizon(grokked_at, plan, run.config.host_model.train.eval_every)
    frequencies = key_frequencies_of(run)

    def train(latents, intervention, name):
        history = train_with_intervention(run, latents, intervention, plan, horizon, frequencies, out_dir / name)
        return history_metrics(history, horizon, frequencies), [(h["step"], h["test/acc"]) for h in history]

    none, none_curve = train([], "clamp", "none")
    results = {"horizon": horizon, "frequencies": frequencies, "none": none, "curves": {"none": none_curve}}
    for arm, chosen, draws in arms_with_draws(run, arms, plan.training_controls):
        results[arm] = {}
        for intervention in plan.training_interventions:
            observed, curve = train(chosen, intervention, f"{arm}-{intervention}")
            controls = [train(draw, intervention, f"{arm}-{intervention}-control{i}") for i, draw in enumerate(draws)]
            results[arm][intervention] = {"arm": observed, "controls": [c[0] for c in controls],
                                          "latents": chosen, "control_latents": draws}
            results["curves"][f"{arm}-{intervention}"] = curve
            results["curves"][f"{arm}-{intervention}-controls"] = [c[1] for c in controls]
    return results


# -- one seed, all seeds, the verdict ---------------------------------------------------------------

def study_seed(overrides: list[str], seed: int, plan: StudyPlan, out_dir: Path, task: str) -> dict:
    """Everything for one host seed; the crosscoder and the retrained hosts live under out_dir/seed<N>."""
    seed_dir = Path(out_dir) / f"seed{seed}"
    run = load_sae_run(train_or_reuse(seed_overrides(overrides, seed), seed_dir / "crosscoder"), task=task,
                       crosscoder=True)
    arms = select_arms(run, plan)
    log.info(f"seed {seed}: arms " + ", ".join(f"{a}: {len(r['latents'])} latents" for a, r in arms.items()))
    return {"seed": seed, "phases": phase_accuracies(run), "arms": arms,
            "crosscoder": {k: run.metrics.get(f"eval/test/{k}") for k in ("fvu", "l0", "dead_frac")},
            "evaluation": evaluation_effects(run, arms, plan),
            "training": training_effects(run, arms, plan, seed_dir / "retrained")}


def fisher_combined_p(p_values: list[float]) -> float:
    """Fisher's method: P(chi^2 with 2k df >= -2 sum ln p), closed form for even degrees of freedom.
    Conservative for empirical p-values (they are discrete); `combined_p` is exact for them."""
    half = -sum(math.log(p) for p in p_values)
    return min(1.0, math.exp(-half) * sum(half ** i / math.factorial(i) for i in range(len(p_values))))


def combined_p(p_values: list[float], controls: list[int], max_outcomes: int = 10 ** 7) -> float:
    """Exact combination of per-seed empirical p-values (1 + #controls at least as extreme) / (1 + n):
    under the null each is uniform on {1/(n+1), ..., 1}, independently per seed; returns
    P(product of null p-values <= the observed product). Below all 5 controls in 3 seeds gives
    (1/6)^3 ~ 0.005, as the decision rule states. Falls back to Fisher beyond max_outcomes."""
    if math.prod(n + 1 for n in controls) > max_outcomes:
        return fisher_combined_p(p_values)
    sums = torch.zeros(1, dtype=torch.float64)
    for n in controls:
        levels = torch.log(torch.arange(1, n + 2, dtype=torch.float64) / (n + 1))
        sums = (sums[:, None] + levels[None, :]).flatten()
    observed = sum(math.log(p) for p in p_values)
    return (sums <= observed + 1e-9).double().mean().item()


def verdict(seeds: list[dict], arm: str, intervention: str) -> dict:
    """Apply the module's decision rule to one arm and training-time intervention over the seeds."""
    rows = [s["training"][arm][intervention] for s in seeds if arm in s["training"]]
    if not rows:
        return {"verdict": "no latents", "seeds_with_latents": 0}
    p_values, below_all, below_largest, train_ok, counts = [], [], [], [], []
    for seed, row in zip([s for s in seeds if arm in s["training"]], rows):
        arm_auc = row["arm"]["test_auc"]
        controls = [c["test_auc"] for c in row["controls"]]
        p_values.append(empirical_p_value(arm_auc, controls, "less"))
        counts.append(len(controls))
        below_all.append(arm_auc < min(controls))
        largest = seed["training"].get("largest", {}).get(intervention)
        below_largest.append(arm == "largest" or (largest is not None and arm_auc < largest["arm"]["test_auc"]))
        train_ok.append(row["arm"]["train_loss"] <= max(c["train_loss"] for c in row["controls"]))
    combined = combined_p(p_values, counts)
    complete = len(rows) == len(seeds)
    if complete and all(below_all) and all(below_largest) and all(train_ok) and combined < SIGNIFICANCE:
        outcome = "confirmed"
    elif combined >= SIGNIFICANCE:
        outcome = "refuted"
    else:
        outcome = "inconclusive"
    return {"verdict": outcome, "seeds_with_latents": len(rows), "p_values": p_values, "combined_p": combined,
            "below_all_controls": below_all, "below_largest": below_largest, "train_loss_within_controls": train_ok}


def summarise(seeds: list[dict], plan: StudyPlan) -> list[dict]:
    """One row per arm and intervention, evaluation-time and training-time, with spreads and p-values."""
    rows = []
    for arm in plan.arms:
        for intervention in plan.evaluation_interventions:
            cells = [s["evaluation"][arm][intervention] for s in seeds if arm in s["evaluation"]]
            if cells:
                rows.append({"when": "evaluation", "arm": arm, "intervention": intervention, "seeds": len(cells),
                             "test_acc": [c["arm"]["test/acc"] for c in cells],
                             "train_acc": [c["arm"]["train/acc"] for c in cells],
                             "control_test_acc_mean": [sum(c["controls"]) / len(c["controls"]) for c in cells],
                             "control_test_acc_min": [min(c["controls"]) for c in cells],
                             "control_train_acc_mean": [sum(c["controls_train"]) / len(c["controls_train"])
                                                        for c in cells],
                             "none_test_acc": [s["evaluation"]["none"]["test/acc"] for s in seeds
                                               if arm in s["evaluation"]],
                             "p_values": [c["p_value"] for c in cells],
                             "combined_p": combined_p([c["p_value"] for c in cells],
                                                      [len(c["controls"]) for c in cells])})
        for intervention in plan.training_interventions:
            cells = [s["training"][arm][intervention] for s in seeds if arm in s["training"]]
            row = {"when": "training", "arm": arm, "intervention": intervention, "seeds": len(cells),
                   **verdict(seeds, arm, intervention)}
            if cells:
                row.update({"test_auc": [c["arm"]["test_auc"] for c in cells],
                            "train_auc": [c["arm"]["train_auc"] for c in cells],
                            "control_test_auc_mean": [sum(x["test_auc"] for x in c["controls"]) / len(c["controls"])
                                                      for c in cells],
                            "control_test_auc_min": [min(x["test_auc"] for x in c["controls"]) for c in cells],
                            "control_train_auc_mean": [sum(x["train_auc"] for x in c["controls"]) / len(c["controls"])
                                                       for c in cells],
                            "none_test_auc": [s["training"]["none"]["test_auc"] for s in seeds if arm in s["training"]],
                            **progress_columns(cells),
                            "steps_to_90": [c["arm"]["steps_to_90"] for c in cells],
                            "control_steps_to_90": [[x["steps_to_90"] for x in c["controls"]] for c in cells]})
            rows.append(row)
    return rows


def last_progress(metrics: dict, key: str) -> float | None:
    """`key` (e.g. test/restricted_loss) at the last step it was measured, or None (mixed hosts)."""
    progress = metrics.get("progress") or {}
    return progress[max(progress, key=int)][key] if progress else None


def progress_columns(cells: list[dict]) -> dict:
    """Restricted loss on test pairs and excluded loss on train pairs (Nanda et al.) at the end of
    the horizon, for the arm and the mean of its controls, per seed (empty for mixed hosts)."""
    columns = {}
    for key, name in (("test/restricted_loss", "test_restricted_loss"), ("train/excluded_loss", "train_excluded_loss")):
        arm = [last_progress(c["arm"], key) for c in cells]
        if any(value is None for value in arm):
            continue
        columns[name] = arm
        columns[f"control_{name}_mean"] = [sum(last_progress(x, key) for x in c["controls"]) / len(c["controls"])
                                           for c in cells]
    return columns


def grokked_seeds(study_one, plan: StudyPlan) -> tuple[list[dict], list[dict]]:
    """study_one(seed) over plan.seeds in order until plan.n_seeds hosts grokked: (results, skipped),
    a seed whose host never grokked (no pre/post checkpoints) skipped with its reason."""
    results, skipped = [], []
    for seed in plan.seeds:
        if plan.n_seeds is not None and len(results) >= plan.n_seeds:
            break
        try:
            results.append(study_one(seed))
        except NeverGrokkedError as error:
            log.warning(f"seed {seed} skipped: {error}")
            skipped.append({"seed": seed, "reason": str(error)})
    if not results or (plan.n_seeds is not None and len(results) < plan.n_seeds):
        raise NeverGrokkedError(f"only {len(results)} of seeds {plan.seeds} grokked; skipped: "
                                + "; ".join(f"seed {s['seed']}" for s in skipped) + " (add seeds to the plan)")
    return results, skipped


def run_study(overrides: list[str], task: str, plan: StudyPlan, out_dir: str | Path) -> dict:
    """All seeds of one operation's study, its summary rows, written to out_dir/study.json."""
    out_dir = Path(out_dir)
    seeds, skipped = grokked_seeds(lambda seed: study_seed(overrides, seed, plan, out_dir, task), plan)
    result = {"task": task, "plan": dataclasses.asdict(plan), "seeds": seeds, "skipped_seeds": skipped,
              "summary": summarise(seeds, plan)}
    write_json(out_dir / "study.json", result)
    return result


def format_summary(rows: list[dict]) -> str:
    """The summary rows as plain text (mean +- spread over seeds, per-seed p-values)."""
    def spread(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        mean = sum(values) / len(values)
        return f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]"

    lines = []
    for row in rows:
        head = f"{row['when']:>10} {row['arm']:>21} {row['intervention']:>7} (n={row['seeds']})"
        if row["when"] == "evaluation":
            lines.append(f"{head}: test acc {spread(row['test_acc'])} "
                         f"vs matched {spread(row['control_test_acc_mean'])}, "
                         f"train acc {spread(row['train_acc'])}, p {['%.2f' % p for p in row['p_values']]}")
        elif row["seeds"]:
            lines.append(f"{head}: test AUC {spread(row['test_auc'])} vs matched {spread(row['control_test_auc_mean'])}"
                         f", none {spread(row['none_test_auc'])}, train AUC {spread(row['train_auc'])}, "
                         f"combined p {row['combined_p']:.3f} -> {row['verdict']}")
        else:
            lines.append(f"{head}: no latents selected in any seed -> {row['verdict']}")
    return "\n".join(lines)


def plot_training_effects(seeds: list[dict], arm: str, intervention: str, path: str | Path, title: str = "") -> Path:
    """Test accuracy while the host retrains: the arm (bold), its matched controls (thin), and no
    intervention (dashed), one panel per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(seeds), figsize=(4 * len(seeds), 3.2), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        curves = seed["training"]["curves"]
        ax.plot(*zip(*curves["none"]), "k--", label="none (empty clamp)")
        for i, control in enumerate(curves.get(f"{arm}-{intervention}-controls", [])):
            ax.plot(*zip(*control), color="tab:grey", linewidth=0.8, label="matched controls" if i == 0 else None)
        if f"{arm}-{intervention}" in curves:
            ax.plot(*zip(*curves[f"{arm}-{intervention}"]), color="tab:red", linewidth=2,
                    label=f"{arm} ({intervention})")
        ax.set_title(f"seed {seed['seed']}")
        ax.set_xlabel("host training step")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# -- per-operation targeting on a mixed host ----------------------------------------------------------

def targeting_index(metrics: dict, none: dict, target: str, others: list[str]) -> float:
    """How much more a run lost on `target`'s test accuracy (AUC over the horizon, against "none")
    than on the other operations' on average: > 0 means the loss was aimed at `target`."""
    def drop(op):
        return none[f"test_auc_{op}"] - metrics[f"test_auc_{op}"]

    return drop(target) - sum(drop(op) for op in others) / len(others)


def targeting_seed(overrides: list[str], seed: int, plan: StudyPlan, out_dir: Path, task: str) -> dict:
    """One seed of the targeting study: a crosscoder over a mixed host, per operation the n latents
    with the largest generalisation effect on that operation (arm b, scored on its pairs), each
    clamped while the host retrains, against matched controls."""
    seed_dir = Path(out_dir) / f"seed{seed}"
    run = load_sae_run(train_or_reuse(seed_overrides(overrides, seed), seed_dir / "crosscoder"), task=task,
                       crosscoder=True)
    ops = [op.value for op in run.config.task.operations]
    if len(ops) < 2:
        raise ValueError(f"per-operation targeting needs a host trained on >= 2 operations, got {ops}")
    arms = {op: {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
            for op, record in arms_by_generalisation_effect(run, ops, plan.n_latents, plan.value).items()}
    training = training_effects(run, arms, plan, seed_dir / "retrained")
    rows = {}
    for op in ops:
        others = [o for o in ops if o != op]
        for intervention in plan.training_interventions:
            cell = training[op][intervention]
            arm_index = targeting_index(cell["arm"], training["none"], op, others)
            controls = [targeting_index(c, training["none"], op, others) for c in cell["controls"]]
            rows[f"{op}/{intervention}"] = {
                "target": op, "intervention": intervention, "index": arm_index, "control_indices": controls,
                "p_value": empirical_p_value(arm_index, controls, "greater"),
                "test_auc": {o: cell["arm"][f"test_auc_{o}"] for o in ops},
                "control_test_auc_mean": {o: sum(c[f"test_auc_{o}"] for c in cell["controls"]) / len(cell["controls"])
                                          for o in ops},
                "none_test_auc": {o: training["none"][f"test_auc_{o}"] for o in ops},
                "train_auc": cell["arm"]["train_auc"]}
    return {"seed": seed, "phases": phase_accuracies(run), "arms": arms, "training": training, "targeting": rows}


def run_targeting_study(overrides: list[str], task: str, plan: StudyPlan, out_dir: str | Path) -> dict:
    """All seeds of the per-operation targeting study, with per target the rule's verdict:
    targeted if in every seed the arm's targeting index is above all its matched controls' and the
    combined p < 0.05;
    not targeted if the combined p (`combined_p`) >= 0.05; otherwise inconclusive. Writes out_dir/targeting.json."""
    out_dir = Path(out_dir)
    seeds, skipped = grokked_seeds(lambda seed: targeting_seed(overrides, seed, plan, out_dir, task), plan)
    verdicts = {}
    for key in seeds[0]["targeting"]:
        cells = [s["targeting"][key] for s in seeds]
        above_all = [c["index"] > max(c["control_indices"]) for c in cells]
        combined = combined_p([c["p_value"] for c in cells], [len(c["control_indices"]) for c in cells])
        verdicts[key] = {"index": [c["index"] for c in cells],
                         "control_index_mean": [sum(c["control_indices"]) / len(c["control_indices"]) for c in cells],
                         "p_values": [c["p_value"] for c in cells], "combined_p": combined,
                         "verdict": "targeted" if all(above_all) and combined < SIGNIFICANCE else
                                    "not targeted" if combined >= SIGNIFICANCE else "inconclusive"}
    result = {"task": task, "plan": dataclasses.asdict(plan), "seeds": seeds, "skipped_seeds": skipped,
              "verdicts": verdicts}
    write_json(out_dir / "targeting.json", result)
    return result


def plot_progress(seed: dict, arm: str, intervention: str, path: str | Path, title: str = "") -> Path | None:
    """Nanda et al.'s progress measures while the host retrains (one seed): restricted loss on test
    pairs and excluded loss on train pairs, for no intervention, the arm and its matched controls.
    None for a host without them (mixed operations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    training = seed["training"]
    if not training["none"].get("progress") or arm not in training:
        return None
    cell = training[arm][intervention]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, ("test/restricted_loss", "train/excluded_loss")):
        def curve(metrics):
            steps = sorted(metrics["progress"], key=int)
            return [int(s) for s in steps], [metrics["progress"][s][key] for s in steps]

        for i, control in enumerate(cell["controls"]):
            ax.plot(*curve(control), color="tab:grey", linewidth=0.8, label="matched controls" if i == 0 else None)
        ax.plot(*curve(training["none"]), "k--", label="none")
        ax.plot(*curve(cell["arm"]), color="tab:red", linewidth=2, label=arm)
        ax.set_xlabel("host training step")
        ax.set_ylabel(key)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
