"""SAE training speed and quality, ours vs a plain dense TopK reference: see sae/bench/synthetic.py."""

from sae.bench.synthetic import main

if __name__ == "__main__":
    main()
