"""SSRF guard: every forbidden address family and spelling, URL tricks, DNS rebinding, TLS to the host name.

All traffic stays on 127.0.0.0/8. Public addresses appear only as resolver answers that are never dialled.
"""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from worker.netguard import (
    ForbiddenTargetError,
    HostAllowlist,
    HostResolutionError,
    check_url,
    is_forbidden_address,
    make_guarded_client,
)

PUBLIC_V4 = "93.184.215.14"  # a global unicast address; never contacted (resolver answers only)
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"


def fixed_resolver(*answers: str):
    def resolve(host: str, port: int) -> list[str]:
        return list(answers)

    return resolve


# --- is_forbidden_address ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.1.1", "link-local"),
        ("169.254.169.254", "cloud metadata"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.254", "carrier-grade NAT"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.5", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("febf:ffff::1", "link-local"),
        ("fc00::1", "unique local"),
        ("fd12:3456::1", "unique local"),
        ("fd00:ec2::254", "cloud metadata"),
        ("ff02::1", "multicast"),
        ("fec0::1", "site-local"),
        ("2001:db8::1", "documentation"),
        # IPv6 forms that carry an IPv4 address: judged by the IPv4 address inside.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:7f00:1", "loopback"),
        ("::ffff:10.1.2.3", "private"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("::127.0.0.1", "loopback"),
        ("64:ff9b::7f00:1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "cloud metadata"),
        ("64:ff9b:1::a00:1", "private"),
        ("2002:7f00:1::1", "loopback"),
        ("2002:c0a8:101::1", "private"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1 (bits inverted)
        # Bound to an interface: the scope, not the address, picks where a connect goes.
        ("2001:4860::1%1", "scoped"),
        # Special-purpose blocks no table above names (benchmarking, ORCHIDv2): caught by is_global.
        ("2001:2::1", "non-global"),
        ("2001:20::1", "non-global"),
    ],
)
def test_forbidden_addresses_are_named(address: str, expected: str) -> None:
    reason = is_forbidden_address(address)
    assert reason is not None, address
    assert expected in reason


@pytest.mark.parametrize(
    "address", [PUBLIC_V4, "8.8.8.8", "1.1.1.1", PUBLIC_V6, "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_pass(address: str) -> None:
    assert is_forbidden_address(address) is None


def test_ipaddress_alone_would_miss_mapped_loopback() -> None:
    # Why unwrapping matters: the standard library does not call this loopback.
    assert not ipaddress.ip_address("::ffff:127.0.0.1").is_loopback
    assert is_forbidden_address(ipaddress.ip_address("::ffff:127.0.0.1")) is not None


# --- check_url: spellings resolved by the system resolver (all local, no network)
# ----------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://localhost/",
        "http://LOCALHOST./",
        "http://2130706433/",  # decimal
        "http://0x7f000001/",  # hex
        "http://0x7f.1/",  # hex + short form
        "http://127.1/",  # short form
        "http://0177.0.0.1/",  # octal
        "http://017700000001/",  # octal, one number
        "http://0/",
        "http://0.0.0.0/",
        "http://[::1]/",
        "http://[::]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:7f00:1]/",
        "http://[0:0:0:0:0:ffff:127.0.0.1]:8080/x",
        "https://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.0.0.1/",
        "http://100.64.0.1/",
        "http://[fe80::1]/",
    ],
)
def test_local_and_private_spellings_are_refused(url: str) -> None:
    with pytest.raises(ForbiddenTargetError) as refused:
        check_url(url)
    assert refused.value.reason


@pytest.mark.parametrize(
    ("answers", "fragment"),
    [
        (["127.0.0.1"], "loopback"),
        (["10.0.0.7"], "private"),
        (["169.254.169.254"], "cloud metadata"),
        (["100.100.100.200"], "cloud metadata"),
        (["fd00:ec2::254"], "cloud metadata"),
        (["fd01::1"], "unique local"),
        (["fe80::1"], "link-local"),
        (["::ffff:192.168.0.1"], "private"),
        # One bad answer among good ones is enough: the connect could go to any of them.
        ([PUBLIC_V4, "127.0.0.1"], "loopback"),
        ([PUBLIC_V6, "::1"], "loopback"),
    ],
)
def test_host_names_resolving_to_forbidden_addresses_are_refused(answers: list[str], fragment: str) -> None:
    with pytest.raises(ForbiddenTargetError) as refused:
        check_url("https://images.example.com/a.jpg", resolver=fixed_resolver(*answers))
    assert fragment in refused.value.reason
    assert "images.example.com" in refused.value.reason


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://images.example.com/a.jpg", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://images.example.com:70/", "scheme"),
        ("dict://images.example.com:11211/", "scheme"),
        ("data:image/png;base64,AAAA", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("//images.example.com/a.jpg", "scheme"),
        ("images.example.com/a.jpg", "scheme"),
        ("http://user@images.example.com/", "user information"),
        ("http://user:secret@images.example.com/", "user information"),
        ("http://images.example.com@127.0.0.1/", "user information"),
        ("http://images.example.com\\@127.0.0.1/", "backslash"),
        ("http://images.example.com:22/", "port 22"),
        ("http://images.example.com:25/", "port 25"),
        ("http://images.example.com:0/", "port"),
        ("http://images.example.com:1023/", "port 1023"),
        ("http://images.example.com /a.jpg", "whitespace"),
        ("http://images.example.com/\r\nX-Injected: 1", "control"),
        ("http:///a.jpg", "host"),
    ],
)
def test_url_tricks_are_refused(url: str, fragment: str) -> None:
    with pytest.raises(ForbiddenTargetError) as refused:
        check_url(url, resolver=fixed_resolver(PUBLIC_V4))
    assert fragment in refused.value.reason


@pytest.mark.parametrize(
    "url",
    [
        "http://images.example.com/a.jpg",
        "https://images.example.com/a.jpg?x=1#frag",
        "https://images.example.com:8443/a.jpg",
        "http://images.example.com:8080/a.jpg",
        "http://images.example.com:1024/a.jpg",  # the first unprivileged port
    ],
)
def test_public_urls_pass_with_their_addresses(url: str) -> None:
    target = check_url(url, resolver=fixed_resolver(PUBLIC_V4, PUBLIC_V6))
    assert not target.allowlisted
    assert target.host == "images.example.com"
    assert target.addresses == (PUBLIC_V4, PUBLIC_V6)
    assert target.scheme in ("http", "https")


def test_resolver_answer_that_is_not_an_address_is_refused() -> None:
    with pytest.raises(ForbiddenTargetError, match="not an IP address"):
        check_url("http://images.example.com/", resolver=fixed_resolver("localhost"))


def test_unresolvable_host_is_refused_with_reason() -> None:
    with pytest.raises(HostResolutionError, match="could not resolve") as failed:
        check_url("http://does-not-exist.invalid/")
    assert isinstance(failed.value, ForbiddenTargetError)  # callers catching the base class still see it
    assert not failed.value.temporary


def test_resolver_asking_to_try_again_is_temporary() -> None:
    def flaky(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    with pytest.raises(HostResolutionError) as failed:
        check_url("http://images.example.com/", resolver=flaky)
    assert failed.value.temporary


# --- allowlist ---------------------------------------------------------------------------------------------


def test_allowlist_parses_hosts_addresses_and_cidrs() -> None:
    allow = HostAllowlist.parse(" images.internal, 10.1.0.0/16 ,127.0.0.1, [::1] ,")
    assert allow.hosts == frozenset({"images.internal"})
    assert HostAllowlist.parse("Bücher.Internal").allows_host("xn--bcher-kva.internal")
    assert {str(net) for net in allow.networks} == {"10.1.0.0/16", "127.0.0.1/32", "::1/128"}
    with pytest.raises(ValueError, match="CIDR"):
        HostAllowlist.parse("10.0.0.0/33")


def test_allowlisted_cidr_opens_only_its_addresses() -> None:
    allow = HostAllowlist.parse("127.0.0.1, 10.1.0.0/16")
    assert check_url("http://127.0.0.1:8000/x", allow).addresses == ("127.0.0.1",)
    assert check_url("http://cdn.internal/x", allow, resolver=fixed_resolver("10.1.2.3")).allowlisted
    for answer in ("127.0.0.2", "10.2.0.1", "::1"):
        with pytest.raises(ForbiddenTargetError):
            check_url("http://cdn.internal/x", allow, resolver=fixed_resolver(answer))


def test_allowlisted_host_name_is_trusted_but_not_for_metadata() -> None:
    allow = HostAllowlist.parse("images.internal")
    assert check_url("http://images.internal:22/", allow, resolver=fixed_resolver("10.9.9.9")).allowlisted
    with pytest.raises(ForbiddenTargetError, match="cloud metadata"):
        check_url("http://images.internal/", allow, resolver=fixed_resolver("169.254.169.254"))
    with pytest.raises(ForbiddenTargetError):
        check_url("http://other.internal/", allow, resolver=fixed_resolver("10.9.9.9"))


def test_metadata_needs_an_exact_entry() -> None:
    with pytest.raises(ForbiddenTargetError, match="cloud metadata"):
        check_url("http://169.254.169.254/", HostAllowlist.parse("169.254.0.0/16"))
    assert check_url("http://169.254.169.254/", HostAllowlist.parse("169.254.169.254")).allowlisted


def test_allowlist_from_settings() -> None:
    from worker.settings import Settings

    allow = HostAllowlist.from_settings(Settings(allow_private_hosts="127.0.0.1,receiver.test"))
    assert allow.allows_host("receiver.test")
    assert allow.allows_address(ipaddress.ip_address("127.0.0.1"))
    assert not HostAllowlist.from_settings(Settings())


# --- the client: refused before a socket opens; connects to the validated address
# ----------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A bare listening socket on 127.0.0.1: any connect attempt would sit in its backlog."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


def _connection_attempted(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


@pytest.mark.parametrize(
    "host_template",
    ["127.0.0.1", "localhost", "2130706433", "0x7f.1", "127.1", "[::ffff:127.0.0.1]"],
)
def test_client_refuses_before_any_socket_opens(listener: socket.socket, host_template: str) -> None:
    port = listener.getsockname()[1]
    with make_guarded_client(timeout=5) as client, pytest.raises(ForbiddenTargetError):
        client.get(f"http://{host_template}:{port}/")
    assert not _connection_attempted(listener)


def test_client_ignores_proxy_environment(monkeypatch: pytest.MonkeyPatch, listener: socket.socket) -> None:
    # A proxy would do the dialling for us, past the guard; the client must not pick one up from the
    # environment.
    port = listener.getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{port}")
    resolver = fixed_resolver("127.0.0.2")
    with make_guarded_client(timeout=2, resolver=resolver) as client, pytest.raises(ForbiddenTargetError):
        client.get("http://images.example.com/")
    assert not _connection_attempted(listener)


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    seen_hosts: list[str]

    def do_GET(self) -> None:
        type(self).seen_hosts.append(self.headers.get("Host", ""))
        body = b"pinned"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def recording_server() -> Iterator[tuple[http.server.ThreadingHTTPServer, type[_RecordingHandler]]]:
    handler = type("Handler", (_RecordingHandler,), {"seen_hosts": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_dns_rebinding_connects_to_the_validated_address(recording_server) -> None:
    """The resolver answers an allowed address, then a forbidden one: the connect uses the first answer."""
    server, handler = recording_server
    port = server.server_address[1]
    # A trap on the rebinding target, same port: a second lookup followed by a connect would land here.
    trap = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    trap.bind(("127.0.0.2", port))
    trap.listen(8)
    trap.setblocking(False)
    answers = iter([["127.0.0.1"], ["127.0.0.2"], ["127.0.0.2"], ["127.0.0.2"]])
    calls: list[str] = []

    def rebinding_resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    try:
        with make_guarded_client("127.0.0.1/32", timeout=5, resolver=rebinding_resolver) as client:
            response = client.get(f"http://rebind.test:{port}/image.jpg")
        assert response.status_code == 200
        assert response.content == b"pinned"
        assert calls == ["rebind.test"]  # one lookup per request: the one that was validated
        assert handler.seen_hosts == [f"rebind.test:{port}"]  # Host header keeps the name
        assert not _connection_attempted(trap)
    finally:
        trap.close()


def test_international_host_names_are_pinned_by_their_ascii_form(recording_server) -> None:
    server, handler = recording_server
    port = server.server_address[1]
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"]

    with make_guarded_client("127.0.0.1/32", timeout=5, resolver=resolver) as client:
        assert client.get(f"http://bücher.test:{port}/a.jpg").status_code == 200
    assert calls == ["xn--bcher-kva.test"]  # resolved once, in the form that is dialled
    assert handler.seen_hosts == [f"xn--bcher-kva.test:{port}"]


def test_each_request_is_validated_again(recording_server) -> None:
    server, _handler = recording_server
    port = server.server_address[1]
    answers = iter([["127.0.0.1"], ["127.0.0.2"]])
    with make_guarded_client("127.0.0.1/32", timeout=5, resolver=lambda h, p: next(answers)) as client:
        assert client.get(f"http://rebind.test:{port}/1").status_code == 200
        with pytest.raises(ForbiddenTargetError, match="loopback"):
            client.get(f"http://rebind.test:{port}/2")


def test_redirects_are_not_followed_by_the_client(recording_server) -> None:
    server, _handler = recording_server
    port = server.server_address[1]
    with make_guarded_client("127.0.0.1", timeout=5) as client:
        assert client.follow_redirects is False
        assert client.get(f"http://127.0.0.1:{port}/").status_code == 200


# --- TLS: SNI and certificate verification are for the host name, not the dialled IP
# ---------------------------


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_tls_verifies_and_sends_sni_for_the_host_name(tmp_path: Path) -> None:
    cert_path, key_path = _self_signed(tmp_path, "images.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_path, key_path)
    sni_names: list[str | None] = []
    server_ctx.sni_callback = lambda sslsock, name, ctx: sni_names.append(name)  # type: ignore[assignment,func-returns-value]
    handler = type("Handler", (_RecordingHandler,), {"seen_hosts": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    client_ctx = ssl.create_default_context(cafile=str(cert_path))
    try:
        with make_guarded_client(
            "127.0.0.1", timeout=5, resolver=fixed_resolver("127.0.0.1"), verify=client_ctx
        ) as client:
            response = client.get(f"https://images.test:{port}/a.jpg")
            assert response.content == b"pinned"
            assert sni_names == ["images.test"]
            assert handler.seen_hosts == [f"images.test:{port}"]
            # The same server reached under another name fails verification: it is checked against the name.
            with pytest.raises(httpx.ConnectError, match="certificate"):
                client.get(f"https://127.0.0.1:{port}/a.jpg")
    finally:
        server.shutdown()
        server.server_close()
