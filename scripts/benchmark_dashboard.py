"""Dashboard benchmark (README "Latent dashboards"): build time, peak memory and site size, and
render times in headless Chromium, on the default grokking run and on a 16,384-latent SAE over ~1M
residues of an ESM-2 stand-in (see sae/bench/dashboard.py).

    python scripts/benchmark_dashboard.py                         # both runs (trains them first: ~15 min)
    python scripts/benchmark_dashboard.py --skip-protein --screenshot docs/dashboard.png
"""
import argparse
import json
from pathlib import Path

from sae.bench.dashboard import browse, build, grokking_run, machine, protein_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("outputs/bench/dashboard"), help="runs and sites go here")
    parser.add_argument("--residues", type=int, default=1_000_000)
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--skip-protein", action="store_true")
    parser.add_argument("--screenshot", type=Path, help="save the grokking dashboard with a panel open as this PNG")
    parser.add_argument("--protein-screenshot", type=Path)
    args = parser.parse_args()
    rows = {}
    run = grokking_run(args.work)
    rows["grokking default (512 latents, 9409 pairs)"] = {**build(run, args.work / "site_grokking"),
                                                          **browse(args.work / "site_grokking", args.screenshot)}
    if not args.skip_protein:
        run = protein_run(args.work / "protein", args.residues, args.latents)
        label = f"protein stand-in ({args.latents} latents, {args.residues:,} residues, d 320)"
        rows[label] = {**build(run, args.work / "site_protein"),
                       **browse(args.work / "site_protein", args.protein_screenshot)}
    print(f"Machine: {machine()}")
    print("| run | build (s) | peak RSS (GiB) | site (MB) | index render (s) | panel render (s, median / max) "
          "| console errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, r in rows.items():
        print(f"| {label} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | {r['site_mb']:.1f} | "
              f"{r['index_seconds']:.2f} | {r['panel_seconds']:.2f} / {r['panel_seconds_max']:.2f} | "
              f"{r['console_errors']} |")
    (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
