"""`scripts/export.py`: a trained SAE as a SAELens or sparsify folder with a model card (README.md
with Hugging Face front matter), ready to be pushed to a model repo as is.

Everything that can refuse (unknown format, missing or corrupt checkpoint, an architecture the
target cannot hold, an output dir in the way) is checked before anything is written; the folder
then appears in one rename (atomic_dir), so a failed export leaves nothing behind.
"""
from __future__ import annotations

import json
from pathlib import Path

from sae.atomic_io import atomic_dir
from sae.errors import UserInputError
from sae.saes import load_with_source
from sae.saes.base import SparseCoder
from sae.saes.foreign import FORMATS, exported_architecture, write_foreign

LOADERS = {"saelens": "from sae_lens import SAE\nsae = SAE.load_from_disk(\"<this folder>\")",
           "sparsify": "from sparsify import Sae\nsae = Sae.load_from_disk(\"<this folder>\")"}
METRICS = ("fvu", "l0", "dead_frac")


def export_sae(source: Path, fmt: str, out: Path) -> Path:
    if fmt not in FORMATS:
        raise UserInputError(f"--format {fmt}: unknown, expected one of {list(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"--out {out} exists and is not an empty dir: choose a new one")
    checkpoint, sae = load_with_source(Path(source))
    architecture = exported_architecture(sae, fmt)
    run = run_record(checkpoint)
    with atomic_dir(out) as tmp:
        write_foreign(sae, fmt, tmp, metadata(sae, run))
        (tmp / "README.md").write_text(model_card(sae, fmt, architecture, run))
    return out


def run_record(checkpoint: Path) -> dict:
    """What the checkpoint and its run dir say about how the SAE was trained."""
    info = json.loads((checkpoint / "sae.json").read_text())
    config = json.loads((checkpoint / "config.json").read_text())
    final_path = checkpoint.parent.parent / "final_metrics.json"
    final = json.loads(final_path.read_text()) if final_path.is_file() else {}
    return {"info": info, "config": config, "final": final if final.get("step") == info.get("step") else {}}


def hook_of(info: dict, key: str = "sources") -> str:
    """The host hook a checkpoint's first source (or a transcoder's target: key="targets") reads."""
    entries = info.get(key) or [{}]
    return entries[0].get("hook", "?") if isinstance(entries[0], dict) else str(entries[0])


def metadata(sae: SparseCoder, run: dict) -> dict:
    """SAELens metadata: where the activations come from, and our training record."""
    config, info = run["config"], run["info"]
    hooks = {"hook_name": hook_of(info)} | ({"hook_name_out": hook_of(info, "targets")} if sae.transcoder else {})
    return {**hooks, "model_name": host_name(config),
            "trained_with": "train-sae", "training_steps": info.get("step"),
            "training_tokens": info.get("step", 0) * config.get("batch_size", 0)}


def host_name(config: dict) -> str:
    host = config.get("host_model", {})
    return host.get("pretrained") or host.get("name") or host.get("arch") or "grokking transformer"


def kind_of(sae: SparseCoder) -> str:
    return ("skip transcoder" if sae.cfg.skip else "transcoder") if sae.transcoder else "SAE"


def model_card(sae: SparseCoder, fmt: str, architecture: str, run: dict) -> str:
    config, info, final = run["config"], run["info"], run["final"]
    library = "saelens" if fmt == "saelens" else "sparsify"
    lines = ["---", f"library_name: {library}", "tags:", "- sparse-autoencoder", "- interpretability", "- train-sae",
             "---", "", f"# {sae.cfg.type} {kind_of(sae)} on {hook_of(info)}"
             + (f" -> {hook_of(info, 'targets')}" if sae.transcoder else ""), "",
             f"Trained with train-sae, exported for {library} (architecture `{architecture}`"
             + (f", inference threshold of the {sae.cfg.type} training rule" if architecture == "jumprelu"
                and sae.cfg.type != "jumprelu" else "") + ").", "",
             f"- input: `{hook_of(info)}` of {host_name(config)} (task: {config.get('task', {})})"
             + (f"; predicts `{hook_of(info, 'targets')}`" if sae.transcoder else ""),
             f"- d_in {sae.d_in}, d_sae {sae.d_sae}" + (f", k {sae.cfg.k}" if hasattr(sae.cfg, "k") else ""),
             f"- {info.get('step')} steps x batch {config.get('batch_size')}, lr {config.get('lr')}, seed "
             f"{config.get('seed')}; takes raw activations (the training normalisation is folded into the weights)",
             "", "## Final metrics", ""]
    rows = [(key, value) for key, value in final.items() if key.startswith("eval/") and key.rsplit("/", 1)[-1]
            in METRICS + ("loss_recovered", "acc_spliced")]
    table = ["| metric | value |", "| --- | --- |"] + [f"| {key} | {value:.4g} |" for key, value in rows]
    lines += table if rows else ["(the run's final_metrics.json is not beside this checkpoint)"]
    lines += ["", "## Load", "", "```python", LOADERS[fmt], "```", "", "## Training config", "", "```json",
              json.dumps(config, indent=2), "```", ""]
    return "\n".join(lines)
