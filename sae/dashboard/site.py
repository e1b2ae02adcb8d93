"""The static site: `index.html`, the package's hand-written assets, and the numbers as `data/*.js`
files that assign to a global (browsers refuse `fetch()` from `file://`, script tags they load).

    index.html            the page (static/index.html with the title filled in)
    assets/               static/dashboard.{js,css}, copied
    data/index.js         window.DASHBOARD = {facts, notes, columns, values, histograms, panel_meta}
    data/latents_NNNNN.js (window.DASHBOARD_SHARDS ||= {})[N] = {latent id: panel data}: SHARD_LATENTS
                          latents each, loaded when a panel of one of them is opened
    dashboard.json        what the site shows (kind, source dir, checkpoint): lets a rebuild replace
                          it and refuses to overwrite anything else without --force

Python computes every number; the page lays them out. The site is written into a temp dir beside
the target and renamed into place at the end, so a failed build leaves the old site (or none).
"""
from __future__ import annotations

import base64
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from sae.errors import UserInputError

STATIC = Path(__file__).resolve().parent / "static"
MARKER = "dashboard.json"
MARKER_FORMAT = 1
SHARD_LATENTS = 64
ASSETS = ("dashboard.js", "dashboard.css")


@dataclass
class Column:
    """One column of the latent table. fmt: int | float | freq (log scale) | bool | text."""

    key: str
    label: str
    fmt: str
    help: str


@dataclass
class Histogram:
    title: str
    xlabel: str
    edges: list[float]
    counts: list[int]
    note: str = ""


@dataclass
class SiteContent:
    """Everything one run's dashboard shows. `panels(ids)` returns the panel data of those latents;
    it is called shard by shard, so per-latent data never has to be in memory all at once."""

    title: str
    family: str  # modular | protein | decoder (weights only: no activations to show)
    facts: list[tuple[str, str]]
    latents: list[int]
    columns: list[Column]
    values: dict[str, list]
    histograms: list[Histogram]
    panel_meta: dict
    panels: Callable[[list[int]], dict[int, dict]]
    notes: list[str] = field(default_factory=list)


# -- numbers as compact JSON ---------------------------------------------------------------------

def quantized(values: np.ndarray) -> dict:
    """Non-negative values as uint8 (0 = 0, 255 = the max) in base64: {"max", "q"} (NaN -> 0)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    top = float(values.max()) if values.size else 0.0
    scaled = np.zeros(values.shape, np.uint8) if top <= 0 else np.rint(np.clip(values, 0, None) / top * 255)
    return {"max": rounded(top), "q": base64.b64encode(scaled.astype(np.uint8).tobytes()).decode("ascii")}


def unit_bytes(values: np.ndarray) -> str:
    """Values in [0, 1] (clipped; NaN -> 0) as uint8 0..255 in base64."""
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    return base64.b64encode(np.rint(values * 255).astype(np.uint8).tobytes()).decode("ascii")


def rounded(value, digits: int = 4):
    """A float with `digits` significant digits (None for NaN/inf: JSON has neither)."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def rounded_list(values: Iterable, digits: int = 4) -> list:
    return [rounded(v, digits) for v in np.asarray(values, dtype=np.float64).ravel()]


def histogram(values: np.ndarray, bins: int, value_range: tuple[float, float], title: str, xlabel: str,
              note: str = "") -> Histogram:
    counts, edges = np.histogram(values, bins=bins, range=value_range)
    return Histogram(title, xlabel, rounded_list(edges), [int(c) for c in counts], note)


def js_assignment(target: str, data) -> str:
    return f"{target} = {json.dumps(data, separators=(',', ':'), allow_nan=False)};\n"


# -- the output dir --------------------------------------------------------------------------------

def marker(kind: str, source: Path, **details) -> dict:
    return {"format": MARKER_FORMAT, "kind": kind, "source": str(Path(source).resolve()), **details}


def check_out(out: Path, expected: dict, force: bool) -> None:
    """Before any work: `out` is new, empty, or a dashboard of the same source (rebuilt in place);
    anything else is refused unless --force."""
    out = Path(out)
    if not out.exists() or force:
        if out.exists() and not out.is_dir():
            raise UserInputError(f"--out {out} is a file, not a dir: choose another --out")
        return
    if not out.is_dir():
        raise UserInputError(f"--out {out} is a file, not a dir: choose another --out")
    if not any(out.iterdir()):
        return
    try:
        found = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        found = None
    found = found if isinstance(found, dict) else {}
    if (found.get("kind"), found.get("source")) != (expected["kind"], expected["source"]):
        what = f"the dashboard of {found['source']}" if "source" in found else f"not a dashboard (no {MARKER})"
        raise UserInputError(f"--out {out} exists and is {what}, not a dashboard of {expected['source']}: "
                             "choose another --out, or pass --force to replace it")


def write_run_site(content: SiteContent, tmp: Path, identity: dict) -> None:
    """Write the whole site into the (empty) temp dir `tmp`."""
    (tmp / "data").mkdir()
    copy_assets(tmp)
    page = (STATIC / "index.html").read_text().replace("{{TITLE}}", html_escape(content.title))
    (tmp / "index.html").write_text(page)
    shards = [content.latents[i:i + SHARD_LATENTS] for i in range(0, len(content.latents), SHARD_LATENTS)]
    index = {"title": content.title, "family": content.family, "facts": content.facts, "notes": content.notes,
             "latents": content.latents, "shard_latents": SHARD_LATENTS,
             "columns": [column.__dict__ for column in content.columns], "values": content.values,
             "histograms": [h.__dict__ for h in content.histograms], "panel_meta": content.panel_meta}
    (tmp / "data" / "index.js").write_text(js_assignment("window.DASHBOARD", index))
    for number, ids in enumerate(shards):
        panels = {str(latent): data for latent, data in content.panels(ids).items()}
        target = f"(window.DASHBOARD_SHARDS = window.DASHBOARD_SHARDS || {{}})[{number}]"
        (tmp / "data" / f"latents_{number:05d}.js").write_text(js_assignment(target, panels))
    (tmp / MARKER).write_text(json.dumps(identity, indent=2) + "\n")


def copy_assets(tmp: Path) -> None:
    (tmp / "assets").mkdir()
    for name in ASSETS:
        shutil.copyfile(STATIC / name, tmp / "assets" / name)


def html_escape(text: str) -> str:
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;"))


def site_bytes(out: Path) -> int:
    return sum(path.stat().st_size for path in Path(out).rglob("*") if path.is_file())
