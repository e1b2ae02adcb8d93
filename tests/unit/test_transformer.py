import pytest
import torch

from sae.host_models.transformer import Activation, GrokTransformer, Norm, Positions, TransformerArch


def arches():
    for n_layers in (1, 2):
        for activation in Activation:
            for norm in Norm:
                for positions in Positions:
                    yield TransformerArch(vocab_size=29, n_outputs=23, n_layers=n_layers, d_model=16, n_heads=4,
                                          kv_heads=2, d_mlp=24, activation=activation, norm=norm, positions=positions)


def reference_logits(model: GrokTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Every position computed (no last-position shortcut): a no-op hook on the last block forces it."""
    last = len(model.blocks) - 1
    return model(tokens, {f"blocks.{last}.resid_post": lambda x: x})


@pytest.mark.parametrize("arch", list(arches()), ids=lambda a: f"{a.n_layers}L-{a.activation.value}-{a.norm.value}-{a.positions.value}")
def test_last_position_shortcut_gives_the_full_model_logits(arch):
    torch.manual_seed(0)
    model = GrokTransformer(arch)
    tokens = torch.randint(0, 29, (10, 4))
    assert torch.allclose(model(tokens), reference_logits(model, tokens), atol=1e-5)


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GrokTransformer(TransformerArch(vocab_size=29, n_outputs=23, n_layers=2, d_model=16, n_heads=4, kv_heads=4, d_mlp=24))
    tokens = torch.randint(0, 23, (5, 4))
    changed = tokens.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 23
    first = model.capture(tokens, ["blocks.1.resid_post"])["blocks.1.resid_post"]
    second = model.capture(changed, ["blocks.1.resid_post"])["blocks.1.resid_post"]
    assert torch.allclose(first[:, :3], second[:, :3]) and not torch.allclose(first[:, 3], second[:, 3])


def test_hooks_read_and_replace():
    torch.manual_seed(0)
    model = GrokTransformer(TransformerArch(vocab_size=29, n_outputs=23, n_layers=2, d_model=16, n_heads=4, kv_heads=4, d_mlp=24))
    tokens = torch.randint(0, 23, (6, 4))
    cache = model.capture(tokens, ["blocks.0.resid_post", "blocks.0.mlp_hidden"])
    assert cache["blocks.0.resid_post"].shape == (6, 4, 16) and cache["blocks.0.mlp_hidden"].shape == (6, 4, 24)
    identity = model(tokens, {"blocks.0.resid_post": lambda x: x})
    assert torch.allclose(identity, model(tokens), atol=1e-6)
    ablated = model(tokens, {"blocks.0.mlp_hidden": torch.zeros_like})
    assert not torch.allclose(ablated, identity)


def test_a_hook_on_the_answer_position_only_keeps_the_shortcut_and_the_logits():
    """A last-block hook flagged `answer_position_only` sees only the answer position (the shortcut
    stays on) and gives the logits of the same edit made with every position computed."""
    torch.manual_seed(0)
    model = GrokTransformer(TransformerArch(vocab_size=29, n_outputs=23, n_layers=1, d_model=16, n_heads=4, kv_heads=4, d_mlp=24))
    tokens = torch.randint(0, 23, (6, 4))
    direction = torch.randn(16)
    seen = []

    def edit(resid):
        seen.append(resid.shape[1])
        return torch.cat([resid[:, :-1], resid[:, -1:] + direction], dim=1)

    full = model(tokens, {"blocks.0.resid_post": edit})
    edit.answer_position_only = True
    shortcut = model(tokens, {"blocks.0.resid_post": edit})
    assert seen == [4, 1]
    torch.testing.assert_close(shortcut, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", list(Norm))
def test_every_hookpoint_is_what_the_block_computes_written_out(norm):
    """resid_mid, mlp_hidden, mlp_out and resid_post of each block against the block's modules applied
    by hand; resid_post = resid_mid + mlp_out; replacing mlp_out with itself changes nothing."""
    torch.manual_seed(0)
    model = GrokTransformer(TransformerArch(vocab_size=29, n_outputs=23, n_layers=2, d_model=16, n_heads=4, kv_heads=4,
                                            d_mlp=24, norm=norm))
    tokens = torch.randint(0, 23, (6, 4))
    names = [f"blocks.{layer}.{point}" for layer in (0, 1) for point in ("resid_mid", "mlp_hidden", "mlp_out", "resid_post")]
    cache = model.capture(tokens, names)
    x = model.embed(tokens) + model.pos_embed
    for layer, block in enumerate(model.blocks):
        mid = x + block.attn(block.norm_attn(x))
        hidden = block.mlp.hidden(block.norm_mlp(mid))
        out = block.mlp.W_out(hidden)
        for point, expected in (("resid_mid", mid), ("mlp_hidden", hidden), ("mlp_out", out), ("resid_post", mid + out)):
            torch.testing.assert_close(cache[f"blocks.{layer}.{point}"], expected, msg=f"{layer}.{point}")
        x = mid + out
    torch.testing.assert_close(model(tokens, {"blocks.1.mlp_out": lambda a: a.clone()}), model(tokens))
    assert not torch.allclose(model(tokens, {"blocks.1.mlp_out": torch.zeros_like}), model(tokens))
