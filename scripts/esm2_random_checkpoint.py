"""Save an ESM-2 with a published model's shapes and random weights, in the format fair-esm's local
loader reads (plus its -contact-regression.pt): a stand-in to check a pipeline, or to measure
speed and memory, on a machine that cannot download the real weights.

    python scripts/esm2_random_checkpoint.py esm2_t6_8M_UR50D outputs/esm2_t6_8M_random.pt
    python scripts/train.py task=protein_mlm host_model=esm2_t6_8M task.fasta=tests/data/proteins.fasta \
        host_model.checkpoints=[outputs/esm2_t6_8M_random.pt]

Its features mean nothing: never report numbers from it as a protein-model result.
"""
import argparse
import sys
from pathlib import Path

from sae.host_models.esm2 import (
    ESM2_ARCHITECTURES, is_fair_esm_filename, random_esm2, save_fair_esm_checkpoint,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(ESM2_ARCHITECTURES), help="fair-esm's name of the model to imitate")
    parser.add_argument("out", help="the .pt file to write; its name must start with 'esm2'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not is_fair_esm_filename(args.out):  # checked before building: a 3B model takes minutes
        sys.exit(f"Error: out: {args.out}: fair-esm reads a file only if its name starts with 'esm2' and ends in '.pt'")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    path = save_fair_esm_checkpoint(random_esm2(args.model, args.seed), args.out)
    print(f"Wrote {path} and {path.with_name(path.stem + '-contact-regression.pt')} (random weights)")


if __name__ == "__main__":
    main()
