"""Tiny real runs in-process: outputs, checkpoint round trip, resume equivalence, metrics sanity."""
import json
from pathlib import Path
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

import sae
from sae.host_models.config import Hookpoint, TokenPositions
from sae.saes import load
from sae.saes.batchtopk import BatchTopKSAEConfig
from sae.saes.topk import TopKSAEConfig
from sae.saes.vanilla import VanillaSAEConfig
from sae.activations.modular import load_activation_data
from sae.training.checkpoint import latest_checkpoint
from sae.jobs import run_training
from sae.training.schedules import Schedule, SchedulerConfig
from tests.conftest import tiny_host, tiny_train_config


def final_weights(run_dir):
    return load_file(str(latest_checkpoint(run_dir) / "sae.safetensors"))


def resumed_and_whole_weights(cfg, tmp_path, caplog) -> tuple[dict, dict]:
    """Train cfg whole, then again from only its step-15 checkpoint (an interrupted run: cfg must
    checkpoint at 15 and run past it); the resumed run must say it resumed. -> (whole, resumed) weights."""
    run_training(cfg, tmp_path / "full")
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_0000015", interrupted / "checkpoints" / "step_0000015")
    with caplog.at_level("INFO"):
        assert run_training(cfg, interrupted)["step"] == cfg.num_steps
    assert "Resuming from" in caplog.text
    return final_weights(tmp_path / "full"), final_weights(interrupted)


def test_run_writes_metrics_checkpoints_and_config(tmp_path, host_cache):
    cfg = tiny_train_config(host_cache)
    summary = run_training(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.json", "final_metrics.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    steps = sorted(int(d.name.split("_")[1]) for d in (run / "checkpoints").glob("step_*"))
    assert steps[-1] == cfg.num_steps and len(steps) >= 3  # FLOP schedule + the end
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/fvu", "train/l0"} <= set(records[0])
    assert summary["eval/train/l0"] <= cfg.sae.k
    assert 0 <= summary["eval/test/fvu"] < 1
    for split in ("train", "test"):
        assert f"eval/{split}/final.L0/loss_recovered" in summary


def test_saved_sae_takes_raw_activations(tmp_path, host_cache):
    """load() gives weights with the normalisation folded in: raw host activations in, raw out."""
    cfg = tiny_train_config(host_cache)
    run_training(cfg, tmp_path / "run")
    loaded = load(latest_checkpoint(tmp_path / "run"))
    data = load_activation_data(cfg.task, cfg.host_model, normalize=True, device="cpu")
    raw = data.train / data.scale[:, None]
    training_view = torch.load(latest_checkpoint(tmp_path / "run") / "train_state.pt", weights_only=True)["sae"]
    trained = sae.saes.build_sae(cfg.sae, 1, raw.shape[-1])
    trained.load_state_dict(training_view)
    expected = trained(data.train).x_hat / data.scale[:, None]
    assert torch.allclose(loaded(raw).x_hat, expected, atol=1e-4)


@pytest.mark.parametrize("sae_cfg", [
    TopKSAEConfig(sparse_dim=64, k=4, k_aux=16, dead_window=128),  # short window: AuxK and dead counters active
    VanillaSAEConfig(sparse_dim=64, sparsity_warmup_steps=10),
    BatchTopKSAEConfig(sparse_dim=64, k=4, k_aux=16, dead_window=128),  # its threshold buffer too
    TopKSAEConfig(sparse_dim=64, k=4, k_aux=16, dead_window=128, resample_every=10, resample_until=0.9),
])
def test_resumed_run_ends_with_the_same_weights(tmp_path, host_cache, sae_cfg):
    cfg = tiny_train_config(host_cache, sae=sae_cfg, checkpoint_every=15, num_steps=40)
    run_training(cfg, tmp_path / "full")
    # An interrupted run: only the step-15 checkpoint made it to disk before the job died.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_0000015", interrupted / "checkpoints" / "step_0000015")
    summary = run_training(cfg, interrupted)
    assert summary["step"] == 40
    full, resumed = final_weights(tmp_path / "full"), final_weights(interrupted)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, host_cache):
    run_training(tiny_train_config(host_cache, num_steps=20), tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="holds a checkpoint of a different run \\('lr' differs"):
        run_training(tiny_train_config(host_cache, num_steps=20, lr=1e-2), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_crosscoder_over_layers_and_all_positions(tmp_path, host_cache):
    host = tiny_host(host_cache, layers=[0, 1], checkpoints=["step_50", "final"], token_positions=TokenPositions.all)
    summary = run_training(tiny_train_config(host_cache, host_model=host), tmp_path / "run")
    assert summary["sources"] == ["step_50.L0", "step_50.L1", "final.L0", "final.L1"]
    meta = json.loads((latest_checkpoint(tmp_path / "run") / "sae.json").read_text())
    assert meta["n_sources"] == 4 and meta["token_positions"] == "all"
    assert [source["step"] for source in meta["sources"]] == [50, 50, 60, 60]  # what each selector resolved to
    assert Path(meta["host_run_dir"]).is_absolute() and (Path(meta["host_run_dir"]) / "summary.json").is_file()
    assert load(latest_checkpoint(tmp_path / "run")).W_dec.shape == (64, 4, 32)


def test_mlp_hookpoint(tmp_path, host_cache):
    host = tiny_host(host_cache, hookpoint=Hookpoint.mlp_hidden)
    run_training(tiny_train_config(host_cache, host_model=host, num_steps=20), tmp_path / "run")
    assert load(latest_checkpoint(tmp_path / "run")).d_in == 64


def test_perfect_splice_recovers_all_loss(host_cache):
    """Splicing the clean activation back in is a no-op: CE equals the clean CE."""
    from sae.metrics.downstream import spliced_metrics

    cfg = tiny_train_config(host_cache)
    data = load_activation_data(cfg.task, cfg.host_model, normalize=False, device="cpu")
    tokens, labels = data.dataset.train
    source = data.sources[0]
    metrics = spliced_metrics(source.model, tokens, labels, source.hook, data.train[:, 0], data.train[:, 0],
                              data.positions)
    assert metrics["ce_spliced"] == pytest.approx(metrics["ce_clean"], abs=1e-5)
    assert metrics["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["ce_zero"] > metrics["ce_clean"]


def test_wandb_offline_writes_its_run_files(tmp_path, host_cache):
    from sae.tracking import TrackingConfig, WandbMode

    cfg = tiny_train_config(host_cache, num_steps=10, tracking=TrackingConfig(mode=WandbMode.offline, group="g"))
    run_training(cfg, tmp_path / "run")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (tmp_path / "run" / "wandb_id.txt").read_text().strip() in runs[0].name


def test_stop_signal_saves_the_current_step_then_runs_the_original_handler(tmp_path, host_cache, monkeypatch):
    """What submitit does on SLURM's time-limit warning (SIGUSR2): its handler requeues and exits.
    The loop must first checkpoint the step it is at, so the requeued job loses nothing."""
    import os
    import signal

    import sae.jobs as run_module

    cfg = tiny_train_config(host_cache, num_steps=40, log_every=5, checkpoint_every=None)
    run_training(cfg, tmp_path / "full")

    handled = []

    def submitit_like_handler(signum, frame):
        handled.append(signum)
        raise SystemExit(0)  # requeue + exit

    original_metrics = run_module.train_metrics

    def metrics_then_signal(*args):
        metrics_then_signal.calls += 1
        if metrics_then_signal.calls == 3:  # the signal arrives mid-way through step 15's bookkeeping
            os.kill(os.getpid(), signal.SIGUSR2)
        return original_metrics(*args)

    metrics_then_signal.calls = 0
    previous = signal.signal(signal.SIGUSR2, submitit_like_handler)
    monkeypatch.setattr(run_module, "train_metrics", metrics_then_signal)
    try:
        with pytest.raises(SystemExit):
            run_training(cfg, tmp_path / "job")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert handled == [signal.SIGUSR2]
    assert latest_checkpoint(tmp_path / "job").name == "step_0000015"
    assert signal.getsignal(signal.SIGUSR2) is previous  # handlers restored
    monkeypatch.setattr(run_module, "train_metrics", original_metrics)
    run_training(cfg, tmp_path / "job")  # the requeued job
    full, resumed = final_weights(tmp_path / "full"), final_weights(tmp_path / "job")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_mixed_task_reports_spliced_accuracy_per_operation(host_cache):
    """Per-operation accuracies average (weighted by pair counts) to the overall one, and the
    clean one matches the host's own per-operation accuracy."""
    from sae.metrics.evaluate import evaluate
    from sae.saes import build_sae
    from sae.tasks.modular import Operation
    from sae.host_models.training import evaluate_host
    from tests.conftest import tiny_task

    task = tiny_task(name="mixed", operations=[Operation.addition, Operation.division])
    cfg = tiny_train_config(host_cache, task=task)
    data = load_activation_data(cfg.task, cfg.host_model, normalize=True, device="cpu")
    torch.manual_seed(0)
    sae_model = build_sae(cfg.sae, 1, data.train.shape[-1])
    metrics = evaluate(sae_model, data)
    test_ops = data.dataset.op_ids[~data.dataset.is_train]
    for run in ("clean", "spliced", "zero"):
        weighted = sum(metrics[f"eval/test/final.L0/acc_{run}_{op.value}"] * (test_ops == i).sum().item()
                       for i, op in enumerate(task.operations)) / len(test_ops)
        assert weighted == pytest.approx(metrics[f"eval/test/final.L0/acc_{run}"])
    host = evaluate_host(data.sources[0].model, data.dataset)
    assert metrics["eval/test/final.L0/acc_clean_division"] == pytest.approx(host["test/acc_division"])


def test_logging_intervals_do_not_change_the_weights(tmp_path, host_cache):
    """log_every/eval_every are resumable changes and sweepable without confounding: the trained
    weights must not depend on them (AuxK active, so the dead-latent bookkeeping is exercised)."""
    sae_cfg = TopKSAEConfig(sparse_dim=64, k=4, k_aux=16, dead_window=128)
    run_training(tiny_train_config(host_cache, sae=sae_cfg, num_steps=60, log_every=7, eval_every=13), tmp_path / "a")
    run_training(tiny_train_config(host_cache, sae=sae_cfg, num_steps=60, log_every=10, eval_every=60), tmp_path / "b")
    first, second = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_dead_latent_state_round_trips_and_old_checkpoints_rebuild_the_set():
    from sae.training.step import DeadLatents

    tracker = DeadLatents(d_sae=5, window=10, device="cpu")
    tracker.tokens_since_fired.copy_(torch.tensor([0, 20, 5, 11, 0]))
    restored = DeadLatents(d_sae=5, window=10, device="cpu")
    restored.load({"tokens_since_fired": tracker.tokens_since_fired, "dead_latents": torch.tensor([1, 3])})
    assert restored.dead.tolist() == [1, 3]
    old = DeadLatents(d_sae=5, window=10, device="cpu")
    old.load({"tokens_since_fired": tracker.tokens_since_fired, "any_dead": True})
    assert old.dead.tolist() == [1, 3]
    old.load({"tokens_since_fired": torch.zeros(5, dtype=torch.long), "any_dead": False})
    assert old.dead is None


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_finished_constant_lr_run_extends_bit_identically_to_a_fresh_longer_run(tmp_path, host_cache):
    from sae.training.checkpoint import load_train_state

    run_training(tiny_train_config(host_cache, num_steps=30), tmp_path / "extended")
    run_training(tiny_train_config(host_cache, num_steps=60), tmp_path / "extended")
    run_training(tiny_train_config(host_cache, num_steps=60), tmp_path / "fresh")
    extended, fresh = (load_train_state(latest_checkpoint(tmp_path / name), "cpu") for name in ("extended", "fresh"))
    assert extended["step"] == fresh["step"] == 60
    for name, tensor in fresh["sae"].items():
        assert torch.equal(extended["sae"][name], tensor), name
    evals = [(line["step"]) for line in metrics_lines(tmp_path / "extended") if "eval/test/fvu" in line]
    assert evals == [20, 30, 40, 60]  # 30 was the first run's final eval; no step evaluated twice


@pytest.mark.parametrize("change, message", [
    (dict(scheduler=SchedulerConfig(name=Schedule.cosine, warmup_steps=5)), "scheduler=cosine depends on num_steps"),
    (dict(scheduler=SchedulerConfig(warmup_steps=None)), "the warm-up depends on num_steps"),
    (dict(sae=TopKSAEConfig(sparse_dim=64, k=4, k_aux=16, resample_every=10)),
     "dead-latent resampling's schedule depends on num_steps"),
    (dict(lr_sum=0.09), r"lr_sum=0.09 spreads over num_steps \(a longer run gets a lower lr"),
])
def test_extending_is_refused_in_one_line_when_the_schedule_depends_on_num_steps(tmp_path, host_cache, change, message):
    run_training(tiny_train_config(host_cache, num_steps=30, **change), tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=f"num_steps differs \\(saved 30, now 60\\) and {message}") as error:
        run_training(tiny_train_config(host_cache, num_steps=60, **change), tmp_path / "run")
    assert "\n" not in str(error.value)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_lr_sum_sets_the_lr_of_every_step(tmp_path, host_cache):
    cfg = tiny_train_config(host_cache, num_steps=40, lr_sum=0.09, scheduler=SchedulerConfig(warmup_steps=0))
    run_training(cfg, tmp_path / "run")
    lrs = {line["step"]: line["train/lr"] for line in metrics_lines(tmp_path / "run") if "train/lr" in line}
    assert lrs and all(lr == pytest.approx(0.09 / 40, rel=1e-12) for lr in lrs.values())


def test_rerunning_a_finished_run_writes_nothing(tmp_path, host_cache):
    from sae.tracking import TrackingConfig, WandbMode

    cfg = tiny_train_config(host_cache, num_steps=20, tracking=TrackingConfig(mode=WandbMode.offline))
    first = run_training(cfg, tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    time.sleep(1.0)  # nothing of the finished run (W&B's service included) writes after it returned
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert run_training(cfg, tmp_path / "run") == first
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1


def test_a_stop_signal_arriving_during_the_ranks_agreement_waits_for_the_next_step():
    """The signal handler can run while the all-reduce of the stop flags waits (in C++): that
    signal must neither be lost nor decide this step (the other ranks did not see it)."""
    import signal

    from sae.jobs import agree_on_stop
    from sae.signals import PendingSignals
    from sae.world import Collective

    pending = PendingSignals()

    class SignalDuringReduce(Collective):
        size, calls = 2, 0

        def max(self, tensor):
            self.calls += 1
            if self.calls == 1:
                pending.received.append(signal.SIGTERM)  # the handler ran while we waited
            return tensor

    group = SignalDuringReduce()
    assert agree_on_stop(pending, group, "cpu") is False  # nobody offered it this step
    assert pending.received == [signal.SIGTERM]  # kept ...
    assert agree_on_stop(pending, group, "cpu") is True  # ... and agreed on at the next step
    assert pending.received == [signal.SIGTERM]


def test_wandb_gets_the_hosts_curves_and_history_beside_the_sae_run(tmp_path, host_cache):
    """What W&B wrote offline for the SAE run: the host's curves (an image) and its training
    history (a table), so a run's page shows the grokking it was trained on."""
    from sae.tracking import TrackingConfig, WandbMode

    cfg = tiny_train_config(host_cache, num_steps=10, tracking=TrackingConfig(mode=WandbMode.offline))
    run_training(cfg, tmp_path / "run")
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    media = run / "files" / "media"
    assert list(media.glob("images/host/curves_*.png"))
    (table,) = media.glob("table/host/history_*.table.json")
    history = json.loads(table.read_text())
    assert "train/acc" in history["columns"] and len(history["data"]) > 1


def test_wandb_summaries_keep_each_metrics_best_and_the_final_evaluation(monkeypatch):
    """define_metric once per key: min for losses and FVU, max for accuracies and loss recovered,
    W&B's last value for the rest; `summarize` writes final/<metric> beside them."""
    from sae.tracking.wandb_tracker import WandbTracker

    class RecordingRun:
        def __init__(self):
            self.defined, self.logged, self.summary = [], [], {}

        def define_metric(self, key, summary):
            self.defined.append((key, summary))

        def log(self, metrics, step):
            self.logged.append((step, metrics))

    tracker = WandbTracker.__new__(WandbTracker)
    tracker.run, tracker._defined = RecordingRun(), set()
    tracker.log({"train/loss": 2.0, "train/l0": 32.0, "eval/test/final.L0/acc_spliced": 0.9}, step=1)
    tracker.log({"train/loss": 1.0, "eval/test/final.L0/loss_recovered": 0.99}, step=2)
    tracker.summarize({"final/eval/test/fvu": 0.1})
    assert sorted(tracker.run.defined) == [("eval/test/final.L0/acc_spliced", "max"),
                                           ("eval/test/final.L0/loss_recovered", "max"), ("train/loss", "min")]
    assert tracker.run.summary == {"final/eval/test/fvu": 0.1} and len(tracker.run.logged) == 2


def test_resampling_restarts_dead_latents_at_its_steps_and_stops_at_its_fraction(tmp_path, host_cache):
    sae_cfg = TopKSAEConfig(sparse_dim=64, k=4, k_aux=16, dead_window=128, resample_every=10, resample_until=0.5)
    summary = run_training(tiny_train_config(host_cache, sae=sae_cfg, num_steps=40), tmp_path / "run")
    restarts = [(line["step"], line["train/resampled"]) for line in metrics_lines(tmp_path / "run")
                if "train/resampled" in line]
    assert [step for step, _ in restarts] == [10, 20]  # none after step 20 = 0.5 x 40
    assert restarts[0][1] > 0  # a 128-token window at batch 64: latents are dead by step 10
    assert 0 <= summary["eval/test/fvu"] < 1
