"""Batches from in-memory and memory-mapped sharded tables: same rows, same order, prefetching
that never changes what a step sees, and resume from the last consumed batch."""
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae.activations import protein as protein_activations
from sae.activations.batches import BatchStream, ShardedTable, column_mean, mean_squared_norm
from sae.activations.protein import load_protein_activation_data
from sae.jobs import run_training
from tests.conftest import tiny_protein_config


@pytest.fixture
def table_and_shards(tmp_path):
    torch.manual_seed(0)
    table = torch.randn(2500, 2, 8)
    paths = []
    for index, start in enumerate(range(0, 2500, 1000)):
        paths.append(tmp_path / f"shard_{index:05d}.npy")
        np.save(paths[-1], table[start:start + 1000].numpy())
    return table, paths


def test_sharded_table_gathers_the_rows_asked_for_in_order_and_scaled(table_and_shards):
    table, paths = table_and_shards
    scale = torch.tensor([2.0, 0.5])
    sharded = ShardedTable(paths, scale)
    assert sharded.shape == table.shape and len(sharded) == 2500
    rows = torch.tensor([2499, 0, 1000, 999, 1500, 0])
    torch.testing.assert_close(sharded[rows], table[rows] * scale[:, None], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(list(sharded.chunks(300))), table * scale[:, None], rtol=0, atol=0)
    torch.testing.assert_close(column_mean(ShardedTable(paths)), table.mean(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean_squared_norm(ShardedTable(paths)), mean_squared_norm(table), rtol=1e-5, atol=1e-6)
    assert isinstance(np.load(paths[0], mmap_mode="c"), np.memmap)  # what ShardedTable keeps: views of the files


def test_prefetching_serves_the_same_batches_and_resumes_after_the_last_consumed_one(table_and_shards):
    table, paths = table_and_shards
    plain = BatchStream(table, 64, torch.Generator().manual_seed(3), "cpu")
    prefetched = BatchStream(ShardedTable(paths), 64, torch.Generator().manual_seed(3), "cpu", prefetch=True)
    expected = [plain.next() for _ in range(5)]
    served = [prefetched.next() for _ in range(3)]
    saved = prefetched.generator_state()  # the 4th batch is already being gathered
    for a, b in zip(expected, served):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    prefetched.close()
    generator = torch.Generator()
    generator.set_state(saved)
    resumed = BatchStream(ShardedTable(paths), 64, generator, "cpu", prefetch=True)
    for a in expected[3:]:
        torch.testing.assert_close(resumed.next(), a, rtol=0, atol=0)
    resumed.close()


def final_weights(run_dir, step=40):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:07d}" / "sae.safetensors"))


def test_a_streamed_protein_run_matches_the_in_memory_one_and_resumes_exactly(tmp_path, tiny_esm2_files, monkeypatch):
    monkeypatch.setattr(protein_activations, "SHARD_ROWS", 1000)  # 4 shards of training rows
    in_memory = tiny_protein_config(tmp_path, tiny_esm2_files[:1], num_steps=40, checkpoint_every=20)
    run_training(in_memory, tmp_path / "in_memory")
    streamed = tiny_protein_config(tmp_path, tiny_esm2_files[:1], num_steps=40, checkpoint_every=20)
    streamed.task.stream = True
    data = load_protein_activation_data(streamed.task, streamed.host_model, normalize=True, device="cpu")
    assert isinstance(data.train, ShardedTable) and len(data.train.shards) == 4
    assert len(data.eval_table("train")) == streamed.task.max_test_tokens
    summary = run_training(streamed, tmp_path / "streamed")
    assert summary["eval/train/fvu"] < 1.0
    for key, weight in final_weights(tmp_path / "in_memory").items():  # same batches; scale summed in float64
        torch.testing.assert_close(final_weights(tmp_path / "streamed")[key], weight, rtol=1e-3, atol=1e-4)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "streamed", interrupted)
    for checkpoint in (interrupted / "checkpoints").iterdir():
        if int(checkpoint.name.split("_")[1]) > 20:
            shutil.rmtree(checkpoint)
    (interrupted / "final_metrics.json").unlink()
    run_training(streamed, interrupted)
    for key, weight in final_weights(tmp_path / "streamed").items():
        assert torch.equal(final_weights(interrupted)[key], weight), key
