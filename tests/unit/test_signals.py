"""Stop signals as a job sees them, sent for real to this process (os.kill): before the loop a
stop ends the job at once; in the loop the first Ctrl-C or SIGTERM waits for the step's end, a
second Ctrl-C stops at once; the original handlers come back afterwards."""
import os
import signal

import pytest

from sae.signals import StopRequested, deferred_stop_signals


def test_a_stop_before_the_loop_ends_the_job_at_once_naming_what_it_interrupted():
    with pytest.raises(StopRequested) as stop:
        with deferred_stop_signals("during host training"):
            os.kill(os.getpid(), signal.SIGINT)
    assert stop.value.code == 128 + signal.SIGINT and stop.value.status == "cancelled"
    assert stop.value.message.startswith("Ctrl-C (SIGINT) during host training: nothing to save")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_in_the_loop_the_first_ctrl_c_waits_and_the_second_stops_at_once(capfd):
    with pytest.raises(StopRequested) as stop:
        with deferred_stop_signals() as pending:
            pending.deferring = True
            os.kill(os.getpid(), signal.SIGINT)
            assert pending.received == [signal.SIGINT]  # recorded: the step goes on
            assert "stopping after this step's checkpoint (Ctrl-C again to stop at once)" in capfd.readouterr().err
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the second Ctrl-C should have stopped the job here")
    assert stop.value.code == 128 + signal.SIGINT
    assert stop.value.message.startswith("Ctrl-C again: stopped at once, without a checkpoint of this step")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_in_the_loop_is_only_recorded_even_twice():
    """SLURM may send SIGTERM more than once before its SIGKILL: the checkpoint must still be written."""
    with deferred_stop_signals() as pending:
        pending.deferring = True
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert pending.received == [signal.SIGTERM, signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
