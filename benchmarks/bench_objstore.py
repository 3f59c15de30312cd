"""Reading a build's work folder from object storage (`make bench-objstore`).

The end of a build (images.parquet) and each global stage read every partition's files: on an
object store each read is a round trip. datakit keeps ``store.REMOTE_READERS`` (16) partition
reads in flight; the baseline, side by side, reads one partition after the other (the same
code with a window of 1). Both read the same ``--parts`` partitions (items + one stage file
each, 256 rows) from a moto S3 server running in its own process on 127.0.0.1.

A local moto server answers in a millisecond or two and shares this machine's cores with the
client, so the ratio here understates what a real store's network round trips (tens of ms)
would give; it shows the window works and costs nothing.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import pyarrow as pa


def wait_for(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server on port {port} did not start")


def fill(work, parts: int, rows: int) -> None:
    from datakit.store import ITEMS, atomic_write_table

    for part in range(parts):
        ids = [f"{part:05d}-{i}" for i in range(rows)]
        atomic_write_table(work.part_path(ITEMS, part), pa.table({"image_id": ids, "status": ["kept"] * rows}))
        work.write_part("download", part, pa.table({"image_id": ids, "width": list(range(rows))}), {"part": part})
    work.mark_done(ITEMS, {"partitions": parts})


def timed_read(work, readers: int) -> float:
    from datakit import store

    store.REMOTE_READERS = readers
    t0 = time.perf_counter()
    table = work.read_all(["download"])
    seconds = time.perf_counter() - t0
    assert table.num_rows == work.num_parts() * 256
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import s3fs

    from devtools.rehearsal.servers import free_port
    from datakit.store import REMOTE_READERS, WorkDir

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(port)
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
        s3fs.S3FileSystem(**options).mkdir("bench")
        work = WorkDir("s3://bench/build", options)
        fill(work, args.parts, 256)
        windowed, sequential = [], []
        for _ in range(args.repeats):
            sequential.append(timed_read(work, 1))
            windowed.append(timed_read(work, REMOTE_READERS))
    finally:
        server.terminate()
        server.wait(10)
    best_seq, best_win = min(sequential), min(windowed)
    print(f"read_all of {args.parts} partitions (2 objects each) from moto S3, best of {args.repeats}:")
    print(f"  datakit, {REMOTE_READERS} partitions in flight: {best_win:6.2f} s  ({2 * args.parts / best_win:6.1f} objects/s)")
    print(f"  baseline, one after the other:  {best_seq:6.2f} s  ({2 * args.parts / best_seq:6.1f} objects/s)")
    print(f"  ratio: {best_seq / best_win:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
