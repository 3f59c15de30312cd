"""A real HTTP server on 127.0.0.1 that serves a folder of photos plus scripted faults.

Tests, the demo and the download benchmark use it::

    with PhotoServer("/path/to/photos") as server:          # background thread
        server.file_url("Ben_Affleck/Ben_Affleck_0001.jpg")   # http://127.0.0.1:PORT/files/...
        server.url("/fault/status/404")
        server.hits()                                         # {"/files/...": 1, ...}
        server.max_in_flight()                                # most requests open at once

    with PhotoServer(folder, in_process=False) as server:   # separate process (benchmarks)
        ...
    with PhotoServer(folder, tls_dir=tmp) as server:         # https, self-signed certificate
        ...

It is an aiohttp server on a free port. The files of the folder are read into memory at start
(it is meant for test folders, not for terabytes). ``in_process=False`` runs it in its own
process so that a benchmark's client does not share an interpreter (and a GIL) with it.

Routes (every response is deterministic except where a route says it sleeps):

====================================  ===============================================================
``/files/<path>``                     a file of the folder (any query string is ignored, so
                                      ``?copy=N`` gives distinct URLs for the same bytes)
``/image.jpg``                        a small generated JPEG (96x64)
``/fault/status/<code>``              that HTTP status with a short text body
``/fault/flaky/<key>?fail=N``         500 for the first N requests of this path, then the JPEG
``/fault/retry-after/<key>?seconds=S&times=N``
                                      429 with ``Retry-After: S`` for the first N (default 1)
                                      requests of this path, then the JPEG
``/fault/slow-headers?delay=S``       sleeps S seconds before answering
``/fault/slow-body?delay=S``          sends the headers and half the body, sleeps S, sends the rest
``/fault/cut-body``                   declares a Content-Length, sends half of it, closes
``/fault/not-http``                   answers bytes that are not an HTTP response, closes
``/fault/truncated.jpg``              the first 60% of the JPEG, as image/jpeg
``/fault/html-as-jpeg``               an HTML page labelled image/jpeg
``/fault/huge.png``                   a PNG whose header declares 100000x100000 pixels
``/fault/redirect-loop/<name>``       a -> b -> a -> ... (302)
``/fault/redirect-chain/<n>``         n redirects, then the JPEG
``/fault/redirect?to=URL&status=302`` a redirect to any URL (never followed by the server itself)
``/fault/noai?tag=noai``              the JPEG with ``X-Robots-Tag: <tag>``
``/fault/big?size=N&length=1``        N bytes of zeros; ``length=0`` sends them chunked, with no
                                      Content-Length
``/fault/hold/<key>?delay=S``         the JPEG after S seconds (to watch how many requests overlap)
``/fault/stall-once/<key>?delay=S``   the first request of this path gets the JPEG after S seconds
                                      (a worker that hangs), later ones at once
``/_stats``                           JSON: requests seen per path, and the most requests that
                                      were open at once (this route is not counted)
====================================  ===============================================================
"""

from __future__ import annotations

import asyncio
import io
import json
import mimetypes
import socket
import ssl
import struct
import subprocess
import sys
import threading
import urllib.request
import zlib
from collections import Counter
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

HOST = "127.0.0.1"


# ---------------------------------------------------------------- generated bodies

def sample_jpeg(width: int = 96, height: int = 64) -> bytes:
    """A deterministic small JPEG (a colour gradient), the same bytes every call."""
    from PIL import Image

    img = Image.new("RGB", (width, height))
    img.putdata([(x * 255 // width, y * 255 // height, 128) for y in range(height) for x in range(width)])
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels but carries almost no data: the shape
    of a decompression bomb, without the bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


HTML_PAGE = b"<!doctype html><html><head><title>Not an image</title></head><body>hello</body></html>"


# ---------------------------------------------------------------- the application

def load_folder(folder: Path | None) -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    if folder is None:
        return files
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"PhotoServer: folder {folder} does not exist")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            rel = path.relative_to(folder).as_posix()
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            files[rel] = (path.read_bytes(), ctype)
    return files


def build_app(folder: Path | None) -> web.Application:
    files = load_folder(folder)
    jpeg = sample_jpeg()
    hits: Counter[str] = Counter()
    load = {"in_flight": 0, "max_in_flight": 0}

    @web.middleware
    async def count_hits(request: web.Request, handler):
        if request.path == "/_stats":
            return await handler(request)
        hits[request.path] += 1
        load["in_flight"] += 1
        load["max_in_flight"] = max(load["max_in_flight"], load["in_flight"])
        try:
            return await handler(request)
        finally:
            load["in_flight"] -= 1

    def jpeg_response(**headers) -> web.Response:
        return web.Response(body=jpeg, content_type="image/jpeg", headers=headers)

    async def serve_file(request: web.Request) -> web.StreamResponse:
        entry = files.get(request.match_info["path"])
        if entry is None:
            return web.Response(status=404, text="no such file\n")
        body, ctype = entry
        return web.Response(body=body, content_type=ctype)

    async def image(request):
        return jpeg_response()

    async def status(request):
        code = int(request.match_info["code"])
        return web.Response(status=code, text=f"status {code}\n")

    async def flaky(request):
        if hits[request.path] <= int(request.query.get("fail", "1")):
            return web.Response(status=500, text="scripted failure\n")
        return jpeg_response()

    async def retry_after(request):
        if hits[request.path] <= int(request.query.get("times", "1")):
            return web.Response(status=429, text="slow down\n",
                                headers={"Retry-After": request.query.get("seconds", "1")})
        return jpeg_response()

    async def slow_headers(request):
        await asyncio.sleep(float(request.query.get("delay", "5")))
        return jpeg_response()

    async def slow_body(request):
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": str(len(jpeg))})
        await resp.prepare(request)
        half = len(jpeg) // 2
        try:
            await resp.write(jpeg[:half])
            await asyncio.sleep(float(request.query.get("delay", "5")))
            await resp.write(jpeg[half:])
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client gave up, as it should
        return resp

    async def cut_body(request):
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": str(len(jpeg))})
        await resp.prepare(request)
        await resp.write(jpeg[: len(jpeg) // 2])
        request.transport.close()  # flushes what was written, then hangs up mid-body
        raise asyncio.CancelledError  # nothing more to send; keeps aiohttp from finishing the body

    async def not_http(request):
        request.transport.write(b"SMTP ready\r\nnot: an http answer\r\n\r\n")
        request.transport.close()
        raise asyncio.CancelledError  # the answer was not HTTP; nothing more to send

    async def truncated(request):
        return web.Response(body=jpeg[: len(jpeg) * 6 // 10], content_type="image/jpeg")

    async def html_as_jpeg(request):
        return web.Response(body=HTML_PAGE, content_type="image/jpeg")

    huge_png = png_declaring(100_000, 100_000)

    async def huge(request):
        return web.Response(body=huge_png, content_type="image/png")

    async def redirect_loop(request):
        other = "b" if request.match_info["name"] == "a" else "a"
        raise web.HTTPFound(f"/fault/redirect-loop/{other}")

    async def redirect_chain(request):
        n = int(request.match_info["n"])
        if n <= 0:
            return jpeg_response()
        raise web.HTTPFound(f"/fault/redirect-chain/{n - 1}")

    async def redirect(request):
        code = int(request.query.get("status", "302"))
        return web.Response(status=code, headers={"Location": request.query["to"]})

    async def noai(request):
        return jpeg_response(**{"X-Robots-Tag": request.query.get("tag", "noai")})

    async def big(request):
        size = int(request.query.get("size", "1000000"))
        if request.query.get("length", "1") == "1":
            return web.Response(body=b"\0" * size, content_type="image/jpeg")
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for start in range(0, size, 65536):
                await resp.write(b"\0" * min(65536, size - start))
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading at its limit
        return resp

    async def hold(request):
        await asyncio.sleep(float(request.query.get("delay", "0.2")))
        return jpeg_response()

    async def stall_once(request):
        if hits[request.path] == 1:
            await asyncio.sleep(float(request.query.get("delay", "60")))
        return jpeg_response()

    async def stats(request):
        return web.json_response({"hits": dict(hits), "max_in_flight": load["max_in_flight"]})

    app = web.Application(middlewares=[count_hits])
    app.add_routes([
        web.get("/files/{path:.+}", serve_file),
        web.get("/image.jpg", image),
        web.get("/fault/stall-once/{key}", stall_once),
        web.get("/fault/status/{code:\\d+}", status),
        web.get("/fault/flaky/{key}", flaky),
        web.get("/fault/retry-after/{key}", retry_after),
        web.get("/fault/slow-headers", slow_headers),
        web.get("/fault/slow-body", slow_body),
        web.get("/fault/cut-body", cut_body),
        web.get("/fault/not-http", not_http),
        web.get("/fault/truncated.jpg", truncated),
        web.get("/fault/html-as-jpeg", html_as_jpeg),
        web.get("/fault/huge.png", huge),
        web.get("/fault/redirect-loop/{name}", redirect_loop),
        web.get("/fault/redirect-chain/{n:\\d+}", redirect_chain),
        web.get("/fault/redirect", redirect),
        web.get("/fault/noai", noai),
        web.get("/fault/big", big),
        web.get("/fault/hold/{key}", hold),
        web.get("/_stats", stats),
    ])
    return app


async def _start(app: web.Application, sock: socket.socket, ssl_context=None) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=1024, ssl_context=ssl_context).start()
    return runner


def self_signed_context(workdir: Path):
    """An SSL context with a fresh self-signed certificate for 127.0.0.1 (no client trusts it)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


async def _shutdown(runner: web.AppRunner) -> None:
    """Stop listening, then end handlers still sleeping in a slow fault route."""
    await runner.cleanup()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def _bound_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    return sock


def main(argv: list[str] | None = None) -> int:
    """``python -m devtools.photoserver [FOLDER]``: serve until interrupted. Prints
    ``PORT <n>`` on its first line of output once it listens (PhotoServer(in_process=False)
    reads it)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m devtools.photoserver", description=main.__doc__)
    parser.add_argument("folder", nargs="?", type=Path, help="folder served under /files/")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    args = parser.parse_args(argv)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    sock = _bound_socket(args.port)
    runner = loop.run_until_complete(_start(build_app(args.folder), sock))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        loop.run_until_complete(_shutdown(runner))
        loop.close()
    return 0


class PhotoServer:
    """Context manager around the server; see the module docstring."""

    def __init__(
        self,
        folder: str | Path | None = None,
        *,
        in_process: bool = True,
        tls_dir: Path | None = None,
        port: int = 0,
    ):
        self.folder = Path(folder) if folder is not None else None
        # 0: a free port. A fixed port lets a stopped server come back at the same URLs.
        self.fixed_port = port
        self.in_process = in_process
        self.tls_dir = Path(tls_dir) if tls_dir is not None else None  # https with a self-signed cert
        if self.tls_dir is not None and not in_process:
            raise ValueError("PhotoServer: tls_dir is supported for the in-process server only")
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._process = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("PhotoServer is not running; use it as a context manager")
        return f"{'https' if self.tls_dir else 'http'}://{HOST}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def file_url(self, relpath: str, copy: int | None = None) -> str:
        url = self.url("/files/" + quote(relpath))
        return url if copy is None else f"{url}?copy={copy}"

    def stats(self) -> dict:
        handlers = [urllib.request.ProxyHandler({})]  # never via a proxy
        if self.tls_dir is not None:  # trust exactly our own certificate
            handlers.append(urllib.request.HTTPSHandler(
                context=ssl.create_default_context(cafile=str(self.tls_dir / "cert.pem"))))
        with urllib.request.build_opener(*handlers).open(self.url("/_stats"), timeout=10) as resp:
            return json.loads(resp.read())

    def hits(self) -> dict[str, int]:
        """Requests the server has seen, per path (query strings not included)."""
        return self.stats()["hits"]

    def max_in_flight(self) -> int:
        """The most requests the server was answering at the same time."""
        return self.stats()["max_in_flight"]

    # ------------------------------------------------------------ start / stop
    def __enter__(self) -> PhotoServer:
        if self.in_process:
            self._start_thread()
        else:
            self._start_process()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_thread(self) -> None:
        app = build_app(self.folder)
        ssl_context = self_signed_context(self.tls_dir) if self.tls_dir is not None else None
        sock = _bound_socket(self.fixed_port)
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._runner = self._loop.run_until_complete(_start(app, sock, ssl_context))
            except BaseException as e:  # reported to the caller below
                failure.append(e)
                started.set()
                return
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="PhotoServer", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            raise RuntimeError(f"PhotoServer failed to start: {failure[0]}") from failure[0]

    def _start_process(self) -> None:
        # A fresh interpreter (not multiprocessing): callers need no __main__ guard, and the
        # server shares no GIL with the client under test.
        cmd = [sys.executable, "-m", "devtools.photoserver", "--port", str(self.fixed_port)]
        cmd += [str(self.folder)] if self.folder else []
        self._process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self._process.stdout.readline()  # blocks until it listens or dies
        if not line.startswith("PORT "):
            self._process.kill()
            self._process.wait(10)
            raise RuntimeError(f"PhotoServer process failed to start (exit {self._process.returncode}); "
                               "its error is printed above")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
            self._process.stdout.close()
            self._process = None
        if self._loop is not None:
            loop = self._loop
            if self._runner is not None:
                asyncio.run_coroutine_threadsafe(_shutdown(self._runner), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(30)
            loop.close()
            self._loop = None
        self.port = None


if __name__ == "__main__":
    sys.exit(main())
