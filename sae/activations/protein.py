"""ESM-2 activations on a FASTA file as SAE training data, through an on-disk activation cache.

Extraction is the expensive part, so the residue activations of every source (checkpoint x layer)
are written once into a cache dir and reused by later runs and sweep jobs:

    record.json           what produced it: host files/names, layers, dtype, FASTA sha256, every
                          task key that changes which residues are kept
    train/shard_00000.npy [rows, n_sources, d_in] float32, raw (unnormalised), memory-mapped on read
    test/shard_00000.npy  held-out records

Only residue positions are kept (cls, eos and padding never reach an SAE). All layers of one model
come from one forward pass. The dir is written under a temp name and renamed when complete, and
a lock lets concurrent sweep jobs build it once. A cache whose record does not match the config is
refused, never reused or overwritten.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sae.errors import UserInputError
from sae.host_models.config import ESM2HostConfig
from sae.host_models.esm2 import ESM2Host, check_local_checkpoint, esm2_hook_name, load_fair_esm, residue_mask
from sae.tasks.protein import (FastaScan, ProteinRecord, ProteinTaskConfig, in_split, read_records, scan_fasta,
                               token_batches)
from sae.run_lock import waiting_lock
from sae.activations.batches import ShardedTable, normalisation_scale
from sae.activations.sources import capture_sources, sources_meta
from sae.atomic_io import atomic_dir, remove_stale_temps, write_json
from sae.world import LOCAL, Collective

log = logging.getLogger(__name__)

SHARD_ROWS = 1 << 16
CACHE_ROOT = Path("outputs/activations")
CACHE_FORMAT = 1


@dataclass
class ProteinSource:
    name: str  # e.g. "esm2_t6_8M_UR50D.L3"
    checkpoint: str  # 'pretrained' or the .pt path
    layer: int
    model: ESM2Host
    hook: str  # e.g. "layers.3.resid"


@dataclass
class ProteinActivationData:
    """train/test: [rows, n_sources, d_in] residue activations, already multiplied by `scale`."""

    sources: list[ProteinSource]
    task: ProteinTaskConfig
    alphabet: object
    train: torch.Tensor | ShardedTable  # ShardedTable with task.stream: rows stay on disk until a batch asks
    test: torch.Tensor
    scale: torch.Tensor
    cache_dir: Path
    scan: FastaScan
    eval_sets: dict[str, list[ProteinRecord]] = field(default_factory=dict)
    train_sample: torch.Tensor | None = None  # what evaluate() scores as "train" when streaming
    row_unit = "residues"

    def eval_table(self, split: str) -> torch.Tensor:
        if split == "test":
            return self.test
        return self.train if self.train_sample is None else self.train_sample

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def meta(self) -> dict:
        test_split = ("training records (task.test_fraction=0: nothing held out)" if self.task.test_fraction == 0
                      else "held-out records")
        return {**sources_meta(self.sources), "token_positions": "residues", "activation_cache": str(self.cache_dir),
                "test_split": test_split}

    def eval_records(self, split: str) -> list[ProteinRecord]:
        """The first task.eval_sequences records of a split, in file order: the masked-LM eval set
        (read once, then kept)."""
        if split not in self.eval_sets:
            records = (r for r in read_records(self.task) if in_split(r, split, self.task))
            self.eval_sets[split] = list(islice(records, self.task.eval_sequences))
        return self.eval_sets[split]


@dataclass
class CheckedProteinInputs:
    scan: FastaScan
    sources: list[ProteinSource]


def check_protein_inputs(task: ProteinTaskConfig, host: ESM2HostConfig, device: str,
                         dtype: torch.dtype) -> CheckedProteinInputs:
    """Before any work: the host files exist and load (pretrained weights can be fetched), the
    layers exist, the FASTA is valid."""
    for entry in host.checkpoints:
        if entry != "pretrained":
            check_local_checkpoint(entry)
    scan = scan_fasta(task)
    log.info(scan.report(task.fasta, task))
    for warning in scan.warnings(task.fasta):
        log.warning(warning)
    return CheckedProteinInputs(scan, load_protein_sources(host, device, dtype))


def load_protein_sources(host: ESM2HostConfig, device: str, dtype: torch.dtype) -> list[ProteinSource]:
    sources, labels = [], []
    for entry in host.checkpoints:
        model, _ = load_fair_esm(entry, host.pretrained)
        wrapped = ESM2Host(model.to(device=device, dtype=dtype))  # dtype fixed before the first forward
        label = host.pretrained if entry == "pretrained" else Path(entry).stem
        label = label if label not in labels else f"{label}#{len(labels)}"
        labels.append(label)
        for layer in host.layers:
            if layer > wrapped.n_layers:
                raise UserInputError(f"host_model.layers: layer {layer} out of range [0, {wrapped.n_layers}] "
                                     f"for {entry}")
            sources.append(ProteinSource(f"{label}.L{layer}", entry, layer, wrapped, esm2_hook_name(layer)))
    widths = {s.model.d_model for s in sources}
    if len(widths) > 1:
        raise UserInputError(f"host_model.checkpoints: the models have different widths {sorted(widths)}; "
                             "a crosscoder needs one d_in")
    return sources


def load_alphabet():
    import esm

    return esm.data.Alphabet.from_architecture("ESM-1b")


def cache_record(task: ProteinTaskConfig, host: ESM2HostConfig, scan: FastaScan, dtype: torch.dtype) -> dict:
    """Everything that decides the cached numbers; a cache is reused only if this matches exactly."""
    models = []
    for entry in host.checkpoints:
        if entry == "pretrained":
            models.append({"pretrained": host.pretrained})
        else:
            stat = Path(entry).stat()
            models.append({"file": str(Path(entry).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    data_keys = ("max_length", "test_fraction", "invalid_residues", "max_train_tokens", "max_test_tokens", "seed")
    return {
        "format": CACHE_FORMAT, "models": models, "layers": list(host.layers), "dtype": str(dtype),
        "fasta": {"path": str(Path(task.fasta).resolve()), "sha256": scan.sha256},
        "task": {key: getattr(task, key).value if hasattr(getattr(task, key), "value") else getattr(task, key)
                 for key in data_keys},
    }


def cache_dir_for(task: ProteinTaskConfig, record: dict) -> Path:
    if task.activation_cache is not None:
        return Path(task.activation_cache)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    return CACHE_ROOT / f"{Path(task.fasta).stem}_{digest}"


def check_cache(cache_dir: Path, record: dict) -> bool:
    """True if a complete cache with this record exists; refuse a mismatching one."""
    path = cache_dir / "record.json"
    if not path.is_file():
        if cache_dir.exists() and any(cache_dir.iterdir()):
            raise UserInputError(f"task.activation_cache: {cache_dir} exists but is not an activation cache "
                                 "(no record.json); choose an empty or new dir")
        return False
    saved = json.loads(path.read_text())
    differing = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
    if differing:
        key = differing[0]
        raise UserInputError(f"task.activation_cache: {cache_dir} was built for a different config ('{key}' "
                             f"differs: cached {saved.get(key)}, now {record.get(key)}); point "
                             "task.activation_cache at a new dir or set it to null")
    return True


@torch.no_grad()
def residue_activations(sources: list[ProteinSource], batch: list[ProteinRecord], alphabet) -> torch.Tensor:
    """[residues in the batch, n_sources, d_in], one forward pass per model for all its layers."""
    tokens = batch_tokens(batch, alphabet, sources[0].model)
    keep = residue_mask(tokens, alphabet)
    return torch.stack([activation[keep].float() for activation in capture_sources(sources, tokens)], dim=1)


def batch_tokens(batch: list[ProteinRecord], alphabet, model: ESM2Host) -> torch.Tensor:
    """fair-esm's own batch converter: cls + residues + eos, padded."""
    _, _, tokens = alphabet.get_batch_converter()([(r.id, r.sequence) for r in batch])
    return tokens.to(next(model.parameters()).device)


class ShardWriter:
    """Rows appended into one preallocated [SHARD_ROWS, ...] buffer, saved as shard_NNNNN.npy each
    time it fills and then refilled in place: extraction memory is one shard however large the FASTA."""

    def __init__(self, out: Path) -> None:
        self.out, self.buffer, self.filled, self.shards = out, None, 0, 0

    def add(self, rows: np.ndarray) -> None:
        if self.buffer is None:
            self.buffer = np.empty((SHARD_ROWS, *rows.shape[1:]), dtype=rows.dtype)  # pages touched as filled
        while len(rows):
            taken = min(len(rows), SHARD_ROWS - self.filled)
            self.buffer[self.filled:self.filled + taken] = rows[:taken]
            self.filled, rows = self.filled + taken, rows[taken:]
            if self.filled == SHARD_ROWS:
                self.flush()

    def flush(self) -> None:
        if self.filled:
            np.save(self.out / f"shard_{self.shards:05d}.npy", self.buffer[:self.filled])
            self.filled, self.shards = 0, self.shards + 1


def write_split(sources: list[ProteinSource], task: ProteinTaskConfig, alphabet, split: str, out: Path,
                max_rows: int, expected_rows: int | None = None) -> int:
    """Stream the split's records through the host(s) into shards of SHARD_ROWS rows; stop at max_rows.
    A progress bar with ETA counts residues (expected_rows: the split's residues from the FASTA scan)."""
    out.mkdir(parents=True)
    records = (r for r in read_records(task) if in_split(r, split, task))
    writer, written = ShardWriter(out), 0
    total = min(max_rows, expected_rows) if expected_rows is not None else max_rows
    with tqdm(total=total, desc=f"ESM-2 activations ({split})", unit="residue", unit_scale=True,
              dynamic_ncols=True, mininterval=2.0) as progress:
        for batch in token_batches(records, task.tokens_per_batch):
            acts = residue_activations(sources, batch, alphabet).cpu()[: max_rows - written]
            writer.add(acts.numpy())
            written += len(acts)
            progress.update(len(acts))
            if written >= max_rows:
                break
    writer.flush()
    return written


def build_cache(sources, task: ProteinTaskConfig, alphabet, cache_dir: Path, record: dict,
                scan: FastaScan | None = None) -> None:
    expected = {"train": scan.train_residues, "test": scan.test_residues} if scan is not None else {}
    with atomic_dir(cache_dir) as tmp:
        rows = {split: write_split(sources, task, alphabet, split, tmp / split, limit, expected.get(split))
                for split, limit in (("train", task.max_train_tokens), ("test", task.max_test_tokens))}
        write_json(tmp / "record.json", record)
        write_json(tmp / "rows.json", rows)
    log.info("Activation cache written: %s (%d train / %d held-out residues)", cache_dir, rows["train"], rows["test"])


# -- the same cache built by every process of a multi-process run --------------------------------------
#
# The split's batches are listed without the model (the same batches, in the same order, as the
# single-process build, cut where max_*_tokens is reached); process r extracts batches r, r + N, ...
# into part files; rank 0 joins them in batch order into the usual shards. Same rows, same order,
# same record.json as one process. Rank 0 holds the cache's lock throughout, so concurrent builders
# (other jobs) wait and reuse it as they do for a single-process build.

def split_batches(task: ProteinTaskConfig, split: str, max_rows: int) -> list[list[ProteinRecord]]:
    records = (r for r in read_records(task) if in_split(r, split, task))
    batches, rows = [], 0
    for batch in token_batches(records, task.tokens_per_batch):
        if rows >= max_rows:
            break
        batches.append(batch)
        rows += sum(len(r.sequence) for r in batch)
    return batches


@dataclass
class ResidueRows:
    """Which residue each row of a cached split is, in cache order (the order of `split_batches`:
    records by length within the read-ahead buffer, residues in sequence order, cut at max rows).

    record: [rows] int32 index into ids; position: [rows] int32 residue index in the sequence as fed
    to the host (cropped); residue: [rows] uint8 ASCII letter; ids / lengths / offsets per record
    (offset: where the cropped sequence starts in the record as the FASTA file has it)."""

    record: np.ndarray
    position: np.ndarray
    residue: np.ndarray
    ids: list[str]
    lengths: np.ndarray
    offsets: np.ndarray


def residue_rows(task: ProteinTaskConfig, split: str, max_rows: int) -> ResidueRows:
    records = [record for batch in split_batches(task, split, max_rows) for record in batch]
    lengths = np.array([len(r.sequence) for r in records], dtype=np.int64)
    record = np.repeat(np.arange(len(records), dtype=np.int32), lengths)[:max_rows]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    position = (np.arange(len(record)) - starts[record]).astype(np.int32)
    residue = np.frombuffer("".join(r.sequence for r in records).encode("ascii"), dtype=np.uint8)[:max_rows]
    return ResidueRows(record, position, residue.copy(), [r.id for r in records], lengths.astype(np.int32),
                       np.array([r.offset for r in records], dtype=np.int32))


def extract_my_batches(sources, alphabet, batches: list, group: Collective, parts: Path) -> None:
    mine = range(group.rank, len(batches), group.size)
    for index in tqdm(mine, desc=f"ESM-2 activations (rank {group.rank})", unit="batch", mininterval=2.0,
                      disable=group.rank != 0):
        acts = residue_activations(sources, batches[index], alphabet).cpu().numpy()
        if len(acts) != sum(len(r.sequence) for r in batches[index]):
            raise RuntimeError(f"batch {index}: {len(acts)} residues extracted, the records have a different count")
        np.save(parts / f"batch_{index:06d}.npy", acts)


def join_batches(parts: Path, n_batches: int, out: Path, max_rows: int) -> int:
    out.mkdir(parents=True)
    writer, written = ShardWriter(out), 0
    for index in range(n_batches):
        rows = np.load(parts / f"batch_{index:06d}.npy")[: max_rows - written]
        writer.add(rows)
        written += len(rows)
    writer.flush()
    return written


def cache_lock(cache_dir: Path):
    """The cache's lock, beside it: concurrent sweep jobs build it once, the others wait and reuse it."""
    return waiting_lock(cache_dir.parent / f".{cache_dir.name}.lock",
                        f"the activation cache {cache_dir} (another run is building or checking it)")


def build_cache_together(sources, task: ProteinTaskConfig, alphabet, cache_dir: Path, record: dict,
                         group: Collective) -> None:
    """Every rank calls this; on return the cache is complete (built now, or found)."""
    limits = {"train": task.max_train_tokens, "test": task.max_test_tokens}
    with contextlib.ExitStack() as held:
        plan = None
        if group.rank == 0:
            try:
                held.enter_context(cache_lock(cache_dir))
                remove_stale_temps(cache_dir.parent, cache_dir.name)
                plan = "reuse" if check_cache(cache_dir, record) else str(held.enter_context(atomic_dir(cache_dir)))
            except UserInputError as refusal:
                group.broadcast_object(f"error:{refusal}")
                raise
        plan = group.broadcast_object(plan)
        if plan.startswith("error:"):
            raise UserInputError(plan.removeprefix("error:"))
        if plan == "reuse":
            log.info("Reusing activation cache %s", cache_dir)
            return
        tmp = Path(plan)
        batches = {split: split_batches(task, split, limits[split]) for split in limits}
        for split in limits:
            (tmp / "parts" / split).mkdir(parents=True, exist_ok=True)
            extract_my_batches(sources, alphabet, batches[split], group, tmp / "parts" / split)
        group.barrier()
        if group.rank == 0:
            rows = {split: join_batches(tmp / "parts" / split, len(batches[split]), tmp / split, limits[split])
                    for split in limits}
            shutil.rmtree(tmp / "parts")
            write_json(tmp / "record.json", record)
            write_json(tmp / "rows.json", rows)
            log.info("Activation cache written by %d processes: %s (%d train / %d held-out residues)", group.size,
                     cache_dir, rows["train"], rows["test"])
    group.barrier()  # rank 0 has renamed the cache into place


def shard_paths(cache_dir: Path, split: str) -> list[Path]:
    return sorted((cache_dir / split).glob("shard_*.npy"))


def read_split(cache_dir: Path, split: str) -> torch.Tensor:
    """Shards memory-mapped and concatenated into one in-memory table (max_*_tokens bound its size)."""
    return torch.cat([torch.from_numpy(np.load(path, mmap_mode="r").copy()) for path in shard_paths(cache_dir, split)])


def load_protein_activation_data(task: ProteinTaskConfig, host: ESM2HostConfig, normalize: bool, device: str,
                                 dtype: torch.dtype = torch.float32, checked: CheckedProteinInputs | None = None,
                                 group: Collective = LOCAL) -> ProteinActivationData:

    checked = checked or check_protein_inputs(task, host, device, dtype)
    scan, sources = checked.scan, checked.sources
    alphabet = load_alphabet()
    record = cache_record(task, host, scan, dtype)
    cache_dir = cache_dir_for(task, record)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    if group.size > 1:
        build_cache_together(sources, task, alphabet, cache_dir, record, group)
    else:
        with cache_lock(cache_dir):
            remove_stale_temps(cache_dir.parent, cache_dir.name)  # a build killed mid-way
            if check_cache(cache_dir, record):
                log.info("Reusing activation cache %s", cache_dir)
            else:
                build_cache(sources, task, alphabet, cache_dir, record, scan)
    test = read_split(cache_dir, "test").to(device)
    if task.stream:
        table = ShardedTable(shard_paths(cache_dir, "train"))
        scale = (normalisation_scale(table) if normalize else torch.ones(len(sources))).to(device)
        train = table.with_scale(scale)
        return ProteinActivationData(sources, task, alphabet, train, test * scale[:, None], scale, cache_dir, scan,
                                     train_sample=train.head(task.max_test_tokens).to(device))
    train = read_split(cache_dir, "train").to(device)
    scale = normalisation_scale(train) if normalize else torch.ones(len(sources), device=device)
    return ProteinActivationData(sources, task, alphabet, train * scale[:, None], test * scale[:, None], scale,
                                 cache_dir, scan)

