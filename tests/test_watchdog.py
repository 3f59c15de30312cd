"""The driver's stall watch on its own: it interrupts only when progress stops, and exits the
process when the interrupted work does not stop either. (The runner's restart after a hung
worker is tested in test_runner.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from datakit.watchdog import EXIT_STALLED, StallWatch

REPO = Path(__file__).resolve().parent.parent


def sleep_until_interrupted(seconds: float) -> bool:
    """True when a KeyboardInterrupt arrived within ``seconds``."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            time.sleep(0.05)
    except KeyboardInterrupt:
        return True
    return False


def test_no_progress_for_the_timeout_interrupts_the_main_thread():
    started = time.monotonic()
    watch = StallWatch(lambda: 7, timeout=0.5, what="stage test", poll=0.1, grace=30)
    with watch:
        interrupted = sleep_until_interrupted(10)
    assert interrupted and watch.fired
    assert 0.4 < time.monotonic() - started < 5


def test_a_process_started_with_sigint_ignored_is_still_interrupted():
    """`datakit run ... &` from a script inherits SIGINT ignored; the watch must still stop the
    stalled work, and the process's own disposition comes back afterwards."""
    script = textwrap.dedent(
        """
        import signal, time
        from datakit.watchdog import StallWatch
        with StallWatch(lambda: 0, timeout=0.3, what="stage test", poll=0.1, grace=30) as watch:
            try:
                time.sleep(20)
                print("not interrupted")
            except KeyboardInterrupt:
                print("interrupted")
        print("ignored again" if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else "changed")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    assert proc.stdout.split() == ["interrupted", "ignored", "again"], proc.stdout + proc.stderr


def test_moving_progress_never_interrupts():
    ticks = iter(range(10_000))
    watch = StallWatch(lambda: next(ticks), timeout=0.5, what="stage test", poll=0.1, grace=30)
    with watch:
        interrupted = sleep_until_interrupted(2.0)
    assert not interrupted and not watch.fired


def test_no_timeout_means_no_watch():
    with StallWatch(lambda: 0, timeout=None, what="stage test") as watch:
        assert not sleep_until_interrupted(0.5)
    assert watch._thread is None


def test_work_that_ignores_the_interrupt_ends_the_process_with_exit_75():
    script = textwrap.dedent(
        """
        import time
        from datakit.watchdog import StallWatch
        with StallWatch(lambda: 0, timeout=0.3, what="stage download", poll=0.1, grace=1.0):
            while True:  # a pipeline whose shutdown hangs as well
                try:
                    time.sleep(10)
                except KeyboardInterrupt:
                    pass
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_STALLED
    assert "stage download stalled" in proc.stderr and "Run the same command again to resume" in proc.stderr
