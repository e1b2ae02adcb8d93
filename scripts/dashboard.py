"""Write an HTML dashboard of a run's latents, or a sweep's page: a folder that opens from file://
with no server and no network (copy it off the cluster and double-click index.html).

    python scripts/dashboard.py outputs/runs/<date>/<time>     # -> <run dir>/dashboard/index.html
    python scripts/dashboard.py outputs/sweeps/<date>/<time>   # -> <sweep dir>/dashboard/index.html,
                                                               #    each job's dashboard built if missing
"""
import argparse
import logging
import sys
from pathlib import Path

from sae.dashboard.build import build_run_dashboard
from sae.dashboard.inputs import dir_kind
from sae.dashboard.sweep import build_sweep_dashboard
from sae.errors import ReportedError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="a run dir or a sweep dir")
    parser.add_argument("--out", type=Path, help="where to write the site (default: <dir>/dashboard)")
    parser.add_argument("--latents", help="only these latents, e.g. 0-99,512 (runs only; default: all)")
    parser.add_argument("--force", action="store_true", help="replace an --out dir that is not this dir's dashboard")
    parser.add_argument("--device", default="cpu", help="where to encode the activations: cpu or cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sae.saes").setLevel(logging.WARNING)
    try:
        if dir_kind(args.dir) == "run":
            index = build_run_dashboard(args.dir, args.out, args.latents, args.force, args.device)
        else:
            if args.latents is not None:
                raise ReportedError("--latents applies to a run dir, not a sweep (each job's dashboard shows all)")
            index = build_sweep_dashboard(args.dir, args.out, args.force)
    except ReportedError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Stopped: Ctrl-C; nothing was written (the site is renamed into place only when complete)",
              file=sys.stderr)
        return 130
    print(f"Dashboard written: open {index.resolve().as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
