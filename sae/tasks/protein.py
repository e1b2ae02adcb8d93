"""`task=protein_mlm`: protein sequences from a FASTA file (biopython), validated, streamed, split,
cropped and batched for an ESM-2 host.

- Streamed: records are read one at a time, so a FASTA larger than memory works; gzipped files
  (`.fasta.gz`, as UniProt/UniRef ship them) are decompressed on the fly.
- Validated by `scan_fasta` before any work: not FASTA / empty file, duplicated ids, empty records,
  characters outside the amino-acid alphabet. Blank lines (also before the first record) are
  skipped; lowercase residues (soft-masked sequences) are upper-cased and counted in one warning.
  `task.invalid_residues` says what happens to a record
  with a bad character: `error` (default, names file, record id and position), `skip` (dropped and
  counted), `replace_with_X` (each bad character becomes X, counted). Empty records are an error
  unless the policy is skip. Counts are reported; nothing is dropped silently.
- Split by record: a record is held out when a hash of (seed, id) falls below `test_fraction`,
  so the split does not depend on file order or on other records. `test_fraction=0` holds nothing
  out and evaluates on the training records (labelled so in the run's results): for a FASTA too
  small to split.
- Cropped: a record longer than `max_length` residues is cut to a window of that length at an
  offset drawn from (seed, id), the same window every run (the scan reports how many, the longest).
- Headers that are not UTF-8 are read with replacement characters and counted in a warning.
- Batched by a token budget: a batch holds at most `tokens_per_batch` padded tokens (cls and eos
  included), records sorted by length within a read-ahead buffer to waste little padding.
"""
from __future__ import annotations

import gzip
import hashlib
import io
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, Iterator, Optional


from sae.atomic_io import file_sha256
from sae.errors import UserInputError

# The amino-acid letters ESM-2's alphabet holds: the 20 standard residues and X B U Z O.
AMINO_ACIDS = frozenset("ACDEFGHIKLMNPQRSTVWYXBUZO")
ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
SORT_BUFFER_RECORDS = 2048


class InvalidResidues(str, Enum):
    error = "error"
    skip = "skip"
    replace_with_X = "replace_with_X"


class FastaError(UserInputError):
    """A FASTA file that cannot be used as it is; the message names the file (and record, position)."""


@dataclass
class ProteinTaskConfig:
    """`task=protein_mlm`: masked-LM activations of an ESM-2 host on a FASTA file."""

    name: str = "protein_mlm"
    fasta: str = ""  # required: task.fasta=path/to/seqs.fasta (plain or .gz)
    max_length: int = 1022  # residues per record (ESM-2's context is 1024 tokens incl. cls, eos)
    tokens_per_batch: int = 8192  # padded tokens per forward pass
    test_fraction: float = 0.1  # records held out (by a hash of their id); 0 = evaluate on the training records
    invalid_residues: InvalidResidues = InvalidResidues.error
    max_train_tokens: int = 200_000  # residue activations kept for SAE training (bounds memory)
    max_test_tokens: int = 20_000
    eval_sequences: int = 32  # records per split for the masked-LM metric
    mask_prob: float = 0.15  # BERT-style: of the chosen residues 80% <mask>, 10% random, 10% kept
    seed: int = 0
    activation_cache: Optional[str] = None  # a dir; null = outputs/activations/<hash of the record>
    # true: train from the cache's memory-mapped shards, batches gathered in a background thread
    # (caches larger than memory); eval/train metrics then use the first max_test_tokens train rows
    stream: bool = False

    def __post_init__(self) -> None:
        if not self.fasta:
            raise ValueError("task.fasta is required for task=protein_mlm: task.fasta=path/to/seqs.fasta "
                             "(plain or gzipped)")
        for key in ("max_length", "tokens_per_batch", "max_train_tokens", "max_test_tokens", "eval_sequences"):
            if getattr(self, key) <= 0:
                raise ValueError(f"task.{key} must be > 0, got {getattr(self, key)}")
        if self.tokens_per_batch < self.max_length + 2:
            raise ValueError(f"task.tokens_per_batch must be >= task.max_length + 2 = {self.max_length + 2} "
                             f"(one cropped record with cls and eos), got {self.tokens_per_batch}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"task.test_fraction must be in [0, 1), got {self.test_fraction} "
                             "(0 = no held-out records: evaluate on the training records)")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"task.mask_prob must be in (0, 1), got {self.mask_prob}")


@dataclass
class ProteinRecord:
    id: str
    sequence: str  # validated (and cropped, once `crop` has run)
    is_test: bool
    offset: int = 0  # where the (cropped) sequence starts in the record as the FASTA file has it


@dataclass
class FastaScan:
    """What `scan_fasta` found: counts per split after the policy, and what the policy changed."""

    records: int = 0
    train_records: int = 0
    test_records: int = 0
    train_residues: int = 0  # after cropping
    test_residues: int = 0
    skipped_records: int = 0
    replaced_residues: int = 0
    cropped_records: int = 0
    longest: int = 0  # residues of the longest record, before cropping
    non_utf8_headers: int = 0
    uppercased_residues: int = 0  # lowercase (soft-masked) residues read as their uppercase letters
    uppercased_records: int = 0
    sha256: str = ""

    def report(self, path: str, task: ProteinTaskConfig) -> str:
        changed = []
        if self.skipped_records:
            changed.append(f"skipped {self.skipped_records} record(s) (task.invalid_residues=skip)")
        if self.replaced_residues:
            changed.append(f"replaced {self.replaced_residues} residue(s) with X")
        if self.cropped_records:
            changed.append(f"cropped {self.cropped_records} record(s) longer than task.max_length={task.max_length} "
                           f"(longest {self.longest} residues) to a window of {task.max_length}")
        split = (f"{self.train_records} train / {self.test_records} held out" if task.test_fraction > 0 else
                 f"{self.train_records} train, none held out (task.test_fraction=0: evaluated on training records)")
        return (f"{path}: {self.records} records ({split}), {self.train_residues} / {self.test_residues} residues "
                f"after cropping" + (f"; {', '.join(changed)}" if changed else ""))

    def warnings(self, path: str) -> list[str]:
        notes = []
        if self.uppercased_residues:
            notes.append(f"task.fasta: {path}: {self.uppercased_residues} lowercase residue(s) in "
                         f"{self.uppercased_records} record(s) (soft-masked?) were read as uppercase")
        if self.non_utf8_headers:
            notes.append(f"task.fasta: {path}: {self.non_utf8_headers} record header(s) are not UTF-8; their "
                         "undecodable bytes were replaced by U+FFFD in the record ids")
        return notes


def is_held_out(record_id: str, task: ProteinTaskConfig) -> bool:
    digest = hashlib.sha256(f"{task.seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < task.test_fraction


def in_split(record: ProteinRecord, split: str, task: ProteinTaskConfig) -> bool:
    """Whether `record` belongs to `split` ("train" or "test"); with test_fraction=0 the test split
    is the training records (nothing is held out)."""
    if split == "test" and task.test_fraction == 0:
        return True
    return record.is_test == (split == "test")


def crop_start(length: int, record_id: str, task: ProteinTaskConfig) -> int:
    """Where `crop` starts the window of a record of `length` residues (0 when it fits)."""
    excess = length - task.max_length
    if excess <= 0:
        return 0
    digest = hashlib.sha256(f"crop:{task.seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (excess + 1)


def crop(sequence: str, record_id: str, task: ProteinTaskConfig) -> str:
    """A window of max_length residues at an offset fixed by (seed, id)."""
    start = crop_start(len(sequence), record_id, task)
    return sequence[start:start + task.max_length]


GZIP_MAGIC = b"\x1f\x8b"


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def _open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed on the fly if it is gzipped (streaming, whatever its size)."""
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def _check_readable(path: Path) -> None:
    if path.is_dir():
        raise FastaError(f"task.fasta: {path} is a directory, expected a FASTA file (.fasta, .fa or .fasta.gz)")
    if not path.exists():
        raise FastaError(f"task.fasta: file not found: {path}")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise FastaError(f"task.fasta: cannot read {path}: {error.strerror or error}") from None


def _check_looks_like_fasta(path: Path) -> None:
    try:
        with _open_binary(path) as handle:
            head = handle.read(4096)
    except (OSError, EOFError) as error:  # a damaged .gz
        raise FastaError(f"task.fasta: {path} is gzipped but does not decompress ({error})") from None
    if not head.strip():
        raise FastaError(f"task.fasta: {path} is empty (no FASTA records)")
    if head.startswith(b"\xef\xbb\xbf"):
        raise FastaError(f"task.fasta: {path} starts with a UTF-8 byte-order mark; save it without one")
    first_line = head.lstrip().split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    if not first_line.startswith(">"):
        kind = "FASTQ (not supported)" if first_line.startswith("@") else "not FASTA"
        raise FastaError(f"task.fasta: {path} is {kind}: its first line must start with '>', found '{first_line[:40]}'")


@dataclass(frozen=True)
class Cleaned:
    sequence: Optional[str]  # after upper-casing and the policy; None if the policy skipped the record
    replaced: int = 0  # residues the policy replaced with X
    uppercased: int = 0  # lowercase ASCII letters read as uppercase


def _clean(record_id: str, sequence: str, path: Path, policy: InvalidResidues) -> Cleaned:
    """The record's sequence upper-cased (ASCII letters only: anything else stays for the policy),
    then `task.invalid_residues` applied to characters outside the amino-acid alphabet."""
    upper = sequence.translate(ASCII_UPPER)
    uppercased = sum(a != b for a, b in zip(sequence, upper)) if upper != sequence else 0
    cleaned, replaced = _apply_policy(record_id, upper, path, policy)
    return Cleaned(cleaned, replaced, uppercased)


def _apply_policy(record_id: str, sequence: str, path: Path, policy: InvalidResidues) -> tuple[Optional[str], int]:
    """(sequence after the policy or None if skipped, number of replaced residues)."""
    if not sequence:
        if policy is InvalidResidues.skip:
            return None, 0
        raise FastaError(f"task.fasta: {path}: record '{record_id}' is empty "
                         "(task.invalid_residues=skip drops such records)")
    bad = [i for i, char in enumerate(sequence) if char not in AMINO_ACIDS]
    if not bad:
        return sequence, 0
    if policy is InvalidResidues.error:
        i = bad[0]
        raise FastaError(
            f"task.fasta: {path}: record '{record_id}' has '{sequence[i]}' at position {i + 1}, outside the "
            f"amino-acid alphabet {''.join(sorted(AMINO_ACIDS))} ({len(bad)} such character(s); "
            "set task.invalid_residues=skip or replace_with_X to accept them)")
    if policy is InvalidResidues.skip:
        return None, 0
    chars = list(sequence)
    for i in bad:
        chars[i] = "X"
    return "".join(chars), len(bad)


def _parse(path: Path) -> Iterator[tuple[str, str, bool]]:
    """(id, sequence, whether the header was valid UTF-8) per record, streamed. Biopython's plain
    (title, sequence) parser: it skips blank lines, which its strict "fasta" parser refuses before the
    first record (`_check_looks_like_fasta` made sure nothing else comes before it), and keeps the
    sequence a str, so that a non-ASCII character reaches the residue policy with its record and
    position (a SeqRecord's Seq only holds ASCII). The id is the title's first word, as SeqIO's."""
    from Bio.SeqIO.FastaIO import SimpleFastaParser

    with _open_binary(path) as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as handle:
        try:
            for title, sequence in SimpleFastaParser(handle):
                yield (title.split(None, 1) or [""])[0], sequence, "\ufffd" not in title
        except (ValueError, OSError, EOFError) as error:
            raise FastaError(f"task.fasta: {path}: {str(error).splitlines()[0]}") from None


def read_records(task: ProteinTaskConfig) -> Iterator[ProteinRecord]:
    """Stream validated, cropped records (train and held-out, in file order)."""
    path = Path(task.fasta)
    for record_id, sequence, _ in _parse(path):
        cleaned = _clean(record_id, sequence, path, task.invalid_residues).sequence
        if cleaned is not None:
            yield ProteinRecord(record_id, crop(cleaned, record_id, task), is_held_out(record_id, task),
                                crop_start(len(cleaned), record_id, task))


def scan_fasta(task: ProteinTaskConfig) -> FastaScan:
    """One streaming pass that validates the whole file before any work, and counts what is there."""
    path = Path(task.fasta)
    _check_readable(path)
    _check_looks_like_fasta(path)
    scan, seen_ids = FastaScan(), set()
    for record_id, sequence, utf8_header in _parse(path):
        key = hashlib.blake2b(record_id.encode(), digest_size=8).digest()  # small, for huge files
        if key in seen_ids:
            raise FastaError(f"task.fasta: {path}: record id '{record_id}' appears more than once "
                             "(ids must be unique: the held-out split is by id)")
        seen_ids.add(key)
        scan.non_utf8_headers += not utf8_header
        result = _clean(record_id, sequence, path, task.invalid_residues)
        cleaned = result.sequence
        if cleaned is None:
            scan.skipped_records += 1
            continue
        scan.records += 1
        scan.replaced_residues += result.replaced
        scan.uppercased_residues += result.uppercased
        scan.uppercased_records += result.uppercased > 0
        scan.longest = max(scan.longest, len(cleaned))
        scan.cropped_records += len(cleaned) > task.max_length
        length = min(len(cleaned), task.max_length)
        if is_held_out(record_id, task):
            scan.test_records, scan.test_residues = scan.test_records + 1, scan.test_residues + length
        else:
            scan.train_records, scan.train_residues = scan.train_records + 1, scan.train_residues + length
    if scan.records == 0:
        raise FastaError(f"task.fasta: {path} holds no usable records "
                         f"({scan.skipped_records} skipped by task.invalid_residues)")
    if scan.train_records == 0:
        raise FastaError(f"task.fasta: {path}: all {scan.records} record(s) are held out at "
                         f"task.test_fraction={task.test_fraction}; lower it (e.g. task.test_fraction=0 to train and "
                         "evaluate on every record) or add records")
    if scan.test_records == 0 and task.test_fraction > 0:
        raise FastaError(f"task.fasta: {path}: none of its {scan.records} record(s) falls in the held-out split at "
                         f"task.test_fraction={task.test_fraction}; add records, raise task.test_fraction, or set "
                         "task.test_fraction=0 to evaluate on the training records (reported as such)")
    if task.test_fraction == 0:
        scan.test_records, scan.test_residues = scan.train_records, scan.train_residues
    scan.sha256 = file_sha256(path)
    return scan


def token_batches(records: Iterator[ProteinRecord], tokens_per_batch: int) -> Iterator[list[ProteinRecord]]:
    """Groups of records whose padded size (n x (longest + 2)) fits the token budget; records are
    sorted by length within a read-ahead buffer, so the order within the stream changes but the
    set of records does not."""
    buffer: list[ProteinRecord] = []

    def flush() -> Iterator[list[ProteinRecord]]:
        batch: list[ProteinRecord] = []
        for record in sorted(buffer, key=lambda r: len(r.sequence)):
            if batch and (len(batch) + 1) * (len(record.sequence) + 2) > tokens_per_batch:
                yield batch
                batch = []
            batch.append(record)
        if batch:
            yield batch
        buffer.clear()

    for record in records:
        buffer.append(record)
        if len(buffer) >= SORT_BUFFER_RECORDS:
            yield from flush()
    yield from flush()
