"""One-knob-at-a-time study of the training recipe (TopK, BatchTopK, Matryoshka, JumpReLU) on synthetic data: see
sae/bench/recipe.py."""

from sae.bench.recipe import main

if __name__ == "__main__":
    main()
