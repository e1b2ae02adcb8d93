"""The training-recipe study (scripts/recipe_study.py): one recipe knob at a time against a base, on
the synthetic benchmark's data (sae/bench/synthetic.py), over several seeds, sizes and k.

    python scripts/recipe_study.py --vary lr=0.002,0.004,0.008 schedule=constant,linear_decay \
        --sizes 128,2048,16 128,2048,32 --seeds 0 1 2 --tokens 819200

Each value of each --vary knob is a recipe (the base with that one knob changed); every recipe runs
at every size and seed, in this process (quality only: no timing is taken from these runs). The
table gives mean and standard deviation over seeds of FVU, the recovered fraction, dead latents and
L0, and a paired t-test of each recipe against the base on FVU (same seeds, same data).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics

from scipy import stats

from sae.bench.synthetic import DATA_GENERATORS, Case, case_lr_problem, memory_refusal, parse_size, run_case
from sae.training.schedules import Schedule

# what the study may vary, with the type of its values
KNOBS = {"lr": float, "lr_sum": float, "schedule": str, "warmup_fraction": float, "aux_coef": float, "k_aux": int,
         "init_decoder_norm": float, "beta2": float, "batch": int, "dead_window": int,
         "min_lr_ratio": float, "optimizer": str, "b_dec_init": str,
         "resample_every": int, "resample_until": float, "resample_scale": float,
         "jumprelu_coef": float, "bandwidth": float, "init_l0": int}  # the last three: JumpReLU's
CHOICES = {"schedule": [s.value for s in Schedule], "optimizer": ["adam", "signum"], "b_dec_init": ["mean", "zeros"]}
METRICS = {"fvu": "FVU", "recovered": "recovered", "dead_frac": "dead", "l0": "L0", "mean_max_cos": "mean max cos"}
HIERARCHY_METRICS = {"parents_recovered": "parents recovered", "children_recovered": "children recovered",
                     "parent_recall_alone": "parent recall alone", "parent_recall_with_child": "with a child",
                     "absorption": "absorption"}  # --children (sae/bench/hierarchy.py)
FORMATS = {"fvu": ".4f", "recovered": "%", "dead_frac": "%", "l0": ".1f", "mean_max_cos": ".3f",
           "parents_recovered": "%", "children_recovered": "%", "parent_recall_alone": ".3f",
           "parent_recall_with_child": ".3f", "absorption": ".3f"}


def parse_vary(text: str) -> tuple[str, list]:
    key, _, values = text.partition("=")
    if key not in KNOBS or not values:
        raise argparse.ArgumentTypeError(f"--vary takes knob=v1,v2,... with knob one of {sorted(KNOBS)}, got '{text}'")
    try:
        parsed = [KNOBS[key](v) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--vary {key}: values must be {KNOBS[key].__name__}, got '{values}'") from None
    wrong = [v for v in parsed if key in CHOICES and v not in CHOICES[key]]
    if wrong:
        raise argparse.ArgumentTypeError(f"--vary {key}: values must be among {CHOICES[key]}, got '{wrong[0]}'")
    return key, parsed


def recipes(base: dict, vary: list[tuple[str, list]]) -> list[dict]:
    """The base, then the base with one knob changed per value (values equal to the base skipped).
    lr and lr_sum are one knob in two forms: a recipe that sets lr drops the base's lr_sum."""
    out = [dict(base)]
    for key, values in vary:
        changed = [{**base, key: value, **({"lr_sum": None} if key == "lr" and "lr_sum" in base else {})}
                   for value in values]
        out += [recipe for recipe in changed if recipe != base]
    return out


def summarise(results: list[dict]) -> str:
    """Markdown: one row per (size, recipe), mean ± sd over seeds, paired p-value on FVU vs the base."""
    metrics = METRICS | (HIERARCHY_METRICS if "absorption" in results[0] else {})
    lines = [f"| size (d_in, d_sae, k) | recipe | seeds | {' | '.join(metrics.values())} | p (FVU vs base) |",
             "| --- " * (len(metrics) + 4) + "|"]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["d_in"], r["d_sae"], r["k"], r["recipe"]), []).append(r)
    for (d_in, d_sae, k, recipe), runs in groups.items():
        base_runs = {r["seed"]: r for r in groups[(d_in, d_sae, k, "base")]}
        cells = [_mean_sd([r[m] for r in runs], FORMATS[m]) for m in metrics]
        pairs = [(r["fvu"], base_runs[r["seed"]]["fvu"]) for r in runs if r["seed"] in base_runs]
        p = "-" if recipe == "base" or len(pairs) < 2 else _paired_p(pairs)
        lines.append(f"| {(d_in, d_sae, k)} | {recipe} | {len(runs)} | {' | '.join(cells)} | {p} |")
    return "\n".join(lines)


def _paired_p(pairs: list[tuple[float, float]]) -> str:
    """Paired t-test p-value; '= base' when every seed gave the base's value exactly (no test)."""
    if all(a == b for a, b in pairs):
        return "= base"
    return f"{stats.ttest_rel(*zip(*pairs)).pvalue:.3g}"


def _mean_sd(values: list[float], fmt: str) -> str:
    percent = fmt == "%"
    scale = 100 if percent else 1
    mean = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.3g}% ± {sd:.2g}" if percent else f"{mean:{fmt}} ± {sd:{fmt}}"


def describe(recipe: dict, base: dict) -> str:
    changed = [f"{key}={value}" for key, value in recipe.items() if value != base[key]]
    return ", ".join(changed) or "base"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description="one-knob-at-a-time study of the training recipe (TopK and the other architectures)")
    parser.add_argument("--vary", nargs="*", type=parse_vary, default=[], help="knob=v1,v2,... (one recipe per value)")
    parser.add_argument("--base", nargs="*", type=parse_vary, default=[], help="knob=value: change the base recipe")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(128, 2048, 16), (128, 2048, 32)])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tokens", type=int, default=819_200)
    parser.add_argument("--true-features", type=float, default=0.5, help="ground-truth features per latent")
    parser.add_argument("--data", default="flat", choices=DATA_GENERATORS,
                        help="flat: independent, equally likely features; correlated: firing spread 50x and co-firing "
                             "(sae/bench/correlated.py)")
    parser.add_argument("--varied-complexity", action="store_true",
                        help="a geometric number of true features per token (mean k/2; 13%% above k) instead of k/2")
    parser.add_argument("--children", type=int, default=0,
                        help="> 0: hierarchical features, each parent with this many children; adds the "
                             "absorption columns (sae/bench/hierarchy.py)")
    parser.add_argument("--token-features", type=int, default=None,
                        help="true features per token (on average); default k / 2 of each size")
    parser.add_argument("--impl", default="topk", choices=["topk", "batchtopk", "matryoshka", "jumprelu", "sparsify",
                                                        "saelens"],
                        help="sparsify, saelens: their own recipe (no --vary), for a reference row over the same seeds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write every run here")
    args = parser.parse_args(argv)
    if args.children < 0:
        parser.error(f"--children must be >= 0 (0: no hierarchy), got {args.children}")
    if args.token_features is not None and args.token_features < 1:
        parser.error(f"--token-features must be >= 1, got {args.token_features}")
    if args.data == "correlated" and (args.children or args.varied_complexity):
        parser.error("--data correlated draws its own data: no --children or --varied-complexity with it")
    if args.children and args.varied_complexity:
        parser.error("--children and --varied-complexity draw two different kinds of data: pick one")
    defaults = Case("topk", 0, 0, 0, 4096, 0, 2e-3, "cpu", 1, "float32")
    base = {key: getattr(defaults, key) for key in KNOBS}
    for key, values in args.base:
        if len(values) != 1:
            parser.error(f"--base {key}: one value, got {values}")
        base[key] = values[0]
    signum = any(r["optimizer"] == "signum" for r in recipes(base, args.vary))
    if signum and not importlib.util.find_spec("schedulefree"):
        parser.error("optimizer=signum needs the schedulefree package: pip install -e '.[compare]'")
    import torch

    threads = args.threads or torch.get_num_threads()
    runs = [(dataclasses.replace(defaults, impl=args.impl, d_in=d_in, d_sae=d_sae, k=k, tokens=args.tokens,
                                 threads=threads, seed=seed, true_features=args.true_features,
                                 varied_complexity=args.varied_complexity, children=args.children,
                                 token_features=args.token_features, data=args.data, **recipe), recipe)
            for d_in, d_sae, k in args.sizes for recipe in recipes(base, args.vary) for seed in args.seeds]
    refusal = (next(filter(None, (case_lr_problem(case, "lr", "lr_sum") for case, _ in runs)), None)
               or memory_refusal([case for case, _ in runs], "cpu"))
    if refusal:
        parser.error(refusal)
    results = []
    for case, recipe in runs:
        result = {**run_case(case), "recipe": describe(recipe, base)}
        result.pop("curve")
        results.append(result)
        print(f"{(case.d_in, case.d_sae, case.k)} {result['recipe']:28s} seed {case.seed}: FVU {result['fvu']:.4f} "
              f"recovered {result['recovered']:.1%} dead {result['dead_frac']:.1%} L0 {result['l0']:.1f}", flush=True)
    print(summarise(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return results
