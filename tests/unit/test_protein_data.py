"""FASTA reading, validation policies, the held-out split, cropping and token-budget batching."""
import random
import re

import pytest

from sae.tasks.protein import (AMINO_ACIDS, FastaError, InvalidResidues, ProteinTaskConfig, crop, read_records,
                               scan_fasta, token_batches)
from tests.conftest import DATA, PROTEINS_FASTA


def plain_fasta(path):
    """An independent reader: (id, sequence) pairs."""
    records, current = [], None
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            current = [line[1:].split()[0], ""]
            records.append(current)
        elif current is not None:
            current[1] += line.strip()
    return [tuple(r) for r in records]


def task_for(path, **keys):
    return ProteinTaskConfig(fasta=str(path), **{"max_length": 100, "tokens_per_batch": 1024, **keys})


@pytest.mark.parametrize("fasta", [PROTEINS_FASTA, DATA / "real_proteins.fasta"])
def test_scan_counts_match_an_independent_reader(fasta):
    task = task_for(fasta)
    scan = scan_fasta(task)
    expected = plain_fasta(fasta)
    assert scan.records == len(expected) == scan.train_records + scan.test_records
    assert scan.train_residues + scan.test_residues == sum(min(len(s), 100) for _, s in expected)
    assert scan.skipped_records == scan.replaced_residues == 0
    assert 0 < scan.test_records < scan.train_records and len(scan.sha256) == 64


@pytest.mark.parametrize("name, message", [
    ("bad_residue.fasta", "record 'bad_2' has '*' at position 6, outside the amino-acid alphabet"),
    ("duplicate_ids.fasta", "record id 'dup' appears more than once"),
    ("empty_record.fasta", "record 'hollow' is empty"),
    ("leading_text.fasta", "is not FASTA: its first line must start with '>', found 'sequences from the lab'"),
    ("bom.fasta", "starts with a UTF-8 byte-order mark"),
    ("reads.fastq", "is FASTQ (not supported)"),
    ("empty.fasta", "is empty (no FASTA records)"),
    ("missing.fasta", "file not found"),
])
def test_bad_files_fail_naming_file_record_and_position(name, message):
    with pytest.raises(FastaError) as error:
        scan_fasta(task_for(DATA / name))
    assert message in str(error.value) and str(DATA / name) in str(error.value)
    assert "\n" not in str(error.value)


def test_blank_lines_are_skipped_anywhere_in_the_file(tmp_path):
    """Biopython's strict parser refuses a blank line before the first record ("comments at the
    beginning of the file"); every protein tool reads such a file."""
    text = PROTEINS_FASTA.read_text()
    spaced = tmp_path / "spaced.fasta"
    spaced.write_text("\n  \n\t\n" + text.replace("\n>", "\n\n \n>"))
    assert [(r.id, r.sequence) for r in read_records(task_for(spaced))] == \
        [(r.id, r.sequence) for r in read_records(task_for(PROTEINS_FASTA))]
    assert scan_fasta(task_for(spaced)).records == len(plain_fasta(PROTEINS_FASTA))


def test_lowercase_residues_are_upper_cased_and_counted(tmp_path):
    scan = scan_fasta(task_for(DATA / "lowercase.fasta", test_fraction=0))
    assert (scan.uppercased_residues, scan.uppercased_records) == (5, 1)
    (warning,) = scan.warnings("f")
    assert "5 lowercase residue(s) in 1 record(s)" in warning
    assert [r.sequence for r in read_records(task_for(DATA / "lowercase.fasta"))] == ["MKVLAAGG"]
    clean = tmp_path / "upper.fasta"
    clean.write_text(">a\nMKV\n")
    assert scan_fasta(task_for(clean, test_fraction=0)).warnings("f") == []


@pytest.mark.parametrize("sequence, position, char", [("mkv*la", 4, "*"), ("mkvé", 4, "é"), ("MK1v", 3, "1")])
def test_the_residue_policy_still_governs_what_is_not_an_amino_acid_in_either_case(tmp_path, sequence, position,
                                                                                   char):
    path = tmp_path / "soft.fasta"
    path.write_text(f">soft\n{sequence}\n>fine\nMKV\n", encoding="utf-8")
    with pytest.raises(FastaError, match=re.escape(f"record 'soft' has '{char}' at position {position}")):
        scan_fasta(task_for(path))
    replaced = {r.id: r.sequence for r in read_records(task_for(path, invalid_residues=InvalidResidues.replace_with_X))}
    assert replaced["soft"] == sequence.upper().replace(char.upper(), "X")
    skipped = scan_fasta(task_for(path, invalid_residues=InvalidResidues.skip, test_fraction=0))
    assert (skipped.skipped_records, skipped.uppercased_residues) == (1, 0)  # a dropped record's letters not counted


@pytest.fixture
def with_bad_records(tmp_path):
    path = tmp_path / "mixed.fasta"
    path.write_text(PROTEINS_FASTA.read_text() + ">stop_codon\nMKVLA*\n>gap\nMK-VLA\n>hollow\n")
    return path


def test_skip_policy_counts_what_it_drops(with_bad_records):
    scan = scan_fasta(task_for(with_bad_records, invalid_residues=InvalidResidues.skip))
    assert (scan.records, scan.skipped_records) == (len(plain_fasta(PROTEINS_FASTA)), 3)
    assert "skipped 3 record(s)" in scan.report("f", task_for(with_bad_records))
    assert {"stop_codon", "gap", "hollow"}.isdisjoint(r.id for r in read_records(task_for(
        with_bad_records, invalid_residues=InvalidResidues.skip)))


def test_replace_policy_turns_bad_characters_into_x(with_bad_records):
    task = task_for(with_bad_records, invalid_residues=InvalidResidues.replace_with_X)
    with pytest.raises(FastaError, match="record 'hollow' is empty"):  # an empty record cannot be repaired
        scan_fasta(task)
    records = {r.id: r.sequence for r in read_records(task_for(DATA / "bad_residue.fasta",
                                                                  invalid_residues=InvalidResidues.replace_with_X))}
    assert records == {"ok_1": "MKVLAAGG", "bad_2": "MKVLAX"}
    with_bad_records.write_text(with_bad_records.read_text().replace(">hollow\n", ""))
    assert scan_fasta(task).replaced_residues == 2


def test_reading_streams_records_one_at_a_time():
    """The first record arrives before the reader meets a bad one further down the file."""
    stream = read_records(task_for(DATA / "bad_residue.fasta"))
    assert next(stream).id == "ok_1"
    with pytest.raises(FastaError, match="bad_2"):
        next(stream)


def test_split_depends_on_ids_not_on_file_order(tmp_path):
    records = plain_fasta(PROTEINS_FASTA)
    random.Random(1).shuffle(records)
    shuffled = tmp_path / "shuffled.fasta"
    shuffled.write_text("".join(f">{i}\n{s}\n" for i, s in records))
    held_out = {r.id for r in read_records(task_for(PROTEINS_FASTA)) if r.is_test}
    assert held_out == {r.id for r in read_records(task_for(shuffled)) if r.is_test}
    other_seed = {r.id for r in read_records(task_for(PROTEINS_FASTA, seed=1)) if r.is_test}
    assert held_out != other_seed


def test_crop_is_a_fixed_window_of_max_length():
    task = task_for(PROTEINS_FASTA, max_length=50)
    rng = random.Random(0)
    sequence = "".join(rng.choice(sorted(AMINO_ACIDS)) for _ in range(300))
    window = crop(sequence, "rec", task)
    assert len(window) == 50 and window in sequence and window == crop(sequence, "rec", task)
    assert {crop(sequence, f"rec{i}", task) for i in range(20)} != {window}  # offsets differ across records
    assert crop("MKV", "rec", task) == "MKV"


def test_batches_respect_the_token_budget_and_keep_every_record():
    task = task_for(PROTEINS_FASTA, max_length=120, tokens_per_batch=600)
    records = list(read_records(task))
    batches = list(token_batches(iter(records), task.tokens_per_batch))
    assert sorted(r.id for b in batches for r in b) == sorted(r.id for r in records)
    assert all(len(b) * (max(len(r.sequence) for r in b) + 2) <= 600 for b in batches)
    assert len(batches) < len(records)  # short records share batches


@pytest.mark.parametrize("keys, message", [
    ({"tokens_per_batch": 50}, "task.tokens_per_batch must be >= task.max_length + 2 = 102"),
    ({"test_fraction": 1.0}, "task.test_fraction must be in [0, 1)"),
    ({"max_length": 0}, "task.max_length must be > 0"),
])
def test_config_checks(keys, message):
    with pytest.raises(ValueError) as error:
        task_for(PROTEINS_FASTA, **keys)
    assert message in str(error.value)


def test_gzipped_fasta_reads_like_the_plain_file(tmp_path):
    import gzip

    packed = tmp_path / "proteins.fasta.gz"
    packed.write_bytes(gzip.compress(PROTEINS_FASTA.read_bytes()))
    plain, zipped = scan_fasta(task_for(PROTEINS_FASTA)), scan_fasta(task_for(packed))
    assert (zipped.records, zipped.train_residues, zipped.test_residues) == (
        plain.records, plain.train_residues, plain.test_residues)
    assert [(r.id, r.sequence) for r in read_records(task_for(packed))] == [
        (r.id, r.sequence) for r in read_records(task_for(PROTEINS_FASTA))]
    (tmp_path / "broken.fasta.gz").write_bytes(gzip.compress(PROTEINS_FASTA.read_bytes())[:200])
    with pytest.raises(FastaError, match="broken.fasta.gz"):
        scan_fasta(task_for(tmp_path / "broken.fasta.gz"))


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(FastaError, match=f"task.fasta: {tmp_path} is a directory"):
        scan_fasta(task_for(tmp_path))


def test_an_unreadable_file_is_one_line(tmp_path):
    """A file the user may not read. Root reads anything, so as root the check runs without the
    capabilities that bypass file permissions (setpriv, util-linux)."""
    import os
    import shutil
    import subprocess
    import sys

    fasta = tmp_path / "secret.fasta"
    fasta.write_text(">a\nMKV\n")
    fasta.chmod(0)
    command = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[2]); from sae.tasks.protein import *; "
               "scan_fasta(ProteinTaskConfig(fasta=sys.argv[1]))", str(fasta), str(DATA.parents[1])]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"task.fasta: cannot read {fasta}: Permission denied" in result.stderr.strip().splitlines()[-1]


def test_non_utf8_headers_are_counted_in_a_warning(tmp_path):
    fasta = tmp_path / "latin1.fasta"
    fasta.write_bytes(b">p1 caf\xe9 protein\nMKVLA\n>p2 plain\nMKVLAG\n>p3 \xff\xfe\nMKV\n")
    scan = scan_fasta(task_for(fasta, test_fraction=0))
    assert scan.records == 3 and scan.non_utf8_headers == 2
    assert scan.warnings(str(fasta)) == [f"task.fasta: {fasta}: 2 record header(s) are not UTF-8; their undecodable "
                                         "bytes were replaced by U+FFFD in the record ids"]


def test_cropping_is_reported_with_the_longest_record(tmp_path):
    fasta = tmp_path / "long.fasta"
    fasta.write_text(">short\nMKVLA\n>long\n" + "A" * 250 + "\n>longer\n" + "G" * 300 + "\n")
    task = task_for(fasta, test_fraction=0)
    scan = scan_fasta(task)
    assert (scan.cropped_records, scan.longest) == (2, 300)
    assert "cropped 2 record(s) longer than task.max_length=100 (longest 300 residues)" in scan.report("f", task)


def test_a_fasta_too_small_to_split_says_how_to_run_it(tmp_path):
    from sae.tasks.protein import in_split

    fasta = tmp_path / "two.fasta"
    fasta.write_text(">one\nMKVLA\n>two\nMKVLAG\n")
    with pytest.raises(FastaError, match="task.test_fraction=0 to evaluate on the training records"):
        scan_fasta(task_for(fasta))  # the default test_fraction=0.1 holds neither record out
    task = task_for(fasta, test_fraction=0)
    scan = scan_fasta(task)
    assert (scan.train_records, scan.test_records) == (2, 2)
    assert "none held out (task.test_fraction=0: evaluated on training records)" in scan.report("f", task)
    records = list(read_records(task))
    assert all(in_split(r, "train", task) and in_split(r, "test", task) for r in records)
