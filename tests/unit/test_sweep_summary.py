"""The sweep summary's W&B run on a sweep dir as Hydra leaves it: multirun.yaml keeps `${now:...}`
(only Hydra resolves it), and W&B failing must not cost the summary files."""
import json
import logging
from pathlib import Path

import pytest

from sae.analysis import sweep_summary
from sae.analysis.sweep_summary import JobResult, log_sweep_to_wandb, sweep_group, write_reports

MULTIRUN_YAML = """\
hydra:
  sweep:
    dir: outputs/sweeps/${now:%Y-%m-%d}/${now:%H-%M-%S}
  overrides:
    task: [sae=vanilla,topk]
tracking:
  mode: offline
  project: train-sae
"""


def sweep_dir_as_hydra_leaves_it(tmp_path: Path, job_group: str | None) -> Path:
    sweep = tmp_path / "outputs" / "sweeps" / "2026-12-07" / "01-02-03"
    job = sweep / "000_sae=vanilla"
    job.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(MULTIRUN_YAML)
    if job_group is not None:
        (job / "config.json").write_text(json.dumps({"tracking": {"group": job_group}}))
    return sweep


def reports(sweep: Path) -> dict:
    job = JobResult("000_sae=vanilla", ["sae=vanilla"], "completed", "vanilla",
                    {"eval/test/l0": 8.0, "eval/test/fvu": 0.1, "step": 10})
    return write_reports([job], sweep)


def test_the_summary_run_joins_the_group_its_jobs_logged_to(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    sweep = sweep_dir_as_hydra_leaves_it(tmp_path, job_group="outputs_sweeps_2026-12-07_01-02-03")
    assert sweep_group(sweep) == "outputs_sweeps_2026-12-07_01-02-03"
    logged = log_sweep_to_wandb(sweep, reports(sweep))
    assert logged == sweep / "wandb"
    (run,) = logged.glob("offline-run-*")
    assert list(run.glob("files/media/table/sweep/summary_*.table.json"))


def test_without_job_records_the_group_is_the_sweep_dir_as_given(tmp_path):
    sweep = sweep_dir_as_hydra_leaves_it(tmp_path, job_group=None)
    assert sweep_group(sweep) == str(sweep).replace("/", "_")
    assert sweep_group(Path(f"{sweep}/")) == str(sweep).replace("/", "_")


def test_a_failing_wandb_is_one_warning_and_the_summary_files_stand(tmp_path, monkeypatch, caplog):
    sweep = sweep_dir_as_hydra_leaves_it(tmp_path, job_group="g")
    paths = reports(sweep)
    before = {path: path.read_bytes() for path in paths.values()}

    def broken(*args, **kwargs):
        raise RuntimeError("wandb service did not start\nmore detail")

    monkeypatch.setattr("sae.tracking.wandb_tracker.WandbTracker", broken)
    with caplog.at_level(logging.WARNING, logger=sweep_summary.__name__):
        assert log_sweep_to_wandb(sweep, paths) is None
    (record,) = caplog.records
    assert record.getMessage().startswith("W&B summary run not written (RuntimeError: wandb service did not start)")
    assert "\n" not in record.getMessage()
    assert {path: path.read_bytes() for path in paths.values()} == before
    assert not (sweep / "wandb").exists()


@pytest.mark.parametrize("mode", ["disabled"])
def test_tracking_disabled_writes_no_run(tmp_path, mode):
    sweep = sweep_dir_as_hydra_leaves_it(tmp_path, job_group="g")
    (sweep / "multirun.yaml").write_text(MULTIRUN_YAML.replace("mode: offline", f"mode: {mode}"))
    assert log_sweep_to_wandb(sweep, reports(sweep)) is None
    assert not (sweep / "wandb").exists()
