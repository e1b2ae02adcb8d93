"""Hydra launchers of train-SAE (a Hydra plugin: plugins must live in the hydra_plugins package).

They run a sweep's jobs exactly as Hydra's basic launcher and hydra-submitit-launcher do, but wait
for every job, whatever happens to the others, and end with a one-line tally (exit status 1 if any
job did not complete). hydra-submitit-launcher 1.2.0 collects results in order and raises at the
first failed or cancelled job, so the sweep stopped waiting while other jobs were still queued.
"""
