"""fetch_image over real sockets on 127.0.0.1: slow senders, lying lengths, gzip bombs, statuses, redirects.

A scripted raw-socket server plays the misbehaving responses (http.server cannot lie about lengths); it
counts connections and the bytes it managed to send, so tests can show where the client cut the exchange.
"""

from __future__ import annotations

import gzip
import socket
import socketserver
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from worker.fetch import FetchError, fetch_image
from worker.settings import Settings

KIB = 1024
MIB = 1024 * KIB

Script = Callable[[socket.socket, "ScriptedServer"], None]


@dataclass
class ScriptedServer:
    """Serves each path with a function that writes raw bytes to the client socket."""

    routes: dict[str, Script] = field(default_factory=dict)
    connections: int = 0
    bytes_sent: dict[str, int] = field(default_factory=dict)
    port: int = 0
    #: Set when a connection's script has returned (or the client hung up on it).
    handled: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def sent_when_done(self, path: str, timeout: float = 10.0) -> int:
        """Bytes the script for `path` managed to send, read once it has finished (the client sees the
        bytes before the server thread counts them, so reading earlier races with the count).
        """
        assert self.handled.wait(timeout), f"the script for {path} did not finish in {timeout} s"
        return self.bytes_sent.get(path, 0)

    def send(self, sock: socket.socket, path: str, data: bytes) -> None:
        sock.sendall(data)
        self.bytes_sent[path] = self.bytes_sent.get(path, 0) + len(data)


def _request_path(sock: socket.socket) -> str:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(4096)
        if not chunk:
            return ""
        buffer += chunk
    return buffer.split(b" ", 2)[1].decode()


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    state = ScriptedServer()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            state.connections += 1
            sock: socket.socket = self.request
            path = _request_path(sock)
            script = state.routes.get(path)
            try:
                if script is None:
                    state.send(sock, path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                else:
                    script(sock, state)
            except OSError:
                pass  # the client hung up: that is what several tests provoke
            finally:
                state.handled.set()

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "allow_private_hosts": "127.0.0.1",
        "fetch_timeout_s": 5.0,
        "fetch_max_bytes": 1 * MIB,
        "fetch_max_redirects": 3,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def respond(status: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Script:
    def script(sock: socket.socket, server: ScriptedServer) -> None:
        head = {"Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
        lines = "".join(f"{key}: {value}\r\n" for key, value in head.items())
        server.send(sock, "resp", f"HTTP/1.1 {status}\r\n{lines}\r\n".encode() + body)

    return script


# --- success and status codes
# --------------------------------------------------------------------------------


def test_plain_body_is_returned(scripted: ScriptedServer) -> None:
    scripted.routes["/img"] = respond("200 OK", b"\x89PNG" + b"x" * 5000)
    assert fetch_image(scripted.url("/img"), settings()) == b"\x89PNG" + b"x" * 5000


def test_gzip_body_is_decoded(scripted: ScriptedServer) -> None:
    scripted.routes["/gz"] = respond("200 OK", gzip.compress(b"abc" * 1000), {"Content-Encoding": "gzip"})
    assert fetch_image(scripted.url("/gz"), settings()) == b"abc" * 1000


def test_raw_deflate_body_is_decoded(scripted: ScriptedServer) -> None:
    compressor = zlib.compressobj(wbits=-15)
    body = compressor.compress(b"xyz" * 1000) + compressor.flush()
    scripted.routes["/deflate"] = respond("200 OK", body, {"Content-Encoding": "deflate"})
    assert fetch_image(scripted.url("/deflate"), settings()) == b"xyz" * 1000


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        ("500 Internal Server Error", True),
        ("502 Bad Gateway", True),
        ("503 Service Unavailable", True),
        ("429 Too Many Requests", True),
        ("404 Not Found", False),
        ("403 Forbidden", False),
        ("410 Gone", False),
        ("400 Bad Request", False),
    ],
)
def test_status_codes_map_to_transient_or_permanent(
    scripted: ScriptedServer, status: str, *, transient: bool
) -> None:
    scripted.routes["/s"] = respond(status, b"nope")
    with pytest.raises(FetchError) as failed:
        fetch_image(scripted.url("/s"), settings())
    assert failed.value.transient is transient
    assert status.split(maxsplit=1)[0] in failed.value.reason


def test_connection_refused_is_transient() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(FetchError) as failed:
        fetch_image(f"http://127.0.0.1:{port}/", settings())
    assert failed.value.transient
    assert "network error" in failed.value.reason


# --- address guard
# -------------------------------------------------------------------------------------------


def test_loopback_refused_without_allowlist_before_a_socket_opens(scripted: ScriptedServer) -> None:
    scripted.routes["/img"] = respond("200 OK", b"secret")
    for host in ("127.0.0.1", "localhost", "2130706433", "127.1", "[::ffff:127.0.0.1]"):
        with pytest.raises(FetchError) as failed:
            fetch_image(scripted.url("/img", host), settings(allow_private_hosts=""))
        assert not failed.value.transient
        assert "refused" in failed.value.reason
    assert scripted.connections == 0


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:10.0.0.1]/",
        "http://2130706434/",  # 127.0.0.2 spelled as one number; only 127.0.0.1 is allowlisted
        "file:///etc/passwd",
        "ftp://127.0.0.1/x",
        "http://user@127.0.0.1/",
    ],
)
def test_redirect_to_forbidden_target_is_refused(scripted: ScriptedServer, location: str) -> None:
    scripted.routes["/r"] = respond("302 Found", headers={"Location": location})
    with pytest.raises(FetchError) as failed:
        fetch_image(scripted.url("/r"), settings())
    assert not failed.value.transient
    assert "refused" in failed.value.reason


def test_redirect_to_a_malformed_host_is_a_fetch_error(scripted: ScriptedServer) -> None:
    # idna refuses "xn--" (an empty Punycode label) with IDNAError, a UnicodeError, as the request is built.
    scripted.routes["/r"] = respond("302 Found", headers={"Location": "http://xn--/a.png"})
    with pytest.raises(FetchError, match="invalid URL") as failed:
        fetch_image(scripted.url("/r"), settings())
    assert not failed.value.transient


def test_redirects_are_followed_within_the_limit(scripted: ScriptedServer) -> None:
    scripted.routes["/r1"] = respond("301 Moved", headers={"Location": "/r2"})
    scripted.routes["/r2"] = respond("307 Temporary", headers={"Location": scripted.url("/r3")})
    scripted.routes["/r3"] = respond("308 Permanent", headers={"Location": "/final"})
    scripted.routes["/final"] = respond("200 OK", b"here")
    assert fetch_image(scripted.url("/r1"), settings(fetch_max_redirects=3)) == b"here"
    with pytest.raises(FetchError, match="too many redirects") as failed:
        fetch_image(scripted.url("/r1"), settings(fetch_max_redirects=2))
    assert not failed.value.transient


def test_redirect_loop_ends(scripted: ScriptedServer) -> None:
    scripted.routes["/loop"] = respond("302 Found", headers={"Location": "/loop"})
    with pytest.raises(FetchError, match="too many redirects"):
        fetch_image(scripted.url("/loop"), settings())
    assert scripted.connections == 4  # first request + 3 redirects


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/a", "file:///etc/passwd", "gopher://127.0.0.1/", "data:,x"])
def test_bad_schemes_are_permanent(url: str) -> None:
    with pytest.raises(FetchError) as failed:
        fetch_image(url, settings())
    assert not failed.value.transient
    assert "scheme" in failed.value.reason


def test_unknown_host_is_permanent_and_resolver_hiccup_transient() -> None:
    with pytest.raises(FetchError, match="could not resolve") as failed:
        fetch_image("http://does-not-exist.invalid/a.png", settings())
    assert not failed.value.transient

    def flaky(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    with pytest.raises(FetchError, match="could not resolve") as failed:
        fetch_image("http://images.example.com/a.png", settings(), resolver=flaky)
    assert failed.value.transient


def test_octal_spelling_is_refused() -> None:
    with pytest.raises(FetchError) as failed:
        fetch_image("http://0177.0.0.1/", settings(allow_private_hosts=""))
    assert not failed.value.transient


# --- size caps
# ------------------------------------------------------------------------------------------------


def test_declared_oversize_is_refused_without_reading(scripted: ScriptedServer) -> None:
    def huge_declared(sock: socket.socket, server: ScriptedServer) -> None:
        server.send(sock, "/big", b"HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n\r\n")
        for _ in range(100):
            server.send(sock, "/big", b"\0" * MIB)

    scripted.routes["/big"] = huge_declared
    with pytest.raises(FetchError, match="Content-Length") as failed:
        fetch_image(scripted.url("/big"), settings())
    assert not failed.value.transient
    assert scripted.sent_when_done("/big") < 100 * MIB


def test_body_larger_than_cap_is_cut(scripted: ScriptedServer) -> None:
    scripted.routes["/big"] = respond("200 OK", b"\1" * (2 * MIB))
    with pytest.raises(FetchError, match="too large") as failed:
        fetch_image(scripted.url("/big"), settings())
    assert not failed.value.transient


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "read-until-close"])
def test_the_cap_is_exact_a_body_of_the_cap_passes_one_byte_more_does_not(
    scripted: ScriptedServer, declared: bool
) -> None:
    cap = 4 * KIB

    def body_of(size: int) -> Script:
        def script(sock: socket.socket, server: ScriptedServer) -> None:
            length = f"Content-Length: {size}\r\n" if declared else ""
            head = f"HTTP/1.1 200 OK\r\n{length}Connection: close\r\n\r\n".encode()
            server.send(sock, "body", head + b"\5" * size)

        return script

    scripted.routes["/at-cap"] = body_of(cap)
    scripted.routes["/over-cap"] = body_of(cap + 1)
    assert fetch_image(scripted.url("/at-cap"), settings(fetch_max_bytes=cap)) == b"\5" * cap
    # A declared size over the cap is refused from the header alone, before any of the body is read.
    with pytest.raises(FetchError, match="Content-Length" if declared else "more than 4096 bytes") as failed:
        fetch_image(scripted.url("/over-cap"), settings(fetch_max_bytes=cap))
    assert not failed.value.transient


def test_endless_body_without_length_is_cut_at_the_cap(scripted: ScriptedServer) -> None:
    def endless(sock: socket.socket, server: ScriptedServer) -> None:
        server.send(sock, "/endless", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        while True:
            server.send(sock, "/endless", b"\2" * (64 * KIB))

    scripted.routes["/endless"] = endless
    with pytest.raises(FetchError, match="too large"):
        fetch_image(scripted.url("/endless"), settings())


def test_endless_chunked_body_is_cut_at_the_cap(scripted: ScriptedServer) -> None:
    def chunked(sock: socket.socket, server: ScriptedServer) -> None:
        server.send(sock, "/chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            server.send(sock, "/chunked", b"10000\r\n" + b"\3" * 0x10000 + b"\r\n")

    scripted.routes["/chunked"] = chunked
    with pytest.raises(FetchError, match="too large"):
        fetch_image(scripted.url("/chunked"), settings())


def test_lying_small_content_length_returns_only_declared_bytes(scripted: ScriptedServer) -> None:
    # Declares 10 bytes, sends a megabyte: the body is the declared 10; the rest is never read as image data.
    scripted.routes["/lie"] = respond("200 OK", b"0123456789", {"Content-Length": "10"})

    def liar(sock: socket.socket, server: ScriptedServer) -> None:
        server.send(sock, "/lie", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\n")
        server.send(sock, "/lie", b"0123456789" + b"\4" * MIB)

    scripted.routes["/lie"] = liar
    assert fetch_image(scripted.url("/lie"), settings()) == b"0123456789"


def test_lying_large_content_length_then_close_is_transient(scripted: ScriptedServer) -> None:
    def short(sock: socket.socket, server: ScriptedServer) -> None:
        server.send(sock, "/short", b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100)

    scripted.routes["/short"] = short
    with pytest.raises(FetchError) as failed:
        fetch_image(scripted.url("/short"), settings())
    assert failed.value.transient


def test_gzip_bomb_is_cut_at_the_decoded_cap_with_bounded_memory(scripted: ScriptedServer) -> None:
    bomb = gzip.compress(b"\0" * (256 * MIB), compresslevel=9)  # ~250 KiB on the wire
    assert len(bomb) < MIB  # under the cap as sent: only decoding reveals the size
    scripted.routes["/bomb"] = respond("200 OK", bomb, {"Content-Encoding": "gzip"})
    tracemalloc.start()
    try:
        with pytest.raises(FetchError, match="after decompression") as failed:
            fetch_image(scripted.url("/bomb"), settings())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not failed.value.transient
    # Peak Python allocations stay near the 1 MiB cap (+ inflate step and wire chunks), nowhere near 256 MiB.
    assert peak < 8 * MIB


def test_gzip_body_cut_short_is_a_transient_error_not_a_truncated_image(scripted: ScriptedServer) -> None:
    # The connection dropped mid-stream, yet the bytes that arrived match their Content-Length: only the gzip
    # stream knows it is unfinished. A retry may get the whole image; analysing half of one gets nothing.
    whole = gzip.compress(bytes(range(256)) * 64)
    scripted.routes["/cut"] = respond("200 OK", whole[: len(whole) // 2], {"Content-Encoding": "gzip"})
    with pytest.raises(FetchError, match="truncated gzip") as failed:
        fetch_image(scripted.url("/cut"), settings())
    assert failed.value.transient


def test_unsupported_content_encoding_is_permanent(scripted: ScriptedServer) -> None:
    scripted.routes["/br"] = respond("200 OK", b"\x1b\x00", {"Content-Encoding": "br"})
    with pytest.raises(FetchError, match="content-encoding") as failed:
        fetch_image(scripted.url("/br"), settings())
    assert not failed.value.transient


# --- the overall deadline
# --------------------------------------------------------------------------------------


def _trickle(path: str, head: bytes, total: int, interval_s: float) -> Script:
    def script(sock: socket.socket, server: ScriptedServer) -> None:
        server.send(sock, path, head)
        for _ in range(total):
            server.send(sock, path, b"z")
            time.sleep(interval_s)

    return script


def test_slow_body_is_cut_at_the_overall_deadline(scripted: ScriptedServer) -> None:
    # 600 bytes at one per 0.1 s would take a minute; every single read is quick, so only an overall
    # deadline stops it.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 600\r\n\r\n"
    scripted.routes["/slow"] = _trickle("/slow", head, 600, 0.1)
    with pytest.raises(FetchError, match="timed out") as failed:
        fetch_image(scripted.url("/slow"), settings(fetch_timeout_s=1.5))
    assert failed.value.transient
    assert scripted.sent_when_done("/slow") < len(head) + 600


def test_slow_headers_are_cut_at_the_overall_deadline(scripted: ScriptedServer) -> None:
    def slow_headers(sock: socket.socket, server: ScriptedServer) -> None:
        server.send(sock, "/slowhead", b"HTTP/1.1 200 OK\r\n")
        for index in range(600):
            server.send(sock, "/slowhead", f"X-Pad-{index}: a\r\n".encode())
            time.sleep(0.1)

    scripted.routes["/slowhead"] = slow_headers
    with pytest.raises(FetchError, match="timed out"):
        fetch_image(scripted.url("/slowhead"), settings(fetch_timeout_s=1.5))
    assert scripted.sent_when_done("/slowhead") < 600 * len(b"X-Pad-000: a\r\n")


def test_deadline_covers_redirect_hops(scripted: ScriptedServer) -> None:
    # Each hop answers just in time for a per-request timeout, but together they exceed the overall limit.
    def slow_redirect(sock: socket.socket, server: ScriptedServer) -> None:
        time.sleep(0.8)
        server.send(sock, "/hop", b"HTTP/1.1 302 Found\r\nLocation: /hop\r\nContent-Length: 0\r\n\r\n")

    scripted.routes["/hop"] = slow_redirect
    with pytest.raises(FetchError, match="timed out"):
        fetch_image(scripted.url("/hop"), settings(fetch_timeout_s=2.0, fetch_max_redirects=10))
    assert scripted.connections < 10


def test_silent_server_times_out_transient(scripted: ScriptedServer) -> None:
    def silent(sock: socket.socket, server: ScriptedServer) -> None:
        time.sleep(5)

    scripted.routes["/silent"] = silent
    with pytest.raises(FetchError, match="timed out") as failed:
        fetch_image(scripted.url("/silent"), settings(fetch_timeout_s=1.0))
    assert failed.value.transient


def test_fetch_error_survives_pickling() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(FetchError("server answered HTTP 503", transient=True)))  # noqa: S301
    assert isinstance(error, FetchError)
    assert error.reason == "server answered HTTP 503"
    assert error.transient
