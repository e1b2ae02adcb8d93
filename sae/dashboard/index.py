"""The latent table every dashboard has: firing per split, mean activation when firing, decoder norms
per source, the dead flag, and for crosscoders relative decoder norm, decoder cosine and latent
scaling (nu); with the histograms drawn above the table."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from sae.analysis.diffing import decoder_cosines, latent_scaling, relative_decoder_norms
from sae.dashboard.site import Column, Histogram, histogram, rounded_list

ENCODE_ROWS = 4096  # rows per encoder pass (fewer for large dictionaries: see encode_rows)


def encode_rows(d_sae: int) -> int:
    """Rows per chunk so a chunk's dense codes stay near 64 MB (16k latents: 1024 rows)."""
    return max(256, min(ENCODE_ROWS, (1 << 24) // d_sae))


class FiringStats:
    """Per latent over the rows encoded so far: rows of each split it fires on (activation > 0)
    and its summed activation (codes are non-negative, so the sum over all rows is the sum over
    firing rows)."""

    def __init__(self, d_sae: int):
        self.fires = {split: torch.zeros(d_sae, dtype=torch.float64) for split in ("train", "test")}
        self.rows = {"train": 0, "test": 0}
        self.total = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, codes: torch.Tensor, split: str) -> None:
        # codes are >= 0, so a nonzero code fires; bincount over the nonzero columns is 4x faster than a
        # column reduction of (codes > 0) on sparse codes
        self.fires[split] += torch.bincount(codes.nonzero()[:, 1], minlength=codes.shape[1]).double().cpu()
        self.total += codes.sum(dim=0).double().cpu()
        self.rows[split] += len(codes)

    def frequency(self, split: str) -> torch.Tensor:
        return self.fires[split] / max(self.rows[split], 1)

    def mean_when_firing(self) -> torch.Tensor:
        fires = self.fires["train"] + self.fires["test"]
        return torch.where(fires > 0, self.total / fires.clamp_min(1), torch.nan)

    def dead(self) -> torch.Tensor:
        return (self.fires["train"] + self.fires["test"]) == 0


@torch.no_grad()
def encode_all(sae, tables: dict[str, torch.Tensor], stats: FiringStats, desc: str = "encoding activations"):
    """Encode each split's [rows, n_sources, d_in] table in chunks (with a progress bar) into `stats`;
    yields (split, first row, codes) per chunk for callers that need more than the counts."""
    chunk = encode_rows(sae.d_sae)
    total = sum(len(table) for table in tables.values())
    with tqdm(total=total, desc=desc, unit="row", unit_scale=True, dynamic_ncols=True, mininterval=1.0) as bar:
        for split, table in tables.items():
            for start in range(0, len(table), chunk):
                codes = sae.encode(table[start:start + chunk])
                stats.add(codes, split)
                yield split, start, codes
                bar.update(len(codes))


def table_columns(sae, source_names: list[str], input_scale: list[float], latents: list[int],
                  stats: FiringStats | None, scaling_rows: torch.Tensor | None,
                  row_unit: str) -> tuple[list[Column], dict[str, list], list[Histogram]]:
    """The columns every family shares, their values for `latents`, and the histograms."""
    ids = torch.tensor(latents, dtype=torch.long)
    columns = [Column("latent", "latent", "int", "latent id: index.html#latent=<id> opens its panel")]
    values: dict[str, list] = {"latent": list(latents)}
    histograms = []
    if stats is not None:
        columns += [Column("freq_train", "freq train", "freq", f"fraction of training {row_unit} it fires on"),
                    Column("freq_test", "freq test", "freq", f"fraction of held-out {row_unit} it fires on"),
                    Column("mean_act", "mean act", "float", "mean activation over the rows it fires on"),
                    Column("dead", "dead", "bool", f"fires on no {row_unit[:-1]} of either split")]
        values["freq_train"] = rounded_list(stats.frequency("train")[ids])
        values["freq_test"] = rounded_list(stats.frequency("test")[ids])
        values["mean_act"] = rounded_list(stats.mean_when_firing()[ids])
        values["dead"] = [bool(d) for d in stats.dead()[ids]]
        histograms.append(frequency_histogram(stats, ids, row_unit))
    norms = sae.W_dec.detach().norm(dim=-1).cpu()  # [d_sae, n_sources], raw units
    for source, name in enumerate(source_names):
        columns.append(Column(f"dec_norm_{source}", f"|W_dec| {name}", "float",
                              f"decoder norm of source {name} (raw activation units)"))
        values[f"dec_norm_{source}"] = rounded_list(norms[ids, source])
    if len(source_names) >= 2:
        crosscoder_columns(sae, source_names, input_scale, ids, stats, scaling_rows, columns, values, histograms)
    elif stats is None:
        histograms.append(histogram(norms[ids, 0].numpy(), 30, (0.0, float(norms.max()) or 1.0),
                                    "decoder norms", f"|W_dec| {source_names[0]}"))
    return columns, values, histograms


def frequency_histogram(stats: FiringStats, ids: torch.Tensor, row_unit: str) -> Histogram:
    frequency = (stats.fires["train"] + stats.fires["test"])[ids] / max(sum(stats.rows.values()), 1)
    alive = frequency[frequency > 0].log10().numpy()
    low = float(np.floor(min(alive.min(), -1))) if alive.size else -6.0
    dead = int((frequency == 0).sum())
    return histogram(alive, 30, (low, 0.0), "firing frequency", f"log10 fraction of {row_unit} (both splits)",
                     note=f"{dead} dead latent(s) not shown" if dead else "")


def crosscoder_columns(sae, names, input_scale, ids, stats, scaling_rows, columns, values, histograms) -> None:
    """Relative decoder norm r = |d_post| / (|d_pre| + |d_post|) in training units, the pre/post decoder
    cosine, and latent scaling nu (Minder et al. 2025) over `scaling_rows`, between the first two sources."""
    pre, post = names[0], names[1]
    r = relative_decoder_norms(sae, 0, 1, input_scale).cpu()
    cosine = decoder_cosines(sae, ids.to(sae.W_dec.device)).cpu()
    columns += [Column("rel_norm", f"r ({post})", "float", f"relative decoder norm |d_{post}| / (|d_{pre}| + "
                       f"|d_{post}|) in training units: 0 = {pre} only, 1 = {post} only"),
                Column("dec_cos", "cos(pre, post)", "float", f"cosine of the {pre} and {post} decoder directions")]
    values["rel_norm"], values["dec_cos"] = rounded_list(r[ids]), rounded_list(cosine)
    histograms.append(histogram(r[ids].numpy(), 20, (0.0, 1.0), "relative decoder norm",
                                f"r: 0 = {pre} only, 1 = {post} only"))
    if scaling_rows is None or stats is None:
        return
    scaling_rows = scaling_rows.to(sae.W_dec.device)
    scaling = latent_scaling(sae, scaling_rows, ids.to(sae.W_dec.device), chunk=encode_rows(sae.d_sae))
    silent = latent_fires_on(sae, scaling_rows, ids) == 0  # nu of a latent that never fires there is 0 / 0
    for key, label, target in (("nu_error", "nu error", "the crosscoder's error"),
                               ("nu_reconstruction", "nu recon", "the other latents' reconstruction")):
        columns.append(Column(key, label, "float", f"latent scaling on held-out rows: beta_{pre} / beta_{post} "
                              f"fitted to {target} (Minder et al. 2025); near 0 = truly {post}-only"))
        values[key] = rounded_list(scaling[key].cpu().masked_fill(silent, torch.nan))


@torch.no_grad()
def latent_fires_on(sae, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    chunk = encode_rows(sae.d_sae)
    return sum(((sae.encode(rows[i:i + chunk])[:, ids.to(rows.device)] > 0).sum(dim=0).cpu()
                for i in range(0, len(rows), chunk)),
               torch.zeros(len(ids), dtype=torch.long))
