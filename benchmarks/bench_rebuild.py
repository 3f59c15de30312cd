"""A rebuild after a recipe change against a build from scratch (`make bench-rebuild`).

A build of ``--items`` URL items (the face fixtures served under distinct URLs by devtools'
PhotoServer in its own process on 127.0.0.1; every stage, dlib faces), then a filter-threshold
change and then a caption change on top of it. Each change is built twice in the same run: by
reuse, in a copy of the previous build's folder (``datakit run`` on the changed recipe), and
from scratch into an empty folder. Printed: seconds of each, the ratio (goal: threshold at most
0.15, caption at most 0.10), whether the two builds are equal (every manifest column but
``attempts``, tar bytes), the cores each side used and the machine's load.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
FACES = REPO.parent / "shared" / "fixtures" / "faces" / "dev"
GOALS = {"threshold": 0.15, "caption": 0.10}


def url_list(path: Path, server, items: int) -> None:
    photos = sorted(p.relative_to(FACES).as_posix() for p in FACES.rglob("*.jpg"))
    lines = ["url,name"] + [f"{server.file_url(photos[i % len(photos)], copy=i)},{photos[i % len(photos)].split('/')[0]}"
                            for i in range(items)]
    path.write_text("\n".join(lines) + "\n")


def base_recipe(listing: Path, partition_size: int) -> dict:
    return {
        "name": "bench-rebuild", "output": "OUT",
        "sources": [{"name": "web", "kind": "urls", "path": str(listing), "name_column": "name"}],
        "ray": {"partition_size": partition_size},
        "faces": {"backend": "dlib"},
        "stages": {
            "download": {"allow_private_addresses": True, "num_cpus": 0.25, "request_concurrency": 32},
            "detect": {"num_cpus": 0.45}, "filter": {"num_cpus": 0.05, "min_area_fraction": 0.10},
            "embed": {"num_cpus": 0.45}, "attributes": {"num_cpus": 0.05}, "dedup": {}, "cluster": {"min_images": 5},
            "caption": {"num_cpus": 0.05, "mode": "template"}, "shard": {"image_size": 256, "max_samples": 200},
        },
    }  # fmt: skip


def timed_build(root: Path, name: str, recipe: dict, executor: str, start_from: str | None = None) -> float:
    from datakit.engine import build
    from datakit.engine.reuse import format_plan
    from datakit.recipe import load_recipe

    if start_from is not None:
        shutil.copytree(root / start_from, root / name)  # setup, not timed: a real rebuild runs in place
    recipe = copy.deepcopy(recipe) | {"output": str(root / name)}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    t0 = time.perf_counter()
    plan = []
    build.run(load_recipe(path), quiet=True, executor=executor, on_plan=lambda p: plan.extend(format_plan(p)))
    seconds = time.perf_counter() - t0
    if start_from is not None:
        print(f"  {name}: " + "\n  ".join(plan))
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--partition-size", type=int, default=64)
    parser.add_argument("--executor", choices=("ray", "local"), default="ray")
    args = parser.parse_args()
    if not FACES.is_dir():
        print(f"bench-rebuild: face fixtures not found at {FACES}", file=sys.stderr)
        return 2
    from devtools.photoserver import PhotoServer
    from devtools.rehearsal.compare import compare_builds

    cores = os.cpu_count()
    print(f"bench-rebuild: {args.items} items, partitions of {args.partition_size}, executor {args.executor}, "
          f"{cores} cores (both sides use the same), load before {os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rebuild-") as tmp, PhotoServer(FACES, in_process=False) as server:
        root = Path(tmp)
        url_list(root / "urls.csv", server, args.items)
        r0 = base_recipe(root / "urls.csv", args.partition_size)
        base = timed_build(root, "base", r0, args.executor)
        print(f"  base build from scratch: {base:.1f} s (load {os.getloadavg()[0]:.2f})")
        r1 = copy.deepcopy(r0)
        r1["stages"]["filter"]["min_area_fraction"] = 0.15
        r2 = copy.deepcopy(r1)
        r2["stages"]["caption"]["closeup_area_fraction"] = 0.2
        for change, recipe, start in (("threshold", r1, "base"), ("caption", r2, "threshold")):
            reused = timed_build(root, change, recipe, args.executor, start_from=start)
            load_reuse = os.getloadavg()[0]
            scratch = timed_build(root, f"{change}-scratch", recipe, args.executor)
            load_scratch = os.getloadavg()[0]
            problems = compare_builds(root / f"{change}-scratch", root / change)["problems"]
            for problem in problems:
                print(f"  {change}: {problem}")
            same = not problems
            rows.append((change, reused, scratch, load_reuse, load_scratch, same))
    print(f"{'change':<10} {'reuse s':>8} {'scratch s':>10} {'ratio':>6} {'goal':>5}  equal  load (reuse / scratch)")
    for change, reused, scratch, lr, ls, same in rows:
        ratio = reused / scratch
        print(f"{change:<10} {reused:8.1f} {scratch:10.1f} {ratio:6.3f} {GOALS[change]:5.2f}  {'yes' if same else 'NO':<5}  {lr:.2f} / {ls:.2f}")
    return 0 if all(r[5] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
