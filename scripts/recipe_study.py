"""One-knob-at-a-time study of the TopK training recipe on synthetic data: see sae/bench_recipe.py."""

from sae.bench_recipe import main

if __name__ == "__main__":
    main()
