"""Tokens/s of one SAE trained by 1 and N processes (gloo, one thread each), data and latent
parallel, with the communication share of a step: see sae/bench_parallel.py."""

from sae.bench_parallel import main

if __name__ == "__main__":
    main()
