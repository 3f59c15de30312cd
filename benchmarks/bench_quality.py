"""Corpus quality on real photos (`make bench-quality`): the project's recipe against a plain dlib script.

Input, from ../shared/fixtures/faces: the 293 dev photos (30 people), each also re-encoded five
ways as the web serves it (grayscale, CMYK, JPEG quality 40, EXIF-rotated, a 112 px face crop;
devtools/reencode.py), 10% of all of those filed under another dev person's name, and
every negative (no face, tiny faces, groups, people seen once, non-photos) under a random dev
name. One folder source, ROOT/<name>/<file>, as VGGFace2 ships.

- project: ``datakit run``'s engine (``datakit.engine.build.run``, in this process) on a recipe
  with the demo's face stages (dlib backend, detect,
  filter, embed, cluster; dedup left out because the variants are duplicates on purpose).
- baseline: a plain dlib script: Pillow decode, HOG with one upsampling, the largest face, kept
  when its box covers >= 10% of the image, 128-d embedding, per-name centroid, photos within
  0.5 of it kept, names with >= 5 photos kept.

Both run in this one process run, one after the other, on the same files; the table prints
kept-good, misfiled-removed, negatives-dropped, merges and BCubed F (devtools/quality.py),
the wall time, the cores each side used (CPU seconds of this process and its descendants,
Ray's included, while it ran, over its wall time) and the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FACES = REPO.parent / "shared" / "fixtures" / "faces"

from devtools.quality import measure, misfile  # noqa: E402
from devtools.reencode import VARIANTS, reencode  # noqa: E402


def build_inputs(root: Path, step: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """Writes ROOT/<filed name>/<file>; returns (relative paths, filed names, truths)."""
    import dlib

    from portrait.decode import load_rgb

    detector = dlib.get_frontal_face_detector()
    dev = sorted(p for p in (FACES / "dev").glob("*/*") if p.is_file())[::step]
    items: list[tuple[str, bytes, str]] = []  # (file name, bytes, truth)
    for path in dev:
        person = path.parent.name
        items.append((path.name, path.read_bytes(), person))
        rgb = np.asarray(load_rgb(path.read_bytes()))
        found = list(detector(rgb, 1))
        r = max(found, key=lambda d: d.area()) if found else dlib.rectangle(0, 0, rgb.shape[1] - 1, rgb.shape[0] - 1)
        box = (r.left(), r.top(), r.right(), r.bottom())
        for variant in VARIANTS:
            items.append((f"{path.stem}.{variant}.jpg", reencode(rgb, variant, box), person))
    truths = [t for _, _, t in items]
    filed = misfile(truths, 0.10, seed)
    names = sorted(set(truths))
    rng = np.random.default_rng(seed + 1)
    for path in sorted(p for p in (FACES / "negatives").glob("*/*") if p.is_file() and p.name != "SOURCES.tsv"):
        items.append((f"{path.parent.name}.{path.name}", path.read_bytes(), f"negative:{path.parent.name}/{path.name}"))
        filed.append(str(rng.choice(names)))
    rel = []
    for (name, data, _), label in zip(items, filed):
        target = root / label / name
        n = 2
        while target.exists():  # a misfiled copy may meet a file of the same name
            target = root / label / f"{n}.{name}"
            n += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        rel.append(target.relative_to(root).as_posix())
    return rel, filed, [t for _, _, t in items]


def run_project(root: Path, out: Path) -> tuple[dict, float]:
    from datakit.engine import build
    from datakit.recipe import validate_recipe

    import pyarrow.parquet as pq

    raw = {
        "name": "bench-quality",
        "output": str(out),
        "sources": [{"name": "photos", "kind": "folder", "root": str(root)}],
        "faces": {"backend": "dlib"},
        "ray": {"partition_size": 64},
        "stages": {
            "download": {"num_cpus": 0.25},
            "detect": {"num_cpus": 0.45},
            "filter": {"num_cpus": 0.05},
            "embed": {"num_cpus": 0.45},
            "cluster": {"min_images": 5},
        },
    }
    t = time.perf_counter()
    build.run(validate_recipe(raw, REPO / "pipelines" / "bench-quality.yaml"), quiet=True)
    wall = time.perf_counter() - t
    import ray

    ray.shutdown()  # as `datakit run` exits: its daemons would otherwise count in the baseline's cores
    rows = pq.read_table(out / "images.parquet", columns=["locator", "identity_id", "status"]).to_pylist()
    return {r["locator"]: (r["identity_id"] if r["status"] == "kept" else None) for r in rows}, wall


def run_baseline(root: Path, rel: list[str], filed: list[str]) -> tuple[dict, float]:
    """The plain dlib script a data engineer would write first."""
    import dlib
    from PIL import Image

    from portrait.faces.dlib_backend import packaged_model_dir

    t = time.perf_counter()
    models = packaged_model_dir()
    detector = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    emb: dict[str, np.ndarray] = {}
    for path in rel:
        try:
            rgb = np.asarray(Image.open(root / path).convert("RGB"))
        except Exception:
            continue
        faces = list(detector(rgb, 1))
        if not faces:
            continue
        face = max(faces, key=lambda d: d.area())
        if face.area() < 0.10 * rgb.shape[0] * rgb.shape[1]:
            continue
        vec = np.asarray(net.compute_face_descriptor(rgb, sp5(rgb, face)), dtype=np.float32)
        emb[path] = vec / np.linalg.norm(vec)
    out: dict[str, str | None] = dict.fromkeys(rel)
    for name in sorted(set(filed)):
        paths = [p for p, lab in zip(rel, filed) if lab == name and p in emb]
        if not paths:
            continue
        centre = np.mean([emb[p] for p in paths], axis=0)
        close = [p for p in paths if np.linalg.norm(emb[p] - centre) < 0.5]
        if len(close) >= 5:
            for p in close:
                out[p] = name
    return out, time.perf_counter() - t


def with_cores(run, *args) -> tuple[dict, float, float]:
    """``run(*args)``'s (answers, wall) and the cores it used: CPU seconds that this process and
    its descendants (Ray's daemons and workers) spent while it ran, over its wall time."""
    import psutil

    from bench_faces import TreeMonitor

    me = psutil.Process()
    before = {q.pid: sum(q.cpu_times()[:2]) for q in [me, *me.children(recursive=True)]}
    monitor = TreeMonitor(os.getpid())
    answers, wall = run(*args)
    monitor.stop()
    spent = sum(cpu - before.get(pid, 0.0) for pid, cpu in monitor.cpu.items())
    return answers, wall, spent / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step", type=int, default=1, help="every n-th dev photo (1: all 293)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (FACES / "dev").is_dir():
        print(f"face fixtures not found at {FACES} (the shared/ folder must sit beside the repo)")
        return 2
    os.environ.setdefault("RAY_ACCEPT_CLUSTER_RESOURCE_WARNING", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        rel, filed, truth = build_inputs(tmp / "photos", args.step, args.seed)
        load_before = os.getloadavg()
        project, project_wall, project_cores = with_cores(run_project, tmp / "photos", tmp / "out")
        baseline, baseline_wall, baseline_cores = with_cores(run_baseline, tmp / "photos", rel, filed)
        load_after = os.getloadavg()
        rows = {
            "project (datakit recipe)": (measure(filed, truth, [project[p] for p in rel]), project_wall,
                                         f"{project_cores:.2f} (Ray, fractional workers)"),
            "baseline (plain dlib script)": (measure(filed, truth, [baseline[p] for p in rel]), baseline_wall,
                                             f"{baseline_cores:.2f} (one process)"),
        }
        print(f"bench-quality: {len(rel)} items ({sum(t == f for t, f in zip(truth, filed))} correctly labelled, "
              f"{sum(t != f and not t.startswith('negative:') for t, f in zip(truth, filed))} misfiled, "
              f"{sum(t.startswith('negative:') for t in truth)} negatives); "
              f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, {os.cpu_count()} cores")
        cols = ["kept-good", "misfiled-removed", "negatives-dropped", "merges", "BCubed F"]
        width = max(len(k) for k in rows) + 2
        print(" " * width + "".join(f"{c:>20}" for c in cols) + f"{'wall s':>10}  cores")
        for name, (q, wall, cores) in rows.items():
            r = q.row()
            print(f"{name:<{width}}" + "".join(f"{r[c]:>20}" for c in cols) + f"{wall:>10.0f}  {cores}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
