"""Latent dashboards without a browser: every number the site holds against an independent
computation (a direct count, a brute-force sort, the decoder through the unembedding, the FASTA read
by Biopython), and every refusal before any work, leaving existing outputs byte for byte.
tests/browser/ opens the same sites in headless Chromium."""
import base64
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae.activations.protein import residue_rows, shard_paths
from sae.config import load_run_config
from sae.analysis.effects import decoder_logit_effects
from sae.analysis.latents import LatentGrid, firing_frequency, latent_grid
from sae.analysis.runs import load_sae_run, train_or_reuse
from sae.dashboard import build as build_module
from sae.dashboard.build import build_run_dashboard, parse_latents
from sae.dashboard.modular import FourierSpectra
from sae.dashboard.sweep import build_sweep_dashboard
from sae.errors import ReportedError, UserInputError
from sae.host_models.transformer import GrokTransformer, TransformerArch
from sae.jobs import run_training
from sae.saes import load
from sae.tasks.modular import Operation
from tests.conftest import ROOT, tiny_protein_config

TINY = ["task.p=23", "task.train_fraction=0.6", "host_model.d_model=32", "host_model.n_heads=2",
        "host_model.kv_heads=2", "host_model.d_mlp=64", "host_model.train.num_steps=60",
        "host_model.train.steps_after_grok=null", "sae.sparse_dim=48", "sae.k=4", "batch_size=64", "num_steps=40",
        "scheduler.warmup_steps=5", "eval_every=20", "log_every=10", "tracking=disabled", "hardware.threads=1"]


def read_js(path: Path):
    """The JSON a data/*.js file assigns to its global."""
    text = path.read_text()
    start = len("window.DASHBOARD = ") if text.startswith("window.DASHBOARD = ") else text.index("] = ") + 4
    return json.loads(text[start:].rstrip().rstrip(";"))


def site_data(out: Path) -> tuple[dict, dict]:
    """(index, {latent id: panel}) of a built site."""
    panels = {}
    for shard in sorted((out / "data").glob("latents_*.js")):
        panels.update({int(k): v for k, v in read_js(shard).items()})
    return read_js(out / "data" / "index.js"), panels


def tree_bytes(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, host_cache):
    root = tmp_path_factory.mktemp("dashboard_runs")
    cache = f"host_model.cache_dir={host_cache}"
    return {"topk": train_or_reuse([*TINY, cache], root / "topk"),
            "crosscoder": train_or_reuse([*TINY, cache, "host_model.checkpoints=[step_20,final]"], root / "cc"),
            "mixed": train_or_reuse([*TINY, cache, "task=mixed"], root / "mixed"),
            "transcoder": train_or_reuse([*TINY, cache, "sae=transcoder", "sae.sparse_dim=48", "sae.k=4"],
                                         root / "transcoder")}


@pytest.fixture(scope="module")
def sites(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    return {name: build_run_dashboard(run, root / name).parent for name, run in runs.items()}


def all_pairs(run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [n, 4], is_train [n], codes [n, d_sae]) for every pair, encoded directly."""
    data, sae = run.data, run.sae
    tokens = torch.cat([data.dataset.train[0], data.dataset.test[0]])
    is_train = torch.cat([torch.ones(len(data.train), dtype=torch.bool), torch.zeros(len(data.test), dtype=torch.bool)])
    with torch.no_grad():
        codes = sae.encode(torch.cat([data.train, data.test]))
    return tokens, is_train, codes


def test_the_index_has_every_latent_with_frequencies_from_a_direct_count(runs, sites):
    run = load_sae_run(runs["topk"])
    index, panels = site_data(sites["topk"])
    tokens, is_train, codes = all_pairs(run)
    fires = codes > 0
    assert index["latents"] == list(range(run.sae.d_sae)) and sorted(panels) == index["latents"]
    values = index["values"]
    np.testing.assert_allclose(values["freq_train"], fires[is_train].float().mean(0), rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(values["freq_test"], fires[~is_train].float().mean(0), rtol=1e-3, atol=1e-9)
    assert values["dead"] == (~fires.any(0)).tolist()
    for latent in torch.where(fires.any(0))[0].tolist():
        expected = codes[fires[:, latent], latent].double().mean().item()
        assert math.isclose(values["mean_act"][latent], expected, rel_tol=1e-3)
    norms = run.sae.W_dec.detach().norm(dim=-1)[:, 0]
    np.testing.assert_allclose(values["dec_norm_0"], norms, rtol=1e-3)


def test_top_pairs_are_a_brute_force_sort_and_the_heatmap_is_the_activation(runs, sites):
    run = load_sae_run(runs["topk"])
    _, panels = site_data(sites["topk"])
    tokens, is_train, codes = all_pairs(run)
    pairs = [(int(t[0]), int(t[2])) for t in tokens]
    checked = 0
    for latent in torch.where((codes > 0).any(0))[0].tolist():
        brute = sorted(((codes[i, latent].item(), pairs[i], bool(is_train[i])) for i in range(len(pairs))),
                       key=lambda row: -row[0])
        shown = panels[latent]["top"]
        value_of = {pair: (value, train) for value, pair, train in brute}
        for op, a, b, value, train in shown:  # each listed pair is itself, with its own value and split
            assert op == "addition" and math.isclose(value, value_of[(a, b)][0], rel_tol=1e-3)
            assert train == value_of[(a, b)][1]
        expected = [value for value, _, _ in brute[:len(shown)] if value > 0]  # ties may list either pair
        np.testing.assert_allclose([row[3] for row in shown], expected, rtol=1e-3)
        grid = panels[latent]["grids"][0]  # uint8 of activation / max at (a, b)
        q = np.frombuffer(base64.b64decode(grid["q"]), dtype=np.uint8).reshape(23, 23)
        top_value, (a, b), _ = brute[0]
        assert math.isclose(grid["max"], top_value, rel_tol=1e-3) and q[a, b] == 255
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("kind", ["topk", "transcoder"])
def test_the_logit_effect_is_the_decoder_direction_through_the_unembedding(runs, sites, kind):
    """Default host: one layer, no final norm; the SAE's hook is the final residual stream and the
    transcoder's decoder writes to the MLP output (which goes straight to it): the effect of adding
    m d is exactly m d @ W_U over the numbers, centred."""
    run = load_sae_run(runs[kind])
    index, panels = site_data(sites[kind])
    model = run.data.sources[0].model
    W_U = model.unembed.weight.detach()[:23]
    checked = 0
    for latent, panel in panels.items():
        if index["values"]["dead"][latent]:
            assert panel["logits"] is None
            continue
        expected = index["values"]["mean_act"][latent] * (W_U @ run.sae.W_dec.detach()[latent, 0])
        expected -= expected.mean()
        effect = np.array(panel["logits"][0]["effect"])
        # the site keeps 3 significant digits: half a unit in the third digit, plus float32 noise
        np.testing.assert_allclose(effect, expected, rtol=5e-3, atol=1e-5 * float(expected.abs().max()))
        assert panel["logits"][0]["promoted"][0][0] == int(expected.argmax())
        checked += 1
    assert checked >= 5


def test_decoder_logit_effects_match_a_pair_by_pair_forward_inside_the_host():
    """A non-linear rest of the host (hook in the first of two blocks, layernorm): the mean over pairs
    of the change of centred logits, against one forward per pair and direction."""
    torch.manual_seed(0)
    p = 11
    model = GrokTransformer(TransformerArch(vocab_size=p + 6, n_outputs=p, n_layers=2, d_model=16, n_heads=2,
                                            kv_heads=2, d_mlp=32, norm="layernorm")).eval()
    tokens = torch.tensor([[a, p, b, p + 5] for a in range(p) for b in range(0, p, 3)])
    directions = torch.randn(3, 32)
    got = decoder_logit_effects(model, "blocks.0.mlp_hidden", tokens, directions, p)
    for row, direction in enumerate(directions):
        changes = []
        for pair in tokens:
            def add(hidden, d=direction):
                hidden = hidden.clone()
                hidden[0, -1] = hidden[0, -1] + d
                return hidden
            with torch.no_grad():
                change = model(pair[None], {"blocks.0.mlp_hidden": add})[0] - model(pair[None])[0]
            changes.append(change - change.mean())
        torch.testing.assert_close(got[row], torch.stack(changes).mean(0), atol=1e-5, rtol=1e-4)


def test_a_latent_that_follows_a_frequency_shows_it_on_the_operations_group():
    p = 23
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    g, log = 5, {}  # 5 generates the nonzero residues mod 23
    for k in range(p - 1):
        log[pow(g, k, p)] = k
    log_a = torch.tensor([log.get(int(v), 0) for v in a.flatten()]).view(p, p).double()
    maps = {"addition": [torch.cos(2 * math.pi * 4 * a / p) + 1, torch.cos(2 * math.pi * 3 * (a + b) / p) + 1],
            "multiplication": [torch.cos(2 * math.pi * 6 * log_a / (p - 1)) + 1]}
    expected = {"addition": [(4, 0), (3, 3)], "multiplication": [(6, 0)]}
    for op, grids in maps.items():
        values = torch.stack(grids, dim=-1).float()[None]
        grid = LatentGrid(values, torch.ones(1, p, p, dtype=torch.bool), torch.ones(1, p, p, dtype=torch.bool),
                          [Operation(op)])
        strongest = FourierSpectra(grid).strongest(list(range(len(grids))))
        assert [(ka, kb) for ka, kb, _ in strongest] == expected[op]
        assert all(share > 0.9 for *_, share in strongest)


def test_a_crosscoder_has_relative_norms_latent_scaling_and_both_sources_logit_effects(runs, sites):
    from sae.analysis.diffing import decoder_cosines, relative_decoder_norms

    run = load_sae_run(runs["crosscoder"], crosscoder=True)
    index, panels = site_data(sites["crosscoder"])
    values = index["values"]
    r = relative_decoder_norms(run.sae, 0, 1, run.input_scale)
    np.testing.assert_allclose(values["rel_norm"], r, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(values["dec_cos"], decoder_cosines(run.sae, torch.arange(run.sae.d_sae)),
                               rtol=1e-3, atol=1e-4)
    alive = [i for i, dead in enumerate(values["dead"]) if not dead]
    # nu is fitted on held-out rows: defined exactly for the latents that fire there
    assert [v is not None for v in values["nu_error"]] == [f > 0 for f in values["freq_test"]]
    assert {h["title"] for h in index["histograms"]} == {"firing frequency", "relative decoder norm"}
    assert all(len(panels[i]["logits"]) == 2 for i in alive)
    assert index["panel_meta"]["sources"] == ["step_20.L0", "final.L0"]


def test_a_mixed_task_has_per_operation_firing_and_a_heatmap_per_operation(runs, sites):
    run = load_sae_run(runs["mixed"])
    index, panels = site_data(sites["mixed"])
    frequency = firing_frequency(latent_grid(run.sae, run.data))
    for op_index, op in enumerate(["addition", "multiplication"]):
        np.testing.assert_allclose(index["values"][f"freq_{op}"], frequency[op_index], rtol=1e-3, atol=1e-9)
    assert all(len(panel["grids"]) == 2 and len(panel["fourier"]) == 2 for panel in panels.values())
    assert index["panel_meta"]["fourier"][1]["n"] == 22  # the multiplicative group of Z_23


# -- protein ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def protein_site(tmp_path_factory, tiny_esm2_files):
    root = tmp_path_factory.mktemp("protein")
    cfg = tiny_protein_config(root, tiny_esm2_files[:1], num_steps=30)
    run_training(cfg, root / "run")
    return root / "run", build_run_dashboard(root / "run", root / "site").parent


def fasta_sequences() -> dict[str, str]:
    from Bio import SeqIO

    return {record.id: str(record.seq).upper() for record in SeqIO.parse(ROOT / "tests/data/proteins.fasta", "fasta")}


def test_protein_windows_are_the_strongest_residues_of_the_fasta(protein_site):
    run_dir, out = protein_site
    index, panels = site_data(out)
    sae = load(run_dir)
    cache = Path(json.loads(next((run_dir / "checkpoints").glob("*/sae.json")).read_text())["activation_cache"])
    rows = np.concatenate([np.load(p) for split in ("train", "test") for p in shard_paths(cache, split)])
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(rows))
    sequences = fasta_sequences()
    window = index["panel_meta"]["window"]
    row_of = {}  # (record id, 1-based residue in the FASTA record) -> global row, for the shade check
    cached = json.loads((cache / "rows.json").read_text())
    for split, first in (("train", 0), ("test", cached["train"])):
        mapped = residue_rows(load_run_config(run_dir).task, split, cached[split])
        for row in range(len(mapped.record)):
            record = mapped.record[row]
            row_of[(mapped.ids[record], int(mapped.offsets[record] + mapped.position[row] + 1))] = first + row
    checked = 0
    for latent in range(sae.d_sae):
        shown = panels[latent]["windows"]
        strongest = codes[:, latent].sort(descending=True).values
        if strongest[0] <= 0:
            assert shown == []
            continue
        np.testing.assert_allclose([w["value"] for w in shown], strongest[:len(shown)], rtol=1e-3)
        for w in shown:
            sequence = sequences[w["record"]]
            assert w["letters"][window] == sequence[w["residue"] - 1]  # 1-based residue of the record
            around = w["letters"].strip()
            assert around in sequence  # the window is a contiguous stretch of that record
        assert sum(panels[latent]["enrichment"]["counts"]) == min(32, int((codes[:, latent] > 0).sum()))
        shades = np.frombuffer(base64.b64decode(panels[latent]["shades"]), dtype=np.uint8).reshape(len(shown), -1)
        for w, shade in zip(shown, shades):  # each letter shaded by that residue's own activation / the strongest
            row = row_of[(w["record"], w["residue"])]
            for offset, letter in zip(range(-window, window + 1), w["letters"]):
                expected = 0 if letter == " " else codes[row + offset, latent].item() / strongest[0].item()
                assert abs(int(shade[offset + window]) - expected * 255) <= 1
        checked += 1
    assert checked >= 5
    np.testing.assert_allclose(index["values"]["freq_train"][:5],
                               (codes[:int(index["panel_meta"]["train_rows"]), :5] > 0).float().mean(0), rtol=1e-3)


def test_streaming_in_small_chunks_gives_the_same_protein_site(protein_site, tmp_path, monkeypatch):
    """97-row chunks (interior chunks with context on both sides, windows across chunk edges, latents
    skipped once their top-k is full) against the one-chunk build the other tests check."""
    run_dir, out = protein_site
    monkeypatch.setattr("sae.dashboard.protein.encode_rows", lambda d_sae: 97)
    small = build_run_dashboard(run_dir, tmp_path / "small").parent
    (index, panels), (index_small, panels_small) = site_data(out), site_data(small)
    for key, column in index["values"].items():  # float sums in another order: the same to float32 rounding
        other = index_small["values"][key]
        if isinstance(column[0], float):
            np.testing.assert_allclose(np.array(other, dtype=float), np.array(column, dtype=float), rtol=1e-3)
        else:
            assert other == column
    for latent, panel in panels.items():
        other = panels_small[latent]
        key = [(w["record"], w["residue"], w["letters"]) for w in panel["windows"]]
        assert [(w["record"], w["residue"], w["letters"]) for w in other["windows"]] == key
        assert other["shades"] == panel["shades"]
        assert other["enrichment"] == panel["enrichment"]
        np.testing.assert_allclose(other["position"], panel["position"], rtol=1e-5, atol=1e-7)


def test_protein_position_profile_is_the_mean_activation_per_relative_position_bin(protein_site):
    run_dir, out = protein_site
    _, panels = site_data(out)
    sae, cfg = load(run_dir), load_run_config(run_dir)
    cache = Path(json.loads(next((run_dir / "checkpoints").glob("*/sae.json")).read_text())["activation_cache"])
    sums, counts = torch.zeros(20, sae.d_sae, dtype=torch.float64), torch.zeros(20)
    for split in ("train", "test"):
        rows = torch.from_numpy(np.concatenate([np.load(p) for p in shard_paths(cache, split)]))
        mapped = residue_rows(cfg.task, split, len(rows))
        for row in range(len(rows)):  # one residue at a time: no vectorised binning to share a bug with
            length = mapped.lengths[mapped.record[row]]
            bin_ = min(19, int(mapped.position[row]) * 20 // int(length))
            with torch.no_grad():
                sums[bin_] += sae.encode(rows[row:row + 1])[0].double()
            counts[bin_] += 1
    expected = sums / counts.clamp_min(1)[:, None]
    for latent, panel in panels.items():
        np.testing.assert_allclose(panel["position"], expected[:, latent], rtol=2e-3, atol=1e-6)


# -- refusals and faults -----------------------------------------------------------------------------

def test_a_dir_that_is_neither_a_run_nor_a_sweep_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for target in (tmp_path, tmp_path / "notes.txt", tmp_path / "missing"):
        result = subprocess.run([sys.executable, str(ROOT / "scripts/dashboard.py"), str(target)],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 1 and result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1 and "run dir" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_latents_are_parsed_and_out_of_range_refused():
    assert parse_latents("0-3,7", 10) == [0, 1, 2, 3, 7] and parse_latents(None, 3) == [0, 1, 2]
    for spec, message in (("10", "out of range: this SAE has latents 0-9"), ("3-1", "out of range"),
                          ("a", "not a latent id")):
        with pytest.raises(UserInputError, match=message):
            parse_latents(spec, 10)


def test_out_of_range_latents_and_a_foreign_out_dir_are_refused_before_any_work(runs, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    before = tree_bytes(runs["topk"])
    with pytest.raises(UserInputError, match="not a dashboard"):
        build_run_dashboard(runs["topk"], foreign)
    with pytest.raises(UserInputError, match="--latents: 0-48 is out of range"):
        build_run_dashboard(runs["topk"], tmp_path / "new", latents="0-48")
    for out in (runs["topk"], runs["topk"].parent):  # --force must never replace the run itself
        with pytest.raises(UserInputError, match="pick a new dir"):
            build_run_dashboard(runs["topk"], out, force=True)
    assert tree_bytes(runs["topk"]) == before and (foreign / "thesis.tex").read_text() == "do not delete"
    assert not (tmp_path / "new").exists()
    built = build_run_dashboard(runs["topk"], foreign, latents="0-9", force=True).parent
    index, panels = site_data(built)
    assert index["latents"] == list(range(10)) and sorted(panels) == list(range(10))
    assert not (foreign / "thesis.tex").exists()


def test_a_rebuild_replaces_this_runs_dashboard_and_a_failed_build_leaves_the_old_one(runs, tmp_path, monkeypatch):
    out = build_run_dashboard(runs["topk"], tmp_path / "site").parent
    build_run_dashboard(runs["topk"], out)  # its own dashboard: replaced without --force
    before = tree_bytes(out)

    def fail_half_way(inputs, ids):
        content = original(inputs, ids)
        panels = content.panels
        content.panels = lambda chosen: panels(chosen) if chosen[0] == 0 else (_ for _ in ()).throw(OSError("disk"))
        return content

    original = build_module.run_content
    monkeypatch.setattr(build_module, "run_content", fail_half_way)
    monkeypatch.setattr("sae.dashboard.site.SHARD_LATENTS", 16)  # several shards: the failure comes after one
    with pytest.raises(OSError, match="disk"):
        build_run_dashboard(runs["topk"], out)
    assert tree_bytes(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["site"]  # no half-written temp left beside it


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_none_valid_is_refused(runs, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(runs["topk"], run)
    checkpoints = sorted((run / "checkpoints").iterdir(), key=lambda d: int(d.name.split("_")[1]))
    (checkpoints[-1] / "sae.safetensors").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        out = build_run_dashboard(run, tmp_path / "site").parent
    assert json.loads((out / "dashboard.json").read_text())["checkpoint"] == checkpoints[-2].name
    assert any(checkpoints[-1].name in r.getMessage() for r in caplog.records)
    for checkpoint in checkpoints:
        (checkpoint / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(ReportedError, match="holds no valid checkpoint"):
        build_run_dashboard(run, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_run_whose_host_is_gone_gets_the_decoder_columns_and_says_what_is_missing(runs, tmp_path, host_cache):
    run = tmp_path / "run"
    shutil.copytree(runs["topk"], run)
    sae_json = next((run / "checkpoints").glob("*/sae.json"))
    for path in (run / "checkpoints").glob("*/sae.json"):  # point it at a host run that does not exist
        meta = json.loads(path.read_text())
        meta["host_run_dir"] = str(tmp_path / "deleted_host")
        path.write_text(json.dumps(meta))
    from sae.atomic_io import write_manifest

    for checkpoint in (run / "checkpoints").iterdir():
        write_manifest(checkpoint)
    out = build_run_dashboard(run, tmp_path / "site").parent
    index, panels = site_data(out)
    assert index["family"] == "decoder" and "deleted_host" in index["notes"][0]
    assert [c["key"] for c in index["columns"]] == ["latent", "dec_norm_0"] and panels == {}
    assert sae_json.is_file()


def test_a_sweep_page_links_each_jobs_dashboard_and_lists_the_failed_one(runs, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(runs["topk"], sweep / "0_sae.k=4")
    (sweep / "0_sae.k=4" / ".hydra").mkdir(exist_ok=True)
    (sweep / "0_sae.k=4" / ".hydra" / "overrides.yaml").write_text("- sae.k=4\n")
    failed = sweep / "1_sae.k=5000"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- sae.k=5000\n")
    (failed / "job.json").write_text(json.dumps({"status": "failed", "error": "sae.k must be in (0, 48], got 5000"}))
    index = build_sweep_dashboard(sweep)
    page = index.read_text()
    assert 'href="../0_sae.k=4/dashboard/index.html"' in page and (sweep / "0_sae.k=4/dashboard/index.html").is_file()
    assert "sae.k must be in (0, 48], got 5000" in page and (index.parent / "frontier.png").is_file()
    mtime = (sweep / "0_sae.k=4/dashboard/index.html").stat().st_mtime_ns
    build_sweep_dashboard(sweep)  # the job's dashboard is current: reused, not rebuilt
    assert (sweep / "0_sae.k=4/dashboard/index.html").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "sae").glob("*.yaml")))
def test_every_sae_preset_gets_a_dashboard(preset, tmp_path, host_cache):
    """Each SAE type encodes through its own inference path (BatchTopK: its threshold; JumpReLU: its
    thresholds); the table must match a direct count for each."""
    tiny = [o for o in TINY if not o.startswith(("sae.sparse_dim", "sae.k="))]  # each preset's own k (topk_k50: 50)
    deeper = ["host_model.n_layers=2", "host_model.layers=[0,1]"] if preset == "clt" else []  # every layer of 2
    run = train_or_reuse([*tiny, "sae.sparse_dim=64", f"sae={preset}", f"host_model.cache_dir={host_cache}",
                          "num_steps=20", *deeper], tmp_path / "run")
    out = build_run_dashboard(run, tmp_path / "site").parent
    index, panels = site_data(out)
    loaded = load_sae_run(run)
    _, is_train, codes = all_pairs(loaded)
    assert index["latents"] == list(range(loaded.sae.d_sae)) and sorted(panels) == index["latents"]
    np.testing.assert_allclose(index["values"]["freq_test"], (codes[~is_train] > 0).float().mean(0),
                               rtol=1e-3, atol=1e-9)
