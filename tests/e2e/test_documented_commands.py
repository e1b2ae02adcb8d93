"""Every shell command a user is told to run, run as written (marker `documented`, `make test-docs`).

The commands are the lines of every ```bash block in README.md, docs/*.md and experimental/README.md,
in the order they appear (a later one may use what an earlier one made). They run in a fresh copy
of the repository (the tracked files; the project's venv linked in, its `bin/` first on PATH as
after `source .venv/bin/activate`), one `bash -c` each, and fail on a non-zero exit or a traceback.

Made small, one documented way: every `scripts/train.py` call (python or torchrun) and `make train`
gets the overrides below appended, except keys the command sets itself; that is all that changes.
Placeholders a reader replaces by hand are filled in with what the earlier commands made:
`outputs/runs/<date>/<time>` and `outputs/sweeps/<date>/<time>` become the newest such dir.

Left out, by name, each with its reason in the test report (`-rs`):
- a command whose comment says `needs: ...` (a GPU, a SLURM cluster, the network): CI has none of
  them for these commands (the SLURM suite runs its own sweeps on a local cluster);
- the test suites (`make test...`, `make slurm-up`, `make notebooks-full`): .ci/run runs each as a
  stage of its own; this test would otherwise run inside itself;
- commands written inline in the docs' prose (`python scripts/benchmark.py ...`, the recipe study):
  benchmarks and studies of minutes to hours whose modules have unit tests; only fenced blocks
  are commands a reader is told to run as they stand.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
             "experimental/README.md"]

# A host that groks in a few hundred steps (the notebooks' small profile, fewer steps) and a short SAE run.
TINY_MODULAR = ["task.p=53", "task.train_fraction=0.6", "host_model.d_model=64", "host_model.d_mlp=256",
                "host_model.train.num_steps=600", "host_model.train.steps_after_grok=20", "num_steps=20",
                "batch_size=64", "eval_every=20", "hardware.threads=1"]
TINY_PROTEIN = ["task.max_train_tokens=2048", "task.max_test_tokens=512", "task.eval_sequences=4", "num_steps=20",
                "batch_size=64", "eval_every=20", "hardware.threads=1"]
# whole suites, and the notebook runner (the notebooks stage runs it on every notebook, small profile)
TEST_SUITES = re.compile(r"^(make (test|slurm-up|notebooks-full)|python scripts/run_notebooks\.py)")
NEEDS = re.compile(r"#.*\bneeds: ([^#]+)")


@dataclass
class Command:
    document: str
    line: int
    text: str  # as written, continuation lines joined, comment removed
    needs: str | None  # what CI lacks, from the command's `needs: ...` comment


def fenced_commands(document: str) -> list[Command]:
    """The commands of the document's ```bash / ```sh / ```shell blocks."""
    commands, in_block, pending, start = [], False, "", 0
    for number, line in enumerate((ROOT / document).read_text().splitlines(), start=1):
        if line.startswith("```"):
            in_block = line.strip("`").strip() in ("bash", "sh", "shell")
            continue
        if not in_block or (not pending and (not line.strip() or line.lstrip().startswith("#"))):
            continue
        start = start if pending else number
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        needs = NEEDS.search(pending)
        text = re.split(r"\s#\s", " " + pending, maxsplit=1)[0].strip()
        commands.append(Command(document, start, " ".join(text.split()), needs.group(1).strip() if needs else None))
        pending = ""
    return commands


def all_commands() -> list[Command]:
    seen, ordered = set(), []
    for document in DOCUMENTS:
        for command in fenced_commands(document):
            if command.text not in seen:  # the same command in two documents runs once
                seen.add(command.text)
                ordered.append(command)
    return ordered


def made_small(text: str) -> str:
    """The command with the tiny overrides appended to its training call (keys it sets win)."""
    words = shlex.split(text)
    if "scripts/train.py" not in text and words[:2] != ["make", "train"]:
        return text
    tiny = TINY_PROTEIN if "task=protein_mlm" in text else TINY_MODULAR
    given = {word.split("=", 1)[0].lstrip("+~") for word in words if "=" in word}
    given |= {word.split("=", 1)[0] for word in re.findall(r"[\w.]+=", text)}  # inside ARGS="..."
    extra = [override for override in tiny if override.split("=", 1)[0] not in given]
    if words[:2] == ["make", "train"]:
        args = next((word.split("=", 1)[1] for word in words if word.startswith("ARGS=")), "")
        others = [word for word in words if not word.startswith("ARGS=")]
        return shlex.join([*others, "ARGS=" + " ".join([args, *extra]).strip()])
    return f"{text} {' '.join(extra)}"


def fill_placeholders(text: str, workspace: Path) -> str:
    for kind in ("runs", "sweeps"):
        placeholder = f"outputs/{kind}/<date>/<time>"
        if placeholder in text:
            made = sorted((workspace / "outputs" / kind).glob("*/*"), key=lambda p: p.stat().st_mtime)
            assert made, f"{placeholder}: no earlier command made one"
            text = text.replace(placeholder, str(made[-1].relative_to(workspace)))
    return text


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A fresh copy of the tracked files with the project's venv linked in."""
    venv = ROOT / ".venv"
    if not (venv / ".installed").is_file():
        pytest.skip("no project venv: run `make test` (or `make train`) first")
    copy = tmp_path_factory.mktemp("clone")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)  # mtimes kept: make sees the venv as up to date
    (copy / ".venv").symlink_to(venv)
    stale = subprocess.run(["make", "-q", ".venv/.installed"], cwd=copy, capture_output=True)
    if stale.returncode != 0:  # make would reinstall the shared venv from the copy: never
        pytest.fail("the venv is older than setup.cfg/pyproject.toml: run `make test` first")
    return copy


def environment(workspace: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST", "SAE_"))}
    return {**env, "PATH": f"{workspace / '.venv' / 'bin'}:{env.get('PATH', '')}", "PYTHONPATH": str(workspace),
            "VIRTUAL_ENV": str(workspace / ".venv"), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


COMMANDS = all_commands()


@pytest.mark.documented
@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.document}:{c.line}" for c in COMMANDS])
def test_documented_command_runs_as_written(command, workspace):
    if command.needs:
        pytest.skip(f"needs {command.needs}: {command.text}")
    if TEST_SUITES.match(command.text):
        pytest.skip(f"a test suite (or the notebook runner), run by .ci/run as its own stage: {command.text}")
    text = fill_placeholders(made_small(command.text), workspace)
    time.sleep(1.0 - time.time() % 1.0 + 0.05)  # run dirs are named by the second: never two in one
    result = subprocess.run(["bash", "-c", text], cwd=workspace, env=environment(workspace), capture_output=True,
                            text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, (
        f"{command.document}:{command.line}: `{text}` exited {result.returncode}:\n{output[-4000:]}")


def test_the_commands_are_found_and_made_small():
    """The extraction and the rewriting the test above relies on."""
    texts = [c.text for c in COMMANDS]
    assert "make train" in texts and "make test" in texts
    assert made_small("python scripts/train.py sae=topk sae.k=50").endswith("hardware.threads=1")
    small = made_small("python scripts/train.py --multirun sae.sparse_dim=256,512 num_steps=5")
    assert "num_steps=5" in small and "num_steps=20" not in small
    assert made_small('make train ARGS="task=division"') == (
        "make train 'ARGS=task=division " + " ".join(TINY_MODULAR) + "'")
    assert "task.max_train_tokens=2048" in made_small("python scripts/train.py task=protein_mlm task.fasta=x.fasta")
    assert made_small("python scripts/summarize.py outputs/sweeps/x") == "python scripts/summarize.py outputs/sweeps/x"
    assert all(c.needs is None or c.needs.strip() for c in COMMANDS)
