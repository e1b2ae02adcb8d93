"""Two gloo processes train what one process trains: data parallel (each rank half of every
global batch) and latent sharded (each rank half of the latents), for vanilla, TopK (with AuxK on
dead latents; and with dead latents resampled), BatchTopK, JumpReLU, gated, Matryoshka (data parallel
only: its prefixes span shards), skip transcoders (TopK; BatchTopK resampled) and a cross-layer
transcoder (data parallel), 300 steps, compared weight by weight, optimiser state and dead-latent
counters included.

Why float64: in float32 the two runs differ by rounding (a gradient summed in two halves), and
TopK is discontinuous: a row whose k-th and (k+1)-th pre-activations are 1 ulp apart can pick a
different latent in one run, after which the runs drift apart (measured: one such row in 256 at
step 19 of a float32 run, gap 1.2e-7). That is chaos, not a difference of algorithm; float64
makes such near-ties vanishingly rare, so the runs must agree to ~1e-9 after 300 steps.
"""
import pytest
import torch
import torch.multiprocessing as mp

from sae.hardware import Parallel
from sae.parallel import SHARDABLE_TYPES
from sae.saes import (BatchTopKSAEConfig, CLTConfig, GatedSAEConfig, JumpReLUSAEConfig, MatryoshkaSAEConfig, TopKSAEConfig,
                      VanillaSAEConfig)
from tests.distributed.harness import free_port, rank_main, train_steps

STEPS, BATCH = 300, 256
TRANSCODE = dict(input_hookpoint="resid_mid", target_hookpoint="mlp_out")
CONFIGS = {
    "vanilla": VanillaSAEConfig(sparse_dim=128, sparsity_coef=0.05, sparsity_warmup_steps=50, dead_window=2048),
    "topk": TopKSAEConfig(sparse_dim=128, k=8, k_aux=16, dead_window=2048),
    # dead-latent resampling every 10 steps up to step 270 (23 restarts): the same latents restart from the same rows
    "resampled": TopKSAEConfig(sparse_dim=128, k=8, k_aux=16, dead_window=1024, resample_every=10, resample_until=0.9),
    "batchtopk": BatchTopKSAEConfig(sparse_dim=128, k=8, k_aux=16, dead_window=2048),
    "jumprelu": JumpReLUSAEConfig(sparse_dim=128, sparsity_coef=0.05, sparsity_warmup_steps=50, bandwidth=0.1,
                                  init_threshold=0.05, dead_window=2048),
    "matryoshka": MatryoshkaSAEConfig(sparse_dim=128, k=8, k_aux=16, dead_window=2048),
    "gated": GatedSAEConfig(sparse_dim=128, sparsity_coef=0.05, sparsity_warmup_steps=50, dead_window=2048),
    # skip transcoders (input -> a random MLP of it): TopK with AuxK, and BatchTopK with resampling
    "transcoder": TopKSAEConfig(sparse_dim=128, k=8, k_aux=16, dead_window=2048, skip=True, **TRANSCODE),
    "batchtopktranscoder": BatchTopKSAEConfig(sparse_dim=128, k=8, k_aux=16, dead_window=1024, resample_every=10,
                                              resample_until=0.9, skip=True, **TRANSCODE),
    # a cross-layer transcoder over 2 layers (data parallel: its per-layer TopK does not shard)
    "clt": CLTConfig(sparse_dim=64, k=4, k_aux=16, dead_window=2048),
}
JOBS = [(f"{parallel.value}-{name}", (cfg, STEPS, BATCH, parallel))
        for parallel in (Parallel.data, Parallel.latents) for name, cfg in CONFIGS.items()
        if parallel is Parallel.data or cfg.type in SHARDABLE_TYPES]


@pytest.fixture(scope="module")
def two_process_results() -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(2, free_port(), JOBS, results), nprocs=2, join=True)
        return dict(results)


@pytest.fixture(scope="module")
def single_process_results() -> dict:
    torch.set_num_threads(1)
    return {name: train_steps(cfg, STEPS, BATCH) for name, cfg in CONFIGS.items()}


@pytest.mark.parametrize("job", [name for name, _ in JOBS])
def test_two_processes_train_the_single_process_sae(job, two_process_results, single_process_results):
    parallel, sae_type = job.split("-")
    ours, reference = two_process_results[job], single_process_results[sae_type]
    assert reference["dead_seen"] or sae_type in ("vanilla", "jumprelu", "resampled", "gated",
                                                      "batchtopktranscoder"), \
        "the setting must exercise AuxK"
    assert reference["restarted"] > 0 or sae_type not in ("resampled", "batchtopktranscoder"), \
        "the setting must exercise resampling"
    assert ours["restarted"] == reference["restarted"]
    for name, tensor in reference["sae"].items():
        torch.testing.assert_close(ours["sae"][name], tensor, rtol=1e-9, atol=1e-11, msg=f"{job}: {name}")
    for index, tensor in reference["exp_avg_sq"].items():
        torch.testing.assert_close(ours["exp_avg_sq"][index], tensor, rtol=1e-8, atol=1e-16)
    assert torch.equal(ours["tokens_since_fired"], reference["tokens_since_fired"])
    assert (ours["dead_latents"] is None) == (reference["dead_latents"] is None)
    if reference["dead_latents"] is not None:
        assert torch.equal(ours["dead_latents"], reference["dead_latents"])
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(reference["losses"]), rtol=1e-9, atol=0)
    assert reference["losses"][-1] < 0.5 * reference["losses"][0]  # it trained
