"""The evaluation's three files: ``cases.csv`` (one row per case), ``summary.json`` (every metric
with its scorer's name and model hash, n, mean and 95% interval, and the misses) and
``report.html`` (one offline page: the summary, then a grid of references, driving photo, output
and scores per case; images inline as data: URIs, a Content-Security-Policy that loads nothing).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from portrait.faces.reader import load_photo
from trainer.scoring import headpose
from trainer.scoring.intervals import summarise

FIXED_COLUMNS = [
    "case_id", "identity", "label", "prompt_index", "prompt", "driving_index", "driving", "seed", "image",
    "status", "face_score",
]
SCORE_COLUMNS = ["clip_t", "clip_i", "pose_error", "yaw_error", "pitch_error", "roll_error", "expression_error"]


def columns(recognizers) -> list[str]:
    return FIXED_COLUMNS + [f"sim_{r.name}" for r in recognizers] + SCORE_COLUMNS


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def write_cases(rows: list[dict], names: list[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(names)
        for row in rows:
            writer.writerow([_cell(row.get(n)) for n in names])


def metric_entries(rows: list[dict], scorers, conditioning: dict | None, resamples: int) -> dict:
    """Every metric: what measured it (name, model, hash) and n, mean, 95% interval over cases."""
    pose_scorer = {"scorer": "headpose", "model": "insightface meanshape_68 + cv2.solvePnP", "model_sha256": headpose.mean_face_sha256()}
    metrics = {}
    for recognizer in scorers.recognizers:
        conditions = None if conditioning is None else conditioning.get("backend") == recognizer.backend and (
            recognizer.backend == "dlib" or conditioning.get("recognition_sha256") == recognizer.model_sha256)
        metrics[f"face_similarity/{recognizer.name}"] = {
            "scorer": recognizer.name, "model": recognizer.model, "model_sha256": recognizer.model_sha256,
            "conditions_generator": conditions, "higher_is_better": True,
            **summarise([r.get(f"sim_{recognizer.name}") for r in rows], resamples)}
    if scorers.clip:
        for key in ("clip_t", "clip_i"):
            metrics[key] = {"scorer": key, "model": scorers.clip.name, "model_sha256": scorers.clip.model_sha256,
                            "higher_is_better": True, **summarise([r.get(key) for r in rows], resamples)}
    for key, unit in (("pose_error", "deg"), ("yaw_error", "deg"), ("pitch_error", "deg"), ("roll_error", "deg"), ("expression_error", "ratio")):
        metrics[key] = {**pose_scorer, "unit": unit, "higher_is_better": False, **summarise([r.get(key) for r in rows], resamples)}
    return metrics


def summary(rows: list[dict], scorers, *, protocol, mode: str, source: str | None, conditioning: dict | None,
            left_out: list[dict], notes: list[str]) -> dict:
    statuses = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    images = sum(1 for r in rows if r["status"] in ("scored", "no_face"))
    return {
        "protocol": protocol.name,
        "mode": mode,
        "source": source,
        "cases": len(rows),
        "statuses": dict(sorted(statuses.items())),
        "detection": {
            "detector": scorers.reader.backend.name,
            "settings": scorers.reader.settings.model_dump(mode="json"),
            "images": images,
            "misses": statuses.get("no_face", 0),
            "miss_rate": statuses.get("no_face", 0) / images if images else None,
        },
        "metrics": metric_entries(rows, scorers, conditioning, protocol.scorers.bootstrap),
        "identities": sorted({r["identity"] for r in rows}),
        "identities_left_out": left_out,
        "notes": notes,
    }


# ------------------------------------------------------------------ report.html


def thumb(image: Image.Image | np.ndarray | None, side: int = 112) -> str:
    if image is None:
        return ""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def _img(uri: str, cls: str, alt: str) -> str:
    if not uri:
        return f'<div class="{cls} none">{html.escape(alt)}</div>'
    return f'<img class="{cls}" src="{uri}" alt="{html.escape(alt)}">'


STYLE = """
body{font:14px system-ui,sans-serif;margin:16px;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
.case{display:grid;grid-template-columns:auto auto auto 1fr;gap:8px;align-items:start;border-top:1px solid #ddd;padding:8px 0}
.refs img,.refs .none{margin-right:2px}.none{display:inline-block;width:112px;height:112px;background:#eee;font-size:11px}
.scores td{font-size:12px}.status-no_face,.status-missing_image{color:#b00}
"""


def report(rows: list[dict], info: dict, names: list[str], subjects: dict, drivings: list, folder: Path | None, path: Path) -> None:
    """Write the page. ``subjects``: identity slug -> Subject; ``folder``: where case images are."""
    from trainer.scoring.protocol import find_image

    metric_rows = []
    for key, m in info["metrics"].items():
        interval = "" if m["ci95"] is None else f"{m['ci95'][0]:.3f} to {m['ci95'][1]:.3f}"
        mean = "" if m["mean"] is None else f"{m['mean']:.3f}"
        metric_rows.append(
            f"<tr><td class=l>{html.escape(key)}</td><td class=l>{html.escape(str(m['model']))}</td>"
            f"<td class=l><code>{html.escape(m['model_sha256'][:12])}</code></td><td>{m['n']}</td><td>{mean}</td><td>{interval}</td></tr>")
    driving_thumbs = [thumb(d.rgb) for d in drivings]
    reference_thumbs = {slug: "".join(_img(thumb(r.rgb, 72), "ref", r.name) for r in s.references) for slug, s in subjects.items()}
    cases = []
    for row in rows:
        image_path = find_image(folder, row["case_id"]) if folder else None
        readable = image_path is not None and row["status"] in ("scored", "no_face")
        output = thumb(load_photo(image_path.read_bytes())) if readable else ""  # decoded under the pixel limit
        scores = "".join(
            f"<tr><th class=l>{html.escape(n)}</th><td>{html.escape(_cell(row.get(n)))}</td></tr>"
            for n in names[len(FIXED_COLUMNS):] if row.get(n) is not None)
        cases.append(
            f'<div class="case" data-case="{html.escape(row["case_id"])}" data-status="{html.escape(row["status"])}">'
            f'<div class="refs">{reference_thumbs.get(row["identity"], "")}<div>{html.escape(row["label"])}</div></div>'
            f'<div>{_img(driving_thumbs[row["driving_index"]], "driving", "driving " + row["driving"])}</div>'
            f'<div>{_img(output, "output", row["status"])}</div>'
            f'<div><div class="l status-{html.escape(row["status"])}"><b>{html.escape(row["case_id"])}</b> {html.escape(row["status"])}</div>'
            f'<div>{html.escape(row["prompt"])}</div><table class="scores">{scores}</table></div></div>')
    detection = info["detection"]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>evaluation: {html.escape(info['protocol'])}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(info['protocol'])} ({html.escape(info['mode'])})</h1>
<p>{info['cases']} cases; statuses: {html.escape(json.dumps(info['statuses']))};
detector {html.escape(detection['detector'])}: {detection['misses']} misses of {detection['images']} images.</p>
<table id="metrics"><tr><th class=l>metric</th><th class=l>model</th><th class=l>sha256</th><th>n</th><th>mean</th><th>95% interval</th></tr>
{''.join(metric_rows)}</table>
<h2>Cases</h2>
<p>Each row: the reference photos, the driving photo (pose and expression), the output and its scores.</p>
<div id="cases">{''.join(cases)}</div>
</body></html>
"""
    path.write_text(page)
