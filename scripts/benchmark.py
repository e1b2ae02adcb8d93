"""SAE training speed and quality, ours vs a plain dense TopK reference: see sae/bench.py."""

from sae.bench import main

if __name__ == "__main__":
    main()
