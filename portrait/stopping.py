"""SIGTERM stops a command the way Ctrl-C does.

A scheduler's stop (SLURM, Kubernetes, ``kill PID``) sends SIGTERM. Python's default ends the
process on the spot, and ``ray.init`` replaces it with ``sys.exit(15)``: either way the command
leaves without a word. Here SIGTERM raises :class:`Terminated`, a ``KeyboardInterrupt``, so it
unwinds through the same paths as Ctrl-C (a Ray session is shut down, a checkpoint being written
is finished or left under its temporary name) and the command says it stopped and how to go on.
"""

from __future__ import annotations

import signal
import threading

EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a command stopped by it


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (raised in the main thread)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def stop_on_sigterm() -> None:
    """Make SIGTERM raise Terminated in the main thread (call again after ``ray.init``)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
