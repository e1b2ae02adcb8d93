"""The benchmark on real activations (scripts/benchmark_real.py): ours and other libraries' TopK SAEs
(or ours alone in any architecture: `--impls topk sae=batchtopk`) trained on the same host
activations for the same tokens, scored by our evaluation (FVU, L0, dead latents, and loss
recovered with the reconstruction spliced into the host), train and test rows.

    python scripts/benchmark_real.py --host grokking          # the default config's host (make train's)
    python scripts/benchmark_real.py --host esm2 --impls topk,sparsify --steps 500

Hosts: "grokking" is the default config (task=addition, host_model=transformer; its host is
trained once into host_model.cache_dir if absent); "esm2" is an ESM-2 t6-8M stand-in: fair-esm's
architecture with random weights (no weights can be downloaded here, so its features mean nothing;
it checks that a recipe tuned on synthetic data is not worse on real transformer activations) on
tests/data/real_proteins.fasta, masked-LM loss recovered. Every implementation gets the config's
SAE size (sae.sparse_dim, sae.k), batch size and b_dec initialisation (the data mean), the same
batches, and its own recommended optimiser; ours runs the config's lr, schedule and clipping.
Theirs are saved in their library's format and read back with sae.saes.load, so one evaluation
scores everyone.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from sae.activations import load_activations
from sae.activations.batches import calibration_sample, column_mean
from sae.bench.synthetic import Case, train_sae
from sae.bench.external import EXTERNAL, build_external, external_available
from sae.metrics.evaluate import evaluate
from sae.saes import build_sae
from sae.saes.foreign import load_foreign

ROOT = Path(__file__).resolve().parents[2]
ESM2_STAND_IN = "esm2_t6_8M_UR50D"
HOSTS = ("grokking", "esm2")
IMPLEMENTATIONS = ("topk",) + EXTERNAL


def host_overrides(host: str, workdir: Path) -> list[str]:
    if host == "grokking":
        return []
    from sae.host_models.esm2 import random_esm2, save_fair_esm_checkpoint

    checkpoint = workdir / f"{ESM2_STAND_IN.split('_UR')[0]}_random.pt"
    if not checkpoint.is_file():
        save_fair_esm_checkpoint(random_esm2(ESM2_STAND_IN, 0), checkpoint)
    return ["task=protein_mlm", "host_model=esm2_t6_8M", f"task.fasta={ROOT / 'tests/data/real_proteins.fasta'}",
            f"host_model.checkpoints=[{checkpoint}]", f"task.activation_cache={workdir / 'esm2_cache'}",
            "task.max_length=256", "task.tokens_per_batch=4096"]


def train_one(impl: str, cfg, data, steps: int, seed: int):
    """(SAE as our SparseCoder, tokens/s) after `steps` steps of cfg.batch_size rows drawn from the
    training table (with replacement, one generator for every implementation)."""
    torch.manual_seed(seed)
    n_sources, d_in = data.train.shape[1], data.train.shape[2]
    architecture = impl if impl in EXTERNAL else cfg.sae.type  # ours: the config's
    case = Case(architecture, d_in, cfg.sae.sparse_dim, getattr(cfg.sae, "k", 0), cfg.batch_size,
                cfg.batch_size * steps, cfg.lr, "cpu", torch.get_num_threads(), "float32",
                schedule=cfg.scheduler.name.value, lr_sum=cfg.lr_sum, warmup_fraction=cfg.scheduler.warmup_fraction,
                resample_every=0 if impl in EXTERNAL else cfg.sae.resample_every or 0,
                resample_until=cfg.sae.resample_until, resample_scale=cfg.sae.resample_encoder_scale)
    if impl in EXTERNAL:
        sae = build_external(impl, d_in, case.d_sae, case.k, "cpu")
    else:
        sae = build_sae(cfg.sae, n_sources, d_in)
    with torch.no_grad():
        sae.b_dec.copy_(column_mean(data.train).view_as(sae.b_dec))
    sample = calibration_sample(data.train)
    if impl not in EXTERNAL:
        sae.init_from_data(sample)
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(len(data.train), (cfg.batch_size,), generator=generator) for _ in range(steps)]
    timing = train_sae(sae, case, lambda step: data.train[batches[step]], steps, evaluate=dict)
    if impl in EXTERNAL:
        sae = as_our_sae(sae)
    else:
        sae.calibrate_for_inference(sample)  # as the trainer does before it evaluates
    return sae, timing["tokens_per_s"]


def as_our_sae(adapter):
    """Another library's trained SAE, saved in its own format and read back as our SparseCoder (at
    the iterate that reconstructs better when its optimiser keeps two: the training one)."""
    with tempfile.TemporaryDirectory() as folder:
        if hasattr(adapter, "iterates"):
            list(adapter.iterates())  # ends on the training iterate
            adapter.sae.save_to_disk(folder)
        else:
            adapter.sae.save_model(folder)
        return load_foreign(Path(folder))


def headline(metrics: dict, source: str) -> dict:
    row = {}
    for split in ("train", "test"):
        p = f"eval/{split}"
        row.update({f"{split}_fvu": metrics[f"{p}/fvu"], f"{split}_l0": metrics[f"{p}/l0"],
                    f"{split}_dead": metrics[f"{p}/dead_frac"],
                    f"{split}_loss_recovered": metrics[f"{p}/{source}/loss_recovered"]})
    return row


def table(rows: list[dict]) -> str:
    lines = ["| host | impl | steps x batch | tokens/s | FVU train / test | L0 test | dead test | "
             "loss recovered train / test |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['host']} | {r['impl']} | {r['steps']} x {r['batch']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['train_fvu']:.4f} / {r['test_fvu']:.4f} | {r['test_l0']:.1f} | {r['test_dead']:.1%} | "
                     f"{r['train_loss_recovered']:.3f} / {r['test_loss_recovered']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    from sae.analysis.runs import compose_train_config

    parser = argparse.ArgumentParser(description="ours vs other libraries' TopK SAEs on real host activations")
    parser.add_argument("--host", nargs="+", choices=HOSTS, default=list(HOSTS))
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help=f"some of {', '.join(IMPLEMENTATIONS)}")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's num_steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "bench_real"),
                        help="the ESM-2 stand-in's checkpoint and activation cache")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("overrides", nargs="*", help="config overrides as for scripts/train.py (e.g. sae.k=16)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(IMPLEMENTATIONS))
    if unknown:
        parser.error(f"--impls: unknown {unknown}, expected some of {list(IMPLEMENTATIONS)}")
    missing = [impl for impl in impls if impl in EXTERNAL and not external_available(impl)]
    if missing:
        parser.error(f"--impls {','.join(missing)} needs the comparison libraries: pip install -e '.[compare]'")
    if args.steps is not None and args.steps < 8:
        parser.error(f"--steps must be >= 8 (the timed segments need them), got {args.steps}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for host in args.host:
        cfg = compose_train_config(host_overrides(host, workdir) + list(args.overrides))
        if cfg.sae.type != "topk" and set(impls) & set(EXTERNAL):
            parser.error(f"sae={cfg.sae.type}: the other libraries' columns are TopK SAEs; use sae=topk "
                         f"(or --impls topk alone: ours with sae={cfg.sae.type})")
        data = load_activations(cfg.task, cfg.host_model, cfg.sae.normalize, "cpu")
        steps = args.steps or cfg.num_steps
        for impl in impls:
            sae, tokens_per_s = train_one(impl, cfg, data, steps, args.seed)
            metrics = evaluate(sae, data)
            label = cfg.sae.type if impl == "topk" else impl  # ours: whichever architecture the config has
            rows.append({"host": host, "impl": label, "steps": steps, "batch": cfg.batch_size,
                         "tokens_per_s": tokens_per_s, **headline(metrics, data.sources[0].name)})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows
