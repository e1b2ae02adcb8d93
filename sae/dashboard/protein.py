"""Dashboard content for protein runs, streamed over the activation cache a chunk at a time (never all
codes in memory): per latent its firing per split, a running top-k of its strongest residues with
the activation on the residues around each (its sequence windows), amino-acid enrichment of those
residues against the composition of every residue encoded, and its mean activation along the
sequence (relative position, N- to C-terminus). Rows are mapped back to residues by replaying the
cache's record order (sae.activations.protein.residue_rows), which needs the FASTA file unchanged."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from sae.activations.batches import ShardedTable
from sae.activations.protein import ResidueRows, residue_rows, shard_paths
from sae.dashboard.index import FiringStats, encode_rows, table_columns
from sae.dashboard.site import SiteContent, rounded, rounded_list, unit_bytes

TOP_EXAMPLES = 32  # strongest residues kept per latent (enrichment is counted over these)
WINDOWS_SHOWN = 12
WINDOW = 8  # residues shown on each side of a top residue
POSITION_BINS = 20
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
PSEUDOCOUNT = 0.5


class RunningTop:
    """Per latent, the k largest activations seen so far with their global rows and the latent's
    activation on the WINDOW rows either side (NaN outside the row's record or the split)."""

    def __init__(self, n_latents: int, k: int = TOP_EXAMPLES, window: int = WINDOW):
        self.k, self.window = k, window
        self.values = torch.full((k, n_latents), -torch.inf)
        self.rows = torch.full((k, n_latents), -1, dtype=torch.long)
        self.windows = torch.full((k, n_latents, 2 * window + 1), torch.nan)

    def add(self, padded: torch.Tensor, records: torch.Tensor | None, first_row: int) -> None:
        """padded: [window + n + window, n_latents] codes of n centre rows with `window` rows of context
        either side (NaN where there are none); records: [same rows] record index (-1: none) or None;
        first_row: the global row of the first centre row."""
        w, n = self.window, len(padded) - 2 * self.window
        centre = padded[w:w + n].nan_to_num(nan=-torch.inf)
        values, local = centre.topk(min(self.k, n), dim=0)  # [k', L]
        offsets = torch.arange(2 * w + 1)
        around = (local[:, None, :] + offsets[None, :, None])  # [k', 2w+1, L] rows of padded
        windows = padded.gather(0, around.flatten(0, 1)).view(*around.shape)
        if records is not None:
            same = records[around] == records[(local + w)][:, None, :]
            windows = windows.masked_fill(~same, torch.nan)
        merged_values = torch.cat([self.values, values])
        keep = merged_values.topk(self.k, dim=0).indices  # [k, L]
        self.values = merged_values.gather(0, keep)
        self.rows = torch.cat([self.rows, local + first_row]).gather(0, keep)
        merged_windows = torch.cat([self.windows, windows.permute(0, 2, 1)])
        self.windows = merged_windows.gather(0, keep[..., None].expand(-1, -1, 2 * w + 1))


class PositionProfile:
    """Per latent, the summed activation in POSITION_BINS bins of relative position along the sequence."""

    def __init__(self, n_latents: int):
        self.sums = torch.zeros(POSITION_BINS, n_latents, dtype=torch.float64)
        self.rows = torch.zeros(POSITION_BINS, dtype=torch.float64)

    def add(self, codes: torch.Tensor, bins: torch.Tensor) -> None:
        self.sums.index_add_(0, bins, codes.double())
        self.rows += torch.bincount(bins, minlength=POSITION_BINS).double()

    def means(self) -> torch.Tensor:
        return self.sums / self.rows.clamp_min(1)[:, None]


class ProteinStream:
    """One pass over both splits of the cache: firing stats of every latent, and for the chosen
    latents the running top residues and position profile (when rows map to residues)."""

    def __init__(self, sae, cache, latents: list[int], residues: dict[str, ResidueRows] | None):
        self.sae, self.latents = sae, torch.tensor(latents)
        self.tables = {split: ShardedTable(shard_paths(cache.cache_dir, split)) for split in ("train", "test")}
        self.offsets = {"train": 0, "test": len(self.tables["train"])}
        self.residues = residues
        self.stats = FiringStats(sae.d_sae)
        self.top = RunningTop(len(latents)) if residues else None
        self.position = PositionProfile(len(latents)) if residues else None
        self.background = np.zeros(256, dtype=np.int64)

    @torch.no_grad()
    def run(self) -> None:
        chunk = encode_rows(self.sae.d_sae)
        total = sum(len(t) for t in self.tables.values())
        with tqdm(total=total, desc="encoding activations", unit="residue", unit_scale=True, dynamic_ncols=True,
                  mininterval=1.0) as bar:
            for split, table in self.tables.items():
                for start in range(0, len(table), chunk):
                    stop = min(start + chunk, len(table))
                    self.add_chunk(split, table, start, stop)
                    bar.update(stop - start)

    def add_chunk(self, split: str, table: ShardedTable, start: int, stop: int) -> None:
        w = WINDOW if self.top is not None else 0
        low, high = max(0, start - w), min(len(table), stop + w)
        codes = self.sae.encode(table[torch.arange(low, high)])
        centre = codes[start - low:start - low + (stop - start)]
        self.stats.add(centre, split)
        if self.top is None:
            return
        chosen = codes[:, self.latents].float()
        padded = torch.full((w + (stop - start) + w, len(self.latents)), torch.nan)
        padded[w - (start - low):w - (start - low) + len(chosen)] = chosen
        rows = self.residues[split]
        records = torch.full((len(padded),), -1, dtype=torch.long)
        records[w - (start - low):w - (start - low) + len(chosen)] = torch.from_numpy(rows.record[low:high]).long()
        self.top.add(padded, records, self.offsets[split] + start)
        lengths = torch.from_numpy(rows.lengths[rows.record[start:stop]]).long()
        positions = torch.from_numpy(rows.position[start:stop]).long()
        bins = (positions * POSITION_BINS // lengths).clamp_max(POSITION_BINS - 1)
        self.position.add(centre[:, self.latents], bins)
        self.background += np.bincount(rows.residue[start:stop], minlength=256)


def protein_content(inputs, latents: list[int], facts: list[tuple[str, str]]) -> SiteContent:
    cache, task = inputs.protein, inputs.config.task
    residues = None
    if cache.fasta_matches:
        residues = {split: residue_rows(task, split, cache.rows[split]) for split in ("train", "test")}
    stream = ProteinStream(inputs.sae, cache, latents, residues)
    stream.run()
    scaling_rows = stream.tables["test"].head(task.max_test_tokens) if inputs.sae.n_sources >= 2 else None
    columns, values, histograms = table_columns(inputs.sae, inputs.source_names, inputs.meta["input_scale"], latents,
                                                stream.stats, scaling_rows, "residues")
    meta = {"window": WINDOW, "amino_acids": AMINO_ACIDS, "position_bins": POSITION_BINS,
            "train_rows": stream.offsets["test"], "has_residues": residues is not None}
    panels = (lambda ids: protein_panels(ids, latents, stream)) if residues else (lambda ids: {})
    return SiteContent(title="", family="protein", facts=facts, latents=latents, columns=columns, values=values,
                       histograms=histograms, panel_meta=meta, panels=panels)


def protein_panels(ids: list[int], latents: list[int], stream: ProteinStream) -> dict[int, dict]:
    column = {latent: index for index, latent in enumerate(latents)}
    profile = stream.position.means()
    background = stream.background[[ord(a) for a in AMINO_ACIDS]].astype(np.float64)
    background = (background + PSEUDOCOUNT) / (background.sum() + PSEUDOCOUNT * len(AMINO_ACIDS))
    panels = {}
    for latent in ids:
        col = column[latent]
        values, rows = stream.top.values[:, col], stream.top.rows[:, col]
        fired = values > 0
        examples = [window_example(stream, int(row), float(value), stream.top.windows[i, col], float(values[0]))
                    for i, (row, value) in enumerate(zip(rows[fired].tolist(), values[fired].tolist()))
                    if i < WINDOWS_SHOWN]
        panels[latent] = {"windows": examples,
                          "enrichment": enrichment(stream, rows[fired].tolist(), background),
                          "position": rounded_list(profile[:, col])}
    return panels


def locate(stream: ProteinStream, row: int) -> tuple[str, ResidueRows, int]:
    split = "train" if row < stream.offsets["test"] else "test"
    return split, stream.residues[split], row - stream.offsets[split]


def window_example(stream: ProteinStream, row: int, value: float, window: torch.Tensor, top: float) -> dict:
    """One top residue: its record, residue number in the FASTA record (1-based), the WINDOW residues
    either side (within the record) and the latent's activation on each, relative to its top value."""
    split, rows, local = locate(stream, row)
    record = int(rows.record[local])
    letters = "".join(chr(rows.residue[local + offset]) if 0 <= local + offset < len(rows.record)
                      and rows.record[local + offset] == record else " " for offset in range(-WINDOW, WINDOW + 1))
    return {"record": rows.ids[record], "residue": int(rows.offsets[record] + rows.position[local] + 1),
            "length": int(rows.lengths[record]), "split": split, "value": rounded(value), "letters": letters,
            "shade": unit_bytes(window.numpy() / max(top, 1e-30))}


def enrichment(stream: ProteinStream, rows: list[int], background: np.ndarray) -> dict:
    """log2 of each amino acid's share among the latent's top residues over its share of all residues
    encoded (both with a pseudocount of 0.5), and the counts behind it."""
    letters = [chr(located[1].residue[located[2]]) for located in (locate(stream, row) for row in rows)]
    counts = np.array([letters.count(a) for a in AMINO_ACIDS], dtype=np.float64)
    share = (counts + PSEUDOCOUNT) / (counts.sum() + PSEUDOCOUNT * len(AMINO_ACIDS))
    return {"log2": rounded_list(np.log2(share / background), 3), "counts": [int(c) for c in counts]}
