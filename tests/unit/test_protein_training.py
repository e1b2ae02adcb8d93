"""ESM-2 activations, the activation cache, the masked-LM metric and SAE runs on a protein task."""
import json

import pytest
import torch

from sae.errors import UserInputError
from sae.host_models.esm2 import load_fair_esm
from sae.metrics.protein_mlm import bert_mask, masked_lm_metrics
from sae.tasks.protein import read_records, token_batches
from sae.activations import protein as protein_activations
from sae.activations.protein import load_protein_activation_data
from sae.jobs import run_training
from tests.conftest import tiny_protein_config


def reference_by_record(checkpoint, task, layer, split="train") -> dict[str, torch.Tensor]:
    """{record id: [residues, d] activations} from fair-esm's own forward, one record at a time
    (no batching, no padding)."""
    model, alphabet = load_fair_esm(str(checkpoint), "esm2_t6_8M_UR50D")
    convert = alphabet.get_batch_converter()
    rows = {}
    with torch.no_grad():
        for record in read_records(task):
            if record.is_test == (split == "test"):
                _, _, tokens = convert([(record.id, record.sequence)])
                rows[record.id] = model(tokens, repr_layers=[layer])["representations"][layer][0, 1:-1]
    return rows


def cache_row_ids(task, split="train") -> list[tuple[str, int]]:
    """(record id, residue position) of every cache row, in the order the cache writes them: the
    batches of `token_batches`, records within a batch, residues within a record."""
    records = (r for r in read_records(task) if r.is_test == (split == "test"))
    return [(record.id, position) for batch in token_batches(records, task.tokens_per_batch)
            for record in batch for position in range(len(record.sequence))]


def test_cached_activations_equal_fair_esm_on_residues_only(tmp_path, tiny_esm2_files):
    """Rows are matched by identity (record, position), never by sorting on a float key: a float
    key of the same row can round differently on another CPU and swap near-tied rows. Tolerance:
    torch's float32 defaults (batched and padded vs one-record forwards differ by rounding only)."""
    cfg = tiny_protein_config(tmp_path, tiny_esm2_files[:1], layers=(1, 2))
    cfg.task.max_train_tokens = 10**6  # everything
    data = load_protein_activation_data(cfg.task, cfg.host_model, normalize=False, device="cpu")
    row_ids = cache_row_ids(cfg.task)
    assert data.train.shape[0] == len(row_ids) == data.scan.train_residues  # no cls/eos/padding rows
    for s, layer in enumerate((1, 2)):
        reference = reference_by_record(tiny_esm2_files[0], cfg.task, layer)
        expected = torch.stack([reference[record_id][position] for record_id, position in row_ids])
        torch.testing.assert_close(data.train[:, s], expected)
    test_ids = cache_row_ids(cfg.task, "test")[: cfg.task.max_test_tokens]
    reference = reference_by_record(tiny_esm2_files[0], cfg.task, 2, "test")
    expected_test = torch.stack([reference[record_id][position] for record_id, position in test_ids])
    assert data.test.shape == (len(test_ids), 2, 32)
    torch.testing.assert_close(data.test[:, 1], expected_test)


def test_cache_is_sharded_reused_and_refused_when_the_config_differs(tmp_path, tiny_esm2_files, monkeypatch):
    monkeypatch.setattr(protein_activations, "SHARD_ROWS", 1000)
    cfg = tiny_protein_config(tmp_path, tiny_esm2_files[:1])
    first = load_protein_activation_data(cfg.task, cfg.host_model, normalize=True, device="cpu")
    cache = tmp_path / "cache"
    shards = sorted((cache / "train").glob("shard_*.npy"))
    assert first.train.shape[0] == cfg.task.max_train_tokens == 4000 and len(shards) == 4
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    stale = cache.parent / f".{cache.name}.tmp-killed"  # what a build killed mid-way leaves beside the cache
    (stale / "train").mkdir(parents=True)
    again = load_protein_activation_data(cfg.task, cfg.host_model, normalize=True, device="cpu")
    assert not stale.exists()
    torch.testing.assert_close(again.train, first.train)
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps  # reused, not rebuilt
    cfg.host_model.layers = [1]
    with pytest.raises(UserInputError, match="was built for a different config \\('layers' differs: cached \\[2\\], now \\[1\\]\\)"):
        load_protein_activation_data(cfg.task, cfg.host_model, normalize=True, device="cpu")
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps  # the refused cache is untouched
    record = json.loads((cache / "record.json").read_text())
    assert record["fasta"]["sha256"] == first.scan.sha256 and record["layers"] == [2]


def test_shard_writer_cuts_full_shards_and_reuses_one_buffer(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setattr(protein_activations, "SHARD_ROWS", 7)
    writer = protein_activations.ShardWriter(tmp_path)
    rows = np.arange(25 * 2 * 3, dtype=np.float32).reshape(25, 2, 3)
    for start, stop in ((0, 3), (3, 3), (3, 16), (16, 25)):  # uneven appends, one empty, one spanning two shards
        writer.add(rows[start:stop])
    buffer = writer.buffer
    writer.flush()
    shards = [np.load(path) for path in sorted(tmp_path.glob("shard_*.npy"))]
    assert [len(s) for s in shards] == [7, 7, 7, 4] and writer.buffer is buffer
    np.testing.assert_array_equal(np.concatenate(shards), rows)


def test_bert_mask_chooses_residues_only_with_80_10_10():
    from esm.data import Alphabet

    alphabet = Alphabet.from_architecture("ESM-1b")
    _, _, tokens = alphabet.get_batch_converter()([("a", "MKVLA" * 400), ("b", "GG")])
    residues = (tokens != alphabet.padding_idx) & (tokens != alphabet.cls_idx) & (tokens != alphabet.eos_idx)
    masked, chosen = bert_mask(tokens, residues, alphabet, 0.15, torch.Generator().manual_seed(0))
    assert not (chosen & ~residues).any() and chosen[1].sum() >= 1  # a short record still gets a target
    assert abs(chosen[0].float().sum() / 2000 - 0.15) < 0.03
    as_mask = (masked == alphabet.mask_idx)[chosen].float().mean()
    assert abs(as_mask - 0.8) < 0.06
    assert torch.equal(masked[~chosen], tokens[~chosen])


class Identity(torch.nn.Module):
    """An 'SAE' that reconstructs perfectly, or returns zeros."""

    def __init__(self, zero=False):
        super().__init__()
        self.zero = zero

    def encode(self, x):
        return x

    def decode(self, f):
        return torch.zeros_like(f) if self.zero else f


def test_masked_lm_metric_against_a_perfect_and_a_zero_reconstruction(tmp_path, tiny_esm2_files):
    cfg = tiny_protein_config(tmp_path, tiny_esm2_files[:1], layers=(1,))
    data = load_protein_activation_data(cfg.task, cfg.host_model, normalize=True, device="cpu")
    perfect = masked_lm_metrics(Identity(), data, "test")
    name = data.source_names[0]
    assert perfect[f"{name}/ce_spliced"] == pytest.approx(perfect[f"{name}/ce_clean"], abs=1e-4)
    assert perfect[f"{name}/loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    zero = masked_lm_metrics(Identity(zero=True), data, "test")
    assert zero[f"{name}/ce_spliced"] == pytest.approx(zero[f"{name}/ce_zero"], abs=1e-4)
    assert zero[f"{name}/ce_clean"] == perfect[f"{name}/ce_clean"]  # same masks every evaluation
    assert perfect["mlm_targets"] > 0


def test_sae_run_on_esm2_and_a_crosscoder_across_two_models(tmp_path, tiny_esm2_files):
    cfg = tiny_protein_config(tmp_path, tiny_esm2_files, num_steps=40)
    summary = run_training(cfg, tmp_path / "run")
    assert summary["sources"] == ["esm2_tiny_seed0.L2", "esm2_tiny_seed1.L2"]
    assert summary["eval/test/l0"] <= 4 and summary["eval/train/fvu"] < 1.0
    for name in summary["sources"]:
        assert 0 < summary[f"eval/test/{name}/ce_clean"]
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_0000040" / "sae.json").read_text())
    assert meta["n_sources"] == 2 and meta["token_positions"] == "residues"


def test_models_of_different_widths_cannot_share_a_crosscoder(tmp_path, tiny_esm2_files):
    import esm

    from sae.host_models.esm2 import save_fair_esm_checkpoint

    wide = save_fair_esm_checkpoint(esm.model.esm2.ESM2(num_layers=3, embed_dim=48, attention_heads=4),
                                    tmp_path / "esm2_wide.pt")
    cfg = tiny_protein_config(tmp_path, [tiny_esm2_files[0], wide])
    with pytest.raises(UserInputError, match=r"different widths \[32, 48\]"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("checkpoints/*"))
