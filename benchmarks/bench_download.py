"""Download benchmark: datakit's download stage against img2dataset, same server, same URLs.

    make bench-download                      # or: .venv/bin/python benchmarks/bench_download.py
    .venv/bin/python benchmarks/bench_download.py --n 6000 --rounds 3

One local server (devtools.photoserver.PhotoServer in its own process) serves the dev
fixture photos (../shared/fixtures/faces/dev: JPEG and PNG, 112 px to 2500 px). Each photo is
listed many times under distinct URLs (``?copy=N``) to make N URLs. Then, in the same run:

* datakit: ``DownloadStage.process`` on Ray, one task per partition, 2 partitions in parallel
  (default settings: 64 requests in flight per task, 16 per host). Every body is hashed (sha256)
  and decoded by ``decode.check_image`` (Pillow; JPEGs entropy-decoded in full, inverse DCT at
  1/8 scale); each task writes its partition, image bytes included, as parquet. A second row,
  ``full_decode``, decodes every image at full scale (``decode_image``), like img2dataset.
* img2dataset (installed into .venv-bench by benchmarks/img2dataset_venv.sh if missing):
  2 processes x 32 threads, webdataset output, ``resize_mode=no`` with ``skip_reencode=True``
  (it decodes each image with OpenCV and writes the original bytes, like us), sha256 hashes.
* ``datakit run`` on a generated recipe with only the download stage (end to end: Ray start,
  item enumeration, checkpointed partitions, manifests), unless ``--no-runner``.

Printed per round: images fetched, seconds, images/s and the ratio to img2dataset. Times start
after each tool's imports (ray.init and a warm-up task for datakit; the import of img2dataset),
and include process-pool start-up for img2dataset (spawned per run, as in its normal use). The
shard-time column is img2dataset's own measure (first shard start to last shard end). Ray runs
its workers at niceness 15; img2dataset is run at the same niceness, so that on a shared machine
both get the same share of the CPU. CPU ms/image (the tool's own processes) is the figure least
disturbed by other load.
Afterwards every datakit row is checked: kept, and its sha256 equal to the served file's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devtools.photoserver import PhotoServer  # noqa: E402

DEFAULT_PHOTOS = REPO.parent / "shared" / "fixtures" / "faces" / "dev"
BENCH_VENV = REPO / ".venv-bench"

I2D_DRIVER = '''
import json, resource, sys, time
def cpu():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
if __name__ == "__main__":
    from img2dataset import download
    config = json.loads(sys.argv[1])
    c0, t0 = cpu(), time.perf_counter()
    download(**config)  # its worker pool is joined on return, so its CPU counts as children's
    print("BENCH_RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "cpu": cpu() - c0}), flush=True)
'''


# ---------------------------------------------------------------- inputs

def list_photos(folder: Path) -> list[str]:
    photos = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                    if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        sys.exit(f"no photos under {folder}; pass --photos DIR")
    return photos


def make_urls(server: PhotoServer, photos: list[str], n: int) -> list[tuple[str, str]]:
    """n distinct URLs, (url, photo path); photo i % len(photos), copy i // len(photos)."""
    return [(server.file_url(photos[i % len(photos)], copy=i // len(photos)), photos[i % len(photos)])
            for i in range(n)]


def items_table(urls: list[tuple[str, str]]) -> pa.Table:
    n = len(urls)
    return pa.table({
        "image_id": [f"{i:08d}" for i in range(n)], "source": ["bench"] * n, "source_kind": ["urls"] * n,
        "locator": [u for u, _ in urls], "label": [None] * n, "extra": [None] * n,
        "fetch_uri": [u for u, _ in urls], "status": ["kept"] * n, "drop_stage": [None] * n,
        "reason": [None] * n, "detail": [None] * n,
    })


# ---------------------------------------------------------------- datakit on Ray

def _download_partition(table: pa.Table, settings: dict, out_path: str) -> dict:
    import resource

    from datakit.engine.steps import decide
    from datakit.stages.download import DownloadStage, Settings
    from datakit.store import atomic_write_table

    def cpu():
        usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this worker
        return usage.ru_utime + usage.ru_stime

    c0 = cpu()
    out = decide(DownloadStage(Settings(**settings), {}), table)
    atomic_write_table(Path(out_path), out)
    status = out.column("status").to_pylist()
    return {"kept": status.count("kept"), "dropped": status.count("dropped"), "cpu": cpu() - c0,
            "niceness": os.nice(0)}


def run_datakit(urls, tasks: int, out_dir: Path, settings: dict) -> dict:
    import ray

    remote = ray.remote(num_cpus=1)(_download_partition)
    table = items_table(urls)
    size = math.ceil(table.num_rows / tasks)
    parts = [table.slice(i * size, size) for i in range(tasks)]
    refs = [ray.put(p) for p in parts]  # the items are in the object store before the clock starts
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = ray.get([remote.remote(ref, settings, str(out_dir / f"part-{i:05d}.parquet"))
                       for i, ref in enumerate(refs)])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ok": sum(r["kept"] for r in results), "failed": sum(r["dropped"] for r in results),
            "cpu": sum(r["cpu"] for r in results), "niceness": results[0]["niceness"]}


def warm_up_ray(server: PhotoServer, photos: list[str], settings: dict, tmp: Path) -> int:
    """Start Ray and run one small task per CPU, so imports and worker start-up are not timed.
    Returns the niceness Ray's workers run at."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    remote = ray.remote(num_cpus=1)(_download_partition)
    table = items_table(make_urls(server, photos, 20))
    results = ray.get([remote.remote(table, settings, str(tmp / f"warm-{i}.parquet")) for i in range(2)])
    return results[0]["niceness"]


def verify_datakit(out_dir: Path, urls, photo_dir: Path) -> str:
    table = pq.read_table(sorted(out_dir.glob("part-*.parquet")), columns=["image_id", "status", "sha256", "reason",
                                                                        "detail"])
    expected = {}
    problems = []
    for row in table.to_pylist():
        i = int(row["image_id"])
        rel = urls[i][1]
        if rel not in expected:
            expected[rel] = hashlib.sha256((photo_dir / rel).read_bytes()).hexdigest()
        if row["status"] != "kept":
            problems.append(f"{urls[i][0]}: {row['reason']} {row['detail']}")
        elif row["sha256"] != expected[rel]:
            problems.append(f"{urls[i][0]}: sha256 differs from the served file")
    if table.num_rows != len(urls):
        problems.append(f"{table.num_rows} rows for {len(urls)} URLs")
    return "all rows kept, every sha256 matches" if not problems else f"{len(problems)} problems, e.g. {problems[0]}"


# ---------------------------------------------------------------- img2dataset

def ensure_img2dataset() -> Path:
    python = BENCH_VENV / "bin" / "python"
    subprocess.run(["sh", str(REPO / "benchmarks" / "img2dataset_venv.sh")], check=True)
    return python


def run_img2dataset(python: Path, urls, out_dir: Path, processes: int, threads: int, niceness: int) -> dict:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    url_list = out_dir.parent / f"{out_dir.name}-urls.txt"
    url_list.write_text("".join(u + "\n" for u, _ in urls))
    driver = out_dir.parent / "img2dataset_driver.py"
    driver.write_text(I2D_DRIVER)
    config = dict(url_list=str(url_list), input_format="txt", output_folder=str(out_dir),
                  output_format="webdataset", processes_count=processes, thread_count=threads,
                  resize_mode="no", skip_reencode=True, number_sample_per_shard=math.ceil(len(urls) / processes),
                  timeout=10, retries=0, compute_hash="sha256", enable_wandb=False,
                  distributor="multiprocessing")
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    log = out_dir.parent / f"{out_dir.name}.log"
    with open(log, "w") as f:
        # At the niceness Ray gives its workers, so that on a busy machine both tools get the
        # same share of the CPU.
        proc = subprocess.run([str(python), str(driver), json.dumps(config)], stdout=subprocess.PIPE,
                              stderr=f, text=True, env=env, cwd=out_dir.parent,
                              preexec_fn=lambda: os.nice(niceness - os.nice(0)))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"img2dataset failed (exit {proc.returncode}); see {log}")
    result = json.loads(line.split(" ", 1)[1])
    stats = [json.loads(p.read_text()) for p in out_dir.glob("*_stats.json")]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return {"seconds": result["seconds"], "cpu": result["cpu"], "shard_seconds": span,
            "ok": sum(s["successes"] for s in stats),
            "failed": sum(s["count"] - s["successes"] for s in stats)}


# ---------------------------------------------------------------- datakit run (end to end)

def run_datakit_cli(urls, out_dir: Path, tasks: int, settings: dict) -> dict:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    csv = out_dir / "urls.csv"
    csv.write_text("url\n" + "".join(u + "\n" for u, _ in urls))
    stage = {**settings, "concurrency": tasks}
    recipe = {
        "name": "bench-download",
        "output": str(out_dir / "build"),
        "sources": [{"name": "bench", "kind": "urls", "path": str(csv), "url_column": "url"}],
        "ray": {"num_cpus": 2, "partition_size": math.ceil(len(urls) / tasks)},
        "stages": {"download": stage},
    }
    recipe_path = out_dir / "recipe.yaml"
    recipe_path.write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    log = out_dir / "run.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "datakit", "run", str(recipe_path), "--quiet"],
                              stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"datakit run failed (exit {proc.returncode}); see {log}")
    manifest = pq.read_table(out_dir / "build" / "images.parquet", columns=["status"])
    status = manifest.column("status").to_pylist()
    return {"seconds": seconds, "ok": status.count("kept"), "failed": status.count("dropped")}


# ---------------------------------------------------------------- report

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="URLs per run (default 3000)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat both tools this many times")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of photos to serve")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "download")
    parser.add_argument("--tasks", type=int, default=2, help="datakit: parallel Ray tasks (partitions)")
    parser.add_argument("--processes", type=int, default=2, help="img2dataset: processes")
    parser.add_argument("--threads", type=int, default=32, help="img2dataset: threads per process")
    parser.add_argument("--per-host", type=int, default=16, help="datakit: per_host_concurrency")
    parser.add_argument("--decode-threads", type=int, default=None, help="datakit: decode_threads (default: the stage's)")
    parser.add_argument("--no-full-decode", action="store_true", help="skip the datakit run with full_decode")
    parser.add_argument("--no-img2dataset", action="store_true", help="skip the baseline")
    parser.add_argument("--no-runner", action="store_true", help="skip the end-to-end `datakit run`")
    args = parser.parse_args(argv)

    if not args.photos.is_dir():
        sys.exit(f"photo folder {args.photos} not found (the shared fixtures sit beside the repo); "
                 "pass --photos DIR")
    photos = list_photos(args.photos)
    settings = {"allow_private_addresses": True, "per_host_concurrency": args.per_host}
    if args.decode_threads:
        settings["decode_threads"] = args.decode_threads
    i2d_python = None if args.no_img2dataset else ensure_img2dataset()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int, dict]] = []

    with PhotoServer(args.photos, in_process=False) as server:
        urls = make_urls(server, photos, args.n)
        print(f"{args.n} URLs of {len(photos)} photos from {args.photos}, served at {server.base_url}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        niceness = warm_up_ray(server, photos, settings, args.out)
        i2d_fixed = None
        if i2d_python is not None:
            # img2dataset's fixed cost (spawning and importing its pool): a run of 20 URLs, so that
            # the report can give its CPU per image beyond that fixed cost.
            small = run_img2dataset(i2d_python, urls[:20], args.out / "img2dataset-small", args.processes,
                                    args.threads, niceness)
            i2d_fixed = small
        for r in range(args.rounds):
            dk = run_datakit(urls, args.tasks, args.out / f"datakit-{r}", settings)
            rows.append(("datakit (Ray tasks)", r, dk))
            print(f"round {r}: datakit      {dk['ok']}/{args.n} in {dk['seconds']:.2f} s", flush=True)
            if not args.no_full_decode:
                full = run_datakit(urls, args.tasks, args.out / f"datakit-full-{r}", {**settings, "full_decode": True})
                rows.append(("datakit full_decode", r, full))
                print(f"round {r}: datakit full {full['ok']}/{args.n} in {full['seconds']:.2f} s", flush=True)
            if i2d_python is not None:
                i2d = run_img2dataset(i2d_python, urls, args.out / f"img2dataset-{r}", args.processes, args.threads,
                                      niceness)
                rows.append(("img2dataset", r, i2d))
                print(f"round {r}: img2dataset  {i2d['ok']}/{args.n} in {i2d['seconds']:.2f} s "
                      f"(shards {i2d['shard_seconds']:.2f} s)", flush=True)
        check = verify_datakit(args.out / "datakit-0", urls, args.photos)
        import ray

        ray.shutdown()
        if not args.no_runner:
            try:
                cli = run_datakit_cli(urls, args.out / "datakit-run", args.tasks, settings)
                rows.append(("datakit run (end to end)", 0, cli))
            except (RuntimeError, OSError) as e:
                print(f"datakit run: not measured: {e}", flush=True)

    report(rows, args, check, i2d_fixed)
    return 0


def report(rows, args, check: str, i2d_fixed: dict | None = None) -> None:
    def rate(d, key="seconds"):
        return d["ok"] / d[key] if d.get(key) else float("nan")

    def median_rate(name, key="seconds"):
        values = [rate(d, key) for n, _, d in rows if n == name]
        return statistics.median(values) if values else None

    def cpu_ms(d):
        return f"{1000 * d['cpu'] / d['ok']:.2f}" if d.get("cpu") and d["ok"] else "-"

    base = median_rate("img2dataset")
    print()
    print(f"download benchmark: {args.n} URLs, datakit {args.tasks} Ray tasks x 64 requests "
          f"({args.per_host} per host), img2dataset {args.processes} processes x {args.threads} threads")
    print(f"{'tool':28} {'round':>5} {'ok':>6} {'failed':>6} {'seconds':>8} {'images/s':>9} {'vs img2dataset':>15} "
          f"{'CPU ms/image':>13}")
    for name, r, d in rows:
        ratio = f"{rate(d) / base:.2f}x" if base else "-"
        print(f"{name:28} {r:>5} {d['ok']:>6} {d['failed']:>6} {d['seconds']:>8.2f} {rate(d):>9.0f} {ratio:>15} "
              f"{cpu_ms(d):>13}")
        if "shard_seconds" in d:
            print(f"{'  img2dataset shard time':28} {r:>5} {'':>6} {'':>6} {d['shard_seconds']:>8.2f} "
                  f"{rate(d, 'shard_seconds'):>9.0f}")
    if base:
        shard = median_rate("img2dataset", "shard_seconds")
        for name in ("datakit (Ray tasks)", "datakit full_decode"):
            ours = median_rate(name)
            if ours:
                print(f"median images/s: {name} {ours:.0f} = {ours / base:.2f}x img2dataset's {base:.0f} "
                      f"(and {ours / shard:.2f}x its shard-time rate {shard:.0f})")
    i2d_rows = [d for n, _, d in rows if n == "img2dataset"]
    if i2d_fixed and i2d_rows:
        marginal = statistics.median((d["cpu"] - i2d_fixed["cpu"]) / (d["ok"] - i2d_fixed["ok"]) for d in i2d_rows)
        print(f"img2dataset CPU beyond its fixed cost ({i2d_fixed['cpu']:.2f} s for a 20-URL run): "
              f"{1000 * marginal:.2f} ms/image")
    nice = next((d["niceness"] for n, _, d in rows if "niceness" in d), None)
    print(f"both tools ran at niceness {nice} (Ray's worker niceness); ", end="")
    print("CPU ms/image counts the tool's own processes (Ray tasks; img2dataset's driver and pool), "
          "not the server's or Ray's daemons.")
    print(f"datakit check: {check}")


if __name__ == "__main__":
    sys.exit(main())
