"""Export a trained SAE for SAELens or EleutherAI sparsify, with a model card:

    python scripts/export.py outputs/runs/<date>/<time> --format saelens --out exported/my_sae

The source is a run dir (its newest valid checkpoint) or a checkpoint dir. Import goes the other
way without a script: `sae.saes.load(<a SAELens or sparsify folder>)`.
"""
import argparse
import sys

from sae.errors import ReportedError
from sae.saes.export import export_sae
from sae.saes.foreign import FORMATS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run dir or a checkpoint dir")
    parser.add_argument("--format", required=True, help=f"one of {list(FORMATS)}")
    parser.add_argument("--out", required=True, help="a new dir for the exported files")
    args = parser.parse_args(argv)
    try:
        out = export_sae(args.source, args.format, args.out)
    except (ReportedError, FileNotFoundError) as error:
        sys.exit(f"Error: {error}")
    print(f"Exported {args.source} for {args.format} into {out}")


if __name__ == "__main__":
    main()
