"""train-SAE: sparse autoencoders and crosscoders on grokking transformers and protein language models.

`import sae; sae.saes.load(checkpoint_dir)` gives a trained SAE in raw activation units.
"""
from sae import saes  # noqa: F401  (the README's entry point: sae.saes.load)
