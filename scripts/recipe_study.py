"""One-knob-at-a-time study of the training recipe (TopK, BatchTopK, Matryoshka, JumpReLU) on synthetic data: see
sae/bench_recipe.py."""

from sae.bench_recipe import main

if __name__ == "__main__":
    main()
