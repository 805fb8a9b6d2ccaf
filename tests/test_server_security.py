"""Who may connect and what they may open: tokens, Origin allowlist, the source
policy (no client-chosen files or internal hosts), message size and
compression limits, TLS, connection limits, clients that never read."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from server.app import TrackingServer
from server.client import Client
from server.config import ConfigError, ServerConfig, is_loopback
from tests.test_server import FRAMES, Raw, http_get, make_config, running, source_of, write_clip

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

TOKEN = "s3cret-token"


def refused(url: str, **kw) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as err:
        with connect(url, proxy=None, open_timeout=20, **kw):
            pass
    return err.value


# ---------------------------------------------------------------- tokens


def test_a_token_is_required_when_configured(model):
    config = make_config(server={"token": TOKEN, "require_token": True})
    with running(model, config) as st:
        url = st.url
        err = refused(url)
        assert err.response.status_code == 401
        assert err.response.headers["WWW-Authenticate"] == 'Bearer realm="sam2-stream"'
        assert err.response.body == b"a bearer token is required: send 'Authorization: Bearer TOKEN' or ?token=TOKEN\n"
        assert refused(url, additional_headers={"Authorization": "Bearer wrong"}).response.status_code == 401
        assert refused(url + "?token=wrong").response.status_code == 401
        assert refused(url, additional_headers={"Authorization": f"Basic {TOKEN}"}).response.status_code == 401
        assert Raw(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}).hello["type"] == "hello"
        assert Raw(url + f"?token={TOKEN}").hello["type"] == "hello"  # browsers cannot set headers

        async def with_client() -> str:
            async with Client(url, TOKEN) as c:
                return (await c.list_sessions()) and "" or c.hello.server  # type: ignore[union-attr]

        assert asyncio.run(with_client()) == "sam2-stream"
        base = url.replace("ws://", "http://")
        assert http_get(base + "healthz")[0] == 200  # says nothing secret
        assert http_get(base + "metrics")[0] == 401
        assert http_get(base + "metrics", {"Authorization": f"Bearer {TOKEN}"})[0] == 200


def test_a_public_bind_needs_a_token(model, monkeypatch):
    monkeypatch.delenv("SAM2_STREAM_TOKEN", raising=False)
    config = make_config(server={"host": "0.0.0.0"})
    with pytest.raises(ConfigError) as err:
        TrackingServer(config, model)
    assert str(err.value) == (
        "the server binds to 0.0.0.0, not loopback, so clients need a token: set SAM2_STREAM_TOKEN, pass --token, "
        "or set [server] token in the config file"
    )
    monkeypatch.setenv("SAM2_STREAM_TOKEN", TOKEN)
    config.check()
    assert config.token() == TOKEN and config.requires_token()
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "0.0.0.0", "10.1.2.3", "::")] == [
        True, True, True, True, False, False, False,
    ]
    monkeypatch.delenv("SAM2_STREAM_TOKEN")
    assert not ServerConfig().requires_token()  # loopback, no token: open


def test_a_browser_from_another_origin_is_refused(model):
    config = make_config(server={"allow_origins": ["https://ops.example.org"]})
    with running(model, config) as st:
        err = refused(st.url, origin="https://evil.example.org")
        assert err.response.status_code == 403
        assert Raw(st.url, origin="https://ops.example.org").hello["type"] == "hello"
        assert Raw(st.url).hello["type"] == "hello"  # no Origin: not a browser


# ---------------------------------------------------------------- what a client may open


OPEN_OFTEN = {"opens_per_s": 100.0, "open_burst": 100.0}  # the default (2/s) would answer rate_limited here


def test_by_default_clients_open_configured_names_only(model):
    with running(model, make_config(limits=OPEN_OFTEN)) as st:
        c = Raw(st.url)
        cases = {
            "file:/etc/passwd": "source file:/etc/passwd not allowed: scheme 'file' is not allowed here (allowed: none)",
            "/etc/passwd": "source /etc/passwd not allowed: scheme 'file' is not allowed here (allowed: none)",
            "rtsp://10.0.0.1/stream": "source rtsp://10.0.0.1/stream not allowed: scheme 'rtsp' is not allowed here (allowed: none)",
            "http://169.254.169.254/latest/meta-data/": "source http://169.254.169.254/latest/meta-data/ not allowed: "
            "scheme 'http' is not allowed here (allowed: none)",
            "push:cam": "source push:cam not allowed: scheme 'push' is not allowed here (allowed: none)",
            "/dev/video0": "source /dev/video0 not allowed: scheme 'v4l2' is not allowed here (allowed: none)",
        }
        for uri, message in cases.items():
            err = c.error("open", source=uri)
            assert (err["code"], err["message"]) == ("not_allowed", message), uri
        assert c.request("list_sessions")["sessions"] == []


def test_the_policy_allows_only_its_folders_and_hosts(model, tmp_path):
    allowed = tmp_path / "videos"
    allowed.mkdir()
    clip = write_clip(allowed / "clip.mp4", n=4)
    secret = write_clip(tmp_path / "secret.mp4", n=2)
    (allowed / "link.mp4").symlink_to(secret)
    config = make_config(
        policy={"allow_schemes": ["file", "rtsp", "http"], "allow_dirs": [str(allowed)], "allow_hosts": ["cams.example.org"]},
        limits=OPEN_OFTEN,
    )
    with running(model, config) as st:
        c = Raw(st.url)
        outside = "the path is outside the allowed folders"
        cases = {
            "/etc/passwd": f"source /etc/passwd not allowed: {outside}",
            str(secret): f"source {secret} not allowed: {outside}",
            f"{allowed}/../secret.mp4": f"source {allowed}/../secret.mp4 not allowed: {outside}",
            str(allowed / "link.mp4"): f"source {allowed / 'link.mp4'} not allowed: {outside}",
            "rtsp://10.0.0.1/stream": "source rtsp://10.0.0.1/stream not allowed: host '10.0.0.1' is not allowed here",
            "http://169.254.169.254/latest/meta-data/": "source http://169.254.169.254/latest/meta-data/ not allowed: "
            "host '169.254.169.254' is not allowed here",
            "rtsp://admin:hunter2@evil.example.org/x": "source rtsp://admin:***@evil.example.org/x not allowed: "
            "host 'evil.example.org' is not allowed here",
            "udp://cams.example.org:5000": "source udp://cams.example.org:5000 not allowed: scheme 'udp' is not allowed "
            "here (allowed: file, http, rtsp)",
        }
        for uri, message in cases.items():
            err = c.error("open", source=uri)
            assert (err["code"], err["message"]) == ("not_allowed", message), uri
            assert "hunter2" not in err["message"]
        err = c.error("open", source="rtsp://cams.example.org/x", options={"av_options": "x"})
        assert (err["code"], err["field"]) == ("invalid_message", "options.av_options")
        err = c.error("open", source=str(clip), options={"bogus": 1})
        assert (err["code"], err["field"]) == ("invalid_message", "options.bogus")
        assert err["message"].startswith("unknown source option 'bogus'")
        # inside the allowed folder: opens, played as a live camera
        opened = c.request("open", source=str(clip))
        assert opened["created"] is True and opened["session"]["source"] == str(clip)
        assert c.next_frame()["frame_idx"] == 0


# ---------------------------------------------------------------- transport limits


def test_an_oversized_message_closes_only_that_connection(model):
    config = make_config(server={"max_message_bytes": 4096})
    with running(model, config) as st:
        good = Raw(st.url)
        sid = good.request("open", source="cam")["session"]["session_id"]
        bad = Raw(st.url)
        bad.ws.send('{"type":"list_sessions","id":1,"pad":"' + "x" * 10_000 + '"}')
        with pytest.raises(ConnectionClosed) as err:
            bad.recv(timeout=10)
        assert err.value.rcvd.code == 1009
        source_of(st, sid).push(FRAMES[0], pts_s=0.0)
        assert good.next_frame()["frame_idx"] == 0


def test_compression_is_never_negotiated(model):
    """A small compressed message can inflate to gigabytes; the server turns deflate off."""
    with running(model) as st:
        with connect(st.url, proxy=None, compression="deflate") as ws:
            assert ws.protocol.extensions == []


def test_too_many_clients_are_turned_away(model):
    with running(model, make_config(server={"max_clients": 1})) as st:
        first = Raw(st.url)
        err = refused(st.url)
        assert err.response.status_code == 503 and err.response.body == b"too many clients (limit 1)\n"
        first.close()
        deadline = time.time() + 10
        while st.call(lambda: len(st.server.clients)) and time.time() < deadline:
            time.sleep(0.05)
        assert Raw(st.url).hello["type"] == "hello"


def test_a_client_that_never_reads_its_replies_is_disconnected(model):
    config = make_config(
        server={"send_buffer_bytes": 4096, "write_limit_bytes": 4096}, limits={"max_pending_messages": 8}
    )
    with running(model, config) as st:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", st.server.port))
        c = Raw(st.url, sock=sock, max_queue=1)
        try:
            for k in range(400):  # ~100 KB of replies: far more than the buffers hold
                c.ws.send(f'{{"type":"stats","id":{k}}}')
        except ConnectionClosed:
            pass
        with pytest.raises(ConnectionClosed) as err:
            while True:
                c.recv(timeout=20)
        assert err.value.rcvd is not None and err.value.rcvd.code == 1008
        assert err.value.rcvd.reason == "too many unread messages: read replies and events"
        assert Raw(st.url).request("list_sessions")["sessions"] == []  # the server is fine


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(model, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    config = make_config(server={"tls_cert": str(cert), "tls_key": str(key)})
    with running(model, config) as st:
        assert st.url.startswith("wss://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        assert Raw(st.url, ssl=context).request("list_sessions")["sessions"] == []
        with pytest.raises(ssl.SSLCertVerificationError):
            with connect(st.url, proxy=None, open_timeout=20):  # not a trusted certificate
                pass
        with pytest.raises(Exception):
            with connect(st.url.replace("wss://", "ws://"), proxy=None, open_timeout=5):
                pass
    with pytest.raises(ConfigError) as err:
        make_config(server={"tls_cert": str(cert)}).check()
    assert str(err.value) == "TLS needs both a certificate and a key: pass --tls-cert CERT.pem --tls-key KEY.pem"
    with pytest.raises(ConfigError) as err:
        make_config(server={"tls_cert": str(cert), "tls_key": str(Path(tmp_path / "missing.pem"))}).check()
    assert str(err.value).startswith(f"cannot load the TLS certificate {cert} / key {tmp_path / 'missing.pem'}: ")
