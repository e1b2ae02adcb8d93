"""Dead-latent resampling (sae/training/resample.py): which latents restart, from which inputs, at
what scale, with which optimiser state; the alive latents and their state are left as they were."""
import pytest
import torch

from sae.saes import build_sae
from sae.saes.jumprelu import JumpReLUSAEConfig
from sae.saes.topk import TopKSAEConfig
from sae.saes.vanilla import VanillaSAEConfig
from sae.training.resample import resample_dead_latents, resample_due
from sae.training.step import DeadLatents, make_optimizer, optimisation_step
from sae.hardware import HardwareConfig

D_IN, D_SAE = 8, 16


def trained_a_little(cfg, x: torch.Tensor):
    """An SAE and its Adam after a few steps on x (so every latent has non-zero moments)."""
    torch.manual_seed(0)
    sae = build_sae(cfg, 1, D_IN)
    optimizer = make_optimizer(sae.parameters(), lr=1e-2)
    for _ in range(3):
        optimisation_step(sae, sae, optimizer, x, None, getattr(cfg, "sparsity_coef", 0.0), None, HardwareConfig())
    return sae, optimizer


def dead_counter(dead: list[int], window: int = 100) -> DeadLatents:
    counter = DeadLatents(D_SAE, window, "cpu")
    counter.tokens_since_fired[dead] = window + 1
    counter.refresh_dead_set()
    return counter


def test_resampled_latents_take_centred_high_error_rows_at_the_papers_scales():
    """The TopK k=1 SAE reconstructs the rows along e0 exactly (error 0: never drawn); the dead
    latents must each take the direction of one of the badly fitted rows, x - b_dec normalised."""
    cfg = TopKSAEConfig(sparse_dim=D_SAE, k=1, k_aux=4)
    sae = build_sae(cfg, 1, D_IN)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.W_enc[0, 0, 0] = sae.W_dec[0, 0, 0] = 1.0  # latent 0 reads and writes e0 ...
        sae.W_enc[1:, 0, 1] = torch.linspace(0.1, 0.2, D_SAE - 1)  # ... the others only e1, weakly
        sae.W_dec[1:, 0, 1] = 1.0
        sae.b_dec[0, 7] = 0.5  # rows are centred on b_dec before they become directions
    fitted = torch.zeros(6, 1, D_IN)
    fitted[:, 0, 0] = torch.arange(1.0, 7.0)
    fitted[:, 0, 7] = 0.5  # = b_dec: x - b_dec is exactly along e0, reconstructed exactly
    misfit = torch.randn(6, 1, D_IN, generator=torch.Generator().manual_seed(1))
    misfit[:, 0, :2] = 0  # nothing reads these rows' directions: error > 0
    x = torch.cat([fitted, misfit])
    optimizer = make_optimizer(sae.parameters(), lr=1e-3)
    dead = [3, 5, 9, 12]
    alive = [i for i in range(D_SAE) if i not in dead]
    enc_norm = sae.W_enc[alive].flatten(1).norm(dim=1).mean()
    dec_norm = sae.W_dec[alive].flatten(1).norm(dim=1).mean()
    counter = dead_counter(dead)

    assert resample_dead_latents(sae, optimizer, counter, x, seed=0, step=10, encoder_scale=0.2) == len(dead)

    candidates = torch.nn.functional.normalize((misfit - sae.b_dec).flatten(1), dim=1)
    for latent in dead:
        direction = sae.W_dec[latent].flatten() / dec_norm
        assert torch.allclose(sae.W_dec[latent].flatten().norm(), dec_norm, rtol=1e-6)
        best = (candidates @ direction).max()  # the row it came from: cosine 1
        assert best > 1 - 1e-6
        torch.testing.assert_close(sae.W_enc[latent].flatten(), 0.2 * enc_norm * direction)
        assert sae.b_enc[latent] == 0
    assert counter.dead is None and counter.tokens_since_fired[dead].eq(0).all()


@pytest.mark.parametrize("cfg", [TopKSAEConfig(sparse_dim=D_SAE, k=2, k_aux=4),
                                 VanillaSAEConfig(sparse_dim=D_SAE, sparsity_coef=0.1),
                                 JumpReLUSAEConfig(sparse_dim=D_SAE, sparsity_coef=0.1, init_threshold=0.05)])
def test_only_the_dead_latents_and_their_adam_moments_change(cfg):
    x = torch.randn(64, 1, D_IN, generator=torch.Generator().manual_seed(0))
    sae, optimizer = trained_a_little(cfg, x)
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    moments = {name: {m: optimizer.state[p][m].clone() for m in ("exp_avg", "exp_avg_sq")}
               for name, p in sae.named_parameters()}
    dead = [0, 7, 15]
    alive = [i for i in range(D_SAE) if i not in dead]

    resample_dead_latents(sae, optimizer, dead_counter(dead), x, seed=0, step=5, encoder_scale=0.2)

    for name, p in sae.named_parameters():
        state = optimizer.state[p]
        if name in sae.sharded_parameters():  # per latent
            assert torch.equal(p[alive], before[name][alive]), name
            assert not torch.equal(p[dead], before[name][dead]) or name == "b_enc", name
            for moment in ("exp_avg", "exp_avg_sq"):
                assert state[moment][dead].eq(0).all(), (name, moment)
                assert torch.equal(state[moment][alive], moments[name][moment][alive]), (name, moment)
        if name == "log_threshold":  # JumpReLU's θ: back to its initial value
            torch.testing.assert_close(p[dead].exp(), torch.full((len(dead),), 0.05))
        if name not in sae.sharded_parameters():  # b_dec: shared by every latent
            assert torch.equal(p, before[name]), name
            assert torch.equal(state["exp_avg_sq"], moments[name]["exp_avg_sq"]), name


def test_the_draw_depends_on_seed_and_step_only():
    cfg = TopKSAEConfig(sparse_dim=D_SAE, k=2, k_aux=4)
    x = torch.randn(256, 1, D_IN, generator=torch.Generator().manual_seed(0))
    restarted = []
    for seed, step in [(0, 10), (0, 10), (0, 20), (1, 10)]:
        sae, optimizer = trained_a_little(cfg, x)
        torch.manual_seed(seed + step + 123)  # the global generator must not matter
        resample_dead_latents(sae, optimizer, dead_counter([2, 4, 6, 8]), x, seed=seed, step=step, encoder_scale=0.2)
        restarted.append(sae.W_dec[[2, 4, 6, 8]].detach().clone())
    assert torch.equal(restarted[0], restarted[1])
    assert not torch.equal(restarted[0], restarted[2]) and not torch.equal(restarted[0], restarted[3])


def test_nothing_dead_changes_nothing():
    cfg = TopKSAEConfig(sparse_dim=D_SAE, k=2, k_aux=4)
    x = torch.randn(32, 1, D_IN, generator=torch.Generator().manual_seed(0))
    sae, optimizer = trained_a_little(cfg, x)
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    assert resample_dead_latents(sae, optimizer, dead_counter([]), x, seed=0, step=5, encoder_scale=0.2) == 0
    assert all(torch.equal(p, before[name]) for name, p in sae.named_parameters())


@pytest.mark.parametrize("step, due", [(10, True), (15, False), (50, True), (60, False), (100, False)])
def test_resampling_is_due_every_so_many_steps_up_to_a_fraction_of_the_run(step, due):
    assert resample_due(step, every=10, until=0.5, num_steps=100) is due
    assert resample_due(step, every=None, until=0.5, num_steps=100) is False


@pytest.mark.parametrize("step, due", [(80, True), (90, True), (95, False), (100, False)])
def test_the_last_interval_of_a_run_has_no_resampling(step, due):
    assert resample_due(step, every=10, until=1.0, num_steps=100) is due


def test_a_transcoder_restarts_its_encoder_from_the_input_and_its_decoder_from_the_target():
    """Each restarted latent's encoder row is a drawn row's input - b_in and its decoder row the same
    row's target - b_dec (each normalised): a transcoder reads one hook and writes another."""
    cfg = TopKSAEConfig(sparse_dim=D_SAE, k=1, k_aux=4, input_hookpoint="resid_mid", target_hookpoint="mlp_out")
    torch.manual_seed(0)
    sae = build_sae(cfg, 1, D_IN)
    with torch.no_grad():
        sae.b_in.normal_()
        sae.b_dec.normal_()
    table = torch.randn(12, 2, D_IN, generator=torch.Generator().manual_seed(2))
    dead = [2, 7, 11]
    optimizer = make_optimizer(sae.parameters(), lr=1e-3)
    assert resample_dead_latents(sae, optimizer, dead_counter(dead), table, seed=0, step=10, encoder_scale=0.2) == 3

    def unit(rows: torch.Tensor) -> torch.Tensor:
        return rows / rows.norm(dim=1, keepdim=True)

    inputs, targets = unit(table[:, 0] - sae.b_in[0]), unit(table[:, 1] - sae.b_dec[0])
    for latent in dead:
        encoder, decoder = unit(sae.W_enc[latent].detach()), unit(sae.W_dec[latent].detach())
        row = int((inputs @ encoder[0]).argmax())
        torch.testing.assert_close(encoder[0], inputs[row], atol=1e-5, rtol=0)
        torch.testing.assert_close(decoder[0], targets[row], atol=1e-5, rtol=0)
