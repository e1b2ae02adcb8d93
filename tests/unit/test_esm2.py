"""ESM-2 hosts: fair-esm's loaders, our trunk/head split against fair-esm's own forward."""
import urllib.error

import pytest
import torch

from sae.host_models.esm2 import ESM2Host, ESM2LoadError, check_local_checkpoint, load_fair_esm, residue_mask
from tests.conftest import TINY_ESM2, build_tiny_esm2

SEQUENCES = [("short", "MKVLA"), ("long", "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEG"), ("mid", "GGHHKKLLPPQQ")]


@pytest.fixture(scope="module")
def loaded(tiny_esm2_files):
    model, alphabet = load_fair_esm(str(tiny_esm2_files[0]), "esm2_t6_8M_UR50D")
    _, _, tokens = alphabet.get_batch_converter()(SEQUENCES)  # padded: lengths differ
    return ESM2Host(model), alphabet, tokens


def test_local_loader_returns_the_saved_weights(loaded):
    host, _, _ = loaded
    reference = build_tiny_esm2(seed=0)
    for name, value in reference.state_dict().items():
        assert torch.equal(host.model.state_dict()[name], value), name


@pytest.mark.parametrize("with_masks", [False, True])
def test_trunk_equals_fair_esm_repr_layers_and_head_finishes_the_forward(loaded, with_masks):
    host, alphabet, tokens = loaded
    tokens = tokens.clone()
    if with_masks:  # token dropout rescales the embedding when masks are present
        tokens[0, 2] = tokens[1, 5] = alphabet.mask_idx
    n = TINY_ESM2["num_layers"]
    captured = {}
    handle = host.model.emb_layer_norm_after.register_forward_hook(lambda m, inp, out: captured.update(raw=inp[0]))
    with torch.no_grad():
        reference = host.model(tokens, repr_layers=list(range(n + 1)))
        handle.remove()
        for layer in range(n + 1):
            resid = host.trunk(tokens, layer)
            expected = captured["raw"].transpose(0, 1) if layer == n else reference["representations"][layer]
            torch.testing.assert_close(resid, expected, rtol=0, atol=1e-6)
            torch.testing.assert_close(host.head(resid, tokens, layer), reference["logits"], rtol=0, atol=1e-5)
    assert not torch.allclose(captured["raw"].transpose(0, 1), reference["representations"][n])  # fair-esm's is normed


def test_capture_reads_several_layers_in_one_pass(loaded):
    host, _, tokens = loaded
    calls = []
    handles = [block.register_forward_hook(lambda m, i, o, j=j: calls.append(j)) for j, block in enumerate(host.model.layers)]
    with torch.no_grad():
        captured = host.capture(tokens, ["layers.0.resid", "layers.2.resid"])
    for h in handles:
        h.remove()
    assert calls == [0, 1]  # blocks after the deepest requested layer do not run
    for layer in (0, 2):
        torch.testing.assert_close(captured[f"layers.{layer}.resid"], host.trunk(tokens, layer))
    with pytest.raises(ValueError, match="not an ESM-2 hookpoint: 'blocks.0.resid_post'"):
        host.capture(tokens, ["blocks.0.resid_post"])


def test_residue_mask_excludes_cls_eos_and_padding(loaded):
    _, alphabet, tokens = loaded
    mask = residue_mask(tokens, alphabet)
    assert mask.sum(dim=1).tolist() == [len(seq) for _, seq in SEQUENCES]


def test_dtype_chosen_before_the_first_forward_works():
    host = ESM2Host(build_tiny_esm2(seed=0).to(torch.bfloat16))
    tokens = torch.tensor([[0, 5, 6, 7, 2]])
    assert host.trunk(tokens, 2).dtype == torch.bfloat16


def test_pretrained_name_loads_from_torch_hub_cache_offline(tiny_esm2_files, tmp_path, monkeypatch):
    """fair-esm's hub loader reads torch's hub cache before the network: the real pretrained path."""
    import shutil

    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(tiny_esm2_files[0], checkpoints / "esm2_t6_8M_UR50D.pt")
    regression = tiny_esm2_files[0].with_name(f"{tiny_esm2_files[0].stem}-contact-regression.pt")
    shutil.copy(regression, checkpoints / "esm2_t6_8M_UR50D-contact-regression.pt")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model, _ = load_fair_esm("pretrained", "esm2_t6_8M_UR50D")
    assert model.num_layers == TINY_ESM2["num_layers"]


def test_unfetchable_pretrained_name_says_how_to_use_a_local_file(tmp_path, monkeypatch):
    import esm

    def no_network(url):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(esm.pretrained, "load_hub_workaround", no_network)
    with pytest.raises(ESM2LoadError, match=r"cannot fetch pretrained 'esm2_t6_8M_UR50D'.*"
                                            r"host_model.checkpoints=\[/path/to/esm2_t6_8M_UR50D.pt\]") as error:
        load_fair_esm("pretrained", "esm2_t6_8M_UR50D")
    assert "\n" not in str(error.value)


def test_local_checkpoint_checks(tiny_esm2_files, tmp_path):
    with pytest.raises(ESM2LoadError, match="file not found"):
        check_local_checkpoint(str(tmp_path / "esm2_missing.pt"))
    renamed = tmp_path / "model.pt"
    renamed.write_bytes(tiny_esm2_files[0].read_bytes())
    with pytest.raises(ESM2LoadError, match="starts with 'esm2'"):
        check_local_checkpoint(str(renamed))
    alone = tmp_path / "esm2_alone.pt"
    alone.write_bytes(tiny_esm2_files[0].read_bytes())
    with pytest.raises(ESM2LoadError, match="esm2_alone-contact-regression.pt beside it"):
        check_local_checkpoint(str(alone))


def test_layer_out_of_range_is_refused(loaded):
    host, _, tokens = loaded
    with pytest.raises(ValueError, match=r"layer 4 out of range \[0, 3\]"):
        host.trunk(tokens, 4)
