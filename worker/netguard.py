"""SSRF guard for every outbound request the worker makes (image fetches, webhook deliveries).

Three layers, each needed because the one before it can be fooled:

1. ``check_url`` refuses what the URL alone shows: a scheme other than http/https, userinfo
   (``http://trusted.example@127.0.0.1/``), a privileged port other than 80/443, an empty or malformed host.
2. It then resolves the host with ``getaddrinfo`` -- which also turns ``2130706433``, ``0x7f.1`` or ``127.1``
   into 127.0.0.1, spellings ``ipaddress`` rejects -- and refuses the URL if ANY answer is a forbidden address
   (``is_forbidden_address``: loopback, private, link-local, CGNAT, ULA, multicast, reserved, cloud metadata,
   with IPv4-mapped/compatible, NAT64, 6to4 and Teredo IPv6 addresses unwrapped to the IPv4 address inside).
3. The httpx transport built by ``make_guarded_client`` connects to the addresses validated in step 2, not to
   a second DNS answer, so a resolver that answers "public" to the check and "127.0.0.1" to the connect (DNS
   rebinding) gets nowhere. TLS still verifies the certificate and sends SNI for the host name, and the Host
   header is the URL's host, because only the TCP connect is redirected.

The client never follows redirects itself (callers follow them by hand, so every hop goes through steps 1-3
again), ignores proxy environment variables (a proxy would do the connecting for us, unguarded), and refuses a
request before any socket is opened.

Port policy: 80, 443 and every unprivileged port (>= 1024) are allowed. Other privileged ports (22, 25, 110..)
are refused: a fetcher pointed at SSH or SMTP on a public host is an abuse vector, and image and webhook hosts
do not serve from them. Hosts listed by name in the allowlist may use any port.

Allowlist (``SYNTHGUARD_ALLOW_PRIVATE_HOSTS``): comma-separated host names, IP addresses or CIDRs. A listed
host name is trusted whatever it resolves to; an address or CIDR allows resolved addresses inside it. Cloud
metadata addresses stay refused unless listed exactly (a broad ``169.254.0.0/16`` does not open them).
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import os
import socket
import ssl
import threading
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

import httpcore
import httpx

__all__ = [
    "ALLOWED_SCHEMES",
    "CLOUD_METADATA_REASON",
    "ForbiddenTargetError",
    "HostAllowlist",
    "HostResolutionError",
    "ParsedTarget",
    "Resolver",
    "check_url",
    "check_url_form",
    "deadline",
    "is_forbidden_address",
    "make_guarded_client",
    "system_resolver",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> resolved IP address strings. Swappable so tests can play a rebinding DNS server.
Resolver = Callable[[str, int], list[str]]

ALLOWED_SCHEMES: Final = frozenset({"http", "https"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_PRIVILEGED_PORT_LIMIT: Final = 1024
_ALWAYS_ALLOWED_PORTS: Final = frozenset({80, 443})
_DNS_TIMEOUT_S: Final = 10.0

_CLOUD_METADATA: Final = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, DigitalOcean
        ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
    }
)
# Checked in order; the first match names the reason. Python's ``is_private`` folds several of these together,
# and leaves CGNAT (neither private nor global), so the ranges are spelled out for readable reasons.
_FORBIDDEN_V4: Final[tuple[tuple[str, str], ...]] = (
    ("0.0.0.0/8", "unspecified/this-network"),
    ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("169.254.0.0/16", "link-local"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_FORBIDDEN_V6: Final[tuple[tuple[str, str], ...]] = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("fc00::/7", "unique local (private)"),
    ("ff00::/8", "multicast"),
    ("100::/64", "discard-only"),
    ("2001:db8::/32", "documentation"),
)
_V4_NETS: Final = tuple((ipaddress.IPv4Network(net), why) for net, why in _FORBIDDEN_V4)
_V6_NETS: Final = tuple((ipaddress.IPv6Network(net), why) for net, why in _FORBIDDEN_V6)
_NAT64_NETS: Final = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_V4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")


#: How a cloud metadata address is named in refusals; the CLI gives such a URL its own hint.
CLOUD_METADATA_REASON: Final = "cloud metadata endpoint"


class ForbiddenTargetError(Exception):
    """The URL or one of the addresses it resolves to may not be contacted. ``reason`` reads as a sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HostResolutionError(ForbiddenTargetError):
    """The host name could not be resolved. ``temporary``: the resolver timed out or asked to try again
    (EAI_AGAIN), so a later attempt may succeed; otherwise the name does not exist or has no address."""

    def __init__(self, reason: str, *, temporary: bool) -> None:
        super().__init__(reason)
        self.temporary = temporary


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo client), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    for net in _NAT64_NETS:
        if address in net:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    # ::a.b.c.d (deprecated IPv4-compatible); ::1 and :: are loopback/unspecified and handled as IPv6.
    if address in _V4_COMPATIBLE and int(address) > 1:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_forbidden_address(ip: str | IPAddress) -> str | None:
    """Why ``ip`` must not be contacted (e.g. ``"loopback"``), or None when it is a public unicast address.

    IPv6 addresses that embed an IPv4 address are judged by that IPv4 address too: ``::ffff:127.0.0.1`` is
    loopback although ``ipaddress`` says its ``is_loopback`` is False.
    """
    try:
        address: IPAddress = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    except ValueError:
        return "not an IP address"
    if address in _CLOUD_METADATA:
        return CLOUD_METADATA_REASON
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return "scoped (interface-bound) IPv6 address"
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = is_forbidden_address(embedded)
            return None if inner is None else f"{inner} (IPv4 {embedded} inside IPv6)"
        for net6, why in _V6_NETS:
            if address in net6:
                return why
    else:
        if address == ipaddress.IPv4Address("255.255.255.255"):
            return "broadcast"
        for net4, why in _V4_NETS:
            if address in net4:
                return why
    if not address.is_global:
        # Whatever IANA marks non-global and the tables above do not name (future special-purpose blocks).
        return "non-global (special-purpose)"
    return None


def _ascii_host(name: str) -> str:
    """IDNA (punycode) form of a host name, the form URLs are checked and dialled in."""
    try:
        return httpx.URL(f"http://{name}/").raw_host.decode("ascii").lower()
    except (httpx.InvalidURL, ValueError, UnicodeError):
        return name.lower()


@dataclass(frozen=True)
class HostAllowlist:
    """Hosts and networks that may be contacted although private (``SYNTHGUARD_ALLOW_PRIVATE_HOSTS``)."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, spec: str | Iterable[str] | None) -> HostAllowlist:
        """From ``"images.internal, 10.1.0.0/16, 127.0.0.1, [::1]"`` or a list of such entries."""
        if spec is None:
            return cls()
        entries = spec.split(",") if isinstance(spec, str) else list(spec)
        hosts: set[str] = set()
        networks: list[Network] = []
        for raw in entries:
            entry = raw.strip().strip("[]").lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if "/" in entry:
                    raise ValueError(f"{raw.strip()!r} is not a valid CIDR") from None
                hosts.add(_ascii_host(entry.rstrip(".")))
        return cls(frozenset(hosts), tuple(networks))

    @classmethod
    def from_settings(cls, settings: object) -> HostAllowlist:
        """From any object with an ``allow_private_hosts`` string attribute (worker.settings.Settings)."""
        return cls.parse(str(getattr(settings, "allow_private_hosts", "") or ""))

    def allows_host(self, host: str) -> bool:
        return _ascii_host(host.rstrip(".")) in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        if address in _CLOUD_METADATA:
            # Only an exact entry opens a metadata endpoint; a broad CIDR is far more likely a mistake.
            return any(net.num_addresses == 1 and address in net for net in self.networks)
        return any(address in net for net in self.networks)

    def __bool__(self) -> bool:
        return bool(self.hosts or self.networks)


@dataclass(frozen=True)
class ParsedTarget:
    """A URL that passed every check, with the addresses its host resolved to (the only ones to dial)."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...] = field(default_factory=tuple)
    # True when the target is reachable only thanks to SYNTHGUARD_ALLOW_PRIVATE_HOSTS.
    allowlisted: bool = False


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``getaddrinfo`` gives for ``host`` (TCP), bounded in time, in the resolver's order."""
    answers: list[str] = []
    failure: list[BaseException] = []

    def resolve() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            for _family, _type, _proto, _canon, sockaddr in infos:
                address = str(sockaddr[0])
                if address not in answers:
                    answers.append(address)
        except (OSError, UnicodeError) as exc:
            failure.append(exc)

    # getaddrinfo cannot be interrupted; a daemon thread bounds how long a slow (hostile) DNS server holds us.
    thread = threading.Thread(target=resolve, name="netguard-dns", daemon=True)
    thread.start()
    thread.join(_remaining(_DNS_TIMEOUT_S))
    if thread.is_alive():
        raise HostResolutionError(f"could not resolve {host!r}: DNS lookup timed out", temporary=True)
    if failure:
        error = failure[0]
        temporary = isinstance(error, socket.gaierror) and error.errno == socket.EAI_AGAIN
        raise HostResolutionError(f"could not resolve {host!r}: {error}", temporary=temporary)
    return answers


def _split_url(url: str) -> tuple[httpx.URL, str, str, int]:
    if any(ord(char) < 0x21 or char == "\\" for char in url):
        raise ForbiddenTargetError("URL contains whitespace, control characters or backslashes")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ForbiddenTargetError(f"invalid URL: {exc}") from None
    scheme = parsed.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise ForbiddenTargetError(f"scheme {scheme or '(none)'!r} is not allowed (only http and https)")
    after_scheme = url.split("://", 1)[1] if "://" in url else ""
    authority = after_scheme.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if parsed.userinfo or "@" in authority:
        raise ForbiddenTargetError("URLs with user information (user@host) are not allowed")
    # The ASCII (IDNA) form: what is resolved here is what httpcore asks the backend to dial.
    host = parsed.raw_host.decode("ascii").lower()
    if not host:
        raise ForbiddenTargetError("URL has no host")
    port = parsed.port if parsed.port is not None else _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise ForbiddenTargetError(f"port {port} is not valid")
    return parsed, scheme, host, port


def check_url(
    url: str | httpx.URL,
    allow: HostAllowlist | None = None,
    *,
    resolver: Resolver | None = None,
) -> ParsedTarget:
    """Validate ``url`` and resolve its host; raise ForbiddenTargetError if it may not be contacted.

    Every address the host resolves to must be allowed (a host answering both a public and a private address
    is refused), so the connection may then go to any of them.
    """
    allow = allow or HostAllowlist()
    parsed, scheme, host, port = _split_url(str(url))
    host_allowed = allow.allows_host(host)
    if not host_allowed and port < _PRIVILEGED_PORT_LIMIT and port not in _ALWAYS_ALLOWED_PORTS:
        raise ForbiddenTargetError(f"port {port} is not allowed (80, 443 or >= 1024)")
    try:
        addresses = (resolver or system_resolver)(host, port)
    except ForbiddenTargetError:
        raise
    except (OSError, UnicodeError) as exc:
        temporary = isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN
        raise HostResolutionError(f"could not resolve {host!r}: {exc}", temporary=temporary) from None
    if not addresses:
        raise HostResolutionError(f"could not resolve {host!r}: no addresses", temporary=False)
    used_allowlist = False
    for address_text in addresses:
        try:
            address = ipaddress.ip_address(address_text.split("%", 1)[0])
        except ValueError:
            raise ForbiddenTargetError(f"{host} resolves to {address_text!r}, not an IP address") from None
        if host_allowed:
            if address in _CLOUD_METADATA and not allow.allows_address(address):
                raise ForbiddenTargetError(f"{host} resolves to {address} ({CLOUD_METADATA_REASON})")
            continue
        reason = is_forbidden_address(address_text)
        if reason is None:
            continue
        if allow.allows_address(address):
            used_allowlist = True
            continue
        shown = host if host == str(address) else f"{host} resolves to {address}"
        raise ForbiddenTargetError(f"{shown}: {reason} address refused")
    return ParsedTarget(
        url=str(parsed),
        scheme=scheme,
        host=host,
        port=port,
        addresses=tuple(addresses),
        allowlisted=host_allowed or used_allowlist,
    )


def check_url_form(url: str, allow: HostAllowlist | None = None) -> None:
    """Refuse what ``url`` alone shows (scheme, user information, port, syntax) without resolving its host.

    For a URL stored now and contacted later (a callback, an endpoint): its addresses are judged at every
    connection, because DNS may change in between. Raises ForbiddenTargetError.
    """
    # The resolver answers nothing on purpose: a HostResolutionError means the form was fine.
    with contextlib.suppress(HostResolutionError):
        check_url(url, allow, resolver=lambda _host, _port: [])


# --- deadline: one overall time limit over every connect, TLS handshake, read and write of a request ---

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("netguard_deadline", default=None)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[float]:
    """Bound every network operation inside the block to ``seconds`` from now, in total.

    Per-operation timeouts alone let a server that sends one byte a second hold a request forever; inside this
    block each socket wait is clamped to what is left, so the whole exchange ends within ``seconds`` (plus one
    scheduling slice). Yields the absolute ``time.monotonic()`` deadline.
    """
    until = time.monotonic() + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set(until if outer is None else min(outer, until))
    try:
        yield until
    finally:
        _DEADLINE.reset(token)


def _remaining(timeout: float | None) -> float | None:
    until = _DEADLINE.get()
    if until is None:
        return timeout
    left = until - time.monotonic()
    return left if timeout is None else min(timeout, left)


def _clamped(timeout: float | None, error: type[Exception]) -> float | None:
    left = _remaining(timeout)
    if left is not None and left <= 0:
        raise error("overall deadline exceeded")
    return left


class _DeadlineStream(httpcore.NetworkStream):
    """Wraps a socket stream so that each wait is clamped to the overall deadline of the current request."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamped(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamped(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: typing.Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # server_hostname is the URL's host name: SNI and certificate checks are for it, not the dialled IP.
        return _DeadlineStream(
            self._inner.start_tls(ssl_context, server_hostname, _clamped(timeout, httpcore.ConnectTimeout))
        )

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore.NetworkBackend):
    """Dials only addresses that ``check_url`` validated for this host and port."""

    def __init__(self, allow: HostAllowlist, resolver: Resolver | None) -> None:
        self._allow = allow
        self._resolver = resolver
        self._inner = httpcore.SyncBackend()
        self._pins: dict[tuple[str, int], tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def pin(self, target: ParsedTarget) -> None:
        with self._lock:
            self._pins[(target.host, target.port)] = target.addresses

    def _addresses(self, host: str, port: int) -> tuple[str, ...]:
        with self._lock:
            pinned = self._pins.get((host.lower(), port))
        if pinned is not None:
            return pinned
        # Not pinned (cannot happen through _GuardedTransport, kept for safety): validate now, once.
        scheme = "https" if port == _DEFAULT_PORTS["https"] else "http"
        netloc = f"[{host}]" if ":" in host else host
        return check_url(f"{scheme}://{netloc}:{port}/", self._allow, resolver=self._resolver).addresses

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        last_error: Exception | None = None
        for address in self._addresses(host, port):
            try:
                stream = self._inner.connect_tcp(
                    address,
                    port,
                    _clamped(timeout, httpcore.ConnectTimeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
                continue
            return _DeadlineStream(stream)
        if last_error is not None:
            raise last_error
        raise httpcore.ConnectError(f"no address to connect to for {host}")

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


_SSL_CONTEXTS: dict[int, ssl.SSLContext] = {}
_SSL_LOCK = threading.Lock()


def _default_ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle takes ~20 ms; one verifying context per process serves every client.
    with _SSL_LOCK:
        context = _SSL_CONTEXTS.get(os.getpid())
        if context is None:
            context = httpx.create_ssl_context()
            _SSL_CONTEXTS.clear()
            _SSL_CONTEXTS[os.getpid()] = context
        return context


class GuardedTransport(httpx.HTTPTransport):
    """httpx transport that validates each request's URL and connects only to the validated addresses."""

    def __init__(
        self,
        allow: HostAllowlist | None = None,
        *,
        resolver: Resolver | None = None,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits | None = None,
    ) -> None:
        super().__init__(
            verify=_default_ssl_context() if verify is True else verify,
            trust_env=False,
            limits=limits or httpx.Limits(max_connections=10),
        )
        self.allow = allow or HostAllowlist()
        self.resolver = resolver
        self._backend = _GuardedBackend(self.allow, resolver)
        # httpx builds the connection pool without a way to pass a network backend; rebuild it with ours.
        old_pool = self._pool
        self._pool = httpcore.ConnectionPool(
            ssl_context=old_pool._ssl_context,  # keep httpx's verify/cert handling
            max_connections=old_pool._max_connections,
            max_keepalive_connections=old_pool._max_keepalive_connections,
            keepalive_expiry=old_pool._keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=self._backend,
        )
        old_pool.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        target = check_url(request.url, self.allow, resolver=self.resolver)
        self._backend.pin(target)
        return super().handle_request(request)


def make_guarded_client(
    allow: HostAllowlist | str | None = None,
    timeout: float = 20.0,
    *,
    resolver: Resolver | None = None,
    verify: ssl.SSLContext | bool = True,
    headers: dict[str, str] | None = None,
) -> httpx.Client:
    """An ``httpx.Client`` whose every request passes ``check_url`` and dials only validated addresses.

    Redirects are not followed (``follow_redirects=False``): follow them by hand so each hop is re-validated
    and counted. Proxy environment variables are ignored. A refused request raises ForbiddenTargetError from
    ``client.send``/``get``/``post`` before any socket is opened. For an overall time limit across a slow
    response, wrap the request and the body reading in ``with netguard.deadline(seconds):``.
    """
    allowlist = allow if isinstance(allow, HostAllowlist) else HostAllowlist.parse(allow)
    return httpx.Client(
        transport=GuardedTransport(allowlist, resolver=resolver, verify=verify),
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,
        headers=headers,
    )
