"""datakit report: one offline HTML page, checked in real headless Chromium (no mocks)."""

from __future__ import annotations

import asyncio
import re
import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from audit_browser import CHROMIUM, Browser
from audit_fixture import HOSTILE_LABEL, REPO, audit_template  # noqa: F401  (pytest fixture)

from datakit import schema
from datakit.audit import report
from datakit.audit.cli import main as audit_main
from datakit.audit.folder import OutputFolder

SCREENSHOT_COPY = REPO / ".pytest_cache" / "audit_report.png"


def require_chromium():
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the report's browser test needs Debian's chromium. "
            "Install it with scripts/ensure_chromium.sh (apt-get install chromium), which `make test` runs first.",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def page_file(audit_template, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert audit_main(["report", str(audit_template.output), "--out", str(out), "--detail", "8"]) == 0
    return out


def test_page_has_no_external_reference(page_file):
    html = page_file.read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", html)
    assert refs, "the page should reference its figures"
    assert all(r.startswith(("data:", "#")) for r in refs), [r for r in refs if not r.startswith(("data:", "#"))]
    assert "default-src 'none'" in html  # the Content-Security-Policy forbids loading anything else
    assert "<script>window.pwned" not in html  # the hostile label is escaped, in HTML and in the JSON


def test_details_are_bounded(audit_template):
    folder = OutputFolder(audit_template.output)
    options = report.ReportOptions(detail_people=3, thumbs_per_identity=3, images_per_identity=4, dropped_per_person=1, identities=("hugo chavez",))
    people = report.people_data(folder, options)
    detailed = [p for p in people if p["detailed"]]
    assert people[:3] == detailed  # listed first
    assert detailed[0]["names"] == ["Hugo_Chavez"]  # asked for, so first though small
    sizes = sorted((p["kept_count"] for p in people if p["id"] and p is not detailed[0]), reverse=True)
    assert [p["kept_count"] for p in detailed[1:]] == sizes[:2]  # then the largest
    for p in detailed:
        assert len(p["kept"]) == min(4, p["kept_count"]) and sum(1 for k in p["kept"] if k["thumb"]) == 3
        assert len(p["dropped"]) == min(1, p["dropped_count"])
    for p in people[3:]:
        assert p["kept"] == [] and p["dropped"] == []  # names and counts only
        assert sum(p["reasons"].values()) == p["dropped_count"]
    nicole = next(p for p in people if "Nicole Kidman" in p["names"])
    assert nicole["reasons"] == {"http_error": 1, "undecodable": 1}


def test_names_without_kept_identity_are_searchable(audit_template):
    people = report.people_data(OutputFolder(audit_template.output), report.ReportOptions())
    george = [p for p in people if p["names"] == ["George_W_Bush"]]
    assert len(george) == 1 and george[0]["id"] == "" and george[0]["kept_count"] == 0
    assert {d["reason"] for d in george[0]["dropped"]} == {"identity_too_small"}
    # the outlier labelled Tony_Blair is listed under Tony Blair's identity, with its reason
    tony = next(p for p in people if "Tony_Blair" in p["names"])
    assert {d["reason"] for d in tony["dropped"]} == {"identity_outlier", "face_blurry"}


def test_report_in_headless_chromium(audit_template, page_file, tmp_path):
    require_chromium()
    images = pq.read_table(audit_template.output / "images.parquet")
    colin = images.filter(pc.and_(pc.equal(images["status"], schema.KEPT), pc.match_substring(images["label"], "Colin")))
    colin_captions = sorted(colin["caption"].to_pylist())
    shot = tmp_path / "report.png"

    async def drive():
        async with Browser() as page:
            await page.open(page_file.resolve().as_uri())
            first = await page.evaluate(
                """(() => ({
                    title: document.title,
                    table6: [...document.querySelectorAll('#table6 tbody tr')].map(r => [...r.cells].map(c => c.textContent)),
                    figures: [...document.querySelectorAll('#figures img')].map(i => [i.complete, i.naturalWidth]),
                    funnel: [...document.querySelectorAll('#funnel table.funnel tbody tr')].map(r => r.cells[0].textContent),
                    buttons: document.querySelectorAll('#matches button').length,
                }))()"""
            )
            await page.type_text("#search", "colin")
            colin_view = await page.evaluate(
                """(async () => {
                    await Promise.all([...document.querySelectorAll('#person img')].map(i => i.decode()));
                    return {
                    name: document.querySelector('#person h3').textContent,
                    tiles: [...document.querySelectorAll('#person .kept figure')].map(f => ({
                        loaded: !!f.querySelector('img') && f.querySelector('img').naturalWidth > 0,
                        placeholder: (f.querySelector('.noimg') || {}).textContent,
                        caption: f.querySelector('figcaption').textContent})),
                }})()"""
            )
            await page.type_text("#search", "nicole KIDMAN")
            nicole = await page.evaluate(
                "[...document.querySelectorAll('#person table.dropped tr')].slice(1).map(r => [r.cells[2].textContent, r.cells[3].textContent, r.cells[4].textContent])"
            )
            await page.type_text("#search", "john salley")
            hostile = await page.evaluate(
                "({name: document.querySelector('#person h3').textContent, pwned: typeof window.pwned, scripts: document.scripts.length})"
            )
            await page.type_text("#search", "george w")
            george = await page.evaluate("document.querySelector('#person').textContent")
            await page.type_text("#search", "nobody at all")
            nobody = await page.evaluate("document.querySelector('#person').textContent")
            await page.type_text("#search", "Colin_Powell")
            await page.screenshot(shot)
            return first, colin_view, nicole, hostile, george, nobody, page.requested_urls()

    first, colin_view, nicole, hostile, george, nobody, urls = asyncio.run(asyncio.wait_for(drive(), 120))
    assert first["title"] == "Audit report: audit-fixture"
    assert [r[0] for r in first["table6"]] == ["vgg_folder", "imdb_urls", "All"]
    assert first["table6"][-1][1:3] == ["8", "56"]
    assert len(first["figures"]) == 4 and all(done and width > 100 for done, width in first["figures"])
    assert first["funnel"][:3] == ["download", "detect", "filter"]
    assert first["buttons"] > 8  # every identity plus names with only dropped images

    assert "Colin Powell" in colin_view["name"] and "Colin_Powell" in colin_view["name"]
    # 10 kept images listed; thumbnails embedded for the first 8 (ReportOptions.thumbs_per_identity)
    assert len(colin_view["tiles"]) == 10
    assert [t["loaded"] for t in colin_view["tiles"]] == [True] * 8 + [False] * 2
    assert [t["placeholder"] for t in colin_view["tiles"][8:]] == ["thumbnail not embedded"] * 2
    assert sorted(t["caption"] for t in colin_view["tiles"]) == colin_captions

    assert ["download", "http_error", "HTTP 404 Not Found"] in nicole
    assert any(row[1] == "undecodable" for row in nicole)

    assert hostile["name"] == HOSTILE_LABEL  # shown as text, never run
    assert hostile["pwned"] == "undefined" and hostile["scripts"] == 3
    assert "No name or identity id matches" in nobody
    # the 9th person of the page (--detail 8): names and counts only, and how to list the images
    assert "no kept identity: 0 kept, 3 dropped or redacted" in george and "identity_too_small 3" in george
    assert 'datakit report OUTPUT --identity "George_W_Bush"' in george

    assert urls and all(u.startswith(("file:", "data:")) for u in urls), [u for u in urls if not u.startswith(("file:", "data:"))]
    assert shot.stat().st_size > 20_000
    SCREENSHOT_COPY.parent.mkdir(exist_ok=True)
    shutil.copy(shot, SCREENSHOT_COPY)  # kept for a person to look at


def test_chromium_missing_fails_loudly(monkeypatch):
    """The browser test fails with a plain message (never skips) when chromium is absent."""
    import test_audit_report as me

    monkeypatch.setattr(me, "CHROMIUM", me.CHROMIUM.parent / "no-such-chromium")
    with pytest.raises(pytest.fail.Exception, match="scripts/ensure_chromium.sh"):
        me.require_chromium()
