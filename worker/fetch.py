"""Download an image over http(s) within hard limits: SSRF guard, overall deadline, decoded-size cap.

Limits hold against a hostile server:
- one overall deadline (``fetch_timeout_s``) over DNS, connects, TLS, headers, body and every redirect hop: a
  server sending one byte a second is cut when the deadline passes, not when a per-read timeout would;
- the size cap (``fetch_max_bytes``) applies to the DECODED body: gzip/deflate are inflated here in bounded
  steps, so a gzip bomb is cut at the cap without ever holding more than the cap in memory; Content-Length is
  only trusted to refuse early (a declared size over the cap), never to size a buffer;
- redirects are followed by hand, at most ``fetch_max_redirects``, and every hop is re-validated by netguard.

Errors are ``FetchError(reason, transient)``: transient ones (network errors, timeouts, 5xx, 429) are worth a
retry with backoff; permanent ones (4xx, refused address or scheme, too large, too many redirects) are not.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from typing import Final, Protocol

import httpx

from worker import netguard

__all__ = ["FetchError", "FetchSettings", "fetch_image"]

_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
_USER_AGENT: Final = "synthguard-fetch/1 (+image moderation)"
_ACCEPT: Final = "image/*,*/*;q=0.5"
# Inflate in slices this size so one compressed chunk cannot expand into gigabytes before the cap is checked.
_INFLATE_STEP: Final = 256 * 1024


class FetchSettings(Protocol):
    """The settings fetch_image reads (worker.settings.Settings has them all)."""

    @property
    def fetch_max_bytes(self) -> int: ...
    @property
    def fetch_timeout_s(self) -> float: ...
    @property
    def fetch_max_redirects(self) -> int: ...
    @property
    def allow_private_hosts(self) -> str: ...


class FetchError(Exception):
    """Fetching failed. ``reason`` is a sentence for the stored check; ``transient``: a retry may succeed."""

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient

    def __reduce__(self) -> tuple[object, ...]:
        # Celery pickles/serialises exceptions of retried tasks; keyword-only args need help to round-trip.
        return (_rebuild_fetch_error, (self.reason, self.transient))


def _rebuild_fetch_error(reason: str, transient: bool) -> FetchError:
    return FetchError(reason, transient=transient)


class _Inflater:
    """Bounded gzip/deflate decoder: yields decoded slices, never more than ``_INFLATE_STEP`` at a time."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._decoder: zlib._Decompress | None = None

    def _new_decoder(self, first: bytes) -> zlib._Decompress:
        if self._encoding == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # "deflate" is meant to be zlib-wrapped, but servers send raw deflate too; the header tells which.
        zlib_wrapped = len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self._decoder is None:
                self._decoder = self._new_decoder(data)
            try:
                out = self._decoder.decompress(data, _INFLATE_STEP)
            except zlib.error as exc:
                raise FetchError(f"corrupt {self._encoding} response body: {exc}", transient=False) from None
            if out:
                yield out
            if self._decoder.eof:
                # Concatenated gzip members are legal: start a new decoder on what follows.
                data = self._decoder.unused_data
                self._decoder = None
            else:
                data = self._decoder.unconsumed_tail

    def finish(self) -> None:
        if self._decoder is not None and not self._decoder.eof and self._encoding == "gzip":
            raise FetchError("truncated gzip response body", transient=True)


def _read_body(response: httpx.Response, max_bytes: int) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        inflater = None
    elif encoding in ("gzip", "x-gzip", "deflate"):
        inflater = _Inflater("gzip" if encoding != "deflate" else "deflate")
    else:
        raise FetchError(f"unsupported content-encoding {encoding!r}", transient=False)

    declared = response.headers.get("content-length")
    if inflater is None and declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise FetchError(
            f"response too large: Content-Length {int(declared)} bytes > limit {max_bytes}", transient=False
        )

    parts: list[bytes] = []
    total = 0
    for raw in response.iter_raw():
        for piece in inflater.feed(raw) if inflater is not None else (raw,):
            total += len(piece)
            if total > max_bytes:
                raise FetchError(
                    f"response too large: more than {max_bytes} bytes"
                    + (" after decompression" if inflater is not None else ""),
                    transient=False,
                )
            parts.append(piece)
    if inflater is not None:
        inflater.finish()
    return b"".join(parts)


def _status_error(response: httpx.Response) -> FetchError:
    status = response.status_code
    phrase = response.reason_phrase or "error"
    if status == 429 or status >= 500:
        return FetchError(f"server answered HTTP {status} {phrase}", transient=True)
    return FetchError(f"server answered HTTP {status} {phrase}", transient=False)


def fetch_image(
    url: str,
    settings: FetchSettings,
    *,
    client: httpx.Client | None = None,
    resolver: netguard.Resolver | None = None,
) -> bytes:
    """The body at ``url`` (after redirects), within the settings' size, time and address limits.

    ``client`` may be a client from ``netguard.make_guarded_client`` to reuse connections; by default one is
    made per call. Raises FetchError; never returns a partial body.
    """
    timeout_s = float(settings.fetch_timeout_s)
    own_client = client is None
    http = client or netguard.make_guarded_client(
        netguard.HostAllowlist.from_settings(settings), timeout=timeout_s, resolver=resolver
    )
    started = time.monotonic()
    try:
        with netguard.deadline(timeout_s):
            return _fetch_following_redirects(http, url, settings)
    except FetchError:
        raise
    except netguard.HostResolutionError as exc:
        # A name that does not resolve is not an address refusal; a resolver hiccup is worth a retry.
        raise FetchError(exc.reason, transient=exc.temporary) from None
    except netguard.ForbiddenTargetError as exc:
        raise FetchError(f"refused: {exc.reason}", transient=False) from None
    except httpx.TimeoutException:
        elapsed = time.monotonic() - started
        raise FetchError(f"timed out after {elapsed:.1f} s (limit {timeout_s:g} s)", transient=True) from None
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise FetchError(f"invalid URL: {exc}", transient=False) from None
    except httpx.TransportError as exc:
        raise FetchError(f"network error: {type(exc).__name__}: {exc}", transient=True) from None
    except ValueError as exc:
        # httpx and idna raise ValueError / UnicodeError (IDNAError) for a malformed host, e.g. a redirect to
        # http://xn--/, while building or sending a request: a property of this URL, not of the worker.
        raise FetchError(f"invalid URL: {type(exc).__name__}: {exc}", transient=False) from None
    finally:
        if own_client:
            http.close()


def _fetch_following_redirects(http: httpx.Client, url: str, settings: FetchSettings) -> bytes:
    max_redirects = int(settings.fetch_max_redirects)
    current = httpx.URL(url) if _parsable(url) else None
    if current is None:
        # Let netguard produce the readable reason (octal IPv4 spellings and the like end here).
        netguard.check_url(url)
        raise FetchError(f"invalid URL: {url[:200]!r}", transient=False)
    headers = {"User-Agent": _USER_AGENT, "Accept": _ACCEPT, "Accept-Encoding": "gzip, deflate"}
    for hop in range(max_redirects + 1):
        request = http.build_request("GET", current, headers=headers)
        response = http.send(request, stream=True)
        try:
            if response.status_code in _REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    status = response.status_code
                    raise FetchError(f"HTTP {status} redirect without a Location", transient=False)
                if hop == max_redirects:
                    raise FetchError(f"too many redirects (more than {max_redirects})", transient=False)
                try:
                    current = current.join(location)
                except (httpx.InvalidURL, ValueError):
                    reason = f"redirect to an invalid URL: {location[:200]!r}"
                    raise FetchError(reason, transient=False) from None
                continue
            if not 200 <= response.status_code < 300:
                raise _status_error(response)
            return _read_body(response, int(settings.fetch_max_bytes))
        finally:
            response.close()
    raise FetchError(f"too many redirects (more than {max_redirects})", transient=False)  # pragma: no cover


def _parsable(url: str) -> bool:
    try:
        httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        return False
    return True
