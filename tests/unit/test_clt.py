"""Cross-layer transcoders: the masked dense layout against a per-layer loop over the same weights,
the causal pattern kept through training and restarts, one layer = a transcoder, the replacement
model (every MLP replaced at once) against a hand-written forward, and the config's refusals."""
import pytest
import torch

from sae.jobs import run_training
from sae.saes import CLTConfig, TopKSAEConfig, build_sae, load
from sae.activations.modular import load_activation_data
from sae.tasks.modular import build_dataset
from sae.training.step import make_optimizer
from tests.conftest import tiny_host, tiny_train_config

M, K = 12, 3  # latents and active latents per layer


def random_clt(n_layers: int, d: int, skip: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    clt = build_sae(CLTConfig(sparse_dim=M, k=K, k_aux=4, aux_coef=0.5, skip=skip), n_layers, d).double()
    with torch.no_grad():
        for name, param in clt.named_parameters():
            param.add_(0.3 * torch.randn_like(param))
        clt.apply_masks(torch.arange(clt.d_sae))
    return clt


def per_layer_loop(params: dict, table: torch.Tensor, n_layers: int, dead: list[int], skip: bool) -> torch.Tensor:
    """The CLT loss written layer by layer: layer l's latents from its own input, each target from the
    latents of layers <= l, AuxK over the dead latents of every layer on the targets' residual."""
    x, y = table[:, :n_layers], table[:, n_layers:]
    pres, latents = [], []
    for l in range(n_layers):
        rows = slice(l * M, (l + 1) * M)
        pre = (x[:, l] - params["b_in"][l]) @ params["W_enc"][rows, l].t() + params["b_enc"][rows]
        top = pre.topk(K, dim=1)
        latents.append(torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()))
        pres.append(pre)
    y_hat = []
    for target in range(n_layers):
        out = params["b_dec"][target] + sum(latents[l] @ params["W_dec"][l * M:(l + 1) * M, target]
                                            for l in range(target + 1))
        if skip:
            out = out + x[:, target] @ params["W_skip"][target].t()
        y_hat.append(out)
    y_hat = torch.stack(y_hat, dim=1)
    loss = (y_hat - y).pow(2).sum(dim=(1, 2)).mean()
    if dead:
        pre = torch.cat(pres, dim=1)
        mask = torch.zeros(pre.shape[1], dtype=torch.bool)
        mask[dead] = True
        values, indices = pre.masked_fill(~mask, float("-inf")).topk(min(4, len(dead)), dim=1)
        aux_latents = torch.zeros_like(pre).scatter(1, indices, values.relu())
        e = (y - y_hat).detach()
        decoder = torch.stack([params["W_dec"][:, t] * (torch.arange(pre.shape[1]) // M <= t)[:, None].double()
                               for t in range(n_layers)], dim=1)
        e_hat = torch.einsum("bl,lti->bti", aux_latents, decoder)
        loss = loss + 0.5 * (e_hat - e).pow(2).sum() / (e - e.mean(dim=0)).pow(2).sum()
    return loss


@pytest.mark.parametrize("n_layers, dead, skip", [(2, [], False), (3, [1, 5, 14, 30], True), (2, [0, 13], True)])
def test_the_clt_is_its_per_layer_loop_in_loss_and_gradients(n_layers, dead, skip):
    clt = random_clt(n_layers, 6, skip, seed=n_layers)
    table = torch.randn(40, 2 * n_layers, 6, dtype=torch.float64)
    out = clt(table, torch.tensor(dead) if dead else None)
    loss = out.mse + out.aux
    clt.zero_grad()
    loss.backward()
    params = {name: p.detach().clone().requires_grad_() for name, p in clt.named_parameters()}
    reference = per_layer_loop(params, table, n_layers, dead, skip)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for name, param in clt.named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad, msg=name)
    by_layer = (out.latents != 0).view(40, n_layers, M).sum(dim=2)
    assert (by_layer <= K).all() and by_layer.float().mean() > K - 1  # k a layer (fewer where the k-th is < 0)


def test_the_causal_pattern_survives_training_and_restarts():
    """Adam steps, decoder renormalisation and a restart leave every weight outside the pattern at 0."""
    clt = random_clt(3, 5).float()
    optimizer = make_optimizer(clt.parameters(), lr=1e-2)
    table = torch.randn(64, 6, 5)
    for _ in range(5):
        out = clt(table)
        optimizer.zero_grad()
        (out.mse + out.aux).backward()
        clt.before_optimizer_step()
        optimizer.step()
        clt.after_optimizer_step()
    with torch.no_grad():
        clt.W_enc[[2, 20, 30]] = 1.0
        clt.W_dec[[2, 20, 30]] = 1.0
    clt.restart_latents(torch.tensor([2, 20, 30]))
    layer_of = torch.arange(clt.d_sae) // M
    for latent in range(clt.d_sae):
        for source in range(3):
            reads, writes = layer_of[latent] == source, layer_of[latent] <= source
            assert reads or clt.W_enc[latent, source].abs().max() == 0, (latent, source)
            assert writes or clt.W_dec[latent, source].abs().max() == 0, (latent, source)
    torch.testing.assert_close(clt.W_dec.flatten(1).norm(dim=1), torch.ones(clt.d_sae))


def test_one_layer_is_a_topk_transcoder_with_the_same_weights():
    clt = random_clt(1, 6, skip=True)
    transcoder = build_sae(TopKSAEConfig(sparse_dim=M, k=K, k_aux=4, aux_coef=0.5, input_hookpoint="resid_mid",
                                         target_hookpoint="mlp_out", skip=True), 1, 6).double()
    transcoder.load_state_dict(clt.state_dict())
    table = torch.randn(30, 2, 6, dtype=torch.float64)
    dead = torch.tensor([0, 4, 7])
    ours, theirs = clt(table, dead), transcoder(table, dead)  # (the sparse TopK kernels)
    for a, b in ((ours.x_hat, theirs.x_hat), (ours.mse, theirs.mse), (ours.aux, theirs.aux)):
        torch.testing.assert_close(a, b)


def manual_replacement_logits(host, tokens: torch.Tensor, clt, zero: bool = False) -> torch.Tensor:
    """The 2-layer host block by block, every MLP's answer-position output replaced by the CLT's
    prediction from the latents of its own and earlier layers (computed in this replaced stream), or
    zeroed (`zero`)."""
    x = host.embed(tokens) + host.pos_embed[: tokens.shape[1]]
    latents = []
    for layer, block in enumerate(host.blocks):
        mid = x + block.attn(block.norm_attn(x))
        mlp_out = block.mlp.W_out(block.mlp.hidden(block.norm_mlp(mid))).clone()
        latents.append(clt.layer_latents(layer, mid[:, -1]))
        mlp_out[:, -1] = 0.0 if zero else clt.layer_output(layer, latents, mid[:, -1])
        x = mid + mlp_out
    return host.unembed(host.norm_final(x[:, -1]))


@pytest.fixture(scope="module")
def clt_run(tmp_path_factory, host_cache):
    cfg = tiny_train_config(host_cache, sae=CLTConfig(sparse_dim=32, k=4, k_aux=16), num_steps=60,
                            host_model=tiny_host(host_cache, layers=[0, 1]))
    run_dir = tmp_path_factory.mktemp("clt") / "run"
    return cfg, run_dir, run_training(cfg, run_dir)


def test_every_mlp_replaced_at_once_matches_a_manual_forward(clt_run):
    cfg, run_dir, summary = clt_run
    clt = load(run_dir)
    data = load_activation_data(cfg.task, cfg.host_model, normalize=False, device="cpu")
    host = data.sources[0].model
    dataset = build_dataset(cfg.task)
    for split, (tokens, labels) in (("train", dataset.train), ("test", dataset.test)):
        with torch.no_grad():
            logits = manual_replacement_logits(host, tokens, clt)
        prefix = f"eval/{split}/final.all_layers"
        assert summary[f"{prefix}/acc_spliced"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item(),
                                                                 abs=1.5 / len(labels))  # one pair at a tie
        ce = torch.nn.functional.cross_entropy(logits, labels).item()
        assert summary[f"{prefix}/ce_spliced"] == pytest.approx(ce, rel=1e-3, abs=1e-4)
        with torch.no_grad():
            zero_logits = manual_replacement_logits(host, tokens, clt, zero=True)
        zero_ce = torch.nn.functional.cross_entropy(zero_logits, labels).item()
        assert summary[f"{prefix}/ce_zero"] == pytest.approx(zero_ce, rel=1e-3, abs=1e-4)
    for layer in (0, 1):  # and each layer replaced alone, as every transcoder reports
        assert f"eval/test/final.L{layer}/acc_spliced" in summary


def test_the_preset_composes_on_a_two_layer_host(compose_train):
    cfg = compose_train(["sae=clt", "host_model.n_layers=2", "host_model.layers=[0,1]"])
    assert cfg.sae.type == "clt" and cfg.host_model.target_hookpoint.value == "mlp_out"
    assert build_sae(cfg.sae, 2, 128).d_sae == 2 * cfg.sae.sparse_dim


def test_the_circuit_summary_splits_the_whole_logit(clt_run):
    """Over every pair: latents (known-algorithm + other), errors, embeddings and constants account
    for the whole centred answer logit, on train and test pairs."""
    from sae.analysis.circuit_study import circuit_summary
    from sae.analysis.runs import load_sae_run

    _, run_dir, _ = clt_run
    summary = circuit_summary(load_sae_run(run_dir))
    for split in ("train", "test"):
        shares = summary[split]
        assert shares["latents"] + shares["errors"] + shares["embeddings"] + shares["constants"] == pytest.approx(1.0)
        assert shares["known_algorithm_latents"] + shares["other_latents"] == pytest.approx(shares["latents"])
    assert 0 <= summary["latents_on_known_algorithm"] <= summary["alive"] <= 64
    assert len(summary["top_latents"]) == 10
    layers = summary["known_by_layer"]
    assert [row["layer"] for row in layers] == [0, 1]
    assert sum(row["latents"] for row in layers) == summary["latents_on_known_algorithm"]
    for row in layers:  # weighted means of shares of one power spectrum: in [0, 1], together at most 1
        assert 0 <= row["product_share"] and 0 <= row["single_share"] and row["product_share"] + row["single_share"] <= 1 + 1e-9


def test_a_clt_is_not_exported_to_a_single_layer_format_and_its_checkpoint_loads_back(clt_run, tmp_path):
    from sae.errors import UserInputError
    from sae.saes.export import export_sae

    _, run_dir, _ = clt_run
    for fmt in ("saelens", "sparsify"):
        with pytest.raises(UserInputError, match=f"a cross-layer transcoder has no {fmt} format"):
            export_sae(run_dir, fmt, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    clt = load(run_dir)
    assert type(clt).__name__ == "CrossLayerTranscoder" and clt.d_sae == 64 and clt.n_sources == 2
    assert (clt.W_enc * (1 - clt.encoder_mask)).abs().max() == 0  # the causal pattern, as saved


def test_an_interrupted_clt_run_resumes_to_the_same_weights(tmp_path, host_cache, caplog):
    from tests.unit.test_training import resumed_and_whole_weights

    cfg = tiny_train_config(host_cache, sae=CLTConfig(sparse_dim=32, k=4, k_aux=16, dead_window=128, skip=True,
                                                       resample_every=10, resample_until=0.9),
                            host_model=tiny_host(host_cache, layers=[0, 1]), checkpoint_every=15, num_steps=40)
    full, resumed = resumed_and_whole_weights(cfg, tmp_path, caplog)
    assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)
