"""Build a run's dashboard: check what was asked (the dir, --out, --latents) before any work, load the
SAE and its activations, compute the content of its family, and write the site atomically."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from sae.atomic_io import atomic_dir
from sae.dashboard.index import table_columns
from sae.dashboard.inputs import RunInputs, dir_kind, load_run_inputs
from sae.dashboard.modular import modular_content
from sae.dashboard.protein import protein_content
from sae.dashboard.site import SiteContent, check_out, marker, write_run_site
from sae.errors import UserInputError

log = logging.getLogger(__name__)

DEFAULT_OUT = "dashboard"  # inside the run (or sweep) dir


def parse_latents(spec: str | None, d_sae: int) -> list[int]:
    """'0-99,512' -> the sorted ids; None -> every latent."""
    if spec is None:
        return list(range(d_sae))
    chosen: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high) if high else int(low)
        except ValueError:
            raise UserInputError(f"--latents: '{part}' is not a latent id or a range (pass e.g. --latents 0-99,512)") \
                from None
        if not 0 <= first <= last < d_sae:
            raise UserInputError(f"--latents: {part} is out of range: this SAE has latents 0-{d_sae - 1}")
        chosen.update(range(first, last + 1))
    return sorted(chosen)


def check_not_inside(out: Path, source: Path) -> None:
    """--out must not be the run/sweep dir itself or hold it: replacing it would delete the run."""
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents:
        raise UserInputError(f"--out {out} is {'the dir' if out == source else 'a parent of'} {source}: a dashboard "
                             f"replaces its --out dir; pick a new dir (the default is {source / DEFAULT_OUT})")


def build_run_dashboard(run_dir: Path, out: Path | None = None, latents: str | None = None, force: bool = False,
                        device: str = "cpu") -> Path:
    """Write the dashboard of a run into `out` (default <run dir>/dashboard); returns its index.html."""
    run_dir = Path(run_dir)
    if dir_kind(run_dir) != "run":
        raise UserInputError(f"{run_dir} is a sweep dir, not a run: build its sweep page instead")
    out = Path(out) if out is not None else run_dir / DEFAULT_OUT
    check_not_inside(out, run_dir)
    identity = marker("run", run_dir)
    check_out(out, identity, force)
    inputs = load_run_inputs(run_dir, device)
    ids = parse_latents(latents, inputs.sae.d_sae)
    started = time.perf_counter()
    content = run_content(inputs, ids)
    for note in content.notes:
        log.warning("Not drawn: %s", note)
    with atomic_dir(out) as tmp:
        write_run_site(content, tmp, {**identity, "checkpoint": inputs.checkpoint.name, "step": inputs.meta["step"],
                                      "latents": len(ids), "seconds": round(time.perf_counter() - started, 1)})
    return out / "index.html"


def run_content(inputs: RunInputs, ids: list[int]) -> SiteContent:
    facts = run_facts(inputs, ids)
    if inputs.modular is not None:
        content = modular_content(inputs, ids, facts)
    elif inputs.protein is not None:
        content = protein_content(inputs, ids, facts)
    else:
        content = decoder_content(inputs, ids, facts)
    content.title = (f"{inputs.meta['sae']['type']} · {inputs.sae.d_sae} latents · {inputs.config.task.name} · "
                     f"{inputs.run_dir.name}")
    content.notes = list(inputs.missing)
    return content


def decoder_content(inputs: RunInputs, ids: list[int], facts) -> SiteContent:
    """What needs only the SAE's weights: decoder norms (and relative norms for crosscoders)."""
    columns, values, histograms = table_columns(inputs.sae, inputs.source_names, inputs.meta["input_scale"], ids,
                                                None, None, "rows")
    return SiteContent(title="", family="decoder", facts=facts, latents=ids, columns=columns, values=values,
                       histograms=histograms, panel_meta={}, panels=lambda chosen: {})


def run_facts(inputs: RunInputs, ids: list[int]) -> list[tuple[str, str]]:
    meta, config = inputs.meta, inputs.config
    sae_cfg = meta["sae"]
    sparsity = f", k={sae_cfg['k']}" if "k" in sae_cfg else ""
    facts = [("run", str(inputs.run_dir.resolve())),
             ("checkpoint", f"{inputs.checkpoint.name} (step {meta['step']} of {config.num_steps})"),
             ("SAE", f"{sae_cfg['type']}, {inputs.sae.d_sae} latents{sparsity}, d_in {inputs.sae.d_in}"),
             ("sources", ", ".join(f"{s['name']} at {s['hook']}" for s in meta["sources"]))]
    task = config.task
    if hasattr(task, "p"):
        facts.append(("task", f"{task.name}: {', '.join(op.value for op in task.operations)} mod {task.p}, "
                              f"train fraction {task.train_fraction}, token positions {meta['token_positions']}"))
    else:
        facts.append(("task", f"{task.name} on {task.fasta}"))
    final = inputs.run_dir / "final_metrics.json"
    if final.is_file():
        metrics = json.loads(final.read_text())
        shown = [f"{key.split('/', 1)[1]} {metrics[key]:.4g}" for key in
                 ("eval/test/fvu", "eval/test/l0", "eval/test/dead_frac") if isinstance(metrics.get(key), (int, float))]
        facts.append(("final metrics", ", ".join(shown)))
    else:
        facts.append(("final metrics", "none yet: the run has not finished"))
    if len(ids) < inputs.sae.d_sae:
        facts.append(("latents shown", f"{len(ids)} of {inputs.sae.d_sae} (--latents)"))
    facts.append(("built", time.strftime("%Y-%m-%d %H:%M") + f" with torch {torch.__version__}"))
    return facts
