"""Latent dashboards: a static HTML site per run (every latent in a table, a panel per latent) and a
page per sweep, built from what `sae.analysis` computes (inputs, index, modular, protein: the data;
site: the files; static/: the hand-written page, script and style)."""
