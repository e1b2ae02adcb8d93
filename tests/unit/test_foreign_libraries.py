"""Our exports opened by SAELens and sparsify with their own public loaders, and SAEs made by
those libraries opened by ours: encode and decode agree on random activations to float tolerance.
Marker `compare` (needs the [compare] extra; `make test-compare`, part of .ci/run)."""
import pytest
import torch

from sae.saes import load
from sae.saes.export import export_sae
from tests.unit.test_foreign import CONFIGS, trained  # noqa: F401  (the module fixture)

pytestmark = pytest.mark.compare
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vanilla", "topk", "jumprelu", "batchtopk", "gated"])
def test_saelens_loads_our_export_and_computes_our_codes(trained, tmp_path, name):  # noqa: F811
    SAE = pytest.importorskip("sae_lens").SAE
    out = export_sae(trained[name], "saelens", tmp_path / "exported")
    theirs, ours = SAE.load_from_disk(str(out)), load(trained[name])
    x = torch.randn(256, ours.d_in) * 3
    with torch.no_grad():
        codes = theirs.encode(x)
        torch.testing.assert_close(codes, ours.encode(x), **TOL)
        torch.testing.assert_close(theirs.decode(codes), ours(x).x_hat, **TOL)


def test_sparsify_loads_our_topk_export_and_computes_our_codes(trained, tmp_path):  # noqa: F811
    Sae = pytest.importorskip("sparsify").Sae
    out = export_sae(trained["topk"], "sparsify", tmp_path / "exported")
    theirs, ours = Sae.load_from_disk(out), load(trained["topk"])
    x = torch.randn(256, ours.d_in) * 3
    with torch.no_grad():
        encoded = theirs.encode(x)
        dense = torch.zeros(len(x), ours.d_sae).scatter_(1, encoded.top_indices, encoded.top_acts)
        torch.testing.assert_close(dense, ours.encode(x), **TOL)
        torch.testing.assert_close(theirs.decode(encoded.top_acts, encoded.top_indices), ours(x).x_hat, **TOL)


def perturbed(module, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return module


@pytest.mark.parametrize("architecture", ["standard", "topk", "topk_rescaled", "jumprelu", "gated"])
def test_we_load_a_saelens_sae_and_compute_its_codes(tmp_path, architecture):
    """topk_rescaled: SAELens' TopK training default (pre-activations times decoder norms, decoded with
    unit rows), folded into our weights on load."""
    saes = pytest.importorskip("sae_lens.saes")
    classes = {"standard": (saes.StandardSAE, saes.StandardSAEConfig, {}),
               "topk": (saes.TopKSAE, saes.TopKSAEConfig, {"k": 6}),
               "topk_rescaled": (saes.TopKSAE, saes.TopKSAEConfig, {"k": 6, "rescale_acts_by_decoder_norm": True}),
               "jumprelu": (saes.JumpReLUSAE, saes.JumpReLUSAEConfig, {}),
               "gated": (saes.GatedSAE, saes.GatedSAEConfig, {})}
    sae_cls, cfg_cls, extra = classes[architecture]
    theirs = perturbed(sae_cls(cfg_cls(d_in=16, d_sae=48, **extra)), seed=1)
    if architecture == "jumprelu":
        with torch.no_grad():
            theirs.threshold.copy_(torch.rand(48) * 0.5 + 0.01)
    theirs.save_model(tmp_path / "theirs")
    ours = load(tmp_path / "theirs")
    x = torch.randn(256, 16)
    with torch.no_grad():
        codes = theirs.encode(x)
        torch.testing.assert_close(ours.encode(x), codes, **TOL)
        torch.testing.assert_close(ours(x).x_hat, theirs.decode(codes), **TOL)


def test_we_load_a_sparsify_sae_and_compute_its_codes(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    theirs = perturbed(sparsify.Sae(16, sparsify.SaeConfig(num_latents=48, k=6), device="cpu"), seed=2)
    theirs.save_to_disk(tmp_path / "theirs")
    ours = load(tmp_path / "theirs")
    x = torch.randn(256, 16)
    with torch.no_grad():
        encoded = theirs.encode(x)
        dense = torch.zeros(len(x), 48).scatter_(1, encoded.top_indices, encoded.top_acts)
        torch.testing.assert_close(ours.encode(x), dense, **TOL)
        torch.testing.assert_close(ours(x).x_hat, theirs.decode(encoded.top_acts, encoded.top_indices), **TOL)


# -- transcoders: their prediction of the target from the input ----------------------------------

@pytest.mark.parametrize("name, architecture", [("transcoder", "transcoder"),
                                                ("skip_transcoder_jumprelu", "jumprelu_skip_transcoder"),
                                                ("skip_transcoder_batchtopk", "jumprelu_skip_transcoder")])
def test_saelens_loads_our_transcoder_export_and_predicts_as_we_do(trained, tmp_path, name, architecture):  # noqa: F811
    SAE = pytest.importorskip("sae_lens").SAE
    out = export_sae(trained[name], "saelens", tmp_path / "exported")
    theirs, ours = SAE.load_from_disk(str(out)), load(trained[name])
    assert type(theirs).__name__.lower() == architecture.replace("_", "")
    x = torch.randn(256, ours.d_in) * 3
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), **TOL)
        torch.testing.assert_close(theirs(x), ours.predict(x), **TOL)  # (skip path included)


@pytest.mark.parametrize("name", ["skip_transcoder_topk", "transcoder_topk"])
def test_sparsify_loads_our_topk_transcoder_export_and_predicts_as_we_do(trained, tmp_path, name):  # noqa: F811
    Sae = pytest.importorskip("sparsify").Sae
    out = export_sae(trained[name], "sparsify", tmp_path / "exported")
    theirs, ours = Sae.load_from_disk(out), load(trained[name])
    assert theirs.cfg.transcode and theirs.cfg.skip_connection == ours.cfg.skip
    x, y = torch.randn(256, ours.d_in) * 3, torch.randn(256, ours.d_in)
    with torch.no_grad():
        encoded = theirs.encode(x)
        dense = torch.zeros(len(x), ours.d_sae).scatter_(1, encoded.top_indices, encoded.top_acts)
        torch.testing.assert_close(dense, ours.encode(x), **TOL)
        torch.testing.assert_close(theirs(x, y).sae_out, ours.predict(x), **TOL)


@pytest.mark.parametrize("architecture", ["transcoder", "skip_transcoder", "jumprelu_transcoder",
                                          "jumprelu_skip_transcoder"])
def test_we_load_a_saelens_transcoder_and_predict_as_it_does(tmp_path, architecture):
    saes = pytest.importorskip("sae_lens.saes")
    classes = {"transcoder": (saes.Transcoder, saes.TranscoderConfig),
               "skip_transcoder": (saes.SkipTranscoder, saes.SkipTranscoderConfig),
               "jumprelu_transcoder": (saes.JumpReLUTranscoder, saes.JumpReLUTranscoderConfig),
               "jumprelu_skip_transcoder": (saes.JumpReLUSkipTranscoder, saes.JumpReLUSkipTranscoderConfig)}
    sae_cls, cfg_cls = classes[architecture]
    theirs = perturbed(sae_cls(cfg_cls(d_in=16, d_sae=48, d_out=16, apply_b_dec_to_input=False)), seed=3)
    if "jumprelu" in architecture:
        with torch.no_grad():
            theirs.threshold.copy_(torch.rand(48) * 0.5 + 0.01)
    theirs.save_model(tmp_path / "theirs")
    ours = load(tmp_path / "theirs")
    assert ours.transcoder and ours.cfg.skip == ("skip" in architecture)
    x = torch.randn(256, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), **TOL)
        torch.testing.assert_close(ours.predict(x), theirs(x), **TOL)


@pytest.mark.parametrize("skip", [False, True])
def test_we_load_a_sparsify_transcoder_and_predict_as_it_does(tmp_path, skip):
    sparsify = pytest.importorskip("sparsify")
    config = sparsify.SaeConfig(num_latents=48, k=6, transcode=True, skip_connection=skip)
    theirs = perturbed(sparsify.Sae(16, config, device="cpu"), seed=4)
    theirs.save_to_disk(tmp_path / "theirs")
    ours = load(tmp_path / "theirs")
    assert ours.transcoder and ours.cfg.skip == skip
    x = torch.randn(256, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.predict(x), theirs(x, x).sae_out, **TOL)
