"""`datakit stats` on a synthetic 960k-row images.parquet (`make bench-stats`). Goal here: under 60 s.

The manifest has the corpus's shape: 34k identities (cluster sizes 5 to ~300, long tail), three
sources, 80% of the rows kept and the rest dropped at the stages and reasons a real build shows,
unknown ages and genders, and every column of the schema that a build fills, 128-d embeddings
included (so the file is as wide as a real one; stats must read only what it needs).

Measured, each in a child process so imports count as a user would see them:
- ``datakit stats OUTPUT`` end to end (Table 6, Figs. 11-13 and 16, 8 identity sheets). The
  folder has no shards, so sheet tiles are placeholders; sheets are bounded (8 x 12 images),
  so reading real thumbnails adds a constant, not a per-row cost.
- baseline, side by side: the same Table 6 and histograms with pandas over the columns read by
  pyarrow (the obvious way to write it), checked to give the same Table 6.
``--rows`` and ``--identities`` scale it down for a quick look.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from datakit import schema  # noqa: E402

SOURCES = ("vggface2_hq", "imdb_face", "web")
DROPS = [  # (stage, reason, share of the dropped rows)
    ("download", "http_error", 0.35), ("download", "timeout", 0.05), ("download", "undecodable", 0.03),
    ("detect", "no_face", 0.07), ("filter", "face_too_small_area", 0.2), ("filter", "multiple_faces", 0.08),
    ("filter", "face_blurry", 0.04), ("dedup", "duplicate_exact", 0.05), ("dedup", "duplicate_near", 0.05),
    ("cluster", "identity_outlier", 0.06), ("cluster", "identity_too_small", 0.02),
]  # fmt: skip


def make_manifest(path: Path, rows: int, identities: int, seed: int = 0, chunk: int = 120_000) -> None:
    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.lognormal(3.0, 0.8, identities).astype(int), 5, 300)
    owner = np.repeat(np.arange(identities), sizes)
    owner = np.resize(rng.permutation(owner), rows)  # rows -> identity index
    writer = pq.ParquetWriter(path, schema.IMAGES_SCHEMA, compression="zstd")
    drop_p = np.array([p for *_, p in DROPS]) / sum(p for *_, p in DROPS)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        idx = np.arange(start, start + n)
        who = owner[start : start + n]
        src = np.array(SOURCES)[np.where(who % 10 < 6, 0, np.where(who % 10 < 9, 1, 2))]
        kept = rng.random(n) < 0.8
        drop = rng.choice(len(DROPS), size=n, p=drop_p)
        status = np.where(kept, schema.KEPT, schema.DROPPED)
        stage = np.array([d[0] for d in DROPS])[drop]
        reason = np.array([d[1] for d in DROPS])[drop]
        reached_faces = kept | (stage != "download")
        area = np.where(reached_faces, rng.beta(2.5, 6, n) * 0.9 + 0.1 * kept, np.nan).astype(np.float32)
        age = np.where(rng.random(n) < 0.07, np.nan, np.clip(rng.normal(38, 13, n), 1, 95)).astype(np.float32)
        gender = np.where(rng.random(n) < 0.05, None, np.where(who % 2 == 0, "female", "male"))
        emb = rng.standard_normal((n, 128), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        ids = [f"{i:016x}" for i in idx]
        names = [f"Person_{w:05d}" for w in who]
        table = {
            "image_id": ids,
            "source": src,
            "source_kind": np.where(src == "vggface2_hq", "folder", "urls"),
            "locator": [f"http://images.example/{w}/{i}.jpg" for w, i in zip(who, idx)],
            "label": names,
            "status": status,
            "drop_stage": np.where(kept, None, stage),
            "reason": np.where(kept, None, reason),
            "detail": np.where(kept, None, "synthetic"),
            "sha256": [f"{i:064x}" for i in idx],
            "bytes": rng.integers(20_000, 900_000, n),
            "width": np.full(n, 512),
            "height": np.full(n, 512),
            "face_area_fraction": pa.array(area, mask=np.isnan(area)),
            "embedding": pa.FixedSizeListArray.from_arrays(emb.ravel(), 128).cast(schema.LIST_F32),
            "age": pa.array(age, mask=np.isnan(age) | ~kept),
            "gender": np.where(kept, gender, None),
            "caption": np.where(kept, "a close-up portrait photo of a person", None),
            "identity_id": np.where(kept | (stage == "cluster"), [f"id{w:08d}" for w in who], None),
            "identity_distance": pa.array(rng.random(n).astype(np.float32), mask=~kept),
            "shard": np.where(kept, [f"shards/shard-{w // 40:05d}.tar" for w in who], None),
            "key": np.where(kept, ids, None),
        }
        writer.write_table(schema.conform(pa.table({k: pa.array(v) if not isinstance(v, pa.Array) else v for k, v in table.items()})))
    writer.close()


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return wall, done.stdout


BASELINE = r"""
import json, sys, time
import numpy as np, pandas as pd, pyarrow.parquet as pq
t0 = time.perf_counter()
df = pq.read_table(sys.argv[1], columns=["source", "status", "identity_id", "face_area_fraction", "age", "gender", "drop_stage", "reason"]).to_pandas()
kept = df[df.status == "kept"]
t6 = kept.groupby("source").agg(identities=("identity_id", "nunique"), images=("identity_id", "size"))
rows = [{"source": s, "identities": int(r.identities), "images": int(r.images)} for s, r in t6.iterrows()]
rows.append({"source": "All", "identities": int(kept.identity_id.nunique()), "images": len(kept)})
sizes = kept.groupby("identity_id").size().value_counts()
area = np.floor(kept.face_area_fraction.fillna(-0.1) * 10).clip(upper=9).value_counts()
age = np.floor(kept.age.fillna(-10) / 10).clip(upper=7).value_counts()
gender = kept.gender.fillna("unknown").value_counts()
drops = df[df.status != "kept"].groupby(["drop_stage", "reason", "source"]).size()
print(json.dumps({"seconds": time.perf_counter() - t0, "table6": rows}))
"""

COMPUTE_ONLY = r"""
import json, sys, time
from datakit.audit import stats
from datakit.audit.folder import OutputFolder
t0 = time.perf_counter()
stats.compute(OutputFolder(sys.argv[1]))
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=960_000)
    ap.add_argument("--identities", type=int, default=34_000)
    ap.add_argument("--keep", type=Path, help="build the output folder here and keep it (default: a temporary folder)")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-stats-"))
    out = base / "out"
    manifest = out / "images.parquet"
    if not manifest.exists() or pq.read_metadata(manifest).num_rows != args.rows:
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        make_manifest(manifest, args.rows, args.identities)
        print(f"synthetic manifest: {args.rows} rows, {manifest.stat().st_size / 1e6:.0f} MB, made in {time.perf_counter() - t0:.1f} s")
    py = sys.executable
    stats_s, _ = timed([py, "-m", "datakit.audit.cli", "stats", str(out), "--out", str(base / "audit")])
    base_s, base_out = timed([py, "-c", BASELINE, str(manifest)])
    _, compute_out = timed([py, "-c", COMPUTE_ONLY, str(out)])
    ours = json.loads((base / "audit" / "table6.json").read_text())
    theirs = json.loads(base_out)["table6"]
    base_compute = json.loads(base_out)["seconds"]
    our_compute = json.loads(compute_out)["seconds"]
    by_source = {r["source"]: (r["identities"], r["images"]) for r in theirs}
    same = all(by_source.get(r["source"]) == (r["identities"], r["images"]) for r in ours)
    print(f"rows {args.rows}, identities {args.identities}, cores 2")
    print(f"datakit stats (duckdb, Table 6 + 4 figures + 8 sheets, end to end): {stats_s:6.1f} s   goal < 60 s: {'met' if stats_s < 60 else 'NOT met'}")
    print(f"baseline (pandas, Table 6 + histograms only, no figures, end to end): {base_s:6.1f} s")
    print(f"statistics alone (after imports): duckdb {our_compute:.2f} s, pandas baseline {base_compute:.2f} s, "
          f"ratio baseline / duckdb {base_compute / our_compute:.2f}x; same Table 6: {same}")
    print(f"Table 6 All: {ours[-1]}")


if __name__ == "__main__":
    main()
