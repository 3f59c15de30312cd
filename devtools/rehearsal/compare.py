"""Comparing two builds: every manifest's values (but ``attempts``) and every tar's sha256."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from datakit.store import read_table
from devtools.rehearsal.servers import PYTHON, REPO


# ---------------------------------------------------------------- comparing builds


def manifest_files(output: Path) -> list[str]:
    return sorted(p.name for p in output.glob("*.parquet"))


def shard_hashes(output: Path) -> dict[str, str]:
    out = {}
    for p in sorted((output / "shards").rglob("*.tar")) if (output / "shards").exists() else []:
        out[p.relative_to(output).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def compare_builds(clean: Path, faulty: Path) -> dict:
    """Differences between two builds' manifests and shards; ``attempts`` is reported apart."""
    import pyarrow.parquet as pq

    problems: list[str] = []
    attempts_differ = 0
    if manifest_files(clean) != manifest_files(faulty):
        problems.append(f"manifest files differ: {manifest_files(clean)} vs {manifest_files(faulty)}")
    for name in manifest_files(clean):
        if not (faulty / name).exists():
            continue
        a, b = pq.read_table(clean / name), pq.read_table(faulty / name)
        if a.schema != b.schema:
            problems.append(f"{name}: schemas differ")
            continue
        if a.num_rows != b.num_rows:
            problems.append(f"{name}: {a.num_rows} rows vs {b.num_rows}")
            continue
        key = [c for c in ("image_id", "identity_id", "shard", "key") if c in a.column_names][:1]
        if key:
            a, b = a.sort_by([(key[0], "ascending")]), b.sort_by([(key[0], "ascending")])
        for col in a.column_names:
            if name == "images.parquet" and col == "attempts":
                x, y = a.column(col).to_pylist(), b.column(col).to_pylist()
                attempts_differ = sum(1 for u, v in zip(x, y) if u != v)
                continue
            if not a.column(col).equals(b.column(col)):
                x, y = a.column(col).to_pylist(), b.column(col).to_pylist()
                bad = [i for i, (u, v) in enumerate(zip(x, y)) if u != v]
                problems.append(f"{name}:{col}: {len(bad)} rows differ, e.g. row {bad[0]}: {x[bad[0]]!r} vs {y[bad[0]]!r}")
    ha, hb = shard_hashes(clean), shard_hashes(faulty)
    if ha != hb:
        problems.append(f"shard tars differ: {sorted(set(ha.items()) ^ set(hb.items()))[:4]}")
    return {"problems": problems, "attempts_differ": attempts_differ, "tars": len(ha),
            "manifests": manifest_files(clean)}


def verify(output: Path) -> tuple[int, str]:
    out = subprocess.run([PYTHON, "-m", "datakit", "verify", str(output)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    return out.returncode, out.stdout[-3000:] + out.stderr[-3000:]
