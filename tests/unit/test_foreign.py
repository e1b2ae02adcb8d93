"""Export to SAELens / sparsify folders and import back (sae.saes.foreign, scripts/export.py),
without those libraries (the compare suite loads the files with the libraries themselves:
tests/unit/test_foreign_libraries.py). Refusals leave nothing written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae.errors import UserInputError
from sae.jobs import run_training
from sae.saes import BatchTopKSAEConfig, GatedSAEConfig, JumpReLUSAEConfig, TopKSAEConfig, VanillaSAEConfig, load
from sae.saes.export import export_sae
from tests.conftest import tiny_host, tiny_train_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"vanilla": VanillaSAEConfig(sparse_dim=64, sparsity_warmup_steps=10),
           "topk": TopKSAEConfig(sparse_dim=64, k=4, k_aux=16), "jumprelu": JumpReLUSAEConfig(sparse_dim=64),
           "batchtopk": BatchTopKSAEConfig(sparse_dim=64, k=4, k_aux=16),
           "gated": GatedSAEConfig(sparse_dim=64, sparsity_warmup_steps=10)}
TRANSCODE = dict(input_hookpoint="resid_mid", target_hookpoint="mlp_out")
CONFIGS |= {"transcoder": VanillaSAEConfig(sparse_dim=64, sparsity_warmup_steps=10, **TRANSCODE),
            "skip_transcoder_jumprelu": JumpReLUSAEConfig(sparse_dim=64, skip=True, **TRANSCODE),
            "skip_transcoder_batchtopk": BatchTopKSAEConfig(sparse_dim=64, k=4, k_aux=16, skip=True, **TRANSCODE),
            "skip_transcoder_topk": TopKSAEConfig(sparse_dim=64, k=4, k_aux=16, skip=True, **TRANSCODE),
            "transcoder_topk": TopKSAEConfig(sparse_dim=64, k=4, k_aux=16, **TRANSCODE),
            "transcoder_gated": GatedSAEConfig(sparse_dim=64, sparsity_warmup_steps=10, **TRANSCODE)}
# (name, format): each exports and comes back with the same codes and outputs
ROUND_TRIPS = [("vanilla", "saelens"), ("topk", "saelens"), ("jumprelu", "saelens"), ("batchtopk", "saelens"),
               ("gated", "saelens"), ("topk", "sparsify"), ("transcoder", "saelens"),
               ("skip_transcoder_jumprelu", "saelens"), ("skip_transcoder_batchtopk", "saelens"),
               ("skip_transcoder_topk", "sparsify"), ("transcoder_topk", "sparsify")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, host_cache) -> dict[str, Path]:
    runs = {}
    for name, sae_cfg in CONFIGS.items():
        runs[name] = tmp_path_factory.mktemp(name) / "run"
        run_training(tiny_train_config(host_cache, sae=sae_cfg), runs[name])
    return runs


def same_codes(ours, theirs, d_in: int) -> None:
    x = torch.randn(256, d_in) * 3
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.predict(x), ours.predict(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, fmt", ROUND_TRIPS)
def test_an_exported_sae_imports_back_with_the_same_codes(trained, tmp_path, name, fmt):
    out = export_sae(trained[name], fmt, tmp_path / "exported")
    weights = "sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors"
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "cfg.json", weights])
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: ") and "## Final metrics" in card and "eval/test/fvu" in card
    ours, theirs = load(trained[name]), load(out)
    same_codes(ours, theirs, ours.d_in)  # BatchTopK comes back as the JumpReLU it is at inference
    assert theirs.transcoder == ours.transcoder and theirs.cfg.skip == ours.cfg.skip
    if ours.transcoder:
        info = json.loads((out / "cfg.json").read_text())
        hooks = (info.get("metadata") or {}).get("hook_name"), (info.get("metadata") or {}).get("hook_name_out")
        assert hooks == (("blocks.0.resid_mid", "blocks.0.mlp_out") if fmt == "saelens" else (None, None))


def test_exports_the_target_cannot_hold_are_refused_and_write_nothing(trained, tmp_path, host_cache):
    crosscoder = tmp_path / "crosscoder"
    run_training(tiny_train_config(host_cache, host_model=tiny_host(host_cache, layers=[0, 1])), crosscoder)
    cases = [(crosscoder, "saelens", "a crosscoder (2 sources) has no saelens format"),
             (trained["vanilla"], "sparsify", "sparsify stores TopK SAEs only"),
             (trained["gated"], "sparsify", "sparsify stores TopK SAEs only; this SAE is gated"),
             (trained["transcoder_topk"], "saelens", "SAELens transcoders are ReLU (sae=vanilla) or JumpReLU "
              "(sae=jumprelu; batchtopk and matryoshka at their threshold); this one is topk: a TopK transcoder "
              "exports with --format sparsify"),
             (trained["transcoder_gated"], "saelens", "SAELens transcoders are ReLU"),
             (trained["transcoder_gated"], "sparsify", "sparsify stores TopK SAEs only; this transcoder is gated"),
             (trained["topk"], "onnx", "--format onnx: unknown")]
    for source, fmt, message in cases:
        with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            export_sae(source, fmt, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="exists and is not an empty dir"):
        export_sae(trained["topk"], "saelens", tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]


def test_the_script_says_what_is_wrong_with_a_missing_or_corrupt_checkpoint_in_one_line(trained, tmp_path):
    def export(source):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), str(source), "--format", "saelens",
                               "--out", str(tmp_path / "out")], capture_output=True, text=True)

    missing = export(tmp_path / "nowhere")
    assert missing.returncode == 1 and missing.stderr.strip().startswith("Error: ") and "not found" in missing.stderr
    corrupt = tmp_path / "corrupt"
    subprocess.run(["cp", "-r", str(trained["topk"]), str(corrupt)], check=True)
    for weights in corrupt.glob("checkpoints/*/sae.safetensors"):
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    result = export(corrupt)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "holds no valid checkpoint" in result.stderr and "sha256" in result.stderr
    assert not (tmp_path / "out").exists()
    ok = export(trained["topk"])
    assert ok.returncode == 0 and json.loads((tmp_path / "out" / "cfg.json").read_text())["architecture"] == "topk"
