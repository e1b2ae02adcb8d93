"""Tokens/s of one SAE trained by 1 and N processes (gloo, one thread each), data and latent
parallel, with the communication share of a step: see sae/bench/parallel.py."""

from sae.bench.parallel import main

if __name__ == "__main__":
    main()
