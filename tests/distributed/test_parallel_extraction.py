"""An ESM-2 activation cache built by 2 gloo processes (each a share of the FASTA's batches) holds
the same rows, in the same order, with the same record.json, as one built by one process; the
cut at max_train_tokens / max_test_tokens falls at the same row."""
import dataclasses
import json

import numpy as np
import torch
import torch.multiprocessing as mp

from sae.activations.protein import load_protein_activation_data, shard_paths
from tests.conftest import tiny_protein_config
from tests.distributed.harness import build_cache_rank, free_port


def test_two_processes_build_the_cache_one_process_builds(tmp_path, tiny_esm2_files):
    torch.set_num_threads(1)
    cfg = tiny_protein_config(tmp_path, tiny_esm2_files[:1], layers=(1, 2))
    task = dataclasses.replace(cfg.task, tokens_per_batch=600, max_train_tokens=3333)  # many batches, a cut mid-batch
    one = dataclasses.replace(task, activation_cache=str(tmp_path / "one"))
    two = dataclasses.replace(task, activation_cache=str(tmp_path / "two"))
    load_protein_activation_data(one, cfg.host_model, normalize=True, device="cpu")
    mp.spawn(build_cache_rank, args=(2, free_port(), two, cfg.host_model), nprocs=2, join=True)
    for name in ("record.json", "rows.json"):
        assert json.loads((tmp_path / "two" / name).read_text()) == json.loads((tmp_path / "one" / name).read_text())
    assert json.loads((tmp_path / "one" / "rows.json").read_text())["train"] == 3333
    for split in ("train", "test"):
        ours = np.concatenate([np.load(p) for p in shard_paths(tmp_path / "two", split)])
        reference = np.concatenate([np.load(p) for p in shard_paths(tmp_path / "one", split)])
        assert ours.shape == reference.shape and np.array_equal(ours, reference), split
    assert not (tmp_path / "two" / "parts").exists()
    reused = load_protein_activation_data(two, cfg.host_model, normalize=True, device="cpu")  # a complete cache
    assert reused.train.shape[0] == 3333
