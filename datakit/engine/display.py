"""What a person sees while a build runs: one live display, a bar per step.

Progress is read from the work folder (a partition counts when its file is written), so it
looks the same whatever executor runs the steps. On a terminal: a rich bar per step with items
done, items/s and the time left. Elsewhere (a log file, CI): one line per running step every
``LINE_EVERY`` seconds.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from datakit.store import ITEMS, WorkDir

POLL_S = 1.0
LINE_EVERY = 10.0


class Display:
    def __init__(self, work: WorkDir, steps: list[str], enabled: bool = True, console: Console | None = None):
        self.work = work
        self.steps = steps
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.watched: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: Progress | None = None
        self._tasks: dict[str, int] = {}
        self._started: dict[str, tuple[float, int]] = {}
        self._sizes: list[int] = []
        self._printed: dict[str, int] = {}  # non-TTY: the count each step's last line showed

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self):
        if not self.enabled:
            return self
        self._sizes = self._partition_sizes()
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description:<13}"), BarColumn(), MofNCompleteColumn(), TextColumn("items"),
                TextColumn("{task.fields[rate]:>9}"), TimeRemainingColumn(), console=self.console,
            )  # fmt: skip
            for step in self.steps:
                self._tasks[step] = self._progress.add_task(step, total=sum(self._sizes), rate="")
            self._progress.start()
        self._thread = threading.Thread(target=self._loop, name="datakit-display", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._refresh(final=True)
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def watching(self, steps: list[str]):
        """Steps now running: their progress is shown (non-TTY lines name only these)."""
        if not self.enabled:
            yield
            return
        self.watched = list(steps)
        now = time.time()
        for step in steps:
            self._started[step] = (now, self._items_done(step))
        try:
            yield
        finally:
            self._refresh()
            self.watched = []

    # ---------------------------------------------------------------- polling

    def _partition_sizes(self) -> list[int]:
        """Items per partition: all full but the last (as the items were cut), from the totals."""
        try:
            info = json.loads(self.work.success_path(ITEMS).read_text())
        except (OSError, ValueError):
            return []
        parts, items = int(info["partitions"]), int(info["items"])
        size = -(-items // parts) if parts else 0
        return [max(0, min(size, items - p * size)) for p in range(parts)]

    def _items_done(self, step: str) -> int:
        return sum(self._sizes[p] for p in self.work.done_parts(step) if p < len(self._sizes))

    def _loop(self) -> None:
        last_line = time.time()
        while not self._stop.wait(POLL_S):
            if self._progress is not None:
                self._refresh()
            elif time.time() - last_line >= LINE_EVERY:
                self._refresh()
                last_line = time.time()

    def _refresh(self, final: bool = False) -> None:
        total = sum(self._sizes)
        for step in list(self.watched):
            done = self._items_done(step)
            t0, done0 = self._started.get(step, (time.time(), 0))
            elapsed = max(1e-6, time.time() - t0)
            rate = (done - done0) / elapsed
            if self._progress is not None:
                self._progress.update(self._tasks[step], completed=done, rate=f"{rate:.1f}/s" if rate else "")
            elif not final and self._printed.get(step) != done:
                self._printed[step] = done
                eta = (total - done) / rate if rate > 0 else None
                left = f", {eta:.0f} s left" if eta is not None else ""
                self.console.print(f"{step}: {done}/{total} items, {rate:.1f} items/s{left}", highlight=False)
        if self._progress is not None:
            for step in self.steps:  # steps a resumed run finds done
                if step not in self.watched and self.work.is_done(step):
                    self._progress.update(self._tasks[step], completed=total)
