"""Face stages on Ray against a plain loop (`make bench-faces`).

Default (``--mode product``): what ``datakit run`` does. The dev photos, repeated to ``--items``,
are laid out as a folder source (VGGFace2-HQ layout) and built by ``python -m datakit run`` with a
recipe of download, detect, filter and embed (the demo's per-stage CPU shares), in its own
process: timed from process start to exit, Ray start-up included; Ray's start-up is also timed
apart (a fresh process running ``ray.init``) and a figure "once started" leaves it out; the time
to the last embedding written (the newest embed partition file; the manifests and Ray's shutdown
come after it) is printed too, as bench-download counts to the last image written. Against
it, the plain loop below in one process and in two processes (each half of the photos), each
timed the same way. For every run: images/s, cores used (CPU time of the whole process tree /
wall, sampled with psutil every 0.2 s) and peak memory (sum of the tree's RSS); then the ratios.

``--mode fused`` / ``--mode stages``: the older in-process comparison, described next.

The dev photos of ../shared/fixtures/faces, repeated to ``--items`` (default 2000), go through
detect + landmarks + filter + embed twice, in one run:

- plain: one process, a loop a researcher would write around the same dlib models (HOG
  detector on the same detection copy, 68-point landmarks, the 10% rule, 5-point alignment,
  the 128-d ResNet, a 256 px crop as JPEG); it decodes once and checks only area and dominance,
  so it does a little less work than the stages (which decode in detect and again in embed, and
  measure sharpness);
- ray: this project's stage classes (datakit.stages.detect / filter / embed) in Ray Data
  ``map_batches`` actor pools with fractional ``num_cpus`` (whole-CPU pools can deadlock a 2-CPU
  machine), each actor loading its models once. ``--mode fused`` (default): one pool of
  ``--workers`` actors, each running the three stages on its batches; ``--mode stages``: a pool
  per stage, as datakit's runner lays them out (five worker processes to start instead of two).

Prints images/s of each, the ratio (goal: >= 1.8x on 2 cores), and each step's share of the
time. ``ray.init`` is timed apart; actor start-up and model loading count in the Ray time.

Then the per-image CPU cost of the models (``--skip-models`` to leave it out, ``--models-only``
for it alone): dlib's HOG detector and ResNet on the dev photos, beside the paper-scale models
(SCRFD-10G, ArcFace R50 and R100) exported with random weights by devtools/face_model_zoo.py and
run on onnxruntime, one image and a batch at a time, on one thread (a core's cost). Their
parameter counts and multiply-accumulates are printed beside the published figures. The costs
are written to bench-out/model_costs.json, where the rehearsal's 960k projection reads them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEV = REPO.parent / "shared" / "fixtures" / "faces" / "dev"
MODEL_COSTS = REPO / "bench-out" / "model_costs.json"
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
CPU = "cpu seconds"  # process CPU time, to see how much of a core each run really got


def dev_files() -> list[Path]:
    files = sorted(p for p in DEV.glob("*/*") if p.suffix.lower() in SUFFIXES)
    if not files:
        sys.exit(f"no dev photos under {DEV} (the shared/ folder must sit beside the repo)")
    return files


def load_items(n: int) -> list[bytes]:
    blobs = [p.read_bytes() for p in dev_files()]
    return [blobs[i % len(blobs)] for i in range(n)]


# ---------------------------------------------------------------- the plain loop


def plain_loop(items: list[bytes]) -> dict:
    """What a researcher would write: the same dlib models, one image after another."""
    import cv2
    import dlib
    from PIL import Image, ImageOps

    from portrait.faces.dlib_backend import packaged_model_dir

    models = packaged_model_dir()
    t_start = time.perf_counter()
    detector = dlib.get_frontal_face_detector()
    sp68 = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
    sp5 = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    resnet = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    seconds = defaultdict(float)
    seconds["load models"] = time.perf_counter() - t_start
    cpu0 = time.process_time()
    kept, finished = 0, []
    for data in items:
        t0 = time.perf_counter()
        img = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        h, w = img.shape[:2]
        t1 = time.perf_counter()
        longer = max(h, w)
        scale = 640 / longer if longer > 640 else (200 / longer if longer < 200 else 1.0)
        small = cv2.resize(img, (round(w * scale), round(h * scale))) if scale != 1.0 else img
        rects, offset = detector(small, 0), 0
        if not rects:
            offset = round(0.25 * max(small.shape[:2]))
            rects = detector(cv2.copyMakeBorder(small, *[offset] * 4, cv2.BORDER_REPLICATE), 0)
        if not rects:
            offset, rects, scale = 0, detector(cv2.resize(small, None, fx=2.0, fy=2.0), 0), scale * 2
        boxes = [
            dlib.rectangle(*(round((v - offset) / scale) for v in (r.left(), r.top(), r.right(), r.bottom())))
            for r in rects
        ]
        t2 = time.perf_counter()
        shapes = [sp68(img, b) for b in boxes]
        t3 = time.perf_counter()
        keep = False
        if boxes:
            areas = sorted((b.width() * 0.94 * b.height() * 1.40 for b in boxes), reverse=True)
            keep = areas[0] >= 0.10 * h * w and (len(areas) == 1 or areas[0] >= 2 * areas[1])
            subject = max(boxes, key=lambda b: b.area())
        t4 = time.perf_counter()
        if keep:
            shape5 = sp5(img, subject)
            chip = dlib.get_face_chip(img, shape5, size=150, padding=0.25)
            vector = np.array(resnet.compute_face_descriptor(chip))
            crop = dlib.get_face_chip(img, shape5, size=256, padding=0.25)
            buf = io.BytesIO()
            Image.fromarray(crop).save(buf, format="JPEG", quality=95)
            kept += 1
            del vector, shapes
        t5 = time.perf_counter()
        finished.append(time.time())
        seconds["decode"] += t1 - t0
        seconds["detect"] += t2 - t1
        seconds["landmarks"] += t3 - t2
        seconds["filter"] += t4 - t3
        seconds["embed"] += t5 - t4
    seconds[CPU] = time.process_time() - cpu0
    return {"wall": time.perf_counter() - t_start, "kept": kept, "seconds": dict(seconds), "finished": finished}


MIN_FIT_POINTS = 10


def steady_rate(events: list[tuple[float, int]], trim: float = 0.1) -> float:
    """Images/s once running: the least-squares slope of images finished against time, over the
    middle of the run (``trim`` of the span between the first and last event left off at each
    end), so neither start-up (Ray, workers, models) nor the last stragglers and the shutdown
    count. ``events``: (time, images finished then). Fewer than ``MIN_FIT_POINTS`` in the middle
    (a run of a few partitions) give nan: two partition files written a moment apart would read
    as hundreds of images/s."""
    events = sorted(events)
    first, last = events[0][0], events[-1][0]
    lo, hi = first + trim * (last - first), last - trim * (last - first)
    done, points = 0, []
    for t, n in events:
        done += n
        if lo <= t <= hi:
            points.append((t, done))
    if len(points) < MIN_FIT_POINTS:
        return float("nan")
    t, y = np.array(points, dtype=np.float64).T
    return float(np.polyfit(t - t[0], y, 1)[0])


# ---------------------------------------------------------------- the pipeline on Ray


class StagesActor:
    """One Ray worker: builds the named stages once (models loaded once), then runs each batch
    through them in order and reports the time each step took."""

    def __init__(self, names: list[str]):
        from datakit import registry

        self.stages = []
        for name in names:
            cls = registry.stage_class(name)
            stage = cls(cls.Settings(), {"faces": None})
            stage.setup()
            self.stages.append(stage)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from datakit.engine.steps import decide
        from datakit.store import overlay

        steps: dict[str, float] = defaultdict(float)
        cpu0 = time.process_time()
        for stage in self.stages:
            backend = getattr(stage, "backend", None)
            before = dict(getattr(backend, "timings", {}))
            t0 = time.perf_counter()
            batch = overlay(batch, decide(stage, batch))
            spent = time.perf_counter() - t0
            after = dict(getattr(backend, "timings", {}))
            for k in after:
                steps[k] += after[k] - before.get(k, 0.0)
            # time outside the backend's timed steps: decoding, sharpness, bookkeeping
            steps[f"{stage.name} (rest)" if after else stage.name] += spent - sum(
                after[k] - before.get(k, 0.0) for k in after
            )
        steps[CPU] = time.process_time() - cpu0
        column = "_seconds_" + "_".join(s.name for s in self.stages)
        cells = [json.dumps(steps)] + [None] * (batch.num_rows - 1)
        return batch.append_column(column, pa.array(cells, pa.string()))


def ray_pipeline(items: list[bytes], workers: int, batch_size: int, mode: str) -> dict:
    """``fused``: one pool of ``workers`` actors, each running detect, filter and embed;
    ``stages``: one pool per stage, as datakit's runner lays them out."""
    import ray

    table = pa.table({
        "image_id": [f"{i:06d}" for i in range(len(items))],
        "status": ["kept"] * len(items),
        "drop_stage": pa.nulls(len(items), pa.string()),
        "reason": pa.nulls(len(items), pa.string()),
        "detail": pa.nulls(len(items), pa.string()),
        "image_bytes": items,
    })  # fmt: skip
    t_start = time.perf_counter()
    ds = ray.data.from_arrow([table.slice(i, 64) for i in range(0, table.num_rows, 64)])
    if mode == "fused":
        pools = [(["detect", "filter", "embed"], workers, 0.9 / workers)]
    else:
        # Every actor of the three pools must fit in the 2 CPUs at once (2 x 0.45 + 0.05 +
        # 2 x 0.45), or the embed pool gets its second actor only when the detect pool is done.
        pools = [(["detect"], workers, 0.9 / workers), (["filter"], 1, 0.05), (["embed"], workers, 0.9 / workers)]
    for names, size, cpus in pools:
        ds = ds.map_batches(
            type("_".join(names), (StagesActor,), {}),
            batch_size=batch_size,
            batch_format="pyarrow",
            fn_constructor_kwargs={"names": names},
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=cpus,
        )
    seconds = defaultdict(float)
    rows = kept = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += batch.num_rows
        kept += sum(s == "kept" for s in batch.column("status").to_pylist())
        for col in batch.column_names:
            if col.startswith("_seconds_"):
                for cell in batch.column(col).to_pylist():
                    for k, v in json.loads(cell or "{}").items():
                        seconds[k] += v
    assert rows == len(items), f"{rows} rows came back for {len(items)} items"
    return {"wall": time.perf_counter() - t_start, "kept": kept, "seconds": dict(seconds)}


# ---------------------------------------------------------------- the product's layout, and the plain loop in processes


class TreeMonitor:
    """CPU time and peak memory of a process and all its descendants, sampled with psutil."""

    def __init__(self, pid: int, every: float = 0.2):
        import threading

        self.pid, self.every = pid, every
        self.cpu: dict[int, float] = {}
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            rss = 0
            for proc in procs:
                try:
                    times = proc.cpu_times()
                    self.cpu[proc.pid] = times.user + times.system
                    rss += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(self.every)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"cpu": sum(self.cpu.values()), "peak_gb": self.peak_rss / 1e9}


def run_monitored(cmds: list[list[str]], env: dict | None = None) -> dict:
    """Start the commands at once; wall time from start to the last exit, CPU and peak memory
    summed over their process trees, and what each printed last (a JSON line, or None)."""
    import subprocess

    started, t0 = time.time(), time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for cmd in cmds]
    monitors = [TreeMonitor(p.pid) for p in procs]
    outputs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    usage = [m.stop() for m in monitors]
    for p, (out, err) in zip(procs, outputs):
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmds[0][:4])} ... failed ({p.returncode}):\n{err[-2000:]}")
    last = [json.loads(out.strip().splitlines()[-1]) if out.strip().startswith("{") else None for out, _ in outputs]
    return {"wall": wall, "cpu": sum(u["cpu"] for u in usage), "peak_gb": sum(u["peak_gb"] for u in usage), "printed": last,
            "started": started}


def folder_source(files: list[Path], n: int, root: Path, web_size: bool = False) -> list[Path]:
    """``n`` photos in a folder source's layout (one folder per person), the dev photos repeated
    (hard links where the file system allows); with ``web_size`` each is re-saved as a JPEG
    whose longer side is 2000-3000 px (q90), as photos on the web come. Returns the paths."""
    from PIL import Image, ImageOps

    paths = []
    for i in range(n):
        src = files[i % len(files)]
        dst = root / src.parent.name / f"{i:06d}_{src.stem}{'.jpg' if web_size else src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if web_size:
            img = ImageOps.exif_transpose(Image.open(src)).convert("RGB")
            side = 2000 + (i * 137) % 1001
            img.resize((round(img.width * side / max(img.size)), round(img.height * side / max(img.size))),
                       Image.BICUBIC).save(dst, "JPEG", quality=90)
        else:
            try:
                os.link(src, dst)
            except OSError:
                dst.write_bytes(src.read_bytes())
        paths.append(dst)
    return paths


RECIPE = """\
name: bench-faces
output: {output}
sources:
  - name: photos
    kind: folder
    root: {root}
ray:
  partition_size: 32
  num_cpus: {cpus}
faces:
  backend: dlib
stages:
  download: {{num_cpus: 0.25}}
  detect: {{num_cpus: 0.45}}
  filter: {{num_cpus: 0.05, min_area_fraction: 0.10}}
  embed: {{num_cpus: 0.45}}
"""


def product_run(root: Path, work: Path, cpus: int) -> dict:
    recipe = work / "bench-faces.yaml"
    recipe.write_text(RECIPE.format(output=work / "out", root=root, cpus=cpus))
    run = run_monitored([[sys.executable, "-m", "datakit", "run", str(recipe), "--quiet", "--restart"]])
    import pyarrow.parquet as pq

    images = pq.read_table(work / "out" / "images.parquet", columns=["status"]).column("status").to_pylist()
    run["kept"] = images.count("kept")
    # the last embedding written (the newest embed partition file): the face stages' end, before
    # the manifests are written and Ray shuts down
    embedded = list((work / "out" / "_work" / "embed").rglob("*.parquet"))
    run["to_last"] = max(f.stat().st_mtime for f in embedded) - run["started"]
    # each embed partition file is written when its images are done: (time, images)
    run["steady"] = steady_rate([(f.stat().st_mtime, pq.read_metadata(f).num_rows) for f in embedded])
    return run


def ray_startup(cpus: int) -> float:
    """Seconds a fresh process takes to import datakit's engine and start a local Ray."""
    code = (f"import time; t=time.perf_counter(); import ray, datakit.engine.ray_executor; "
            f"ray.init(num_cpus={cpus}, include_dashboard=False, logging_level='ERROR', log_to_driver=False); "
            f"print(time.perf_counter()-t)")
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:  # Ray gives up starting on an overloaded machine ("timed out during startup")
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        sys.exit(f"Ray did not start (load average {os.getloadavg()[0]:.1f}): {last}")
    return float(done.stdout.strip().splitlines()[-1])


def plain_processes(paths: list[Path], processes: int, work: Path) -> dict:
    listing = work / "files.json"
    listing.write_text(json.dumps([str(p) for p in paths]))
    cmds = [[sys.executable, __file__, "--plain-worker", str(listing), "--part", str(i), "--parts", str(processes)]
            for i in range(processes)]
    run = run_monitored(cmds)
    run["kept"] = sum(p["kept"] for p in run["printed"])
    run["steady"] = steady_rate([(t, 1) for p in run["printed"] for t in p["finished"]])
    return run


def plain_worker(listing: str, part: int, parts: int) -> None:
    files = json.loads(Path(listing).read_text())[part::parts]
    result = plain_loop([Path(f).read_bytes() for f in files])
    print(json.dumps({"kept": result["kept"], "wall": result["wall"], "finished": result["finished"]}))


def product_comparison(items: int, web_size: bool = False, rounds: int = 1) -> None:
    import shutil
    import tempfile

    cpus = os.cpu_count() or 2
    work = Path(tempfile.mkdtemp(prefix="bench-faces-"))
    try:
        paths = folder_source(dev_files(), items, work / "photos", web_size)
        size = "re-saved at 2000-3000 px" if web_size else "as they are"
        print(f"{items} photos as a folder source (the {len(dev_files())} dev photos repeated, {size}), {cpus} CPUs; "
              f"load average {os.getloadavg()[0]:.1f} at the start")
        ratios = []
        for r in range(rounds):
            # the product and the two-process loop alternate, so a slow minute of the machine hits both
            startup = ray_startup(cpus)
            runs = {"datakit run": product_run(work / "photos", work, cpus)}
            if r == 0:
                runs["plain, 1 process"] = plain_processes(paths, 1, work)
            runs["plain, 2 processes"] = plain_processes(paths, 2, work)
            if rounds > 1:
                print(f"round {r + 1} of {rounds}:")
            ratios.append(report_round(runs, items, startup))
        if rounds > 1:
            medians = np.median(np.array(ratios), axis=0)
            print("median over the rounds, datakit run vs plain, 2 processes: "
                  + ", ".join(f"{m:.2f}x {n}" for n, m in zip(RATIOS, medians)))
        print("  (cores: CPU time of the process tree / wall; peak memory: summed RSS of the tree, which counts "
              "pages shared between Ray's processes more than once)")
        print("  (once started: wall minus Ray's start-up; once running: the slope of images finished over time in "
              "the middle 80% of each run, start-up, the first partition and the shutdown left out on both sides)")
        print(f"  (goals on a quiet 2-core machine: >= 1.5x the one-process loop end to end, >= 0.95x the "
              f"two-process loop once started); load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        shutil.rmtree(work, ignore_errors=True)


RATIOS = ("end to end", "once started", "to the last embedding written", "once running")


def report_round(runs: dict, items: int, startup: float) -> tuple[float, ...]:
    """Print one round; returns the ratios (``RATIOS``) against the two-process loop."""
    print(f"Ray start-up (import + ray.init in a fresh process, timed apart): {startup:.1f}s")
    for name, run in runs.items():
        line = (f"{name:19s}: {run['wall']:6.1f}s, {items / run['wall']:6.2f} images/s end to end, {run['kept']} kept; "
                f"{run['cpu'] / run['wall']:.2f} cores, {1000 * run['cpu'] / items:.0f} CPU ms per image; "
                f"peak memory {run['peak_gb']:.2f} GB; once running {run['steady']:.2f} images/s")
        if name == "datakit run":
            line += (f"; once started {items / max(run['wall'] - startup, 1e-9):.2f} images/s; last embedding "
                     f"written at {run['to_last']:.1f}s, then manifests and Ray's shutdown to exit")
        print(line)
    product = runs["datakit run"]

    def against(other: dict) -> tuple[float, ...]:
        return (other["wall"] / product["wall"], other["wall"] / max(product["wall"] - startup, 1e-9),
                other["wall"] / max(product["to_last"] - startup, 1e-9), product["steady"] / other["steady"])

    for name in ("plain, 1 process", "plain, 2 processes"):
        if name in runs:
            print(f"ratio vs {name:18s}: " + ", ".join(f"{r:.2f}x {n}" for n, r in zip(RATIOS, against(runs[name]))))
    return against(runs["plain, 2 processes"])


# ---------------------------------------------------------------- per-model costs


def dlib_costs(items: list[bytes], limit: int = 40) -> list[dict]:
    """CPU ms per image of dlib's HOG detector (on the 640 px detection copy) and per face of
    its ResNet (150 px aligned chip), on the first ``limit`` distinct photos."""
    import cv2
    import dlib
    from PIL import Image, ImageOps

    from portrait.faces.dlib_backend import packaged_model_dir

    models = packaged_model_dir()
    detector = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    resnet = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    det_cpu = emb_cpu = 0.0
    images = faces = 0
    for data in list(dict.fromkeys(items))[:limit]:
        img = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        scale = 640 / max(img.shape[:2])
        small = cv2.resize(img, None, fx=scale, fy=scale) if scale < 1 else img
        c0 = time.process_time()
        rects = detector(small, 0)
        det_cpu += time.process_time() - c0
        images += 1
        if rects:
            chip = dlib.get_face_chip(small, sp5(small, rects[0]), size=150, padding=0.25)
            c0 = time.process_time()
            resnet.compute_face_descriptor(chip)
            emb_cpu += time.process_time() - c0
            faces += 1
    return [
        {"label": "dlib HOG detector", "per": "image", "input": "640 px", "runs": [{"batch": 1, "cpu_ms": 1000 * det_cpu / max(images, 1)}]},
        {"label": "dlib ResNet (128-d)", "per": "face", "input": "150 px", "runs": [{"batch": 1, "cpu_ms": 1000 * emb_cpu / max(faces, 1)}]},
    ]


def model_costs(items: list[bytes]) -> dict:
    from devtools import face_model_zoo as zoo

    folder = REPO / "bench-out" / "model_zoo"
    out = {"load": os.getloadavg(), "dlib": dlib_costs(items), "paper": []}
    for name, batches in (("scrfd_10g_kps", (1, 8)), ("arcface_r50", (1, 16)), ("arcface_r100", (1, 16))):
        out["paper"].append(zoo.measure(name, folder, batches=batches))
    out["load_after"] = os.getloadavg()
    MODEL_COSTS.parent.mkdir(parents=True, exist_ok=True)
    MODEL_COSTS.write_text(json.dumps(out, indent=1))
    return out


def report_model_costs(costs: dict) -> None:
    print("\nper-model CPU cost, one thread (onnxruntime for the paper-scale models, random weights; dlib as used here)")
    print(f"{'model':22s} {'input':>9s} {'params M':>9s} {'GMACs':>7s} {'published':>22s} {'ms/unit, batch 1':>17s} {'batched':>16s}")
    for m in costs["dlib"] + costs["paper"]:
        runs = m["runs"]
        size = f"{m['input'][0]}x{m['input'][1]}" if isinstance(m["input"], list | tuple) else m["input"]
        params = f"{m['params_m']:.2f}" if "params_m" in m else "-"
        gmacs = f"{m['gmacs']:.2f}" if "gmacs" in m else "-"
        published = "-"
        if "published_gmacs" in m:
            hw = m["published_input"]
            published = (f"{m['gmacs_at_published_input']:.2f}/{m['published_gmacs']:g} G@{hw[1]}x{hw[0]}"
                         + (f" {m['published_params_m']:g}M" if m["published_params_m"] else ""))
        batched = f"{runs[-1]['cpu_ms']:.0f} (batch {runs[-1]['batch']})" if len(runs) > 1 else "-"
        print(f"{m['label']:22s} {size:>9s} {params:>9s} {gmacs:>7s} {published:>22s} "
              f"{runs[0]['cpu_ms']:>9.0f} /{m['per']:<6s} {batched:>16s}")
    print("  (published: ours/published GMACs at the published input size, and params; sources: "
          "insightface's SCRFD README (arXiv:2105.04714) and arcface_torch README)")
    print(f"  load average {costs['load'][0]:.1f} before, {costs['load_after'][0]:.1f} after, on {os.cpu_count()} CPUs: "
          "CPU ms count this process's own time, so load inflates them little; written to "
          f"{MODEL_COSTS.relative_to(REPO)}")


# ---------------------------------------------------------------- decode costs


def decode_costs(items: list[bytes], sides=(640, 2000, 4000), photos: int = 6, repeat: int = 3) -> list[dict]:
    """CPU ms per image to decode a JPEG for the face stages, before and after the reduced decode
    (portrait/decode.py): the detection copy alone (decode + shrink to 640 px), and a build's
    decodes of one kept image: before, detect, embed and attributes each decoded it in full;
    now they share one reduced decode (face_model.Photos); shard decodes it again and stores it
    at 1024 px. The dev photos are re-saved at each size (JPEG q90)."""
    from PIL import Image

    from datakit.stages.face_model import DecodedPhotos, Photos
    from portrait.decode import decode_image
    from portrait.faces import geometry

    def detection_copy(data: bytes, min_side):
        decoded = decode_image(data, min_side=min_side)
        rgb = np.asarray(decoded.image)
        return geometry.resize(rgb, geometry.detection_scale(*rgb.shape[:2], 200, 640))

    def stored(data: bytes, min_side):
        image = decode_image(data, min_side=min_side).image
        scale = 1024 / max(image.size)
        return image.resize((round(image.width * scale), round(image.height * scale)), resample=3) if scale < 1 else image

    def build(data: bytes, reduced: bool):
        if not reduced:  # before: detect, embed and attributes each decoded in full, shard again
            for _ in range(3):
                np.asarray(decode_image(data).image)
            return stored(data, None)
        shared = DecodedPhotos()  # now: the stages' own path, the worker's pixels shared by the three
        for _ in range(3):
            Photos([data], {}, shared).decode(0)
        return stored(data, 1024)

    rows = []
    for side in sides:
        blobs = []
        for data in list(dict.fromkeys(items))[:photos]:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            scale = side / max(img.size)
            out = io.BytesIO()
            img.resize((round(img.width * scale), round(img.height * scale)), resample=3).save(out, "JPEG", quality=90)
            blobs.append(out.getvalue())
        row = {"side": side}
        for key, run in (
            ("copy_full", lambda d: detection_copy(d, None)), ("copy_reduced", lambda d: detection_copy(d, 640)),
            ("build_full", lambda d: build(d, False)), ("build_reduced", lambda d: build(d, True)),
        ):  # fmt: skip
            c0 = time.process_time()
            for _ in range(repeat):
                for data in blobs:
                    run(data)
            row[key] = 1000 * (time.process_time() - c0) / (repeat * len(blobs))
        rows.append(row)
    return rows


def report_decode_costs(rows: list[dict]) -> None:
    print("\ndecode CPU ms per image (one thread), full decode -> reduced decode (portrait/decode.py):")
    print(f"{'longer side':>12s} {'detection copy':>24s} {'a kept image in a build':>28s}")
    for r in rows:
        print(f"{r['side']:>10d}px {r['copy_full']:>9.1f} -> {r['copy_reduced']:5.1f} ({r['copy_full'] / r['copy_reduced']:4.1f}x)"
              f" {r['build_full']:>12.1f} -> {r['build_reduced']:5.1f} ({r['build_full'] / r['build_reduced']:4.1f}x)")
    print("  (detection copy: decode + shrink to 640 px; build: detect, embed and attributes each decoded in full "
          f"-> one reduced decode they share; shard decodes and stores at 1024 px); load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


# ---------------------------------------------------------------- report


def shares(seconds: dict) -> str:
    steps = {k: v for k, v in seconds.items() if k not in ("load models", CPU)}
    total = sum(steps.values()) or 1.0
    return ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(steps.items(), key=lambda kv: -kv[1]))


def report(name: str, run: dict, items: int) -> float:
    ips = items / run["wall"]
    cores = run["seconds"].get(CPU, 0.0) / run["wall"]
    print(f"{name:13s}: {run['wall']:.1f}s, {ips:.2f} images/s, {run['kept']} kept; "
          f"CPU time / wall = {cores:.2f} cores")  # fmt: skip
    print(f"{'':15s}time by step: {shares(run['seconds'])}")
    return ips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2, help="actors per model stage")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mode", choices=("product", "fused", "stages"), default="product",
                        help="product: datakit run on a folder source; fused: one actor pool runs the three "
                             "stages; stages: a pool per stage (both in this process)")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--skip-models", action="store_true", help="leave out the per-model costs")
    parser.add_argument("--models-only", action="store_true", help="only the per-model costs")
    parser.add_argument("--decode-only", action="store_true", help="only the decode costs")
    parser.add_argument("--rounds", type=int, default=3,
                        help="product mode: datakit run and the two-process loop this many times, alternating; "
                             "prints the median ratios (one round swings by +-10%% on a shared VM)")
    parser.add_argument("--web-size", action="store_true",
                        help="product mode: the photos re-saved as 2000-3000 px JPEGs (web size)")
    parser.add_argument("--plain-worker", help=argparse.SUPPRESS)  # one process of the plain loop
    parser.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--parts", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        return plain_worker(args.plain_worker, args.part, args.parts)
    items = load_items(args.items)
    if args.decode_only:
        return report_decode_costs(decode_costs(items))
    if args.models_only:
        return report_model_costs(model_costs(items))
    if args.mode == "product":
        product_comparison(args.items, args.web_size, args.rounds)
        report_decode_costs(decode_costs(items))
        if not args.skip_models:
            report_model_costs(model_costs(items))
        return None
    print(f"{len(items)} items: the {len(dev_files())} dev photos of {DEV}, repeated")

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    print(f"ray.init: {time.perf_counter() - t0:.1f}s (not counted below)")

    ray_run = ray_pipeline(items, args.workers, args.batch_size, args.mode)
    ray.shutdown()
    ray_ips = report(f"ray ({args.mode})", ray_run, len(items))
    if not args.skip_plain:
        plain_ips = report("plain", plain_loop(items), len(items))
        print(f"{'ratio':13s}: {ray_ips / plain_ips:.2f}x the plain loop (goal >= 1.8x on 2 cores)")
        print(f"{'':15s}(CPU/wall well under 2 for ray, or under 1 for plain: other work shared the cores)")
    if not args.skip_models:
        report_model_costs(model_costs(items))


if __name__ == "__main__":
    main()
