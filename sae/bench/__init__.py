"""Benchmarks and studies, each behind a thin CLI in scripts/ (never imported by the trainer).

    synthetic.py  the training benchmark: speed, floors, quality against tokens and seconds on synthetic
                  activations with a known dictionary (scripts/benchmark.py)
    hierarchy.py  synthetic activations with parent/child features, and the absorption metric (--children)
    external.py   SAELens' and sparsify's TopK SAEs as benchmark columns (the [compare] extra)
    recipe.py     the training-recipe study: one knob at a time, several seeds (scripts/recipe_study.py)
    real.py       ours against the other libraries on real host activations (scripts/benchmark_real.py)
    parallel.py   tokens/s at world size 1 and N, and the communication share (scripts/benchmark_parallel.py)
"""
