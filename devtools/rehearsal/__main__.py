"""Scale and fault rehearsal on a real two-node Ray cluster on this machine.

``python -m devtools.rehearsal`` (``make rehearsal``) starts a Ray head and a second Ray node
(``ray start --head`` / ``ray start --address``, one CPU each, separate temp folders and ports),
serves fixture photos under distinct URLs (plus a share of the downloader's fault routes) from
two local HTTP server processes, and runs ``datakit run --address`` against that cluster:

1. a clean run, sampling the resident memory of every process of the cluster;
2. the same recipe again into a second folder while faults are injected: the HTTP server of
   one source is stopped for a while and started again on the same port; the worker node is
   killed (its raylet and every process under it) mid-stage and started again; the driver is
   killed with SIGKILL and the run started again; one parquet write fails (the faulty build
   writes through ``devtools.flakyfs``, a file system that fails one write on demand): the
   engine retries the write, and
   a run that fails anyway is started again. A stage that makes no progress for the recipe's
   ``ray.stall_timeout`` (60 s here, 30 s in the test's small build; a call can wait forever
   on an actor of a lost node)
   is restarted by datakit's own watchdog (``datakit.watchdog``); the rehearsal kills a
   driver that makes no progress for ``stall_s`` (300 s) only as a backstop;
3. the two builds are compared: every manifest (``*.parquet`` of the output folder) has the
   same rows and values, every tar shard has the same sha256, and ``datakit verify`` passes.

What "identical" means here: every column of every manifest is equal except
``images.parquet:attempts``, which records how many requests this build made for an item.
A partition that is downloaded again after a kill, or an item that was retried while its
server was down, honestly needs a different number of requests; the rehearsal reports how
many rows differ in ``attempts`` and checks that each of them has the same outcome. The
server outage is shorter than the download retry window (``retries`` with doubling
``backoff_s``), so the affected items are fetched on a retry. An outage longer than that
window ends those items as ``connection_error`` rows, which a resume does not fetch again:
the build would complete and account for every item, but it would not equal the clean one.

The rehearsal also prints peak memory at two sizes, the object store's spilled bytes, the
measured per-item cost of each stage and a projection to 960k images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from datakit import registry
from devtools.rehearsal.servers import ALL_STAGES, FixedPortServer, photo_folders, write_recipe
from devtools.rehearsal.cluster import ray_cluster
from devtools.rehearsal.driver import run_clean, run_with_faults
from devtools.rehearsal.compare import compare_builds, verify
from devtools.rehearsal.costs import paper_model_costs, projection, stage_costs


# ---------------------------------------------------------------- the rehearsal


def rehearse(root: Path, items: int, stages: list[str], partition_size: int, faults: bool = True,
             outage_s: float = 2.0, label: str = "", stall_timeout: float = 60) -> dict:
    """Clean build (+ memory) and, with ``faults``, a faulty build compared with it.
    ``stall_timeout``: the recipe's ``ray.stall_timeout``; a small build's partitions finish in
    seconds, so its test waits less for the stage that lost its node."""
    root.mkdir(parents=True, exist_ok=True)
    fail_flag = root / "fail-next-write"
    servers = [FixedPortServer(f) for f in photo_folders()]
    result: dict = {"items": items, "stages": stages, "label": label}
    try:
        for s in servers:
            s.start()
        recipe = write_recipe(root / "recipe", servers, items, stages, partition_size, fail_flag=fail_flag,
                              stall_timeout=stall_timeout)
        with ray_cluster() as cluster:
            print(f"[{label}] {items} items, stages {','.join(stages)}, cluster {cluster.address}", flush=True)
            clean = run_clean(recipe, root / "clean", cluster, root / "clean.log")
            spilled, _ = cluster.spilled_bytes()
            result.update(clean_wall_s=clean["wall_s"], peak_rss=clean["peak_rss"], spilled_bytes=spilled)
            print(f"[{label}] clean build: {clean['wall_s']:.1f} s, {items / clean['wall_s']:.1f} items/s "
                  f"({items / clean['wall_s'] / 2:.1f} per node), peak RSS of Ray processes "
                  f"{clean['peak_rss'] / 2**20:.0f} MiB, spilled {_mib(spilled)}", flush=True)
            if faults:
                for s in servers:  # fresh servers (same ports): stateful fault routes start over
                    s.stop()
                    s.start()
                log = run_with_faults(recipe, root / "faulty", cluster, servers, fail_flag, root / "faulty.log",
                                      outage_s=outage_s)
                result.update(fault_events=log.events, fault_runs=log.attempts)
        result["leftover_processes"] = len(cluster.processes())
        result["costs"] = stage_costs(root / "clean")
        if faults:
            result["compare"] = compare_builds(root / "clean", root / "faulty")
            # verify checks a finished build with shards; a build without the shard stage has none
            finished = "shard" in stages
            result["verify"] = verify(root / "faulty")[0] if finished else None
            result["verify_clean"] = verify(root / "clean")[0] if finished else None
    finally:
        for s in servers:
            s.stop()
    (root / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _mib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.rehearsal", description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=20_000, help="items of the large run")
    parser.add_argument("--small-items", type=int, default=5_000, help="items of the memory comparison run")
    parser.add_argument("--face-items", type=int, default=1_000, help="items of the full-pipeline (face) run")
    parser.add_argument("--partition-size", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder, removed)")
    parser.add_argument("--report-only", action="store_true", help="print the report of an earlier --work folder")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like an exception, so the cluster and the servers are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.report_only:
        if args.work is None:
            parser.error("--report-only needs --work")
        small, large, face = (json.loads((args.work / n / "result.json").read_text()) for n in ("small", "large", "faces"))
        return 0 if report(small, large, face) else 1
    work = args.work or Path(tempfile.mkdtemp(prefix="datakit-rehearsal-"))
    t0 = time.time()
    scale = ["download", "dedup"]
    try:
        small = rehearse(work / "small", args.small_items, scale, args.partition_size, faults=False, label="memory")
        large = rehearse(work / "large", args.items, scale, args.partition_size, label="scale")
        face = rehearse(work / "faces", args.face_items, ALL_STAGES, max(16, args.partition_size // 8), label="faces")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    ok = report(small, large, face)
    print(f"rehearsal {'PASSED' if ok else 'FAILED'} in {(time.time() - t0) / 60:.1f} min")
    return 0 if ok else 1


def report(small: dict, large: dict, face: dict) -> bool:
    ok = True
    print("\n== memory (peak RSS summed over every process of both Ray nodes, sampled every 0.5 s)")
    for r in (small, large):
        print(f"  {r['items']:>6} items: {r['peak_rss'] / 2**20:7.0f} MiB   object store spilled: "
              f"{_mib(r['spilled_bytes'])}")
    print(f"  ratio {large['items'] / small['items']:.0f}x items -> {large['peak_rss'] / max(1, small['peak_rss']):.2f}x memory")
    print("\n== throughput (clean builds, 2 nodes x 1 CPU)")
    for r in (small, large, face):
        print(f"  {r['label']:<7} {r['items']:>6} items {','.join(r['stages'])}: {r['clean_wall_s']:.1f} s wall, "
              f"{r['items'] / r['clean_wall_s'] / 2:.1f} items/s per node")
    for r in (large, face):
        c = r["compare"]
        print(f"\n== faults [{r['label']}]: {r['fault_runs']} driver runs; " + "; ".join(r["fault_events"]))
        print(f"  manifests compared: {', '.join(c['manifests'])}; tar shards: {c['tars']}; rows whose "
              f"download attempts differ (same outcome): {c['attempts_differ']}")
        if r["verify"] is None:
            print("  datakit verify: not applicable (no shard stage in this build)")
        else:
            print(f"  datakit verify: clean exit {r['verify_clean']}, faulty exit {r['verify']}")
        for p in c["problems"]:
            print(f"  DIFFERENCE {p}")
        ok = ok and not c["problems"] and r["verify"] in (0, None) and r["verify_clean"] in (0, None)
    costs = dict(face["costs"])
    costs.update({k: v for k, v in large["costs"].items() if k in ("download", "dedup")})
    print("\n== measured per-item worker time (download, dedup from the scale run; the rest from the face run)")
    for name in registry.STEPS:
        if name in costs:
            c = costs[name]
            print(f"  {name:<11} {1000 * c['s_per_item']:8.2f} ms/item  ({c['items_in']} items in, "
                  f"{100 * c['survival']:.0f}% of the input)")
    print()
    for line in projection(costs, paper=paper_model_costs()):
        print(line)
    return ok


if __name__ == "__main__":
    sys.exit(main())
