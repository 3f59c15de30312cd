"""A progress watchdog for the driver: notices when a running stage stops finishing partitions.

On a cluster a stage can wedge: a worker hangs on a socket, or a call waits on an actor of a
node that died and will not come back. Nothing fails, nothing moves. The
runner counts finished partitions (files in the work folder, so work done anywhere in the
cluster counts); when the count has not changed for ``timeout`` seconds this watchdog
interrupts the driver's main thread, and the runner starts the stage's pending partitions
again on fresh workers. Should the main thread not come back from the interruption within
``grace`` seconds (the pipeline's shutdown hangs too), the process exits with EXIT_STALLED;
running the same command again resumes from the finished partitions.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("datakit")

EXIT_STALLED = 75  # EX_TEMPFAIL: try again


class Stalled(RuntimeError):
    """No partition finished within the stall timeout, more times than the recipe allows."""


class StallWatch:
    def __init__(self, progress: Callable[[], int], timeout: float | None, what: str, poll: float | None = None, grace: float = 120.0):
        self.progress = progress
        self.timeout = timeout
        self.what = what
        self.poll = poll or min(30.0, max(0.5, (timeout or 30.0) / 4))
        self.grace = grace
        self.fired = False
        self._stop = threading.Event()  # set when the main thread leaves the watched block
        self._thread: threading.Thread | None = None
        self._saved_handler = None  # SIGINT's disposition before the watch, when it had to change it

    def __enter__(self) -> StallWatch:
        if self.timeout:
            self._hear_sigint()
            self._thread = threading.Thread(target=self._watch, name="datakit-stall-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._saved_handler is not None:
            signal.signal(signal.SIGINT, self._saved_handler)
            self._saved_handler = None

    def _hear_sigint(self) -> None:
        """The watch stops the pipeline with SIGINT. A command started in the background by a
        script (``datakit run ... &``, nohup) inherits SIGINT ignored, and the interrupt would be
        lost: while watching, SIGINT raises KeyboardInterrupt whatever the process inherited."""
        self._saved_handler = None
        if threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGINT)
            if current in (signal.SIG_IGN, signal.SIG_DFL, None):
                self._saved_handler = current
                signal.signal(signal.SIGINT, signal.default_int_handler)

    def _watch(self) -> None:
        last, since = self._count(), time.monotonic()
        while not self._stop.wait(self.poll):
            now, count = time.monotonic(), self._count()
            if count != last:
                last, since = count, now
            elif now - since >= self.timeout:
                self._fire(now - since)
                return

    def _count(self) -> int:
        try:
            return self.progress()
        except OSError as error:  # a flaky listing is not a stall; the next poll asks again
            log.warning("stall watch: cannot count finished partitions (%s)", error)
            return -1

    def _fire(self, idle: float) -> None:
        self.fired = True
        log.warning("%s: no partition finished in %.0f s; stopping the pipeline to start it again", self.what, idle)
        # A real SIGINT, not _thread.interrupt_main(): the main thread sleeps in a lock wait that
        # only a signal wakes.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        if not self._stop.wait(self.grace):
            print(
                f"datakit: {self.what} stalled and its pipeline did not stop within {self.grace:.0f} s; "
                f"exiting (code {EXIT_STALLED}). Run the same command again to resume.",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_STALLED)
