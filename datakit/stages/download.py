"""The download stage: fetch every URL item (and read every folder item), check it is a usable
image, and record what came back.

One ``process()`` call handles one partition with many requests in flight (asyncio + aiohttp):
``request_concurrency`` workers take items in turn; each host has at most
``per_host_concurrency`` requests open. Bodies are decoded and hashed in a small thread pool
(Pillow and hashlib release the GIL), so decoding overlaps with the network.

For each URL, in order:

1. ``netguard.check_url``: http(s) only, a well-formed host, no forbidden IP literal.
2. The request, with a total time limit per hop (headers and body). Redirects are followed by
   hand so that every hop goes through step 1 again; the connector's resolver refuses host
   names that resolve to forbidden addresses before any connection is made.
3. Transient failures (timeouts, connection errors, 5xx, 429) are retried with exponential
   backoff; the jitter is seeded from the URL, so two runs wait alike. ``Retry-After`` is
   honoured; if it asks for longer than ``max_retry_after_s`` the item is dropped instead of
   hammering the server early. Other 4xx answers are final.
4. ``X-Robots-Tag: noai`` / ``noimageai`` on any hop drops the item (``respect_opt_out``).
5. The body is read up to ``max_bytes`` (Content-Length is checked first, then the bytes read).
6. ``decode.check_image`` decodes it under ``max_pixels`` (decode_image's checks and verdicts;
   JPEGs at 1/8 scale, every byte still entropy-decoded; ``full_decode`` for full scale); the
   shorter side must reach ``min_side``.

With a download cache (recipe key ``cache:``, ``datakit.cache``), a URL fetched and accepted by
an earlier build is taken from the cache (``attempts`` 0) and goes through step 6 again; every
URL item accepted here is added to it. Folder items skip the network and go through steps 5 and 6. The same URL appearing twice in a
partition is fetched once and both rows get the result. A bad item never raises: it becomes a
dropped row with a reason code and plain-words detail. Outputs hold no timings, so a
deterministic server gives identical rows run after run.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import os
import random
import re
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

import aiohttp
import pyarrow as pa
import yarl
from pydantic import Field, field_validator

from datakit import netguard
from datakit.cache import DownloadCache
from portrait.decode import DEFAULT_MAX_PIXELS, DecodeError, check_image, decode_image
from datakit.stage import Output, Stage, StageSettings

STAGE = "download"
DEFAULT_USER_AGENT = "hifi-portrait-datakit/0.1 (research dataset builder; honours X-Robots-Tag noai)"
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
OPT_OUT_TOKENS = ("noai", "noimageai")
READ_CHUNK = 1 << 16

# Columns this stage adds (typed by the manifest schema), plus the bulk bytes.
ADDS = ("http_status", "attempts", "final_url", "content_type", "sha256", "bytes", "format", "width", "height",
        "mode", "image_bytes")


class Settings(StageSettings):
    """``download:`` in a recipe. ``concurrency`` (inherited) is the number of parallel Ray tasks;
    ``request_concurrency`` is the number of requests in flight inside each task."""

    timeout_s: float = Field(default=20.0, gt=0, description="time limit per request (headers and body)")
    max_bytes: int = Field(default=20_000_000, gt=0, description="larger bodies/files are dropped (too_large)")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, description="declared width x height limit")
    min_side: int = Field(default=64, ge=1, description="shorter side below this is dropped (image_too_small)")
    retries: int = Field(default=2, ge=0, description="extra attempts after a transient failure")
    backoff_s: float = Field(default=0.5, ge=0, description="first backoff; doubles each retry, jittered")
    max_retry_after_s: float = Field(default=30.0, ge=0, description="longest Retry-After the stage waits for")
    request_concurrency: int = Field(default=64, ge=1, description="requests in flight per partition task")
    per_host_concurrency: int = Field(default=16, ge=1, description="requests in flight per host and task")
    max_redirects: int = Field(default=5, ge=0, description="redirects followed per URL, each one re-checked")
    allow_private_addresses: bool = Field(
        default=False, description="allow loopback and private networks (link-local and the rest stay refused)")
    allowed_networks: list[str] = Field(
        default_factory=list, description="CIDR blocks allowed whatever their kind, e.g. 10.1.2.0/24")
    respect_opt_out: bool = Field(default=True, description="drop items served with X-Robots-Tag noai/noimageai")
    user_agent: str = DEFAULT_USER_AGENT  # sent with every request: name the build and a contact
    decode_threads: int = Field(default=2, ge=1, description="threads that decode and hash bodies, per task")
    full_decode: bool = Field(
        default=False, description="decode JPEGs at full scale (decode_image) instead of decode.check_image's "
        "1/8 scale; same verdicts, about twice the CPU")

    @field_validator("allowed_networks")
    @classmethod
    def _networks_parse(cls, value: list[str]) -> list[str]:
        netguard.Policy.of(False, value)  # raises ValueError naming the bad entry
        return value


# ---------------------------------------------------------------- results of one item

@dataclass
class Outcome:
    """What happened to one item; becomes one output row."""

    reason: str | None = None  # None: kept
    detail: str | None = None
    http_status: int | None = None
    attempts: int | None = None
    final_url: str | None = None
    content_type: str | None = None
    body: bytes | None = None
    info: dict = field(default_factory=dict)  # sha256, bytes, format, width, height, mode


class _Retry(Exception):
    """A transient failure of one attempt: worth another try after a pause."""

    def __init__(self, reason: str, detail: str, http_status: int | None = None,
                 final_url: str | None = None, retry_after: float | None = None):
        super().__init__(detail)
        self.reason, self.detail = reason, detail
        self.http_status, self.final_url, self.retry_after = http_status, final_url, retry_after


# ---------------------------------------------------------------- the stage

class DownloadStage(Stage):
    name = STAGE
    kind = "partition"
    Settings = Settings

    reads = ("source_kind", "fetch_uri")
    adds = ADDS

    def __init__(self, settings: Settings | None = None, context: dict | None = None):
        super().__init__(settings if settings is not None else Settings(), context or {})
        self.policy = netguard.Policy.of(self.settings.allow_private_addresses, self.settings.allowed_networks)
        where = self.context.get("cache")
        self.cache = DownloadCache(where) if where else None

    def process(self, rows: pa.Table) -> Output:
        items = rows.select(["source_kind", "fetch_uri"]).to_pylist()
        outcomes = _run_sync(lambda: _Partition(self.settings, self.policy, self.cache).run(items))
        out = Output({c: [None] * len(items) for c in ADDS})
        for i, outcome in enumerate(outcomes):
            values = dict(http_status=outcome.http_status, attempts=outcome.attempts, final_url=outcome.final_url,
                          content_type=outcome.content_type, **outcome.info)
            if outcome.reason is None:
                values["image_bytes"] = outcome.body
            else:
                out.drops[i] = (outcome.reason, outcome.detail)
            for name, value in values.items():
                out.values[name][i] = value
        return out


def _run_sync(make_coro):
    """asyncio.run, also when the caller already runs an event loop (then in a fresh thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    result: list = []
    failure: list[BaseException] = []

    def target():
        try:
            result.append(asyncio.run(make_coro()))
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)

    thread = threading.Thread(target=target, name="download-partition")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


# ---------------------------------------------------------------- one partition

class _Partition:
    def __init__(self, settings: Settings, policy: netguard.Policy, cache: DownloadCache | None = None):
        self.s = settings
        self.policy = policy
        self.cache = cache
        self.host_slots: dict[str, asyncio.Semaphore] = {}

    async def run(self, rows: list[dict]) -> list[Outcome]:
        # Identical URLs (or paths) are fetched once; every row that names them gets the result.
        keys = [(r["source_kind"] == "folder", r["fetch_uri"]) for r in rows]
        unique = list(dict.fromkeys(keys))
        results: dict = {}
        self.pool = ThreadPoolExecutor(self.s.decode_threads, thread_name_prefix="download-decode")
        connector = aiohttp.TCPConnector(
            limit=self.s.request_concurrency, limit_per_host=self.s.per_host_concurrency,
            resolver=netguard.GuardedResolver(self.policy), ttl_dns_cache=300)
        try:
            async with aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                timeout=aiohttp.ClientTimeout(total=None),  # each hop is timed in _hop
                headers={"User-Agent": self.s.user_agent, "Accept": "image/*,*/*;q=0.8"},
            ) as self.session:
                todo = iter(unique)

                async def worker():
                    for key in todo:
                        results[key] = await self._item(*key)

                await asyncio.gather(*(worker() for _ in range(min(self.s.request_concurrency, len(unique)))))
        finally:
            self.pool.shutdown(wait=True)
        return [_copy(results[k]) for k in keys]

    async def _item(self, is_file: bool, uri: str | None) -> Outcome:
        try:
            if not uri:
                return Outcome("invalid_url" if not is_file else "file_missing", "no URL or path for this item")
            cached = None if is_file or self.cache is None else await self._in_pool(self.cache.get, uri)
            if cached is not None:  # fetched by an earlier build: the same answer, no request
                outcome = Outcome(http_status=cached["http_status"], attempts=0, final_url=cached["final_url"],
                                  content_type=cached["content_type"], body=cached["body"])
            else:
                outcome = await (self._read_file(uri) if is_file else self._fetch(uri))
            if outcome.reason is None:
                await self._inspect(outcome)
            if cached is None and outcome.reason is None and not is_file and self.cache is not None:
                await self._in_pool(self.cache.put, uri, outcome.body, outcome.http_status, outcome.final_url, outcome.content_type)
            return outcome
        except Exception as e:  # a bug or an error no branch foresaw; the item still gets its row
            return Outcome("stage_error", f"download failed unexpectedly: {type(e).__name__}: {e}")

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ------------------------------------------------------------ folder items
    async def _read_file(self, path: str) -> Outcome:
        return await asyncio.get_running_loop().run_in_executor(self.pool, _read_capped, path, self.s.max_bytes)

    # ------------------------------------------------------------ URL items
    async def _fetch(self, url: str) -> Outcome:
        try:
            target = netguard.check_url(url, self.policy)
        except netguard.Refused as e:
            return Outcome(e.reason, e.detail, attempts=0, final_url=url)
        attempt = 0
        while True:
            attempt += 1
            try:
                outcome = await self._attempt(target)
            except _Retry as failure:
                delay = self._retry_delay(url, attempt, failure)
                if delay is None:
                    return Outcome(failure.reason, failure.detail + self._gave_up(attempt, failure),
                                   http_status=failure.http_status, attempts=attempt,
                                   final_url=failure.final_url or url)
                await asyncio.sleep(delay)
                continue
            outcome.attempts = attempt
            return outcome

    def _retry_delay(self, url: str, attempt: int, failure: _Retry) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if attempt > self.s.retries:
            return None
        if failure.retry_after is not None:
            return None if failure.retry_after > self.s.max_retry_after_s else failure.retry_after
        jitter = random.Random(f"{url}\0{attempt}").uniform(0.5, 1.5)  # same waits run after run
        return self.s.backoff_s * 2 ** (attempt - 1) * jitter

    def _gave_up(self, attempt: int, failure: _Retry) -> str:
        if failure.retry_after is not None and failure.retry_after > self.s.max_retry_after_s:
            return (f"; Retry-After asks for {failure.retry_after:g} s, more than max_retry_after_s "
                    f"{self.s.max_retry_after_s:g}, so no retry")
        return f" (after {attempt} attempt{'s' if attempt > 1 else ''})"

    async def _attempt(self, target: netguard.Target) -> Outcome:
        """One try: the request and its redirects, each hop checked by the policy."""
        seen = [str(target.url)]
        while True:
            outcome, location = await self._hop(target)
            if location is None:
                return outcome
            try:
                target = netguard.check_url(target.url.join(yarl.URL(location)), self.policy)
            except (netguard.Refused, ValueError) as e:
                reason, detail = (e.reason, e.detail) if isinstance(e, netguard.Refused) else ("invalid_url", str(e))
                return Outcome(reason, f"redirect from {seen[-1]} refused: {detail}",
                               http_status=outcome.http_status, final_url=location)
            url = str(target.url)
            if url in seen:
                return Outcome("too_many_redirects", "redirect loop: " + " -> ".join(seen + [url]),
                               http_status=outcome.http_status, final_url=url)
            seen.append(url)
            if len(seen) - 1 > self.s.max_redirects:
                return Outcome("too_many_redirects",
                               f"more than max_redirects {self.s.max_redirects} redirects (last to {url})",
                               http_status=outcome.http_status, final_url=url)

    async def _hop(self, target: netguard.Target) -> tuple[Outcome, str | None]:
        """One request. Returns (outcome, redirect location or None); raises _Retry."""
        url = str(target.url)
        async with self._host_slot(target.host):
            try:
                async with asyncio.timeout(self.s.timeout_s):
                    async with self.session.get(target.url, allow_redirects=False) as resp:
                        return await self._answer(resp, url)
            except TimeoutError:
                raise _Retry("timeout", f"no complete answer within timeout_s {self.s.timeout_s:g} s "
                             f"from {url}", final_url=url) from None
            except aiohttp.ClientConnectorDNSError as e:
                if isinstance(e.os_error, netguard.AddressRefused):
                    return Outcome("refused_address", e.os_error.detail, final_url=url), None
                return Outcome("dns_error", f"cannot resolve {target.host}: {e.os_error}", final_url=url), None
            except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as e:
                return Outcome("connection_error", f"TLS failed for {url}: {e}", final_url=url), None
            except aiohttp.InvalidURL as e:
                return Outcome("invalid_url", f"aiohttp cannot request {url}: {e}", final_url=url), None
            except aiohttp.ClientResponseError as e:  # aiohttp's parser calls a broken answer "400": it is not the server's
                raise _Retry("connection_error", f"the answer is not valid HTTP ({e.message}) from {url}", final_url=url) from None
            except (aiohttp.ClientError, OSError) as e:
                raise _Retry("connection_error", f"{type(e).__name__}: {e} ({url})", final_url=url) from None

    async def _answer(self, resp: aiohttp.ClientResponse, url: str) -> tuple[Outcome, str | None]:
        status = resp.status
        ctype = resp.headers.get("Content-Type")
        base = dict(http_status=status, final_url=url, content_type=ctype)
        tag = self._opt_out(resp)
        if tag:
            return Outcome("opted_out", f"X-Robots-Tag: {tag} ({url})", **base), None
        if status in REDIRECT_STATUSES:
            location = resp.headers.get("Location")
            if not location:
                return Outcome("http_error", f"HTTP {status} redirect without a Location header ({url})", **base), None
            return Outcome(**base), location
        if status == 429 or status >= 500:
            raise _Retry("http_error", f"HTTP {status} {resp.reason or ''}".rstrip() + f" from {url}",
                         http_status=status, final_url=url, retry_after=_retry_after(resp))
        if not 200 <= status < 300:
            return Outcome("http_error", f"HTTP {status} {resp.reason or ''}".rstrip() + f" from {url}", **base), None
        body, problem = await self._read_body(resp)
        if problem:
            return Outcome("too_large", problem + f" ({url})", **base), None
        return Outcome(body=body, **base), None

    def _opt_out(self, resp: aiohttp.ClientResponse) -> str | None:
        if not self.s.respect_opt_out:
            return None
        for value in resp.headers.getall("X-Robots-Tag", []):
            tokens = re.split(r"[\s,;:]+", value.lower())
            if any(t in OPT_OUT_TOKENS for t in tokens):
                return value
        return None

    async def _read_body(self, resp: aiohttp.ClientResponse) -> tuple[bytes | None, str | None]:
        limit = self.s.max_bytes
        length = resp.content_length
        if length is not None and length > limit:
            return None, f"Content-Length {length} is over max_bytes {limit}"
        encoded = resp.headers.get("Content-Encoding", "identity").lower() != "identity"
        if length is not None and not encoded:
            return await resp.read(), None  # aiohttp never reads past Content-Length
        data = bytearray()
        async for chunk in resp.content.iter_chunked(READ_CHUNK):
            data += chunk
            if len(data) > limit:
                return None, f"body is over max_bytes {limit} (no Content-Length; stopped reading there)"
        return bytes(data), None

    def _host_slot(self, host: str) -> asyncio.Semaphore:
        slot = self.host_slots.get(host)
        if slot is None:
            slot = self.host_slots[host] = asyncio.Semaphore(self.s.per_host_concurrency)
        return slot

    # ------------------------------------------------------------ decode and hash
    async def _inspect(self, outcome: Outcome) -> None:
        loop = asyncio.get_running_loop()
        problem = await loop.run_in_executor(self.pool, _inspect_body, outcome, self.s.max_pixels, self.s.min_side,
                                             self.s.full_decode)
        if problem:
            outcome.reason, outcome.detail = problem
            outcome.body = None


def _local_path(uri: str) -> str:
    """A folder item's path: sources write a name that is not UTF-8 as a file:// URI."""
    if uri.startswith("file://"):
        return os.fsdecode(unquote_to_bytes(uri[len("file://"):]))
    return uri


def _read_capped(path: str, max_bytes: int) -> Outcome:
    local = _local_path(path)  # messages name the item as its row does
    try:
        info = os.stat(local)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            return Outcome("file_missing", f"{path} is not a regular file")
        size = info.st_size
        if size > max_bytes:
            return Outcome("too_large", f"file {path} has {size} bytes, over max_bytes {max_bytes}")
        with open(local, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        return Outcome("file_missing", f"cannot read {path}: {e.strerror or e}")
    if len(data) > max_bytes:  # it grew since stat
        return Outcome("too_large", f"file {path} is over max_bytes {max_bytes}")
    return Outcome(body=data)


def _inspect_body(outcome: Outcome, max_pixels: int, min_side: int, full_decode: bool) -> tuple[str, str] | None:
    """Hash and decode the body; fill outcome.info. Returns (reason, detail) on a drop."""
    body = outcome.body
    outcome.info = {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    where = f" ({outcome.final_url})" if outcome.final_url else ""
    try:
        if full_decode:
            decoded = decode_image(body, max_pixels)
            decoded.image.close()
        else:
            decoded = check_image(body, max_pixels)
    except DecodeError as e:
        return e.reason, e.detail + where
    outcome.info.update(format=decoded.format, width=decoded.width, height=decoded.height, mode=decoded.mode)
    if min(decoded.width, decoded.height) < min_side:
        return "image_too_small", f"{decoded.width}x{decoded.height}, shorter side under min_side {min_side}" + where
    return None


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent/bad."""
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _copy(outcome: Outcome) -> Outcome:
    """Each row gets its own Outcome, so rows sharing a fetch never share mutable state."""
    return Outcome(**{**outcome.__dict__, "info": dict(outcome.info)})
