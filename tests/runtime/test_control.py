"""Run-time machinery in this process: written files' permissions, Ctrl-C as a stop request,
a failing liveness thread, and the checkpoint schedule."""

from __future__ import annotations

import numpy as np


def test_written_files_are_readable_by_others_as_the_umask_allows(tmp_path, blobs):
    import os
    import stat

    from mpi_easgd.data import write_dataset

    old = os.umask(0o022)
    try:
        x = np.zeros((4, 1, 8, 8), np.uint8)
        path = write_dataset(tmp_path / "d.h5", (x, np.zeros(4)), (x, np.zeros(4)), num_classes=2, name="d")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_ctrl_c_asks_for_a_checkpoint_instead_of_raising():
    """SIGINT (Ctrl-C on a laptop) is a stop request like SIGTERM: no KeyboardInterrupt
    unwinds the ranks; the loop checkpoints and the job exits 75."""
    import os
    import signal

    from mpi_easgd.runtime.control import StopRequest

    previous = {s: signal.getsignal(s) for s in StopRequest.SIGNALS}
    try:
        stop = StopRequest().install()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_a_failing_liveness_thread_ends_the_job_with_one_line(monkeypatch, capsys):
    """An exception in the watchdog thread must not end liveness silently (the peers would
    then blame a healthy rank): it ends the job, saying why."""
    import mpi_easgd.runtime.watchdog as watchdog

    ended = []
    monkeypatch.setattr(watchdog, "abort", lambda comm, status: ended.append(status))

    def broken_tick():
        raise ValueError("boom")

    dog = watchdog.Watchdog(None, 0.04, str, tick=broken_tick).start()
    dog._thread.join(5)
    assert ended == [1]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the liveness thread failed (ValueError: boom); ending the job" in err


def test_checkpoint_schedule_counts_from_the_last_checkpoint():
    from mpi_easgd.runtime.schedule import Schedule

    steps = Schedule("5", step=20, now=0.0)
    assert [s for s in range(20, 31) if steps.due(s, 0.0)] == [25, 26, 27, 28, 29, 30]
    steps.mark(25, 0.0)
    assert not steps.due(29, 0.0) and steps.due(30, 0.0)
    clock = Schedule("30s", now=100.0)
    assert not clock.due(1, 129.0) and clock.due(1, 130.0) and not clock.due(0, 500.0)
    assert not Schedule("").due(10**6, 10**9)
