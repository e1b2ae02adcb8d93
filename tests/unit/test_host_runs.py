"""Checkpoint selectors resolve from a host run's record (pure logic, a hand-written record)."""
import json

import pytest

from sae.host_models.runs import HostRunError, resolve_checkpoint


def write_run(tmp_path, checkpoints, grokking_step):
    records = [{"step": s, "file": f"checkpoints/step_{s:07d}.safetensors", "train/acc": tr, "test/acc": te}
               for s, tr, te in checkpoints]
    summary = {"complete": True, "task": {"p": 97, "operations": ["addition"]}, "checkpoints": records,
               "grokking_step": grokking_step, "memorisation_step": 50, "final_step": records[-1]["step"]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return tmp_path


CHECKPOINTS = [(0, 0.01, 0.01), (10, 0.3, 0.02), (50, 1.0, 0.05), (100, 1.0, 0.2), (200, 1.0, 0.7),
               (350, 1.0, 0.99), (500, 1.0, 1.0)]


@pytest.mark.parametrize("selector, step", [("final", 500), ("post_grok", 350), ("pre_grok", 50), ("step_200", 200)])
def test_selectors(tmp_path, selector, step):
    run = write_run(tmp_path, CHECKPOINTS, grokking_step=350)
    label, path, record = resolve_checkpoint(run, selector)
    assert record["step"] == step and path == run / f"checkpoints/step_{step:07d}.safetensors"


def test_pre_grok_is_the_middle_of_the_memorised_plateau(tmp_path):
    plateau = [(step, 1.0, 0.05 + step / 1000) for step in range(50, 210, 10)]  # memorised, test < 0.5
    run = write_run(tmp_path, [(0, 0.0, 0.0), *plateau, (300, 1.0, 0.8), (400, 1.0, 0.995)], grokking_step=400)
    assert resolve_checkpoint(run, "pre_grok")[2]["step"] == 120  # plateau 50..200: middle 125, the earlier of 120/130
    run = write_run(tmp_path, [(0, 0.0, 0.0), (60, 1.0, 0.1), (100, 1.0, 0.2), (130, 1.0, 0.4), (200, 1.0, 0.995)],
                    grokking_step=200)
    assert resolve_checkpoint(run, "pre_grok")[2]["step"] == 100  # plateau 60..130: middle 95


def test_pre_grok_falls_back_to_the_least_generalised_memorised_checkpoint_when_generalisation_was_fast(tmp_path):
    run = write_run(tmp_path, [(0, 0.0, 0.0), (50, 1.0, 0.6), (80, 1.0, 0.9), (100, 1.0, 0.995)], grokking_step=100)
    assert resolve_checkpoint(run, "pre_grok")[2]["step"] == 50


def test_selector_errors_say_what_to_do(tmp_path):
    run = write_run(tmp_path, CHECKPOINTS, grokking_step=None)
    with pytest.raises(HostRunError, match="never grokked"):
        resolve_checkpoint(run, "post_grok")
    with pytest.raises(HostRunError, match=r"no checkpoint at step 7 .*saved steps: \[0, 10, 50"):
        resolve_checkpoint(run, "step_7")
    with pytest.raises(HostRunError, match="train one first with `python scripts/train_host.py"):
        resolve_checkpoint(tmp_path / "empty", "final")


def test_a_final_checkpoint_that_fell_out_of_grokking_is_named_in_a_warning(tmp_path, caplog):
    """Seen: test 0.995 at step 150, 0.74 at the final step 250, and an SAE trained on it silently."""
    run = write_run(tmp_path, [(0, 0.0, 0.0), (100, 1.0, 0.3), (150, 1.0, 0.995), (250, 1.0, 0.74)], grokking_step=150)
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(run, "final")[2]["step"] == 250
    assert "grokked at step 150 but its final checkpoint (step 250) fell back to test acc 0.740" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        resolve_checkpoint(write_run(tmp_path, CHECKPOINTS, grokking_step=350), "final")
    assert caplog.text == ""
