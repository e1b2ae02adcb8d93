"""Dashboard content for modular-arithmetic runs: per latent, its activation over every (a, b) pair of
every operation (train/test split marked), the 2-D Fourier power of that map with the host's key
frequencies, the top-activating pairs, and the answer logits its decoder direction writes, per source
(a crosscoder's pre_grok | post_grok side by side)."""
from __future__ import annotations

import base64
import dataclasses

import torch

from sae.analysis.effects import decoder_logit_effects, sample_pairs
from sae.analysis.fourier import (PHASE_SIGN, folded_power, grid_power, key_frequencies, operation_grid,
                                  operation_key_frequencies, strongest_folded)
from sae.analysis.latents import LatentGrid, firing_frequency, latent_grid, top_activating
from sae.dashboard.index import FiringStats, encode_all, table_columns
from sae.dashboard.site import Column, SiteContent, quantized, rounded, rounded_list
from sae.host_models.config import TokenPositions

TOP_PAIRS = 12
EFFECT_PAIRS = 256  # pairs the logit effect is averaged over (exact for a linear rest of the host)
ANSWERS_LISTED = 5
POWER_LATENTS = 512  # latents per batch of Fourier transforms (bounds the float64 spectra in memory)


def modular_content(inputs, latents: list[int], facts: list[tuple[str, str]]) -> SiteContent:
    sae, data = inputs.sae, inputs.modular
    stats = FiringStats(sae.d_sae)
    for _ in encode_all(sae, {"train": data.train, "test": data.test}, stats):
        pass
    grid = latent_grid(sae, answer_rows(data))
    crosscoder = sae.n_sources >= 2
    unit = "pairs" if data.positions is TokenPositions.answer else "tokens"
    columns, values, histograms = table_columns(sae, inputs.source_names, inputs.meta["input_scale"], latents, stats,
                                                data.test if crosscoder else None, unit)
    ops = [op.value for op in grid.operations]
    ids = torch.tensor(latents)
    spectra = FourierSpectra(grid)
    if len(ops) > 1:
        frequency = firing_frequency(grid)
        for index, op in enumerate(ops):
            columns.append(Column(f"freq_{op}", f"freq {op}", "freq", f"fraction of the {op} pairs it fires on"))
            values[f"freq_{op}"] = rounded_list(frequency[index, ids])
    else:
        top = spectra.strongest(latents)
        columns += [Column("top_k", "top (k_a, k_b)", "text", "its strongest 2-D frequency pair (folded)"),
                    Column("top_share", "top share", "float", "that pair's share of its non-constant Fourier power")]
        values["top_k"] = [f"({ka}, {kb})" if share > 0 else "" for ka, kb, share in top]
        values["top_share"] = [rounded(share) if share > 0 else None for _, _, share in top]
    effects = LogitEffects(inputs, data, stats)
    meta = {"p": data.dataset.p, "operations": ops, "sources": inputs.source_names,
            "split": [split_codes(grid, op) for op in range(len(ops))],
            "fourier": [{"n": spectra.group_size(op), "axis": fourier_axis(op)} for op in ops],
            "key_frequencies": key_frequencies_by_source(data, ops),
            "effect_note": effects.note, "positions": data.positions.value}
    return SiteContent(facts=facts, family="modular", latents=latents, columns=columns, values=values,
                       histograms=histograms, panel_meta=meta, title="",
                       panels=lambda ids: modular_panels(ids, grid, spectra, effects))


def answer_rows(data):
    """The activations at the answer position only (as trained with token_positions=answer; from the
    4-token rows of a token_positions=all run): one row per pair, what heatmaps show."""
    if data.positions is TokenPositions.answer:
        return data
    seq = data.dataset.tokens.shape[1]

    def last(table: torch.Tensor) -> torch.Tensor:
        return table.view(-1, seq, *table.shape[1:])[:, -1]

    return dataclasses.replace(data, train=last(data.train), test=last(data.test), positions=TokenPositions.answer)


def split_codes(grid: LatentGrid, op: int) -> str:
    """[p, p] per pair: 0 no such pair (b = 0 for division), 1 train, 2 test; base64 bytes."""
    codes = torch.where(grid.exists[op], torch.where(grid.is_train[op], 1, 2), 0).to(torch.uint8)
    return base64.b64encode(codes.numpy().tobytes()).decode("ascii")


def fourier_axis(op: str) -> str:
    if op in ("multiplication", "division"):
        return "frequency over the discrete log of a, b (0 left out)"
    return "frequency over a, b"


class FourierSpectra:
    """Folded 2-D Fourier power of every latent's map, per operation, computed in batches on demand."""

    def __init__(self, grid: LatentGrid):
        self.grid = grid

    def group_size(self, op: str) -> int:
        p = self.grid.values.shape[1]
        return p - 1 if op in ("multiplication", "division") else p

    def folded(self, op: int, latents: list[int]) -> torch.Tensor:
        """[len(latents), n // 2 + 1, n // 2 + 1]."""
        maps = self.grid.values[op][..., latents].permute(2, 0, 1)
        return folded_power(grid_power(operation_grid(maps, self.grid.operations[op].value)))

    def strongest(self, latents: list[int], op: int = 0) -> list[tuple[int, int, float]]:
        out = []
        for start in range(0, len(latents), POWER_LATENTS):
            out += [strongest_folded(f, 1)[0] for f in self.folded(op, latents[start:start + POWER_LATENTS])]
        return out


class LogitEffects:
    """Per source, each latent's decoder direction x its mean activation when firing, pushed through the
    rest of that source's host (sae.analysis.effects), averaged over a fixed sample of pairs."""

    def __init__(self, inputs, data, stats: FiringStats):
        self.data, self.sae = data, inputs.sae
        self.scale = stats.mean_when_firing()
        tokens = data.dataset.tokens
        self.tokens = tokens[sample_pairs(len(tokens), EFFECT_PAIRS).to(tokens.device)]
        self.written_at = data.targets or data.sources  # where each source's decoder writes (a transcoder: its target)
        hooks = sorted({source.hook for source in self.written_at})
        self.note = (f"mean change of the centred answer logits when the latent's mean activation times its decoder "
                     f"direction is added at {', '.join(hooks)} (answer position), over "
                     f"{len(self.tokens)} pairs")

    def of(self, latents: list[int]) -> dict[int, list[dict] | None]:
        alive = [i for i in latents if torch.isfinite(self.scale[i])]
        out: dict[int, list[dict] | None] = {i: None for i in latents}
        if not alive:
            return out
        per_source = []
        for index, source in enumerate(self.written_at):
            directions = self.sae.W_dec.detach()[alive, index] * self.scale[alive, None].to(self.sae.W_dec)
            per_source.append(decoder_logit_effects(source.model, source.hook, self.tokens, directions,
                                                    self.data.dataset.p).cpu())
        for row, latent in enumerate(alive):
            out[latent] = [answer_list(effects[row]) for effects in per_source]
        return out


def answer_list(effect: torch.Tensor) -> dict:
    order = effect.argsort(descending=True, stable=True).tolist()
    return {"effect": rounded_list(effect, 3),
            "promoted": [[c, rounded(effect[c])] for c in order[:ANSWERS_LISTED]],
            "suppressed": [[c, rounded(effect[c])] for c in order[::-1][:ANSWERS_LISTED]]}


def key_frequencies_by_source(data, ops: list[str]) -> dict[str, dict[str, list[int]]]:
    """Per source and operation, the host's key frequencies (embedding Fourier norms, on the
    operation's group for multiplicative ones)."""
    p, out = data.dataset.p, {}
    for source in data.sources:
        W_E = source.model.embed.weight.detach()[:p].cpu()
        out[source.name] = {op: (operation_key_frequencies(W_E, op) if op in PHASE_SIGN else key_frequencies(W_E))
                            for op in ops}
    return out


def modular_panels(latents: list[int], grid: LatentGrid, spectra: FourierSpectra, effects: LogitEffects) -> dict:
    folded = [spectra.folded(op, latents) for op in range(len(grid.operations))]
    logits = effects.of(latents)
    panels = {}
    for row, latent in enumerate(latents):
        panels[latent] = {
            "grids": [quantized(grid.values[op, :, :, latent].numpy()) for op in range(len(grid.operations))],
            "fourier": [{**quantized(f[row].numpy()), "top": [[ka, kb, rounded(s)] for ka, kb, s in
                                                               strongest_folded(f[row], 3) if s > 0]}
                        for f in folded],
            "top": [[r["op"], r["a"], r["b"], rounded(r["value"]), r["train"]]
                    for r in top_activating(grid, latent, TOP_PAIRS) if r["value"] > 0],
            "logits": logits[latent],
        }
    return panels
