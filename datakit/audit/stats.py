"""Corpus statistics from the manifests (duckdb over parquet): Table 6, Figs. 11-13 and 16, the funnel.

Definitions (HiFi-Portrait's Table 6 and figures, on the *kept* images):

- Table 6, one row per source and an ``All`` row: identities (distinct ``identity_id`` among
  the source's kept images), images (kept images), images per identity (images / identities).
  An identity can hold images from several sources, so ``All`` identities can be fewer than
  the sum of the per-source rows.
- Fig. 11: identities by cluster size (kept images per identity), in the bins of SIZE_EDGES.
- Fig. 12: kept images by face-box area fraction in 0.1-wide bins ([0, 0.1), ..., [0.9, 1.0]).
- Fig. 13: kept images by estimated age in decades (0-9 ... 70+).
- Fig. 16: gender of kept images and of identities (their majority).
- Missing values are counted in an ``unknown`` bin; they are never dropped from a figure.
- The funnel: every input item, where it left the build (stage, reason, source), redactions
  last. ``items`` counts all rows of images.parquet, whatever their status.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import duckdb

from datakit import registry, schema
from datakit.audit.folder import IDENTITIES, IMAGES, OutputFolder

UNKNOWN = "unknown"
SIZE_EDGES = (1, 5, 10, 15, 20, 30, 50, 100, 200, 500)  # bins [a, b); the last is open-ended
AGE_EDGES = (0, 10, 20, 30, 40, 50, 60, 70)  # decades; the last bin is 70+
GENDERS = ("female", "male")
NEEDED = ("source", "status", "identity_id", "face_area_fraction", "age", "gender", "drop_stage", "reason")


@dataclass
class Stats:
    build_name: str | None
    recipe_hash: str | None
    items: int
    kept: int
    dropped: int
    redacted: int
    table6: list[dict]  # {source, identities, images, images_per_identity}; last row is All
    identity_sizes: dict[str, int]  # Fig. 11: size bin -> identities
    identity_size_counts: dict[int, int]  # exact: size -> identities
    face_area: dict[str, int]  # Fig. 12: bin -> images
    age_groups: dict[str, int]  # Fig. 13
    gender_images: dict[str, int]  # Fig. 16
    gender_identities: dict[str, int]
    funnel: list[dict]  # {step, items_in, dropped, left}
    drops: list[dict]  # {stage, reason, source, images}
    items_by_source: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = asdict(self)
        out["identity_size_counts"] = {str(k): v for k, v in self.identity_size_counts.items()}
        return out


def size_labels() -> list[str]:
    labels = []
    for lo, hi in zip(SIZE_EDGES, SIZE_EDGES[1:]):
        labels.append(str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}")
    return labels + [f"{SIZE_EDGES[-1]}+"]


def size_label(n: int) -> str:
    labels = size_labels()
    for i, hi in enumerate(SIZE_EDGES[1:]):
        if n < hi:
            return labels[i]
    return labels[-1]


def area_labels() -> list[str]:
    return [f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)] + [UNKNOWN]


def age_labels() -> list[str]:
    return [f"{lo}-{hi - 1}" for lo, hi in zip(AGE_EDGES, AGE_EDGES[1:])] + [f"{AGE_EDGES[-1]}+", UNKNOWN]


def compute(folder: OutputFolder) -> Stats:
    folder.require(IMAGES)
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    con.execute("SET enable_progress_bar = false")  # it would print into stdout (and into --json output)
    images = folder.sql_source(con, IMAGES, NEEDED)
    # One scan of the few columns needed, into memory; the queries below then never touch the file.
    con.execute(f"CREATE TABLE images AS SELECT {', '.join(NEEDED)} FROM {images}")
    con.execute("CREATE TABLE kept AS SELECT * FROM images WHERE status = 'kept'")
    statuses = dict(con.execute("SELECT status, count(*) FROM images GROUP BY status").fetchall())
    items = sum(statuses.values())
    build = folder.build
    return Stats(
        build_name=(build.get("recipe") or {}).get("name"),
        recipe_hash=build.get("recipe_hash"),
        items=items,
        kept=statuses.get(schema.KEPT, 0),
        dropped=statuses.get(schema.DROPPED, 0),
        redacted=statuses.get(schema.REDACTED, 0),
        table6=table6(con, folder),
        identity_sizes=identity_size_bins(con),
        identity_size_counts=identity_size_counts(con),
        face_area=face_area_bins(con),
        age_groups=age_bins(con),
        gender_images=gender_images(con),
        gender_identities=gender_identities(con, folder),
        funnel=funnel(con, list((folder.recipe.get("stages") or {}).keys())),
        drops=drops(con),
        items_by_source=dict(con.execute("SELECT source, count(*) FROM images GROUP BY source ORDER BY source").fetchall()),
    )


def _order_sources(folder: OutputFolder, names) -> list:
    """Sources in the recipe's order, then any others by name."""
    declared = [s.get("name") for s in folder.sources]
    rank = {n: i for i, n in enumerate(declared)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), str(n)))


def table6(con, folder: OutputFolder) -> list[dict]:
    per = {
        src: (idents, imgs)
        for src, idents, imgs in con.execute(
            "SELECT source, count(DISTINCT identity_id), count(*) FROM kept GROUP BY source"
        ).fetchall()
    }
    # sources with no kept image still get a row (0 identities, 0 images)
    names = set(per) | {s for (s,) in con.execute("SELECT DISTINCT source FROM images").fetchall()}
    rows = [_t6_row(src, *per.get(src, (0, 0))) for src in _order_sources(folder, names)]
    idents, imgs = con.execute("SELECT count(DISTINCT identity_id), count(*) FROM kept").fetchone()
    rows.append(_t6_row("All", idents, imgs))
    return rows


def _t6_row(source, identities: int, images: int) -> dict:
    ratio = round(images / identities, 2) if identities else None
    return {"source": source, "identities": int(identities), "images": int(images), "images_per_identity": ratio}


def identity_size_counts(con) -> dict[int, int]:
    rows = con.execute(
        "SELECT n, count(*) FROM (SELECT identity_id, count(*) AS n FROM kept WHERE identity_id IS NOT NULL "
        "GROUP BY identity_id) GROUP BY n ORDER BY n"
    ).fetchall()
    return {int(n): int(c) for n, c in rows}


def identity_size_bins(con) -> dict[str, int]:
    out = dict.fromkeys(size_labels(), 0)
    for n, c in identity_size_counts(con).items():
        out[size_label(n)] += c
    without = con.execute("SELECT count(*) FROM kept WHERE identity_id IS NULL").fetchone()[0]
    if without:
        out[f"{UNKNOWN} (images without identity)"] = int(without)
    return out


def face_area_bins(con) -> dict[str, int]:
    out = dict.fromkeys(area_labels(), 0)
    rows = con.execute(
        "SELECT CASE WHEN face_area_fraction IS NULL OR isnan(face_area_fraction) THEN -1 "
        "ELSE least(greatest(floor(face_area_fraction * 10), 0), 9) END AS b, count(*) FROM kept GROUP BY b"
    ).fetchall()
    labels = area_labels()
    for b, c in rows:
        out[UNKNOWN if b < 0 else labels[int(b)]] += int(c)
    return out


def age_bins(con) -> dict[str, int]:
    out = dict.fromkeys(age_labels(), 0)
    top = AGE_EDGES[-1]
    rows = con.execute(
        "SELECT CASE WHEN age IS NULL OR isnan(age) OR age < 0 THEN -1 "
        f"ELSE least(floor(age / 10), {top // 10}) END AS b, count(*) FROM kept GROUP BY b"
    ).fetchall()
    labels = age_labels()
    for b, c in rows:
        out[UNKNOWN if b < 0 else labels[int(b)]] += int(c)
    return out


def gender_images(con) -> dict[str, int]:
    out = dict.fromkeys((*GENDERS, UNKNOWN), 0)
    for g, c in con.execute("SELECT gender, count(*) FROM kept GROUP BY gender").fetchall():
        out[g if g in GENDERS else UNKNOWN] += int(c)
    return out


def gender_identities(con, folder: OutputFolder) -> dict[str, int]:
    """Majority gender per identity: identities.parquet's, else computed the same way here."""
    out = dict.fromkeys((*GENDERS, UNKNOWN), 0)
    if folder.has(IDENTITIES):
        rows = con.execute(
            f"SELECT gender, count(*) FROM {folder.sql_source(con, IDENTITIES, ['gender'])} GROUP BY gender"
        ).fetchall()
    else:
        rows = con.execute(
            "SELECT CASE WHEN f > m THEN 'female' WHEN m > f THEN 'male' END AS g, count(*) FROM ("
            "SELECT identity_id, count(*) FILTER (WHERE gender = 'female') AS f, count(*) FILTER (WHERE gender = 'male') AS m "
            "FROM kept WHERE identity_id IS NOT NULL GROUP BY identity_id) GROUP BY g"
        ).fetchall()
    for g, c in rows:
        out[g if g in GENDERS else UNKNOWN] += int(c)
    return out


def stage_order(stages) -> list[str]:
    known = [s for s in registry.STEPS if s in stages]
    return known + sorted(s for s in stages if s not in registry.STEPS and s is not None)


def drops(con) -> list[dict]:
    """Every item that left: by stage, reason and source (redactions as stage ``redact``)."""
    rows = con.execute(
        "SELECT coalesce(drop_stage, CASE WHEN status = 'redacted' THEN 'redact' END) AS stage, "
        "CASE WHEN status = 'redacted' AND drop_stage IS NULL THEN 'redacted' ELSE reason END AS reason, "
        "source, count(*) FROM images WHERE status <> 'kept' GROUP BY ALL"
    ).fetchall()
    order = {s: i for i, s in enumerate(stage_order({r[0] for r in rows}))}
    rows.sort(key=lambda r: (order.get(r[0], len(order)), str(r[1]), str(r[2])))
    return [{"stage": s or UNKNOWN, "reason": r or UNKNOWN, "source": src, "images": int(n)} for s, r, src, n in rows]


def funnel(con, stages: list[str] = ()) -> list[dict]:
    """Items left after each stage (the recipe's stages and any that dropped items; in run order)."""
    total = con.execute("SELECT count(*) FROM images").fetchone()[0]
    by_stage: dict[str, int] = dict.fromkeys(stages, 0)
    for d in drops(con):
        by_stage[d["stage"]] = by_stage.get(d["stage"], 0) + d["images"]
    steps, left = [], int(total)
    for stage in stage_order(by_stage):
        n = by_stage[stage]
        steps.append({"step": stage, "items_in": left, "dropped": n, "left": left - n})
        left -= n
    return steps


# ---------------------------------------------------------------- formats


def table6_csv(stats: Stats) -> str:
    lines = ["source,identities,images,images_per_identity"]
    for r in stats.table6:
        ratio = "" if r["images_per_identity"] is None else f"{r['images_per_identity']:.2f}"
        lines.append(f"{_csv(r['source'])},{r['identities']},{r['images']},{ratio}")
    return "\n".join(lines) + "\n"


def _csv(value) -> str:
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def fmt_ratio(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"
