"""Attribution graphs: complete (every target's incoming edges sum to it, the logit to the host's own
logit) on float64, every checked edge equal to an explicit path product through the frozen attention
written out here, pruning and the replay check's report."""
import math

import pytest
import torch

from sae.analysis.circuits import (ReplacementMismatch, attribution_graph, clean_run, plot_graph, prune,
                                   to_float64)
from sae.host_models.transformer import GrokTransformer, TransformerArch
from sae.saes import CLTConfig, build_sae

P = 11


def tiny(norm: str, skip: bool = False, seed: int = 0):
    """A random 2-layer host and a random CLT on it, float64."""
    torch.manual_seed(seed)
    host = GrokTransformer(TransformerArch(vocab_size=P + 6, n_outputs=P, n_layers=2, d_model=16, n_heads=2,
                                           kv_heads=2, d_mlp=32, norm=norm)).double().eval()
    clt = build_sae(CLTConfig(sparse_dim=20, k=4, skip=skip), 2, 16).double().eval()
    with torch.no_grad():
        for param in clt.parameters():
            param.add_(0.2 * torch.randn_like(param))
        clt.apply_masks(torch.arange(clt.d_sae))
    return host, clt


def tokens_of(a: int, b: int) -> torch.Tensor:
    return torch.tensor([a, P, b, P + 5])


@pytest.mark.parametrize("norm, skip", [("none", False), ("layernorm", True), ("rmsnorm", False)])
def test_graphs_are_complete_and_the_logit_is_the_hosts(norm, skip):
    host, clt = tiny(norm, skip)
    for a, b in ((3, 7), (0, 10), (9, 9)):
        answer = (a + b) % P
        graph = attribution_graph(host, clt, a, b, tokens_of(a, b), answer)
        assert graph.completeness_gap() < 1e-10
        with torch.no_grad():
            own = host(tokens_of(a, b)[None])[0, answer].item()
        assert graph.edges[-1].sum().item() == pytest.approx(own, abs=1e-9)
        assert graph.logit == pytest.approx(own, abs=1e-9)
        latents = [n for n in graph.nodes if n["kind"] == "latent"]
        assert 0 < len(latents) <= 2 * clt.cfg.k


def manual_pattern(attn, x: torch.Tensor) -> torch.Tensor:
    """[H, seq, seq] softmax(q k^T / sqrt(d_head)) with the causal mask, for one input x [seq, d] (no norm)."""
    seq = x.shape[0]
    q = (x @ attn.W_q.weight.t()).view(seq, attn.n_heads, attn.d_head).transpose(0, 1)
    k = (x @ attn.W_k.weight.t()).view(seq, attn.n_heads, attn.d_head).transpose(0, 1)
    scores = q @ k.transpose(1, 2) / math.sqrt(attn.d_head)
    return scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf")).softmax(dim=-1)


def through_attention_at_answer(attn, pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What a vector v added to the answer position's stream adds to that position after the block's
    attention (frozen): v itself plus, per head h, A_h[ans, ans] W_O_h W_V_h v."""
    d_head = attn.d_head
    out = v.clone()
    for h in range(attn.n_heads):
        W_V = attn.W_v.weight[h * d_head:(h + 1) * d_head]  # [d_head, d]
        W_O = attn.W_o.weight[:, h * d_head:(h + 1) * d_head]  # [d, d_head]
        out += pattern[h, -1, -1] * (W_O @ (W_V @ v))
    return out


def test_edges_are_explicit_path_products_through_the_frozen_attention():
    """No norm, 2 layers: a layer-0 latent s writes v0 = f_s W_dec[s, 0] into the answer position's
    MLP output of layer 0 and f_s W_dec[s, 1] into layer 1's. Its edge to a layer-1 latent t is
    W_enc[t, 1] . (v0 + attention_1(v0)); to the logit, W_U[c] . (v0 + attention_1(v0) + f_s W_dec[s, 1])."""
    host, clt = tiny("none")
    a, b = 4, 9
    answer = (a + b) % P
    graph = attribution_graph(host, clt, a, b, tokens_of(a, b), answer)
    with torch.no_grad():  # the clean stream entering layer 1, by hand
        x = host.embed(tokens_of(a, b)) + host.pos_embed
        block = host.blocks[0]
        mid = x + block.attn(x[None])[0]
        x1 = mid + block.mlp.W_out(block.mlp.hidden(mid))
        pattern = manual_pattern(host.blocks[1].attn, x1)
    checked = 0
    latent_rows = {node: row for row, node in enumerate(graph.targets)}
    for s, source in enumerate(graph.nodes):
        if source["kind"] != "latent" or source["layer"] != 0:
            continue
        f_s, index = source["activation"], source["latent"]
        with torch.no_grad():
            v0 = f_s * clt.W_dec[index, 0]
            at_layer_1 = through_attention_at_answer(host.blocks[1].attn, pattern, v0)
            expected_logit = host.unembed.weight[answer] @ (at_layer_1 + f_s * clt.W_dec[index, 1])
        assert graph.edges[-1, s].item() == pytest.approx(expected_logit.item(), rel=1e-9, abs=1e-12)
        for t, target in enumerate(graph.nodes):
            if target["kind"] == "latent" and target["layer"] == 1:
                expected = (clt.W_enc[target["latent"], 1] @ at_layer_1).item()
                assert graph.edges[latent_rows[t], s].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
                checked += 1
    assert checked >= 4


def test_pruning_keeps_the_most_influential_nodes_and_refuses_a_bad_threshold():
    host, clt = tiny("none")
    graph = attribution_graph(host, clt, 2, 5, tokens_of(2, 5), 7)
    small, whole = prune(graph, 0.5), prune(graph, 1.0)
    assert graph.targets[-1] in small.kept and set(small.kept) <= set(whole.kept)
    assert len(small.kept) < len(whole.kept)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=rf"the attribution threshold must be in \(0, 1\], got {bad}"):
            prune(graph, bad)


def test_a_host_the_replay_does_not_reproduce_is_reported(monkeypatch):
    host, clt = tiny("none")
    original = host.forward
    monkeypatch.setattr(host, "forward", lambda tokens, *args, **kw: original(tokens, *args, **kw) + 0.5)
    with pytest.raises(ReplacementMismatch, match=r"input \(a=1, b=2\): the frozen replay gives logit .* the host's "
                                                  r"forward .* the host is not what the replacement model assumes"):
        attribution_graph(host, clt, 1, 2, tokens_of(1, 2), 3)


def test_to_float64_copies_and_the_figure_is_written(tmp_path):
    host, clt = tiny("none")
    host64, clt64 = to_float64(host.float(), clt.float())
    assert host64.embed.weight.dtype == torch.float64 and host.embed.weight.dtype == torch.float32
    graph = prune(attribution_graph(host64, clt64, 1, 1, tokens_of(1, 1), 2), 0.8)
    path = plot_graph(graph, tmp_path / "graph.png")
    assert path.stat().st_size > 5000
    run = clean_run(host64, clt64, torch.stack([tokens_of(1, 1), tokens_of(3, 4)]), torch.tensor([2, 7]))
    assert len(run.latents) == 2 and run.latents[0].shape == (2, 20)


def test_logit_effects_of_many_inputs_sum_to_the_centred_logit():
    from sae.analysis.circuits import logit_effects

    host, clt = tiny("layernorm", skip=True)
    pairs = [(a, b) for a in range(P) for b in range(0, P, 2)]
    tokens = torch.stack([tokens_of(a, b) for a, b in pairs])
    answers = torch.tensor([(a + b) % P for a, b in pairs])
    effects = logit_effects(host, clt, tokens, answers, chunk=17)
    with torch.no_grad():
        logits = host(tokens)
    centred = logits.gather(1, answers[:, None])[:, 0] - logits.mean(dim=1)
    total = (effects.embedding.sum(1) + sum(l.sum(1) for l in effects.latents) + effects.errors.sum((1, 2))
             + effects.constants.sum(1))
    torch.testing.assert_close(total, centred, rtol=0, atol=1e-9)
    torch.testing.assert_close(effects.logits, centred, rtol=0, atol=1e-9)
    shares = effects.shares()
    torch.testing.assert_close(sum(shares.values()), torch.ones(len(pairs), dtype=torch.float64))


def test_output_frequencies_read_a_decoder_through_the_unembedding():
    """An unembedding whose first two dimensions hold cos and sin of frequency 3 over c: a latent writing
    dimension 0 has all its output power at 3; one writing only dimension 5 (unread) has none."""
    from sae.analysis.circuit_study import output_key_shares

    host, clt = tiny("none")
    c = torch.arange(P, dtype=torch.float64)
    with torch.no_grad():
        host.unembed.weight.zero_()
        host.unembed.weight[:, 0] = torch.cos(2 * math.pi * 3 * c / P)
        host.unembed.weight[:, 1] = torch.sin(2 * math.pi * 3 * c / P)
        host.unembed.weight[:, 5] = 0.0
        clt.W_dec.zero_()
        clt.W_dec[0, 0, 0] = 1.0  # layer-0 latent 0 writes e0 into layer 0's MLP output
        clt.W_dec[1, :, 1] = 0.5  # latent 1: e1 into both layers'
        clt.W_dec[2, 1, 2] = 1.0  # latent 2: e2, which the unembedding does not read
    shares = output_key_shares(clt, host, "addition", [3], P)
    assert shares[0].item() == pytest.approx(1.0) and shares[1].item() == pytest.approx(1.0)
    assert shares[2].item() == 0.0
    assert output_key_shares(clt, host, "addition", [4], P)[0].item() == pytest.approx(0.0, abs=1e-12)
