"""Dead-latent resampling (Bricken et al. 2023, "Towards Monosemanticity"): every so many steps,
the latents that have not fired for `sae.dead_window` tokens start again from inputs the SAE
reconstructs badly.

Each dead latent takes one row of the batch, drawn with probability proportional to the square of
its reconstruction error; the centred row x - b_dec, normalised, becomes the latent's direction:
its decoder row at the alive latents' mean decoder norm, its encoder row at `encoder_scale` times
their mean encoder norm (0.2 in the paper: the new latent starts small), its encoder bias 0, its
other per-latent parameters at their initial values (JumpReLU's θ) and its Adam moments 0. The
draw comes from a generator seeded by (seed, step), so a resumed run and every process of a
parallel run make the same choices.
"""
from __future__ import annotations

import torch

from sae.saes.base import SparseCoder
from sae.training.step import DeadLatents


def resample_due(step: int, every: int | None, until: float, num_steps: int) -> bool:
    """After step `step` (1-based): a resample every `every` steps up to `until` x num_steps, and
    never in the last `every` steps: restarted latents always train for a whole interval before the
    run ends (a restart at the last step left ~800 untrained latents in a 4M-token run's final
    dictionary and its FVU at 0.39 instead of 0.13)."""
    if every is None or step % every:
        return False
    return step <= until * num_steps and step + every <= num_steps


@torch.no_grad()
def resample_dead_latents(sae: SparseCoder, optimizer: torch.optim.Optimizer, dead: DeadLatents, x: torch.Tensor,
                          seed: int, step: int, encoder_scale: float) -> int:
    """Restart every dead latent (see the module's doc) and reset its dead-latent counter; x: this
    process's rows of the batch, [rows, n_sources, d_in]. Returns how many latents were restarted
    (over the whole dictionary). Every process calls it (collectives when the run is parallel)."""
    shards, rows = sae.latent_shards, sae.rows
    local_dead = dead.mask()
    whole_dead = local_dead if shards.size == 1 else shards.gather(local_dead.to(torch.uint8)).flatten().bool()
    n_dead = int(whole_dead.sum())
    if n_dead == 0:
        return 0
    # one direction per dead latent of the whole dictionary, in latent order; this shard takes its own
    # [n_dead, n_sources x d_in] unit rows: encoder directions from the input, decoder ones from the target
    encoder_directions, decoder_directions = _sampled_directions(sae, x, n_dead, seed, step)
    start = shards.rank * sae.d_sae
    dead_ids = torch.nonzero(whole_dead).flatten()
    on_this_shard = (dead_ids >= start) & (dead_ids < start + sae.d_sae)
    local = dead_ids[on_this_shard] - start
    encoder_directions, decoder_directions = encoder_directions[on_this_shard], decoder_directions[on_this_shard]
    alive = ~local_dead
    enc_norm = _mean_alive_norm(sae.W_enc.flatten(1), alive, shards)
    dec_norm = _mean_alive_norm(sae.W_dec.flatten(1), alive, shards)
    sae.W_enc[local] = (encoder_scale * enc_norm * encoder_directions).view(-1, sae.n_sources, sae.d_in).to(
        sae.W_enc.dtype)
    sae.W_dec[local] = (dec_norm * decoder_directions).view(-1, sae.n_sources, sae.d_in).to(sae.W_dec.dtype)
    sae.b_enc[local] = 0
    sae.restart_latents(local)  # the architecture's own per-latent parameters (JumpReLU: θ)
    _zero_optimizer_rows(sae, optimizer, local)
    dead.revive(local)
    return n_dead


def _sampled_directions(sae: SparseCoder, x: torch.Tensor, n: int, seed: int,
                        step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder, decoder) directions: n unit rows each of the global batch's x - b_dec (an SAE: both the
    same; a transcoder: its input - b_in, and its target - b_dec), rows drawn with probability ∝
    (squared reconstruction error)^2; x: this process's table rows. The same on every process."""
    was_training = sae.training
    sae.eval()  # the inference forward: no training statistics move (BatchTopK's threshold)
    try:
        error = (sae.targets_of(x) - sae(x).x_hat).flatten(1).pow(2).sum(dim=1).double()  # the run's own forward
    finally:
        sae.train(was_training)
    if sae.rows.size > 1:  # every process: the errors and rows of the whole batch
        error, x = sae.rows.gather(error).flatten(), sae.rows.gather(x).flatten(0, 1)
    weights = error.pow(2)
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)  # a perfect (or broken) fit: draw uniformly
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    picked = torch.multinomial(weights.cpu(), n, replacement=n > len(x), generator=generator).to(x.device)
    rows = x[picked]

    def unit(centred: torch.Tensor) -> torch.Tensor:
        centred = centred.flatten(1).to(sae.W_dec.dtype)
        return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)

    decoder = unit(sae.targets_of(rows) - sae.b_dec)
    return (unit(sae.inputs_of(rows) - sae.b_in) if sae.transcoder else decoder), decoder


def _mean_alive_norm(weights: torch.Tensor, alive: torch.Tensor, shards) -> torch.Tensor:
    """Mean row norm over the alive latents of the whole dictionary (1 when none is alive)."""
    norms = weights.norm(dim=1)
    totals = torch.stack([norms[alive].sum(), alive.sum().to(norms.dtype)])
    total, count = (totals if shards.size == 1 else shards.sum(totals)).tolist()
    return torch.tensor(total / count if count else 1.0, device=weights.device)


def _zero_optimizer_rows(sae: SparseCoder, optimizer: torch.optim.Optimizer, local: torch.Tensor) -> None:
    """Adam's moments of the restarted latents' rows: a fresh start, not the dead latent's history."""
    for name in sae.sharded_parameters():  # those whose first dimension is the latent
        state = optimizer.state.get(getattr(sae, name), {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in state:
                state[moment][local] = 0
