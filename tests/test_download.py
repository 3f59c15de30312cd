"""The download stage against a real HTTP server on 127.0.0.1 (devtools/photoserver.py).

Most cases run in one batch (one process() call, as in a build) and each test reads its row.
The slow routes sleep 30 s: the batch can only end inside the pytest-timeout if the per-request
time limit works. No request ever leaves 127.0.0.1: refused addresses are refused before any
connection is attempted.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from datakit import schema
from datakit.engine.steps import decide
from portrait.decode import DecodeError, check_image, decode_image
from devtools.photoserver import png_declaring
from datakit.stages.download import ADDS, DownloadStage, Settings
from devtools.photoserver import PhotoServer, sample_jpeg

pytestmark = pytest.mark.timeout(25)

FAST = dict(timeout_s=1.0, retries=1, backoff_s=0.05, max_bytes=1_000_000, max_retry_after_s=5,
            allow_private_addresses=True)


# ---------------------------------------------------------------- inputs

def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def _gradient(size=(120, 80)) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size)
    img.putdata([(x * 2 % 256, y * 3 % 256, (x + y) % 256) for y in range(h) for x in range(w)])
    return img


def make_images() -> dict[str, bytes]:
    """Small images in the modes and layouts the stage must handle."""
    rgb = _gradient()
    palette_alpha = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_alpha.info["transparency"] = 0
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgb.size, 0))  # fully transparent: must come out white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    jpeg = _save(rgb, "JPEG", quality=90)
    return {
        "rgb.jpg": jpeg,
        "copy_of_rgb.jpg": jpeg,
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG", quality=90),
        "palette.png": _save(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
        "palette_alpha.png": _save(palette_alpha, "PNG", transparency=0),
        "gray.png": _save(rgb.convert("L"), "PNG"),
        "gray_alpha.png": _save(rgb.convert("LA"), "PNG"),
        "rgba.png": _save(rgba, "PNG"),
        "gray16.png": _save(rgb.convert("L").convert("I;16"), "PNG"),
        "webp.webp": _save(rgb, "WEBP", quality=80),
        "exif_rotated.jpg": _save(rgb, "JPEG", quality=90, exif=exif),
        "tiny.png": _save(_gradient((32, 32)), "PNG"),
        "refused_1.png": _save(rgb, "PNG"),
        "refused_2.png": _save(rgb, "PNG"),
        "predropped.png": _save(rgb, "PNG"),
    }


def items(urls: dict[str, str], kind: str = "urls") -> pa.Table:
    names = list(urls)
    n = len(names)
    return pa.table({
        "image_id": names, "source": ["test"] * n, "source_kind": [kind] * n, "locator": list(urls.values()),
        "label": [None] * n, "extra": [None] * n, "fetch_uri": list(urls.values()), "status": ["kept"] * n,
        "drop_stage": [None] * n, "reason": [None] * n, "detail": [None] * n,
    })


def run(table: pa.Table, **settings) -> dict[str, dict]:
    out = decide(DownloadStage(Settings(**settings), {}), table)
    assert out.column_names == ["image_id", "status", "drop_stage", "reason", "detail", *ADDS]
    assert all(out.schema.field(c).type == schema.IMAGE_COLUMNS[c][0] for c in ADDS if c != "image_bytes")
    assert out.column("image_id").to_pylist() == table.column("image_id").to_pylist()
    return {row["image_id"]: row for row in out.to_pylist()}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name, data in make_images().items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def server(photo_dir):
    with PhotoServer(photo_dir) as srv:
        yield srv


def fault_urls(server) -> dict[str, str]:
    u = server.url
    return {
        "ok": u("/image.jpg"),
        "not_found": u("/fault/status/404"),
        "forbidden": u("/fault/status/403"),
        "flaky_once": u("/fault/flaky/once?fail=1"),
        "always_500": u("/fault/flaky/always?fail=99"),
        "retry_after_1s": u("/fault/retry-after/short?seconds=1"),
        "retry_after_1h": u("/fault/retry-after/long?seconds=3600"),
        "retry_after_date": u("/fault/retry-after/date?seconds=Wed,%2021%20Oct%202015%2007:28:00%20GMT"),
        "slow_headers": u("/fault/slow-headers?delay=30"),
        "slow_body": u("/fault/slow-body?delay=30"),
        "cut_body": u("/fault/cut-body"),
        "not_http": u("/fault/not-http"),
        "truncated_jpeg": u("/fault/truncated.jpg"),
        "html_as_jpeg": u("/fault/html-as-jpeg"),
        "huge_png": u("/fault/huge.png"),
        "redirect_loop": u("/fault/redirect-loop/a"),
        "redirect_3": u("/fault/redirect-chain/3"),
        "redirect_9": u("/fault/redirect-chain/9"),
        "redirect_to_metadata": u("/fault/redirect?to=http://169.254.169.254/latest/meta-data/"),
        "redirect_to_ftp": u("/fault/redirect?to=ftp://127.0.0.1/a.jpg"),
        "noai": u("/fault/noai?tag=noai"),
        "noimageai_for_a_bot": u("/fault/noai?tag=googlebot:%20noindex,%20noimageai"),
        "noindex_only": u("/fault/noai?tag=noindex"),
        "too_large_declared": u("/fault/big?size=2000000"),
        "too_large_chunked": u("/fault/big?size=2000000&length=0"),
        "ftp": "ftp://127.0.0.1/a.jpg",
        "file": "file:///etc/passwd",
        "malformed": "http://[::1",
        "no_scheme": "www.example.com/a.jpg",
        "dns": "http://no-such-host.invalid/a.jpg",
        "same_url_1": server.file_url("gray.png"),
        "same_url_2": server.file_url("gray.png"),
        "rgb": server.file_url("rgb.jpg"),
        "copy_of_rgb": server.file_url("copy_of_rgb.jpg"),
        **{name: server.file_url(f"{name}.{ext}") for name, ext in [
            ("cmyk", "jpg"), ("palette", "png"), ("palette_alpha", "png"), ("gray_alpha", "png"),
            ("rgba", "png"), ("gray16", "png"), ("webp", "webp"), ("exif_rotated", "jpg"), ("tiny", "png")]},
        "predropped": server.file_url("predropped.png"),
    }


@pytest.fixture(scope="module")
def batch(server):
    urls = fault_urls(server)
    table = items(urls)
    # One row arrives already dropped by an earlier stage: it must pass through untouched.
    status = table.column("status").to_pylist()
    idx = list(urls).index("predropped")
    for col, value in (("status", "dropped"), ("drop_stage", "items"), ("reason", "invalid_url"),
                       ("detail", "dropped upstream")):
        values = table.column(col).to_pylist() if col != "status" else status
        values[idx] = value
        table = table.set_column(table.schema.get_field_index(col), col, pa.array(values, pa.string()))
    return run(table, **FAST), urls


def row(batch, name):
    return batch[0][name]


# ---------------------------------------------------------------- faults

@pytest.mark.parametrize(
    "name, reason, http_status, attempts",
    [
        ("not_found", "http_error", 404, 1),
        ("forbidden", "http_error", 403, 1),
        ("always_500", "http_error", 500, 2),
        ("retry_after_1h", "http_error", 429, 1),
        ("slow_headers", "timeout", None, 2),
        ("slow_body", "timeout", None, 2),
        ("cut_body", "connection_error", None, 2),
        ("not_http", "connection_error", None, 2),
        ("truncated_jpeg", "undecodable", 200, 1),
        ("html_as_jpeg", "undecodable", 200, 1),
        ("huge_png", "too_many_pixels", 200, 1),
        ("redirect_loop", "too_many_redirects", 302, 1),
        ("redirect_9", "too_many_redirects", 302, 1),
        ("redirect_to_metadata", "refused_address", 302, 1),
        ("redirect_to_ftp", "unsupported_scheme", 302, 1),
        ("noai", "opted_out", 200, 1),
        ("noimageai_for_a_bot", "opted_out", 200, 1),
        ("too_large_declared", "too_large", 200, 1),
        ("too_large_chunked", "too_large", 200, 1),
        ("ftp", "unsupported_scheme", None, 0),
        ("file", "unsupported_scheme", None, 0),
        ("malformed", "invalid_url", None, 0),
        ("no_scheme", "invalid_url", None, 0),
        ("dns", "dns_error", None, 1),
        ("tiny", "image_too_small", 200, 1),
    ],
)
def test_each_fault_ends_as_a_dropped_row_with_its_reason(batch, name, reason, http_status, attempts):
    r = row(batch, name)
    assert (r["status"], r["drop_stage"], r["reason"]) == ("dropped", "download", reason), r["detail"]
    assert r["http_status"] == http_status
    assert r["attempts"] == attempts
    assert r["detail"] and reason in schema.REASONS
    assert r["image_bytes"] is None


def test_details_say_what_happened_in_plain_words(batch):
    assert "HTTP 404" in row(batch, "not_found")["detail"]
    assert "Retry-After asks for 3600 s" in row(batch, "retry_after_1h")["detail"]
    assert "timeout_s 1 s" in row(batch, "slow_body")["detail"]
    assert "redirect loop" in row(batch, "redirect_loop")["detail"]
    assert "169.254.169.254 is a link-local address" in row(batch, "redirect_to_metadata")["detail"]
    assert row(batch, "redirect_to_metadata")["final_url"] == "http://169.254.169.254/latest/meta-data/"
    assert "10000000000 pixels, over max_pixels" in row(batch, "huge_png")["detail"]
    assert "starts with b'<!doctype html>" in row(batch, "html_as_jpeg")["detail"]
    assert "Content-Length 2000000" in row(batch, "too_large_declared")["detail"]
    assert "X-Robots-Tag: noai" in row(batch, "noai")["detail"]
    assert "no-such-host.invalid" in row(batch, "dns")["detail"]
    # once "ClientResponseError: 400, message='Invalid constant string'", which reads like the server's 400
    assert "the answer is not valid HTTP" in row(batch, "not_http")["detail"] and "400" not in row(batch, "not_http")["detail"]


def test_no_retry_for_4xx_and_bounded_retries_for_5xx(batch, server):
    hits = server.hits()
    assert hits["/fault/status/404"] == 1
    assert hits["/fault/flaky/always"] == 2  # retries=1
    assert hits["/fault/slow-headers"] == 2
    assert hits["/fault/retry-after/long"] == 1  # Retry-After over the cap: no early retry


def test_transient_failures_recover_on_retry(batch):
    for name in ("flaky_once", "retry_after_1s", "retry_after_date"):
        r = row(batch, name)
        assert (r["status"], r["http_status"], r["attempts"]) == ("kept", 200, 2), r["detail"]
        assert r["image_bytes"] == sample_jpeg()


def test_a_good_url_is_kept_with_everything_recorded(batch):
    r = row(batch, "ok")
    expected = sample_jpeg()
    assert r["status"] == "kept" and r["reason"] is None and r["detail"] is None
    assert (r["http_status"], r["attempts"], r["content_type"]) == (200, 1, "image/jpeg")
    assert r["final_url"] == batch[1]["ok"]
    assert r["sha256"] == hashlib.sha256(expected).hexdigest()
    assert r["bytes"] == len(expected)
    assert (r["format"], r["width"], r["height"], r["mode"]) == ("JPEG", 96, 64, "RGB")
    assert r["image_bytes"] == expected


def test_redirects_within_the_limit_are_followed(batch):
    r = row(batch, "redirect_3")
    assert r["status"] == "kept"
    assert r["final_url"].endswith("/fault/redirect-chain/0")


def test_other_robots_tags_do_not_opt_out(batch):
    assert row(batch, "noindex_only")["status"] == "kept"


def test_the_same_url_twice_is_fetched_once_and_both_rows_get_the_result(batch, server):
    a, b = row(batch, "same_url_1"), row(batch, "same_url_2")
    assert a["status"] == b["status"] == "kept"
    assert a["sha256"] == b["sha256"] and a["image_bytes"] == b["image_bytes"] is not None
    assert server.hits()["/files/gray.png"] == 1


def test_identical_bytes_under_two_urls_get_the_same_sha256(batch):
    a, b = row(batch, "rgb"), row(batch, "copy_of_rgb")
    assert a["status"] == b["status"] == "kept"
    assert a["final_url"] != b["final_url"]
    assert a["sha256"] == b["sha256"]


@pytest.mark.parametrize("name, mode, fmt", [("cmyk", "CMYK", "JPEG"), ("palette", "P", "PNG"),
                                             ("palette_alpha", "P", "PNG"), ("gray", "L", "PNG"),
                                             ("gray_alpha", "LA", "PNG"), ("rgba", "RGBA", "PNG"),
                                             ("gray16", "I;16", "PNG"), ("webp", "RGB", "WEBP")])
def test_every_mode_is_kept_with_its_original_mode_and_bytes(batch, photo_dir, name, mode, fmt):
    r = row(batch, "same_url_1" if name == "gray" else name)
    assert r["status"] == "kept", r["detail"]
    assert (r["mode"], r["format"], r["width"], r["height"]) == (mode, fmt, 120, 80)
    file = next(photo_dir.glob(f"{name}.*"))
    assert r["image_bytes"] == file.read_bytes()


def test_exif_orientation_is_applied_to_the_recorded_size(batch):
    r = row(batch, "exif_rotated")
    assert r["status"] == "kept"
    assert (r["width"], r["height"]) == (80, 120)  # stored 120x80, displayed rotated


def test_a_row_dropped_upstream_passes_through_untouched(batch, server):
    r = row(batch, "predropped")
    assert (r["status"], r["drop_stage"], r["reason"], r["detail"]) == ("dropped", "items", "invalid_url",
                                                                        "dropped upstream")
    assert all(r[c] is None for c in ("http_status", "attempts", "sha256", "image_bytes", "final_url"))
    assert "/files/predropped.png" not in server.hits()


# ---------------------------------------------------------------- decode conversions

@pytest.mark.parametrize("name", ["cmyk.jpg", "palette.png", "palette_alpha.png", "gray.png", "gray_alpha.png",
                                  "rgba.png", "gray16.png", "webp.webp", "exif_rotated.jpg"])
def test_decoded_images_are_rgb(photo_dir, name):
    decoded = decode_image((photo_dir / name).read_bytes())
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (decoded.width, decoded.height)


def test_transparent_pixels_become_white(photo_dir):
    assert decode_image((photo_dir / "rgba.png").read_bytes()).image.getpixel((5, 5)) == (255, 255, 255)
    palette = decode_image((photo_dir / "palette_alpha.png").read_bytes()).image
    src = Image.open(photo_dir / "palette_alpha.png")
    transparent = next((x, y) for y in range(src.height) for x in range(src.width) if src.getpixel((x, y)) == 0)
    assert palette.getpixel(transparent) == (255, 255, 255)


def test_exif_rotation_turns_the_pixels(photo_dir):
    decoded = decode_image((photo_dir / "exif_rotated.jpg").read_bytes())
    plain = decode_image((photo_dir / "rgb.jpg").read_bytes()).image
    assert decoded.image.size == (80, 120)
    rotated = plain.transpose(Image.Transpose.ROTATE_270)
    diff = max(abs(a - b) for a, b in zip(decoded.image.getpixel((0, 0)), rotated.getpixel((0, 0))))
    assert diff < 12  # same corner pixel, up to JPEG noise


def _verdict(fn, data: bytes):
    try:
        info = fn(data)
    except DecodeError as e:
        return e.reason
    return info.format, info.mode, info.width, info.height


def test_check_image_gives_decode_images_verdict_on_generated_and_broken_images(photo_dir):
    jpeg = sample_jpeg()
    bodies = {p.name: p.read_bytes() for p in photo_dir.iterdir()}
    bodies.update({"truncated": jpeg[: len(jpeg) * 6 // 10], "html": b"<html></html>", "empty": b"",
                   "huge": png_declaring(100_000, 100_000), "cut_in_header": jpeg[:40]})
    verdicts = {name: _verdict(decode_image, data) for name, data in bodies.items()}
    assert {name: _verdict(check_image, data) for name, data in bodies.items()} == verdicts
    assert verdicts["truncated"] == "undecodable" and verdicts["huge"] == "too_many_pixels"
    assert verdicts["exif_rotated.jpg"] == ("JPEG", "RGB", 80, 120)


def test_check_image_gives_decode_images_verdict_on_every_fixture_file(faces_dir):
    files = sorted(p for p in faces_dir.rglob("*") if p.is_file() and p.suffix not in (".tsv", ".md"))
    differ = [p.name for p in files
              if _verdict(check_image, p.read_bytes()) != _verdict(decode_image, p.read_bytes())]
    assert differ == []
    assert len(files) > 300


def test_full_decode_setting_gives_the_same_rows(server):
    urls = {k: v for k, v in fault_urls(server).items()
            if k in ("ok", "truncated_jpeg", "html_as_jpeg", "huge_png", "cmyk", "exif_rotated", "tiny", "rgb")}
    fast = decide(DownloadStage(Settings(**FAST), {}), items(urls))
    full = decide(DownloadStage(Settings(**FAST, full_decode=True), {}), items(urls))
    assert fast.equals(full)


# ---------------------------------------------------------------- address policy, end to end

def test_loopback_is_refused_by_default_before_any_request(server):
    urls = {"literal": server.file_url("refused_1.png"),
            "by_name": server.file_url("refused_2.png").replace("127.0.0.1", "localhost"),
            "ipv6": f"http://[::1]:{server.port}/files/refused_1.png"}
    rows = run(items(urls), timeout_s=2)
    for name, r in rows.items():
        assert r["reason"] == "refused_address", (name, r["detail"])
        assert "loopback" in r["detail"]
    assert rows["literal"]["attempts"] == 0  # judged from the URL alone
    hits = server.hits()
    assert "/files/refused_1.png" not in hits and "/files/refused_2.png" not in hits


def test_a_private_redirect_target_is_refused_when_only_this_server_is_allowed(server):
    # allowed_networks opens exactly 127.0.0.1; the redirect to 10.0.0.1 must be refused before
    # any connection (a connection attempt would end as timeout or connection_error instead).
    url = server.url("/fault/redirect?to=http://10.0.0.1/a.jpg")
    r = run(items({"r": url}), timeout_s=2, retries=0, allowed_networks=["127.0.0.1/32"])["r"]
    assert (r["reason"], r["http_status"]) == ("refused_address", 302), r["detail"]
    assert "10.0.0.1 is a private address" in r["detail"]


def test_https_certificates_are_verified(photo_dir, tmp_path):
    # A self-signed certificate is a hard failure: no retry, and the detail says why.
    with PhotoServer(photo_dir, tls_dir=tmp_path) as srv:
        assert srv.base_url.startswith("https://")
        r = run(items({"tls": srv.file_url("rgb.jpg")}), **FAST)["tls"]
        assert (r["reason"], r["attempts"]) == ("connection_error", 1), r["detail"]
        assert "certificate" in r["detail"].lower()
        assert srv.hits() == {}  # the handshake failed before any request was sent


# ---------------------------------------------------------------- limits, folders, determinism

@pytest.mark.parametrize("per_host, in_flight, expected", [(4, 64, 4), (16, 3, 3)])
def test_requests_in_flight_stay_within_the_limits(photo_dir, per_host, in_flight, expected):
    with PhotoServer(photo_dir) as srv:
        urls = {f"h{i}": srv.url(f"/fault/hold/{i}?delay=0.2") for i in range(24)}
        rows = run(items(urls), **{**FAST, "per_host_concurrency": per_host, "request_concurrency": in_flight})
        assert all(r["status"] == "kept" for r in rows.values())
        assert srv.max_in_flight() == expected


def test_folder_items_are_read_and_checked_like_downloads(photo_dir, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 2_000_000)
    html = tmp_path / "page.jpg"
    html.write_bytes(b"<html>not an image</html>")
    paths = {"rgb": str(photo_dir / "rgb.jpg"), "exif": str(photo_dir / "exif_rotated.jpg"),
             "missing": str(tmp_path / "gone.jpg"), "directory": str(tmp_path), "big": str(big),
             "html": str(html), "tiny": str(photo_dir / "tiny.png")}
    rows = run(items(paths, kind="folder"), **FAST)
    expected = {"rgb": None, "exif": None, "missing": "file_missing", "directory": "file_missing",
                "big": "too_large", "html": "undecodable", "tiny": "image_too_small"}
    assert {k: r["reason"] for k, r in rows.items()} == expected
    assert rows["rgb"]["sha256"] == hashlib.sha256((photo_dir / "rgb.jpg").read_bytes()).hexdigest()
    assert (rows["exif"]["width"], rows["exif"]["height"]) == (80, 120)
    assert rows["rgb"]["http_status"] is None and rows["rgb"]["attempts"] is None
    assert "gone.jpg" in rows["missing"]["detail"]
    assert "not a regular file" in rows["directory"]["detail"]


def test_a_fifo_in_a_folder_source_does_not_block(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    r = run(items({"fifo": str(fifo)}, kind="folder"), **FAST)["fifo"]
    assert r["reason"] == "file_missing"


def test_same_server_and_settings_give_identical_rows(server):
    deterministic = {k: v for k, v in fault_urls(server).items()
                     if k in ("ok", "not_found", "truncated_jpeg", "html_as_jpeg", "huge_png", "redirect_loop",
                              "redirect_3", "redirect_to_metadata", "noai", "too_large_declared",
                              "too_large_chunked", "ftp", "malformed", "dns", "cmyk", "exif_rotated", "tiny")}
    first = decide(DownloadStage(Settings(**FAST), {}), items(deterministic))
    second = decide(DownloadStage(Settings(**FAST), {}), items(deterministic))
    assert first.equals(second)


def test_process_works_inside_a_running_event_loop(server):
    async def inside():
        return decide(DownloadStage(Settings(**FAST), {}), items({"a": server.url("/image.jpg")}))

    assert asyncio.run(inside()).column("status").to_pylist() == ["kept"]


def test_fixture_photos_download_intact(faces_dir, tmp_path):
    """Real photos (JPEG and PNG, 112 px to 2500 px, grayscale among them) come back byte-exact."""
    dev = faces_dir / "dev"
    files = sorted(p for p in dev.rglob("*") if p.suffix.lower() in (".jpg", ".png"))[::4]
    with PhotoServer(dev) as srv:
        urls = {p.relative_to(dev).as_posix(): srv.file_url(p.relative_to(dev).as_posix()) for p in files}
        rows = run(items(urls), **{**FAST, "max_bytes": 20_000_000})
    for rel, r in rows.items():
        data = (dev / rel).read_bytes()
        assert r["status"] == "kept", (rel, r["detail"])
        assert r["sha256"] == hashlib.sha256(data).hexdigest()
        with Image.open(dev / rel) as im:
            assert (r["width"], r["height"]) in (im.size, im.size[::-1])  # EXIF may turn it

