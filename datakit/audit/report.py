"""One self-contained HTML page: Table 6, the figures, the drop funnel and an identity browser.

No external asset: CSS and JavaScript are inline, figures and thumbnails are data: URIs, and a
Content-Security-Policy forbids the page from loading anything else, so it works offline and from
a mail attachment. Every text from the data (names, captions, URLs, details) is escaped in the
HTML and set with textContent in the browser; the browser's data is JSON inside a non-executable
script element with <, > and & escaped, so a hostile name cannot run code.

Size bounds, for a corpus of ~34k identities and ~1M dropped items: every identity and every
name is searchable and shows its counts and its drops by reason. Images are listed for the first
``detail_people`` people only (those asked for with ``--identity``, then the ones with the most
kept, then dropped, images): up to ``images_per_identity`` kept images with captions, the first
``thumbs_per_identity`` with a thumbnail read from the shards, and ``dropped_per_person`` dropped
ones with their reasons. Anyone else: ``datakit report OUTPUT --identity NAME`` lists them.
With the defaults the page stays around 25 MB (11 MB of it names and counts at 34k identities).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from dataclasses import dataclass

import pyarrow.compute as pc
from PIL import Image

from datakit import schema
from datakit.audit import plots, sheets
from datakit.audit import stats as stats_mod
from datakit.audit.folder import IMAGES, OutputFolder


@dataclass
class ReportOptions:
    detail_people: int = 300  # people whose images are listed (the rest: names and counts)
    thumbs_per_identity: int = 8
    images_per_identity: int = 24
    dropped_per_person: int = 50
    thumb_size: int = 128
    identities: tuple[str, ...] = ()  # names or ids listed in detail first


def build(folder: OutputFolder, options: ReportOptions | None = None, st: stats_mod.Stats | None = None) -> str:
    options = options or ReportOptions()
    st = st or stats_mod.compute(folder)
    people = people_data(folder, options)
    figures = [
        ("fig11", "Fig. 11: identity cluster size (kept images per identity)", plots.fig11_identity_sizes(st)),
        ("fig12", "Fig. 12: face area fraction of kept images, 0.1-wide bins", plots.fig12_face_area(st)),
        ("fig13", "Fig. 13: estimated age of kept images", plots.fig13_age(st)),
        ("fig16", "Fig. 16: gender of kept images and identities", plots.fig16_gender(st)),
    ]
    title = f"Audit report: {st.build_name or folder.root.name}"
    body = [
        f"<header><h1>{_e(title)}</h1>{summary_html(folder, st)}</header>",
        "<nav><a href='#table6'>Table 6</a> <a href='#figures'>Figures</a> <a href='#funnel'>Drop funnel</a> "
        "<a href='#browser'>Identity browser</a> <a href='#redactions'>Redactions</a> <a href='#changes'>Changes</a></nav>",
        f"<section id='table6'><h2>Table 6: sources</h2>{table6_html(st)}</section>",
        "<section id='figures'><h2>Figures</h2>" + "".join(_figure(i, cap, png) for i, cap, png in figures) + "</section>",
        f"<section id='funnel'><h2>Drop funnel</h2>{funnel_html(st)}</section>",
        BROWSER_HTML,
        f"<section id='redactions'><h2>Redactions</h2>{redactions_html(folder)}</section>",
        f"<section id='changes'><h2>Changes since the previous state</h2>{changes_html(folder)}</section>",
        f"<script type='application/json' id='people-data'>{_json_for_script(people)}</script>",
        f"<script>const DETAIL = {int(options.detail_people)};</script>",
        f"<script>{BROWSER_JS}</script>",
    ]
    return PAGE.format(title=_e(title), css=CSS, body="\n".join(body))


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _json_for_script(obj) -> str:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _figure(ident: str, caption: str, png: bytes) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    return f"<figure id='{ident}'><img src='{uri}' alt='{_e(caption)}'><figcaption>{_e(caption)}</figcaption></figure>"


# ---------------------------------------------------------------- static sections


def summary_html(folder: OutputFolder, st: stats_mod.Stats) -> str:
    runs = folder.build.get("runs") or []
    built = runs[-1].get("finished") if runs else None
    parts = [
        f"<p class='summary'><b>{st.items}</b> input items: <b>{st.kept}</b> kept, <b>{st.dropped}</b> dropped, "
        f"<b>{st.redacted}</b> redacted; <b>{st.table6[-1]['identities']}</b> identities.</p>",
        f"<p class='meta'>Folder {_e(folder.root)}; recipe hash {_e((st.recipe_hash or 'unknown')[:12])}"
        + (f"; built {_e(built)}" if built else "") + ".</p>",
    ]  # fmt: skip
    return "".join(parts)


def table6_html(st: stats_mod.Stats) -> str:
    rows = "".join(
        f"<tr{' class=all' if r is st.table6[-1] else ''}><td>{_e(r['source'])}</td><td>{r['identities']}</td>"
        f"<td>{r['images']}</td><td>{stats_mod.fmt_ratio(r['images_per_identity'])}</td></tr>"
        for r in st.table6
    )
    return (
        "<table class='num'><thead><tr><th>source</th><th>identities</th><th>images</th><th>images per identity</th></tr>"
        f"</thead><tbody>{rows}</tbody></table><p class='note'>Kept images. An identity can span sources, so All can be "
        "less than the sum of the identities above.</p>"
    )


def funnel_html(st: stats_mod.Stats) -> str:
    top = max([f["items_in"] for f in st.funnel] + [1])
    rows = []
    for f in st.funnel:
        width = 100 * f["left"] / top
        rows.append(
            f"<tr><td>{_e(f['step'])}</td><td>{f['items_in']}</td><td>{f['dropped']}</td><td>{f['left']}</td>"
            f"<td class='barcell'><div class='bar' style='width:{width:.1f}%'></div></td></tr>"
        )
    stages = ("<table class='num funnel'><thead><tr><th>stage</th><th>items in</th><th>dropped</th><th>left</th>"
              f"<th></th></tr></thead><tbody>{''.join(rows)}</tbody></table>")  # fmt: skip
    sources = sorted({d["source"] for d in st.drops}, key=str)
    pivot: dict[tuple, dict] = defaultdict(dict)
    for d in st.drops:
        pivot[(d["stage"], d["reason"])][d["source"]] = d["images"]
    head = "".join(f"<th>{_e(s)}</th>" for s in sources)
    body = []
    for (stage, reason), per in pivot.items():
        meaning = schema.REASONS.get(reason, ("", "redacted by datakit redact" if reason == "redacted" else ""))[1]
        cells = "".join(f"<td>{per.get(s, 0)}</td>" for s in sources)
        body.append(f"<tr><td>{_e(stage)}</td><td title='{_e(meaning)}'>{_e(reason)}</td>{cells}<td>{sum(per.values())}</td></tr>")
    reasons = (f"<h3>By stage, reason and source</h3><table class='num reasons'><thead><tr><th>stage</th><th>reason</th>{head}"
               f"<th>total</th></tr></thead><tbody>{''.join(body)}</tbody></table>")  # fmt: skip
    return stages + (reasons if body else "<p>No item was dropped.</p>")


def changes_html(folder: OutputFolder) -> str:
    """``datakit diff``'s answer for the build's previous state (history/) and its current one."""
    from datakit.audit import diff

    earlier = diff.previous_state(folder)
    if earlier is None:
        return "<p>No earlier state: the build has not been rebuilt with a changed recipe or source.</p>"
    found = diff.compare(diff.images_of(earlier), diff.images_of(folder.root))
    return f"<p>Against {_e(earlier.name)}.</p>" + diff.html(found, _e)


def redactions_html(folder: OutputFolder) -> str:
    log = folder.redactions()
    if not log:
        return "<p>None.</p>"
    rows = "".join(
        f"<tr><td>{_e(r.get('time'))}</td><td>{_e(r.get('reason'))}</td><td>{len(r.get('image_ids') or [])}</td>"
        f"<td>{len(r.get('also_dropped') or [])}</td><td>{_e(', '.join(r.get('shards_rewritten') or []))}</td></tr>"
        for r in log
    )
    return ("<table><thead><tr><th>time</th><th>reason</th><th>images redacted</th><th>images dropped with them</th>"
            f"<th>shards rewritten</th></tr></thead><tbody>{rows}</tbody></table>")  # fmt: skip


# ---------------------------------------------------------------- identity browser data


def people_data(folder: OutputFolder, options: ReportOptions) -> list[dict]:
    """One entry per kept identity, plus one per name whose images were all dropped.

    Every entry has names, counts and drop counts by reason; the first ``detail_people`` entries
    (those asked for, then by kept and dropped images) also list their images.
    """
    identities = sheets.kept_identities(folder)
    known = {i.identity_id for i in identities}
    by_name: dict[str, str] = {}
    for ident in identities:
        for n in ident.names:
            by_name.setdefault(sheets.normalize(n), ident.identity_id)
    people: dict[str, dict] = {i.identity_id: _person(i.identity_id, i.names, i.images) for i in identities}
    cols = ["image_id", "status", "identity_id", "label", "source", "locator", "drop_stage", "reason", "detail", "redaction_reason"]
    others = folder.read(IMAGES, columns=cols)
    others = others.filter(pc.not_equal(others["status"], schema.KEPT)).to_pylist()
    owner = []
    for r in others:
        pid = r["identity_id"] if r["identity_id"] in known else by_name.get(sheets.normalize(r["label"]))
        if pid is None:
            pid = f"name:{sheets.normalize(r['label'])}" if r["label"] else "name:"
            people.setdefault(pid, _person("", [r["label"] or "(no name)"], 0))
        p = people[pid]
        p["dropped_count"] += 1
        reason = r["reason"] or r["status"]
        p["reasons"][reason] = p["reasons"].get(reason, 0) + 1
        owner.append(pid)
    wanted = [sheets.normalize(q) for q in options.identities]
    order = sorted(people, key=lambda k: (not _asked(people[k], wanted), -people[k]["kept_count"], -people[k]["dropped_count"], people[k]["names"][0].casefold()))
    detailed = set(order[: options.detail_people])
    for r, pid in zip(others, owner):
        p = people[pid]
        if pid in detailed and len(p["dropped"]) < options.dropped_per_person:
            p["dropped"].append(_dropped_entry(r))
    shown = [k for k in order if k in detailed and k in known]
    samples = sheets.kept_samples(folder, shown, options.images_per_identity)
    thumb_rows = [r for ident in shown for r in samples[ident][: options.thumbs_per_identity]]
    thumbs = dict(zip((r["image_id"] for r in thumb_rows), sheets.read_images(folder, thumb_rows)))
    for ident in shown:
        people[ident]["kept"] = [_kept_entry(r, thumbs.get(r["image_id"]), options.thumb_size) for r in samples[ident]]
    for k in detailed:
        people[k]["detailed"] = True
    return [people[k] for k in order]


def _person(ident: str, names: list[str], kept: int) -> dict:
    return {"id": ident, "names": names, "kept_count": kept, "kept": [], "dropped_count": 0, "dropped": [], "reasons": {}, "detailed": False}


def _asked(person: dict, wanted: list[str]) -> bool:
    return any(q == person["id"] or q in (sheets.normalize(n) for n in person["names"]) for q in wanted)


def _dropped_entry(r: dict) -> dict:
    reason = r["reason"] or ("redacted" if r["status"] == schema.REDACTED else None)
    meaning = schema.REASONS.get(r["reason"], ("", ""))[1] if r["reason"] else ""
    detail = r["detail"]
    if r["status"] == schema.REDACTED:
        detail = f"redacted: {r['redaction_reason']}" + (f" (dropped before: {r['detail']})" if r["detail"] else "")
    return {"image_id": r["image_id"], "source": r["source"], "locator": r["locator"], "status": r["status"],
            "stage": r["drop_stage"] or ("redact" if r["status"] == schema.REDACTED else None), "reason": reason,
            "meaning": meaning, "detail": detail}  # fmt: skip


def _kept_entry(r: dict, jpeg: bytes | None, size: int) -> dict:
    return {"key": r["key"], "caption": r["caption"], "source": r["source"], "locator": r["locator"],
            "age": None if r["age"] is None else round(float(r["age"]), 1), "gender": r["gender"],
            "thumb": thumbnail_uri(jpeg, size)}  # fmt: skip


def thumbnail_uri(data: bytes | None, size: int) -> str | None:
    if not data:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (size, size))
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=75)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:  # a damaged member: no thumbnail (verify reports the damage)
        return None


# ---------------------------------------------------------------- page template

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body>
{body}
</body></html>
"""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"DejaVu Sans",sans-serif;margin:0 auto;max-width:1100px;padding:0 16px 40px;color:#222}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:15px}nav a{margin-right:12px}.meta,.note{color:#666;font-size:12px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}table.num td:not(:first-child):not(:nth-child(2)){text-align:right}tr.all td{font-weight:bold}
table.reasons td:nth-child(2){text-align:left}
figure{display:inline-block;margin:8px;vertical-align:top}figure img{max-width:520px}figcaption{font-size:12px;color:#555}
.barcell{width:280px}.bar{height:12px;background:#4C72B0}
#search{font-size:16px;padding:6px 10px;width:360px}
#matches button{margin:3px;padding:3px 8px;border:1px solid #bbb;background:#fafafa;border-radius:3px;cursor:pointer}
#matches button.active{background:#4C72B0;color:#fff}
.tiles{display:flex;flex-wrap:wrap;gap:10px}.tile{width:150px;margin:0;font-size:12px}
.tile img,.tile .noimg{width:128px;height:128px;object-fit:cover;display:block;background:#eee}
.tile .noimg{display:flex;align-items:center;justify-content:center;color:#888;text-align:center;font-size:11px}
.tile .cap{margin-top:3px}.tile .src{color:#777;font-size:11px;word-break:break-all}
.dropped td{font-size:12px;word-break:break-all}.count{color:#666}
"""

BROWSER_HTML = """<section id="browser"><h2>Identity browser</h2>
<p class="note">Type a name (case, spaces and underscores do not matter) or an identity id. Kept images show their
caption; dropped ones their stage, reason and details.</p>
<input id="search" type="search" placeholder="Find a name or identity id" autocomplete="off" aria-label="find a name">
<div id="matches"></div><div id="person"></div></section>"""

BROWSER_JS = r"""
(function(){
const people = JSON.parse(document.getElementById('people-data').textContent);
const norm = s => (s || '').toLowerCase().replace(/_/g, ' ').replace(/\s+/g, ' ').trim();
for (const p of people) p.haystack = [p.id].concat(p.names).map(norm).join('\n');
const input = document.getElementById('search');
const matches = document.getElementById('matches');
const panel = document.getElementById('person');
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function show(p, button) {
  for (const b of matches.querySelectorAll('button')) b.classList.remove('active');
  if (button) button.classList.add('active');
  panel.replaceChildren();
  panel.appendChild(el('h3', 'name', p.names.join(' / ') || '(no name)'));
  panel.appendChild(el('p', 'count', (p.id ? 'identity ' + p.id + ': ' : 'no kept identity: ') +
    p.kept_count + ' kept, ' + p.dropped_count + ' dropped or redacted'));
  const reasons = Object.entries(p.reasons).map(([r, n]) => r + ' ' + n).join(', ');
  if (reasons) panel.appendChild(el('p', 'reasons', 'dropped or redacted, by reason: ' + reasons));
  if (!p.detailed) {
    panel.appendChild(el('p', 'note', 'Images are listed for the first ' + DETAIL + ' people of this page only; ' +
      'run datakit report OUTPUT --identity "' + (p.names[0] || p.id) + '" to list this one.'));
    return;
  }
  panel.appendChild(el('h4', null, 'Kept images (' + p.kept_count + ')'));
  const tiles = el('div', 'tiles kept');
  for (const k of p.kept) {
    const f = el('figure', 'tile');
    if (k.thumb) { const img = el('img'); img.src = k.thumb; img.alt = k.caption || ''; f.appendChild(img); }
    else f.appendChild(el('div', 'noimg', 'thumbnail not embedded'));
    f.appendChild(el('figcaption', 'cap', k.caption || '(no caption)'));
    f.appendChild(el('div', 'src', k.source + ': ' + k.locator));
    tiles.appendChild(f);
  }
  panel.appendChild(tiles);
  if (p.kept.length < p.kept_count) panel.appendChild(el('p', 'note', 'showing ' + p.kept.length + ' of ' + p.kept_count));
  panel.appendChild(el('h4', null, 'Dropped images (' + p.dropped_count + ')'));
  if (p.dropped.length) {
    const t = el('table', 'dropped');
    const head = el('tr');
    for (const h of ['source', 'locator', 'stage', 'reason', 'detail']) head.appendChild(el('th', null, h));
    t.appendChild(head);
    for (const d of p.dropped) {
      const tr = el('tr');
      tr.appendChild(el('td', null, d.source)); tr.appendChild(el('td', null, d.locator));
      tr.appendChild(el('td', null, d.stage)); const r = el('td', 'reason', d.reason); r.title = d.meaning || ''; tr.appendChild(r);
      tr.appendChild(el('td', null, d.detail || ''));
      t.appendChild(tr);
    }
    panel.appendChild(t);
    if (p.dropped.length < p.dropped_count) panel.appendChild(el('p', 'note', 'showing ' + p.dropped.length + ' of ' + p.dropped_count));
  } else panel.appendChild(el('p', 'note', 'none'));
}
function update() {
  const q = norm(input.value);
  const hits = q ? people.filter(p => p.haystack.includes(q)) : people;
  matches.replaceChildren();
  for (const p of hits.slice(0, 50)) {
    const b = el('button', null, (p.names.join(' / ') || '(no name)') + ' (' + p.kept_count + ')');
    b.addEventListener('click', () => show(p, b));
    matches.appendChild(b);
  }
  if (hits.length > 50) matches.appendChild(el('span', 'note', ' and ' + (hits.length - 50) + ' more: type more of the name'));
  if (q && hits.length) show(hits[0], matches.querySelector('button'));
  else { panel.replaceChildren(); if (q) panel.appendChild(el('p', 'none', 'No name or identity id matches "' + input.value + '".')); }
}
input.addEventListener('input', update);
update();
})();
"""
