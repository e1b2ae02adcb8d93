"""Ours vs other libraries' TopK SAEs on real host activations (grokking, ESM-2 stand-in): see sae/bench/real.py."""

from sae.bench.real import main

if __name__ == "__main__":
    main()
