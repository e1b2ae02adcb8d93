"""The experimental/ notebooks: stripped in git, well-formed, and (marker `notebooks`, run by
.ci/run) executed top to bottom on their small profile by scripts/run_notebooks.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from sae.analysis.notebook import setup
from sae.errors import UserInputError

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "experimental"
REQUIRED = {f"cc_first-{task}" for task in ("addition", "subtraction", "multiplication", "division", "mixed")} | {
    "viz_neuron_activations", "viz_feature_attribution", "viz_latent_space", "viz_neuron_interpretability",
    "tc_first_look", "clt_circuits"}


def run_notebooks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebooks.py"), *args], capture_output=True,
                          text=True, timeout=3000, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_required_notebooks_are_there_without_outputs_and_use_the_library():
    assert {p.stem for p in NOTEBOOKS.glob("*.ipynb")} == REQUIRED
    for name in REQUIRED:
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.outputs == [] and cell.execution_count is None for cell in code), f"{name} has outputs"
        source = "\n".join(cell.source for cell in code)
        assert f'setup("{name}")' in source and "nb.save_results(" in source
        assert "import sae" in source or "from sae." in source


def test_bad_runner_input_fails_in_one_line_before_any_work(tmp_path):
    result = run_notebooks("cc_first-modulo", "--out", str(tmp_path))
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith(
        "Error: no notebook experimental/cc_first-modulo.ipynb; available: cc_first-addition")
    result = run_notebooks("--profile", "huge", "--out", str(tmp_path))
    assert result.stderr.strip().splitlines()[-1] == "Error: --profile must be small or full, got 'huge'"
    assert list(tmp_path.iterdir()) == []


def test_notebook_setup_refuses_an_unknown_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("SAE_NOTEBOOK_PROFILE", "medium")
    with pytest.raises(UserInputError, match="SAE_NOTEBOOK_PROFILE must be one of small, full, got 'medium'"):
        setup("cc_first-addition")
    monkeypatch.setenv("SAE_NOTEBOOK_PROFILE", "small")
    monkeypatch.setenv("SAE_NOTEBOOK_THREADS", "0")
    with pytest.raises(UserInputError, match="SAE_NOTEBOOK_THREADS"):
        setup("cc_first-addition")


@pytest.mark.notebooks
def test_every_notebook_executes_on_its_small_profile(tmp_path):
    result = run_notebooks("--out", str(tmp_path), "--jobs", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in REQUIRED:
        assert f"{name}: ok" in result.stdout
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["profile"] == "small" and results["notebook"] == name
        assert any(p.stat().st_size > 0 for p in (tmp_path / name).glob("*.png"))
    first_cells = {line.split("|")[1].strip() for line in result.stdout.splitlines() if line.startswith("| ")}
    # the study tables (training, evaluation, targeting), every task, with their headers
    assert first_cells == {"task", "arm chosen for", "addition", "subtraction", "multiplication", "division"}
    addition = json.loads((tmp_path / "cc_first-addition" / "results.json").read_text())
    (pre, post), = addition["phases"].values()  # the small profile: one seed
    assert pre["train_acc"] >= 0.99 and post["test_acc"] >= 0.99 and pre["step"] < post["step"]
    assert {row["arm"] for row in addition["summary"]} == {"post_specific", "generalisation_effect", "largest"}
    mixed = json.loads((tmp_path / "cc_first-mixed" / "results.json").read_text())
    assert set(mixed["verdicts"]) == {"addition/clamp", "subtraction/clamp"}
