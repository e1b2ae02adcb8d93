"""Transcoders and skip transcoders: every architecture against a naive dense transcoder written here,
the sparse kernels' gradients, folding, the replacement metrics against a hand-written host forward,
runs (checkpoint, load, resume) and the config's one-line refusals."""
import json

import pytest
import torch

from sae.config import ConfigError
from sae.host_models.config import Hookpoint
from sae.saes import SAE_TYPES, build_sae, load
from sae.jobs import run_training
from sae.activations.modular import load_activation_data
from sae.tasks.modular import build_dataset
from tests.conftest import ROOT, tiny_host, tiny_train_config

HOOKS = dict(input_hookpoint="resid_mid", target_hookpoint="mlp_out")


def transcoder_config(kind: str, skip: bool, **keys):
    config_cls, _ = SAE_TYPES[kind]
    selection = {"topk": dict(k=5, k_aux=4, aux_coef=0.5), "batchtopk": dict(k=5, k_aux=4, aux_coef=0.5),
                 "matryoshka": dict(k=5, k_aux=4, aux_coef=0.5, prefix_fractions=[0.25, 1.0]),
                 "jumprelu": dict(init_l0=None, init_threshold=0.05), "gated": {}, "vanilla": {}}[kind]
    return config_cls(**{"sparse_dim": 48, "skip": skip, **HOOKS, **selection, **keys})


def random_transcoder(cfg, n_sources: int, d_in: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_sae(cfg, n_sources, d_in).double()
    with torch.no_grad():  # away from the tied init; a non-zero skip and input centre
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model


def naive_transcoder(params: dict, x_in: torch.Tensor, latents_of) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, prediction), written out per source with einsum: pre = sum_s (x_s - b_in_s) W_enc_s + b_enc,
    y_s = f W_dec_s + b_dec_s (+ W_skip_s x_s)."""
    pre = torch.einsum("bsi,lsi->bl", x_in - params["b_in"], params["W_enc"]) + params["b_enc"]
    latents = latents_of(pre)
    y_hat = torch.einsum("bl,lsi->bsi", latents, params["W_dec"]) + params["b_dec"]
    if "W_skip" in params:
        y_hat = y_hat + torch.einsum("bsi,soi->bso", x_in, params["W_skip"])
    return latents, y_hat


def naive_topk_rows(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k largest by a full sort, ReLU'd; the rest zero."""
    order = pre.argsort(dim=1, descending=True)[:, :k]
    return torch.zeros_like(pre).scatter(1, order, pre.gather(1, order).relu())


def naive_auxk(params, pre, y, y_hat, dead, k_aux, coef):
    mask = torch.zeros(pre.shape[1], dtype=torch.bool)
    mask[dead] = True
    values, indices = pre.masked_fill(~mask, float("-inf")).topk(min(k_aux, len(dead)), dim=1)
    aux_latents = torch.zeros_like(pre).scatter(1, indices, values.relu())
    e = (y - y_hat).detach()
    e_hat = torch.einsum("bl,lsi->bsi", aux_latents, params["W_dec"])
    return coef * (e_hat - e).pow(2).sum() / (e - e.mean(dim=0)).pow(2).sum()


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("n_sources, dead", [(1, []), (1, [0, 3, 5, 9, 17, 30]), (2, [2, 4, 8, 11, 40])])
def test_sparse_topk_transcoder_step_matches_a_naive_dense_transcoder(n_sources, dead, skip):
    """float64: the sparse kernels' loss (MSE of the target + AuxK on its residual) and every
    parameter's gradient equal the dense transcoder written out in this test."""
    cfg = transcoder_config("topk", skip)
    model = random_transcoder(cfg, n_sources, 7, seed=3)
    table = torch.randn(64, 2 * n_sources, 7, dtype=torch.float64)
    x_in, y = table[:, :n_sources], table[:, n_sources:]
    out = model(table, torch.tensor(dead) if dead else None)
    assert out.indices is not None and out.x_hat.shape == y.shape  # the sparse path ran
    loss = out.mse + out.aux
    model.zero_grad()
    loss.backward()
    params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    assert ("W_skip" in params) == skip and "b_in" in params
    latents, y_hat = naive_transcoder(params, x_in, lambda pre: naive_topk_rows(pre, cfg.k))
    reference = (y_hat - y).pow(2).sum(dim=(1, 2)).mean()
    if dead:
        pre = torch.einsum("bsi,lsi->bl", x_in - params["b_in"], params["W_enc"]) + params["b_enc"]
        reference = reference + naive_auxk(params, pre, y, y_hat, dead, cfg.k_aux, cfg.aux_coef)
    reference.backward()
    torch.testing.assert_close(out.dense_latents(cfg.sparse_dim), latents.detach())
    torch.testing.assert_close(loss, reference)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad, msg=name)


@pytest.mark.parametrize("kind", ["vanilla", "topk", "batchtopk", "matryoshka", "jumprelu", "gated"])
@pytest.mark.parametrize("skip", [False, True])
def test_every_architecture_predicts_the_target_from_the_input(kind, skip):
    """Inference forward of every selection rule: latents from the input columns only (a changed target
    changes nothing but the error), the prediction and its MSE against the naive transcoder's decode."""
    cfg = transcoder_config(kind, skip)
    model = random_transcoder(cfg, 2, 6, seed=1).eval()
    table = torch.randn(32, 4, 6, dtype=torch.float64)
    out = model(table)
    shifted = table.clone()
    shifted[:, 2:] += 5.0
    torch.testing.assert_close(model(shifted).x_hat, out.x_hat)
    torch.testing.assert_close(model.encode(table), model.encode(table[:, :2]))
    params = {name: p.detach() for name, p in model.named_parameters()}
    codes = out.dense_latents(cfg.sparse_dim)
    _, y_hat = naive_transcoder(params, table[:, :2], lambda pre: codes)
    torch.testing.assert_close(out.x_hat, y_hat)
    if kind != "matryoshka":  # (its mse is the mean over prefixes, tested with the SAEs)
        torch.testing.assert_close(out.mse, (y_hat - table[:, 2:]).pow(2).sum(dim=(1, 2)).mean())


def test_the_skip_path_alone_is_the_linear_map_and_learns_a_linear_target():
    """With no latent firing the prediction is b_dec + W_skip x; a few Adam steps on a target that is a
    linear map of the input bring the skip transcoder's error far below the plain one's."""
    torch.manual_seed(0)
    d = 8
    A = torch.randn(d, d) / d ** 0.5
    x = torch.randn(512, 1, d)
    table = torch.cat([x, x @ A.t()], dim=1)
    final = {}
    for skip in (False, True):
        torch.manual_seed(0)
        model = build_sae(transcoder_config("topk", skip, k=1, sparse_dim=16), 1, d)
        model.init_b_dec(table.mean(dim=0))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(300):
            out = model(table)
            optimizer.zero_grad()
            out.mse.backward()
            model.before_optimizer_step()
            optimizer.step()
            model.after_optimizer_step()
        final[skip] = model(table).mse.item() / table[:, 1].var(dim=0).sum().item()
    assert final[True] < 0.05 < final[False]
    with torch.no_grad():
        model.W_dec.zero_()
        torch.testing.assert_close(model(table).x_hat, model.b_dec + x @ model.W_skip[0].t())


def test_folding_the_scales_gives_a_transcoder_of_raw_activations():
    """Trained on c_in x -> c_out y (its own scale per column), folded it maps raw x to raw y."""
    for skip in (False, True):
        model = random_transcoder(transcoder_config("topk", skip), 2, 5, seed=2).eval()
        table = torch.randn(16, 4, 5, dtype=torch.float64)
        scale = torch.tensor([0.5, 2.0, 3.0, 0.25], dtype=torch.float64)
        expected = model(table * scale[:, None]).x_hat / scale[2:, None]
        model.fold_input_scale(scale)
        torch.testing.assert_close(model(table).x_hat, expected)


def manual_replacement_logits(host, tokens: torch.Tensor, transcoder) -> torch.Tensor:
    """The 2-layer host's forward written out block by block (not through hooks), with the last block's
    MLP output at the answer position replaced by the transcoder's prediction from resid_mid."""
    x = host.embed(tokens) + host.pos_embed[: tokens.shape[1]]
    for layer, block in enumerate(host.blocks):
        mid = x + block.attn(block.norm_attn(x))
        mlp_out = block.mlp.W_out(block.mlp.hidden(block.norm_mlp(mid)))
        if layer == len(host.blocks) - 1:
            mlp_out = mlp_out.clone()
            mlp_out[:, -1] = transcoder(torch.stack([mid[:, -1], mlp_out[:, -1]], dim=1)).x_hat[:, 0]
        x = mid + mlp_out
    return host.unembed(host.norm_final(x[:, -1]))


@pytest.fixture(scope="module")
def transcoder_run(tmp_path_factory, host_cache):
    cfg = tiny_train_config(host_cache, sae=transcoder_config("topk", True, k=4, k_aux=16, sparse_dim=64),
                            num_steps=60)
    cfg.host_model.layers = [1]
    from sae.config import read_transcoder_hooks
    read_transcoder_hooks(cfg.sae, cfg.host_model)
    run_dir = tmp_path_factory.mktemp("transcoder") / "run"
    summary = run_training(cfg, run_dir)
    return cfg, run_dir, summary


def test_a_transcoder_run_reports_the_replacement_model_against_a_manual_forward(transcoder_run):
    """final_metrics: FVU of the MLP output, and the host with its MLP output replaced by the saved
    transcoder's prediction: accuracy and CE equal a hand-written forward; zero-ablation zeroes the MLP."""
    cfg, run_dir, summary = transcoder_run
    model = load(run_dir)
    data = load_activation_data(cfg.task, cfg.host_model, normalize=False, device="cpu")
    assert [s.hook for s in data.targets] == ["blocks.1.mlp_out"] and data.sources[0].hook == "blocks.1.resid_mid"
    host = data.sources[0].model
    dataset = build_dataset(cfg.task)
    for split, (tokens, labels) in (("train", dataset.train), ("test", dataset.test)):
        with torch.no_grad():
            logits = manual_replacement_logits(host, tokens, model)
            zero_logits = manual_replacement_logits(host, tokens, lambda table: type("Out", (), {
                "x_hat": torch.zeros_like(table[:, 1:])})())
        prefix = f"eval/{split}/final.L1"
        accuracy = (logits.argmax(-1) == labels).float().mean().item()
        # the run scores in training units, this forward in raw ones: a float32 near-tie may flip one pair
        assert summary[f"{prefix}/acc_spliced"] == pytest.approx(accuracy, abs=1.5 / len(labels))
        ce = torch.nn.functional.cross_entropy(logits, labels).item()
        assert summary[f"{prefix}/ce_spliced"] == pytest.approx(ce, rel=1e-4, abs=1e-5)
        zero_ce = torch.nn.functional.cross_entropy(zero_logits, labels).item()
        assert summary[f"{prefix}/ce_zero"] == pytest.approx(zero_ce, rel=1e-4, abs=1e-5)
        target = data.eval_table(split)[:, 1]
        fvu = (target - model(data.eval_table(split)).x_hat[:, 0]).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
        assert summary[f"eval/{split}/fvu"] == pytest.approx(fvu.item(), rel=1e-4)
    meta = json.loads(next((run_dir / "checkpoints").glob("step_*")).joinpath("sae.json").read_text())
    assert meta["targets"][0]["hook"] == "blocks.1.mlp_out" and len(meta["input_scale"]) == 2


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu"])
def test_an_interrupted_transcoder_run_resumes_to_the_same_weights(kind, tmp_path, host_cache, caplog):
    """Only the step-15 checkpoint survived: the run resumes from it (skip path, b_in, dead-latent
    resampling of a transcoder included) and ends with the uninterrupted run's weights, bit for bit."""
    from tests.unit.test_training import resumed_and_whole_weights
    sae = transcoder_config(kind, True, sparse_dim=64, dead_window=128, resample_every=10, resample_until=0.9,
                            **({"k": 4, "k_aux": 16} if kind != "jumprelu" else {}))
    cfg = tiny_train_config(host_cache, sae=sae, checkpoint_every=15, num_steps=40)
    from sae.config import read_transcoder_hooks
    read_transcoder_hooks(cfg.sae, cfg.host_model)
    full, resumed = resumed_and_whole_weights(cfg, tmp_path, caplog)
    assert set(full) == set(resumed) and {"W_skip", "b_in"} <= set(full)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


# -- config: one line naming the key, before any work ---------------------------------------------

def test_the_presets_read_the_mlp_input_and_predict_its_output(compose_train):
    cfg = compose_train(["sae=transcoder"])
    assert cfg.host_model.hookpoint is Hookpoint.resid_mid and cfg.host_model.target_hookpoint is Hookpoint.mlp_out
    assert cfg.sae.type == "topk" and not cfg.sae.skip
    assert compose_train(["sae=skip_transcoder", "sae.k=8"]).sae.skip
    jumprelu = compose_train(["sae=jumprelu", "+sae.input_hookpoint=resid_mid", "+sae.target_hookpoint=resid_post"])
    assert jumprelu.sae.transcoder and jumprelu.host_model.target_hookpoint is Hookpoint.resid_post


FASTA = str(ROOT / "tests" / "data" / "proteins.fasta")


@pytest.mark.parametrize("overrides, message", [
    (["sae=transcoder", "sae.target_hookpoint=mlp_output"],
     "sae.target_hookpoint=mlp_output is not a hook of the transformer host; allowed: resid_mid, mlp_hidden, "
     "mlp_out, resid_post"),
    (["sae=transcoder", "sae.input_hookpoint=mlp_out", "sae.target_hookpoint=resid_mid"],
     "sae.target_hookpoint=resid_mid must come after sae.input_hookpoint=mlp_out in the block"),
    (["sae=transcoder", "sae.target_hookpoint=mlp_hidden"],
     "sae.input_hookpoint=resid_mid (width 128) and sae.target_hookpoint=mlp_hidden (width 512) differ"),
    (["sae=transcoder", "host_model.hookpoint=mlp_out"],
     "host_model.hookpoint=mlp_out and sae.input_hookpoint=resid_mid disagree"),
    (["sae=transcoder", "sae.target_hookpoint=null"],
     "a transcoder names both sae.input_hookpoint and sae.target_hookpoint"),
    (["sae=topk", "sae.skip=true"], "sae.skip=true needs a transcoder"),
    (["host_model.target_hookpoint=mlp_out"], "host_model.target_hookpoint=mlp_out is set from sae.target_hookpoint"),
    (["sae=transcoder", "task=protein_mlm", "host_model=esm2_t6_8M", f"task.fasta={FASTA}"],
     "sae.target_hookpoint=mlp_out: transcoders need a host with MLP input and output hooks; esm2_t6_8M"),
    # cross-layer transcoders (sae=clt)
    (["sae=clt"], "sae=clt on a 1-layer host (host_model.n_layers=1) is a plain transcoder: use sae=transcoder"),
    (["sae=clt", "host_model.n_layers=3", "host_model.layers=[0,2]"],
     "sae=clt reads every layer of the host: host_model.layers must be [0, 1, 2] (host_model.n_layers=3), got [0, 2]"),
    (["sae=clt", "host_model.n_layers=2", "host_model.layers=[0,5]"], "host_model.layers: layer 5 out of range [0, n_layers=2)"),
    (["sae=clt", "host_model.n_layers=2", "host_model.layers=[0,1]", "host_model.checkpoints=[pre_grok,post_grok]"],
     "sae=clt takes one host checkpoint (train one CLT per checkpoint"),
])
def test_bad_transcoder_and_clt_configs_are_refused_in_one_line(compose_train, overrides, message):
    with pytest.raises(ConfigError) as error:
        compose_train(overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_host_without_the_target_width_is_refused_when_loading(host_cache):
    """Widths come from the host actually loaded too: a host whose MLP hidden width differs from the
    residual's cannot map resid_mid to mlp_hidden."""
    from sae.host_models.runs import HostRunError
    host = tiny_host(host_cache)
    host.hookpoint, host.target_hookpoint = Hookpoint.resid_mid, Hookpoint.mlp_hidden
    cfg = tiny_train_config(host_cache)
    with pytest.raises(HostRunError, match=r"have different widths \[32, 64\]"):
        load_activation_data(cfg.task, host, normalize=False, device="cpu")


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka"])
def test_the_sparse_batchtopk_kernels_train_a_transcoder_as_the_dense_path_does(kind):
    """Training-mode BatchTopK / Matryoshka skip transcoders: the sparse kernels (input without gradient)
    and the dense forward (input that needs one) give the same codes, loss and every gradient."""
    def loss_and_grads(model, table, dead):
        out = model(table, dead)
        loss = out.mse + out.aux
        model.zero_grad()
        loss.backward()
        return out, loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    model = random_transcoder(transcoder_config(kind, True), 2, 7, seed=5).train()
    table = torch.randn(64, 4, 7, dtype=torch.float64)
    dead = torch.tensor([1, 6, 9, 30])
    sparse_out, sparse_loss, sparse_grads = loss_and_grads(model, table, dead)
    assert sparse_out.rows is not None
    dense_out, dense_loss, dense_grads = loss_and_grads(model, table.clone().requires_grad_(), dead)
    assert dense_out.rows is None
    torch.testing.assert_close(sparse_out.dense_latents(model.d_sae), dense_out.latents)
    torch.testing.assert_close(sparse_loss, dense_loss)
    for name, grad in sparse_grads.items():
        torch.testing.assert_close(grad, dense_grads[name], msg=name)
