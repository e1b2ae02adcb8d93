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
        first_row: the global row of the first centre row. Only latents whose chunk maximum beats their
        current k-th value are merged (after the first chunks, few: the pass costs about one read)."""
        w, n = self.window, len(padded) - 2 * self.window
        beats = padded[w:w + n].amax(dim=0) > self.values[-1]
        columns = torch.where(beats)[0]
        if not len(columns):
            return
        sub = padded[:, columns] if len(columns) < padded.shape[1] else padded
        values, local = sub[w:w + n].topk(min(self.k, n), dim=0)  # [k', C]; centre rows are never NaN
        around = local[:, None, :] + torch.arange(2 * w + 1)[None, :, None]  # [k', 2w+1, C] rows of padded
        windows = sub.gather(0, around.flatten(0, 1)).view(*around.shape)
        if records is not None:
            windows = windows.masked_fill(records[around] != records[local + w][:, None, :], torch.nan)
        merged = torch.cat([self.values[:, columns], values])
        keep = merged.topk(self.k, dim=0).indices  # [k, C]
        self.values[:, columns] = merged.gather(0, keep)
        self.rows[:, columns] = torch.cat([self.rows[:, columns], local + first_row]).gather(0, keep)
        merged_windows = torch.cat([self.windows[:, columns], windows.permute(0, 2, 1)])
        self.windows[:, columns] = merged_windows.gather(0, keep[..., None].expand(-1, -1, 2 * w + 1))


class PositionProfile:
    """Per latent, the summed activation in POSITION_BINS bins of relative position along the sequence."""

    def __init__(self, n_latents: int):
        self.sums = torch.zeros(POSITION_BINS, n_latents, dtype=torch.float64)
        self.rows = torch.zeros(POSITION_BINS, dtype=torch.float64)

    def add(self, codes: torch.Tensor, bins: torch.Tensor) -> None:
        chunk = torch.zeros(POSITION_BINS, codes.shape[1]).index_add_(0, bins, codes)  # float32 within a chunk
        self.sums += chunk.double()
        self.rows += torch.bincount(bins, minlength=POSITION_BINS).double()

    def means(self) -> torch.Tensor:
        return self.sums / self.rows.clamp_min(1)[:, None]


class ProteinStream:
    """One pass over both splits of the cache: firing stats of every latent, and for the chosen
    latents the running top residues and position profile (when rows map to residues)."""

    def __init__(self, sae, cache, latents: list[int], residues: dict[str, ResidueRows] | None):
        self.sae, self.latents = sae, torch.tensor(latents)
        self.every_latent = latents == list(range(sae.d_sae))  # then no column gather per chunk
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
        device = self.sae.W_dec.device
        codes = self.sae.encode(table[torch.arange(low, high)].to(device)).float().cpu()  # accumulators live on the CPU
        centre = codes[start - low:start - low + (stop - start)]
        self.stats.add(centre, split)
        if self.top is None:
            return
        chosen = codes if self.every_latent else codes[:, self.latents]
        rows = self.residues[split]
        records = torch.full((w + (stop - start) + w,), -1, dtype=torch.long)
        first = w - (start - low)  # where row `low` sits in the padded chunk
        records[first:first + len(chosen)] = torch.from_numpy(rows.record[low:high]).long()
        if len(chosen) == len(records):  # context on both sides: no copy
            padded = chosen
        else:  # the split's first or last chunk: NaN rows stand for the context that is not there
            padded = torch.full((len(records), len(self.latents)), torch.nan)
            padded[first:first + len(chosen)] = chosen
        self.top.add(padded, records, self.offsets[split] + start)
        lengths = torch.from_numpy(rows.lengths[rows.record[start:stop]]).long()
        positions = torch.from_numpy(rows.position[start:stop]).long()
        bins = (positions * POSITION_BINS // lengths).clamp_max(POSITION_BINS - 1)
        self.position.add(centre if self.every_latent else centre[:, self.latents], bins)
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


class AllResidues:
    """Both splits' residue rows as one table over global rows (train rows, then test rows), so a
    latent's top rows and their windows are looked up with array indexing."""

    def __init__(self, residues: dict[str, ResidueRows]):
        train, test = residues["train"], residues["test"]
        self.record = np.concatenate([train.record, test.record + len(train.ids)]).astype(np.int64)
        self.position = np.concatenate([train.position, test.position])
        self.residue = np.concatenate([train.residue, test.residue])
        self.ids = train.ids + test.ids
        self.lengths = np.concatenate([train.lengths, test.lengths])
        self.offsets = np.concatenate([train.offsets, test.offsets])
        self.first_test_record = len(train.ids)
        amino = np.full(256, -1, dtype=np.int64)
        amino[[ord(a) for a in AMINO_ACIDS]] = np.arange(len(AMINO_ACIDS))
        self.amino_index = amino  # ASCII letter -> index in AMINO_ACIDS (-1: X, B, ...)

    def windows(self, rows: np.ndarray) -> list[str]:
        """The WINDOW letters either side of each row, ' ' outside its record."""
        around = rows[:, None] + np.arange(-WINDOW, WINDOW + 1)[None, :]
        inside = np.clip(around, 0, len(self.record) - 1)
        same = (around >= 0) & (around < len(self.record)) & (self.record[inside] == self.record[rows][:, None])
        letters = np.where(same, self.residue[inside], ord(" ")).astype(np.uint8)
        return [line.tobytes().decode("ascii") for line in letters]


def protein_panels(ids: list[int], latents: list[int], stream: ProteinStream) -> dict[int, dict]:
    column = {latent: index for index, latent in enumerate(latents)}
    profile = stream.position.means()
    residues = AllResidues(stream.residues)
    background = stream.background[[ord(a) for a in AMINO_ACIDS]].astype(np.float64)
    background = (background + PSEUDOCOUNT) / (background.sum() + PSEUDOCOUNT * len(AMINO_ACIDS))
    panels = {}
    for latent in ids:
        col = column[latent]
        values = stream.top.values[:, col]
        fired = int((values > 0).sum())  # the running top-k is sorted: its fired rows come first
        rows = stream.top.rows[:fired, col].numpy()
        panels[latent] = {**windows_panel(residues, rows[:WINDOWS_SHOWN], values[:WINDOWS_SHOWN].tolist(),
                                          stream.top.windows[:min(fired, WINDOWS_SHOWN), col]),
                          "enrichment": enrichment(residues, rows, background),
                          "position": rounded_list(profile[:, col])}
    return panels


def windows_panel(residues: AllResidues, rows: np.ndarray, values: list[float], windows: torch.Tensor) -> dict:
    """The top residues: record id, residue number in the FASTA record (1-based, crops accounted for),
    split, value, the WINDOW residues either side; and `shades`: the latent's activation on each
    window letter relative to its strongest, 2 * WINDOW + 1 bytes per window in one base64 string."""
    records = residues.record[rows]
    examples = [{"record": residues.ids[record], "residue": int(residues.offsets[record] + residues.position[row] + 1),
                 "length": int(residues.lengths[record]), "value": rounded(value), "letters": letters,
                 "split": "train" if record < residues.first_test_record else "test"}
                for row, record, value, letters in zip(rows.tolist(), records.tolist(), values,
                                                       residues.windows(rows))]
    top = max(values[0], 1e-30) if len(rows) else 1.0
    return {"windows": examples, "shades": unit_bytes(windows.numpy() / top)}


def enrichment(residues: AllResidues, rows: np.ndarray, background: np.ndarray) -> dict:
    """log2 of each amino acid's share among the latent's top residues over its share of all residues
    encoded (both with a pseudocount of 0.5), and the counts behind it."""
    index = residues.amino_index[residues.residue[rows]]
    counts = np.bincount(index[index >= 0], minlength=len(AMINO_ACIDS)).astype(np.float64)
    share = (counts + PSEUDOCOUNT) / (counts.sum() + PSEUDOCOUNT * len(AMINO_ACIDS))
    return {"log2": rounded_list(np.log2(share / background), 3), "counts": [int(c) for c in counts]}
