"""How long a dashboard takes to build, how much memory and disk it needs, and how fast its pages
render in headless Chromium, on two runs:

- grokking: the default run (`make train`: 512 latents over the 9409 pairs of addition mod 97);
- protein: a 16,384-latent TopK SAE over ~1M residues of an ESM-2 stand-in (the t6_8M architecture,
  d 320, random weights: its features mean nothing, the sizes are what matter) on copies of
  tests/data/real_proteins.fasta.

The build runs in a child process (`scripts/dashboard.py`), so its peak RSS is its own.
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sae.analysis.runs import compose_train_config, train_or_reuse
from sae.dashboard.browser import console_errors, headless_chromium, open_seconds, panel_seconds
from sae.dashboard.site import site_bytes

ROOT = Path(__file__).resolve().parents[2]
REAL_FASTA = ROOT / "tests" / "data" / "real_proteins.fasta"
PANELS_TIMED = 5


def grokking_run(work: Path) -> Path:
    return train_or_reuse(["tracking=disabled"], work / "grokking_default")


def repeated_fasta(residues: int, out: Path) -> Path:
    """Copies of the real FASTA (ids made unique per copy) until it holds at least `residues` after
    cropping to ESM-2's 1022 residues per record."""
    from Bio.SeqIO.FastaIO import SimpleFastaParser

    text = REAL_FASTA.read_text()
    with open(REAL_FASTA) as handle:
        per_copy = sum(min(len(sequence), 1022) for _, sequence in SimpleFastaParser(handle))
    copies = -(-residues // per_copy)
    with open(out, "w") as handle:
        for copy in range(copies):
            handle.write(text.replace(">", f">c{copy}_"))
    return out


def protein_run(work: Path, residues: int, latents: int) -> Path:
    from sae.host_models.esm2 import random_esm2, save_fair_esm_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "esm2_t6_8M_random.pt"
    if not checkpoint.is_file():
        save_fair_esm_checkpoint(random_esm2("esm2_t6_8M_UR50D"), checkpoint)
    fasta = work / f"proteins_{residues}.fasta"
    if not fasta.is_file():
        repeated_fasta(residues * 23 // 20, fasta)  # ~10% are held out by a hash of the id: keep a margin
    test_rows = residues // 10
    overrides = ["task=protein_mlm", f"task.fasta={fasta}", "host_model=esm2_t6_8M",
                 f"host_model.checkpoints=[{checkpoint}]", "host_model.layers=[4]",
                 f"task.max_train_tokens={residues - test_rows}", f"task.max_test_tokens={test_rows}",
                 "task.test_fraction=0.1", f"sae.sparse_dim={latents}", "sae.k=32", "num_steps=50",
                 "batch_size=1024", "eval_every=50", "checkpoint_every=50", "task.eval_sequences=4",
                 f"task.activation_cache={work / 'cache'}", "tracking=disabled"]
    compose_train_config(overrides)  # checked before the long extraction
    return train_or_reuse(overrides, work / f"protein_{latents}")


def build(run_dir: Path, out: Path) -> dict:
    """Build in a child process: seconds, its peak RSS, the site's size."""
    child = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:]); s = time.perf_counter() - t; "
             "print('RESULT', r.returncode, s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    command = [sys.executable, "-c", child, sys.executable, str(ROOT / "scripts" / "dashboard.py"), str(run_dir),
               "--out", str(out), "--force"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    _, code, seconds, rss_kib = line.split()
    if int(code) != 0:
        raise RuntimeError(f"dashboard build failed: {result.stderr.strip().splitlines()[-1:]}")
    return {"seconds": float(seconds), "peak_rss_gib": int(rss_kib) / 2**20, "site_mb": site_bytes(out) / 1e6}


def browse(out: Path, screenshot: Path | None = None) -> dict:
    """Index render and panel render times in headless Chromium (medians), and console errors."""
    index = json.loads((out / "data" / "index.js").read_text().removeprefix("window.DASHBOARD = ").rstrip().rstrip(";"))
    alive = [latent for latent, dead in zip(index["latents"], index["values"].get("dead", [])) if not dead]
    chosen = alive[:: max(1, len(alive) // PANELS_TIMED)][:PANELS_TIMED] or index["latents"][:PANELS_TIMED]
    with headless_chromium(height=1600 if screenshot else 1100) as driver:
        url = (out / "index.html").resolve().as_uri()
        loads = [open_seconds(driver, url) for _ in range(3)]
        panels = [panel_seconds(driver, latent) for latent in chosen]
        if screenshot is not None:
            panel_seconds(driver, showcase(index))
            time.sleep(0.3)
            driver.save_screenshot(str(screenshot))
        errors = console_errors(driver)
    return {"index_seconds": statistics.median(loads), "panel_seconds": statistics.median(panels),
            "panel_seconds_max": max(panels), "console_errors": len(errors)}


def showcase(index: dict) -> int:
    """The latent a screenshot opens: the one whose map is most one Fourier mode (modular), else the
    most frequent."""
    values = index["values"]
    key = "top_share" if "top_share" in values else "freq_train"
    scores = [-1.0 if v is None else v for v in values[key]]
    return index["latents"][max(range(len(scores)), key=scores.__getitem__)]


def machine() -> str:
    import os
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def peak_self_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
