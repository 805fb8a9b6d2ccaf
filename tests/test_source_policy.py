"""The source policy against what an attacker on the loopback would try.

Every URL FFmpeg opens for a client-named source obeys the policy, not only the
first: local and HTTP HLS playlists whose segments, keys or entries point
elsewhere, HTTP redirects, ffconcat lists. Real servers on 127.0.0.1
(``tests/servers/http_server.py``); a second server stands for the host the
policy does not allow, and its connection log proves it was never contacted.
Also: the path checked is the path opened (``file:`` prefixes, a folder named
``file:..``), the same answer for existing and missing paths outside the
policy, host patterns with ports, and every client option's range and cap.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.servers.http_server import serve_directory
from tests.videogen import make_clip, pattern_rgb, read_index
from tracker.errors import (
    SourceConnectionError,
    SourceError,
    SourceNotAllowedError,
    SourceNotFoundError,
    SourceOptionError,
    SourceUnsupportedError,
)
from tracker.ingest import HostPattern, SourcePolicy, open_source, parse_source
from tracker.sources import policed_io
from tracker.sources.av_reader import ffmpeg_options, ffmpeg_url
from tracker.sources.images import read_image_rgb
from tracker.sources.policed_io import open_file_checked

pytestmark = pytest.mark.timeout(120)

KEY = bytes(range(16))
IV = bytes(range(16, 32))
SEGMENTS = 4  # of 5 frames each


def indices(source_or_uri: object, **options: object) -> list[int]:
    """Frame indices read back from the pictures of a source opened in file mode."""
    options = {"mode": "file", "timeout_s": 5, **options}
    with open_source(source_or_uri, **options) as source:  # type: ignore[arg-type]
        return [read_index(f.image_rgb) for f in source]


def encrypt(data: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(KEY), modes.CBC(IV)).encryptor()
    return encryptor.update(padder.update(data) + padder.finalize()) + encryptor.finalize()


def playlist(entries: list[str], key_uri: str | None = None) -> str:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:1", "#EXT-X-MEDIA-SEQUENCE:0",
             "#EXT-X-PLAYLIST-TYPE:VOD"]
    if key_uri is not None:
        lines.append(f'#EXT-X-KEY:METHOD=AES-128,URI="{key_uri}",IV=0x{IV.hex()}')
    for entry in entries:
        lines += ["#EXTINF:0.200000,", entry]
    return "\n".join([*lines, "#EXT-X-ENDLIST", ""])


@dataclass
class Site:
    """Media in an allowed folder (also served over HTTP), and an outside folder (also on another server)."""

    root: Path
    allowed: Path  # the policy's folder; also the allowed HTTP server's root
    outside: Path  # beside it; also the other server's root
    allowed_url: str
    other_url: str
    other_seen: list[str]
    allowed_seen: list[str]

    @property
    def allowed_port(self) -> int:
        return int(self.allowed_url.rsplit(":", 1)[1])

    def policy(self, **kwargs: object) -> SourcePolicy:
        """file and http allowed: the allowed folder and the allowed server's host:port only."""
        return SourcePolicy(schemes=frozenset({"file", "images", "http"}), directories=(self.allowed,),
                            hosts=(f"127.0.0.1:{self.allowed_port}",), **kwargs)  # type: ignore[arg-type]

    def write(self, name: str, text: str) -> Path:
        path = self.allowed / name
        path.write_text(text)
        return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("policy")
    allowed, outside = root / "allowed", root / "outside"
    for folder in (allowed, outside):
        (folder / "hls").mkdir(parents=True)
        make_clip(folder / "clip.mp4", "libx264", n_frames=6, size_hw=(48, 64))
    make_clip(allowed / "hls" / "index.m3u8", "libx264", n_frames=5 * SEGMENTS, size_hw=(48, 64), gop=5,
              container_format="hls",
              container_options={"hls_time": "0.2", "hls_list_size": "0", "hls_playlist_type": "vod",
                                 "hls_segment_filename": str(allowed / "hls" / "seg%03d.ts")})
    segments = sorted((allowed / "hls").glob("seg*.ts"))
    assert len(segments) == SEGMENTS
    for seg in segments:
        shutil.copy(seg, outside / "hls" / seg.name)
        shutil.copy(seg, outside / seg.name)
        (allowed / "hls" / f"enc{seg.name}").write_bytes(encrypt(seg.read_bytes()))
    for folder in (allowed, outside):
        (folder / "hls" / "key.bin").write_bytes(KEY)
    other_seen: list[str] = []
    allowed_seen: list[str] = []
    with serve_directory(outside, seen=other_seen) as other_url, \
            serve_directory(allowed, seen=allowed_seen, redirects={
                "/hls/moved.m3u8": f"{other_url}/hls/index.m3u8",
                "/moved.mp4": f"{other_url}/clip.mp4",
                "/here.mp4": "/clip.mp4",
                "/twice.mp4": "/here.mp4",
                "/to-file.mp4": f"file://{allowed / 'clip.mp4'}",
            }) as allowed_url:
        yield Site(root, allowed, outside, allowed_url, other_url, other_seen, allowed_seen)


@pytest.fixture(autouse=True)
def _clear_logs(request: pytest.FixtureRequest) -> None:
    if "site" in request.fixturenames:
        site = request.getfixturevalue("site")
        site.other_seen.clear()
        site.allowed_seen.clear()


SEGMENT_NAMES = [f"seg{i:03d}.ts" for i in range(SEGMENTS)]


# --------------------------------------------------------------------------- local playlists


def test_a_local_playlist_inside_the_policy_plays(site: Site) -> None:
    path = site.write("hls/inside.m3u8", playlist(SEGMENT_NAMES))
    assert indices(str(path), policy=site.policy()) == list(range(5 * SEGMENTS))


@pytest.mark.parametrize("escape", ["../../outside/seg001.ts", "ABSOLUTE", "FILE_URI"])
def test_a_local_playlist_naming_files_outside_is_refused(site: Site, escape: str) -> None:
    target = site.outside / "seg001.ts"
    entry = {"ABSOLUTE": str(target), "FILE_URI": f"file://{target}"}.get(escape, escape)
    path = site.write(f"hls/escape-{len(entry)}.m3u8", playlist([SEGMENT_NAMES[0], entry, SEGMENT_NAMES[2]]))
    with pytest.raises(SourceNotAllowedError) as caught:
        indices(str(path), policy=site.policy())
    message = str(caught.value)
    assert message.startswith(f"source {path} not allowed: it names ")
    assert message.endswith("seg001.ts, outside the allowed folders")
    # without a policy (the CLI, configured sources) the same playlist plays as FFmpeg reads it
    assert indices(str(path)) == list(range(15))


def test_a_local_playlist_naming_another_port_never_connects(site: Site) -> None:
    url = f"{site.other_url}/seg001.ts"
    path = site.write("hls/other-port.m3u8", playlist([SEGMENT_NAMES[0], url]))
    with pytest.raises(SourceNotAllowedError) as caught:
        indices(str(path), policy=site.policy())
    other = url.removeprefix("http://").split("/")[0]
    assert str(caught.value) == (f"source {path} not allowed: it names {url}, and host '{other}' is not allowed here")
    assert site.other_seen == []


def test_the_policy_travels_with_the_spec(site: Site) -> None:
    """A spec parsed under a policy keeps it: opening it later (or reconnecting) checks the nested opens too."""
    path = site.write("hls/travels.m3u8", playlist([SEGMENT_NAMES[0], str(site.outside / "seg001.ts")]))
    spec = parse_source(str(path), policy=site.policy(), mode="file")
    assert spec.policy == site.policy()
    with pytest.raises(SourceNotAllowedError, match="outside the allowed folders$"):
        open_source(spec)


# --------------------------------------------------------------------------- HLS over HTTP


def test_an_http_playlist_inside_the_policy_plays(site: Site) -> None:
    assert indices(f"{site.allowed_url}/hls/index.m3u8", policy=site.policy()) == list(range(5 * SEGMENTS))
    assert site.allowed_seen.count("GET /hls/seg003.ts") == 1


def test_http_segments_on_another_port_are_refused_without_a_connection(site: Site) -> None:
    entries = [SEGMENT_NAMES[0], f"{site.other_url}/hls/seg001.ts", SEGMENT_NAMES[2]]
    site.write("hls/remote-segment.m3u8", playlist(entries))
    uri = f"{site.allowed_url}/hls/remote-segment.m3u8"
    with pytest.raises(SourceNotAllowedError) as caught:
        indices(uri, policy=site.policy())
    other = site.other_url.removeprefix("http://")
    assert str(caught.value) == (f"source {uri} not allowed: it names {site.other_url}/hls/seg001.ts, "
                                 f"and host '{other}' is not allowed here")
    assert site.other_seen == []
    assert "GET /hls/remote-segment.m3u8" in site.allowed_seen


def test_an_encrypted_playlist_with_its_key_inside_plays(site: Site) -> None:
    site.write("hls/encrypted.m3u8", playlist([f"enc{name}" for name in SEGMENT_NAMES], key_uri="key.bin"))
    assert indices(f"{site.allowed_url}/hls/encrypted.m3u8", policy=site.policy()) == list(range(5 * SEGMENTS))
    assert "GET /hls/key.bin" in site.allowed_seen


def test_an_aes_key_uri_on_another_port_is_refused_without_a_connection(site: Site) -> None:
    key_uri = f"{site.other_url}/hls/key.bin"
    site.write("hls/remote-key.m3u8", playlist([f"enc{name}" for name in SEGMENT_NAMES], key_uri=key_uri))
    uri = f"{site.allowed_url}/hls/remote-key.m3u8"
    with pytest.raises(SourceNotAllowedError) as caught:
        indices(uri, policy=site.policy())
    assert str(caught.value).startswith(f"source {uri} not allowed: it names {key_uri}, and host ")
    assert site.other_seen == []


def test_localhost_allowed_does_not_allow_127_0_0_1(site: Site) -> None:
    """The issue's case: with ``localhost`` allowed, segment URLs on 127.0.0.1:OTHER_PORT were fetched."""
    site.write("hls/numeric.m3u8", playlist([f"{site.other_url}/hls/{name}" for name in SEGMENT_NAMES]))
    policy = SourcePolicy(schemes=frozenset({"http"}), hosts=("localhost",))
    uri = f"http://localhost:{site.allowed_port}/hls/numeric.m3u8"
    with pytest.raises(SourceNotAllowedError, match=r"and host '127\.0\.0\.1:\d+' is not allowed here$"):
        indices(uri, policy=policy)
    assert site.other_seen == []


def test_policed_http_keeps_credentials_tls_and_timeouts(tmp_path: Path) -> None:
    """The policed HTTP reader answers like FFmpeg's: Basic auth, self-signed TLS, a silent server's timeout."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI missing: apt-get install openssl")
    (tmp_path / "private").mkdir()
    make_clip(tmp_path / "private" / "clip.mp4", "libx264", n_frames=4, size_hw=(48, 64))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    with serve_directory(tmp_path, user="bob", password="hunter2") as base, \
            serve_directory(tmp_path, certfile=str(cert), keyfile=str(key)) as tls_base:
        host, tls_host = base.removeprefix("http://"), tls_base.removeprefix("https://")
        policy = SourcePolicy(schemes=frozenset({"http", "https"}), hosts=("127.0.0.1",), allow_av_options=True)
        assert indices(f"http://bob:hunter2@{host}/private/clip.mp4", policy=policy) == [0, 1, 2, 3]
        with pytest.raises(SourceConnectionError) as caught:
            indices(f"http://bob:nope@{host}/private/clip.mp4", policy=policy)
        assert str(caught.value) == (f"cannot connect to http://bob:***@{host}/private/clip.mp4: authentication failed "
                                     "(check the user name and password in the URL)")
        url = f"https://{tls_host}/private/clip.mp4"
        assert indices(url, policy=policy) == [0, 1, 2, 3]  # not verified: FFmpeg's default
        assert indices(url, policy=policy, ca_file=str(cert)) == [0, 1, 2, 3]
        with pytest.raises(SourceConnectionError, match="TLS failed, most likely the server's certificate did not"):
            indices(url, policy=policy, tls_verify=True)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # accepts (in the kernel) and never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/clip.mp4"
        with pytest.raises(SourceConnectionError) as caught:
            indices(url, policy=policy, timeout_s=1)
        assert str(caught.value) == (f"cannot connect to {url}: no answer within 1 s "
                                     "(check the host, the port and that the stream is running, or raise timeout_s)")


# --------------------------------------------------------------------------- redirects


def test_a_redirect_to_another_port_is_refused_without_a_connection(site: Site) -> None:
    for path, target in [("/moved.mp4", "/clip.mp4"), ("/hls/moved.m3u8", "/hls/index.m3u8")]:
        uri = f"{site.allowed_url}{path}"
        with pytest.raises(SourceNotAllowedError) as caught:
            indices(uri, policy=site.policy())
        other = site.other_url.removeprefix("http://")
        assert str(caught.value) == (f"source {uri} not allowed: it redirects to {site.other_url}{target}, "
                                     f"and host '{other}' is not allowed here")
    assert site.other_seen == []


def test_a_redirect_to_a_local_file_is_refused_even_inside_the_allowed_folder(site: Site) -> None:
    """An HTTP server cannot make the reader open files, allowed ones included."""
    uri = f"{site.allowed_url}/to-file.mp4"
    with pytest.raises(SourceNotAllowedError) as caught:
        indices(uri, policy=site.policy())
    assert str(caught.value) == f"source {uri} not allowed: it redirects to a local file"


def test_a_symlink_loop_is_outside_the_policy_not_an_internal_error(site: Site) -> None:
    loop = site.allowed / "loop.mp4"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    for source in (str(loop), f"file:{loop}"):
        with pytest.raises(SourceNotAllowedError, match="outside the allowed folders"):
            parse_source(source, policy=site.policy())
    assert not site.policy().allows_path(loop)


def test_a_redirect_to_an_allowed_target_is_followed(site: Site) -> None:
    assert indices(f"{site.allowed_url}/twice.mp4", policy=site.policy()) == list(range(6))
    assert {"GET /twice.mp4", "GET /here.mp4", "GET /clip.mp4"} <= set(site.allowed_seen)


# --------------------------------------------------------------------------- concat lists


def test_ffconcat_lists_are_refused_and_their_entries_never_opened(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [f"file '{site.outside / 'clip.mp4'}'", f"file '{site.other_url}/clip.mp4'", "file 'clip.mp4'"]
    for i, entry in enumerate(entries):
        local = site.write(f"list{i}.ffconcat", f"ffconcat version 1.0\n{entry}\n")
        for uri in (str(local), f"{site.allowed_url}/{local.name}"):
            with pytest.raises(SourceNotAllowedError) as caught:
                indices(uri, policy=site.policy())
            assert str(caught.value) == (f"source {uri} not allowed: concat lists (ffconcat) are not accepted "
                                         "here; open their files one by one")
    # the friendly refusal aside, FFmpeg's own protocols are off for a policed source: the
    # concat demuxer's entries (opened without io_open) cannot be opened at all
    monkeypatch.setattr(policed_io, "_FFCONCAT_MAGIC", b"\x00never")
    for i in range(len(entries)):
        for uri in (str(site.allowed / f"list{i}.ffconcat"), f"{site.allowed_url}/list{i}.ffconcat"):
            with pytest.raises(SourceError):
                indices(uri, policy=site.policy())
    assert site.other_seen == []
    spec = parse_source(str(site.allowed / "list0.ffconcat"), policy=site.policy())
    assert ffmpeg_options(spec)["protocol_whitelist"] == "none"


# --------------------------------------------------------------------------- the path checked is the path opened


def test_file_prefixes_cannot_make_ffmpeg_read_another_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``file:file:../secret/clip.mp4`` with a folder literally named ``file:..`` in the cwd."""
    work = tmp_path / "work"
    (work / "file:..").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    make_clip(tmp_path / "secret" / "clip.mp4", "libx264", n_frames=8, size_hw=(48, 64))  # outside
    monkeypatch.chdir(work)
    policy = SourcePolicy(schemes=frozenset({"file"}), directories=(work,))
    uri = "file:file:../secret/clip.mp4"  # FFmpeg used to strip both prefixes and read ../secret/clip.mp4
    spec = parse_source(uri, policy=policy, mode="file")
    inside = work / "file:.." / "secret" / "clip.mp4"  # what the policy reads, and now what is opened
    assert spec.location == str(inside) and ffmpeg_url(spec) == f"file:{inside}"
    with pytest.raises(SourceNotFoundError):  # not the outside clip FFmpeg would have read
        open_source(spec)
    inside.parent.mkdir()
    make_clip(inside, "libx264", n_frames=3, size_hw=(48, 64))
    assert indices(uri, policy=policy) == [0, 1, 2]
    assert indices(uri) == [0, 1, 2]  # the same canonical path without a policy


def test_the_opened_file_is_checked_not_only_the_name(tmp_path: Path) -> None:
    """A symlink swapped in after the check: the descriptor's real path is outside, so it is refused."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    cv2.imwrite(str(outside / "secret.png"), pattern_rgb(7, 32, 32))
    (allowed / "00000.png").symlink_to(outside / "secret.png")
    os.mkfifo(allowed / "pipe.ts")
    policy = SourcePolicy(schemes=frozenset({"file", "images"}), directories=(allowed,))
    with pytest.raises(SourceNotAllowedError) as caught:
        open_file_checked(str(allowed / "00000.png"), policy, "x")
    assert str(caught.value) == f"source x not allowed: {allowed / '00000.png'} is outside the allowed folders"
    with pytest.raises(SourceNotAllowedError):
        read_image_rgb(allowed / "00000.png", policy, "x")
    assert read_image_rgb(allowed / "00000.png") is not None  # unpoliced: read as before
    with pytest.raises(SourceUnsupportedError, match="pipe.ts is not a regular file$"):  # and no hang on a FIFO
        open_file_checked(str(allowed / "pipe.ts"), policy, "x")


# --------------------------------------------------------------------------- no existence oracle


def test_outside_the_policy_existing_and_missing_paths_get_one_answer(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "file.mp4").write_bytes(b"x")
    (tmp_path / "odd:name").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    probes = [str(tmp_path / "dir"), str(tmp_path / "missing"), str(tmp_path / "file.mp4"),
              str(tmp_path / "dir" / "missing"), f"file:{tmp_path / 'dir'}", f"file:{tmp_path / 'nope'}"]
    deny_all = SourcePolicy()
    allowed = tmp_path / "allowed"
    folders = SourcePolicy(schemes=frozenset({"file", "images"}), directories=(allowed,))
    for policy, reason in [(deny_all, "scheme 'file' is not allowed here (allowed: none)"),
                           (folders, "the path is outside the allowed folders")]:
        for uri in probes:
            for options in ({}, {"fps": 5}, {"resize": 64}):  # fps applies to folders only: still one answer
                with pytest.raises(SourceNotAllowedError) as caught:
                    parse_source(uri, policy=policy, **options)
                assert str(caught.value) == f"source {uri} not allowed: {reason}", (uri, options)
        for uri in ("odd:name", "odd:missing"):  # a relative name with a colon is a scheme, existing or not
            with pytest.raises(SourceUnsupportedError, match=r"unknown scheme 'odd:'"):
                parse_source(uri, policy=policy)
    with pytest.raises(SourceNotAllowedError) as caught:
        parse_source(f"images:{tmp_path / 'dir'}", policy=SourcePolicy(schemes=frozenset({"file"})))
    assert str(caught.value).endswith("scheme 'images' is not allowed here (allowed: file)")


def test_the_server_default_answers_alike_for_existing_and_missing_folders(tmp_path: Path) -> None:
    from server.config import ServerConfig, SourceCatalog

    (tmp_path / "exists").mkdir()
    catalog = SourceCatalog(ServerConfig())
    answers = set()
    for name in ("exists", "missing"):
        with pytest.raises(SourceNotAllowedError) as caught:
            catalog.open_uri(str(tmp_path / name))
        answers.add(str(caught.value).replace(name, "NAME"))
    assert answers == {f"source {tmp_path / 'NAME'} not allowed: scheme 'file' is not allowed here (allowed: none)"}


# --------------------------------------------------------------------------- hosts and ports


@pytest.mark.parametrize(
    ("pattern", "allowed", "refused"),
    [
        ("cam1.lan", [("cam1.lan", 554), ("CAM1.lan", None)], [("cam2.lan", 554), ("10.0.0.1", 554)]),
        ("cam1.lan:554", [("cam1.lan", 554)], [("cam1.lan", 8554), ("cam1.lan", None)]),
        ("[fd00::5]:8554", [("fd00::5", 8554), ("[FD00:0::5]", 8554)], [("fd00::5", 554), ("fd00::6", 8554)]),
        ("fd00::5", [("[fd00::5]", 1)], [("fd00::6", 1)]),
        ("10.0.0.0/8:554", [("10.1.2.3", 554)], [("10.1.2.3", 80), ("11.0.0.1", 554), ("cam1.lan", 554)]),
        ("[fd00::/8]:443", [("fd12::1", 443)], [("fe80::1", 443)]),
        ("*.cams.example:443", [("a.cams.example", 443)], [("cams.example", 443), ("a.cams.example", 80)]),
        ("*:443", [("anything", 443)], [("anything", 80)]),
        ("127.0.0.1", [("127.0.0.1", 9)], [("localhost", 9)]),
        ("*", [("anything", None), ("", 5000)], []),  # '': udp://@:5000, every local address
    ],
)
def test_host_patterns_with_ports(pattern: str, allowed: list[tuple[str, int | None]],
                                  refused: list[tuple[str, int | None]]) -> None:
    parsed = HostPattern.parse(pattern)
    assert all(parsed.matches(h, p) for h, p in allowed)
    assert not any(parsed.matches(h, p) for h, p in refused)


def test_a_policy_with_ports_checks_the_port_of_the_url() -> None:
    policy = SourcePolicy(schemes=frozenset({"rtsp", "https"}), hosts=("cam1.lan:554", "[fd00::5]:8554", "*:443"))
    for ok in ["rtsp://cam1.lan/s", "rtsp://cam1.lan:554/s", "rtsp://[fd00::5]:8554/s", "https://x.example/a.m3u8"]:
        policy.check(parse_source(ok))
    for uri, shown in [("rtsp://cam1.lan:8554/s", "cam1.lan:8554"), ("rtsp://[fd00::5]/s", "[fd00::5]:554"),
                       ("https://x.example:8443/a", "x.example:8443")]:
        with pytest.raises(SourceNotAllowedError) as caught:
            parse_source(uri, policy=policy)
        assert str(caught.value) == f"source {uri} not allowed: host '{shown}' is not allowed here"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("cam:99999", "host pattern 'cam:99999': the port must be 1-65535, not '99999'"),
        ("[fd00::5", "host pattern '[fd00::5': a '[' without its ']'"),
        ("10.0.0.0/99", "host pattern '10.0.0.0/99': '10.0.0.0/99' is not a network like 10.0.0.0/8"),
        ("a b", "host pattern 'a b': use a name, an address, *.domain, a network like 10.0.0.0/8 or *, "
                "each optionally with :PORT ([v6 address]:PORT)"),
    ],
)
def test_bad_host_patterns_are_refused_at_start_up(pattern: str, message: str) -> None:
    from server.config import ConfigError, ServerConfig

    with pytest.raises(ValueError) as caught:
        SourcePolicy(hosts=(pattern,))
    assert str(caught.value) == message
    config = ServerConfig()
    config.policy.allow_hosts = [pattern]
    with pytest.raises(ConfigError) as config_error:
        config.check()
    assert str(config_error.value) == f"[policy] allow_hosts: {message}"


# --------------------------------------------------------------------------- option bounds


@pytest.mark.parametrize(
    ("uri", "option", "value", "message"),
    [
        ("a.mp4", "timeout_s", 1e308, "timeout_s must be a number in (0, 3600] for a.mp4, not 1e+308"),
        ("a.mp4", "timeout_s", 1e300, "timeout_s must be a number in (0, 3600] for a.mp4, not 1e+300"),
        ("a.mp4", "timeout_s", "inf", "timeout_s must be a number in (0, 3600] for a.mp4, not 'inf'"),
        ("a.mp4", "timeout_s", "nan", "timeout_s must be a number in (0, 3600] for a.mp4, not 'nan'"),
        ("a.mp4", "timeout_s", True, "timeout_s must be a number in (0, 3600] for a.mp4, not True"),
        ("rtsp://h/s", "max_backoff_s", 7200, "max_backoff_s must be a number in (0, 3600] for rtsp://h/s, not 7200"),
        ("rtsp://h/s", "reconnect_attempts", 2.5,
         "reconnect_attempts must be an integer in [1, 1000000] for rtsp://h/s, not 2.5"),
        ("rtsp://h/s", "reconnect_attempts", 10**7,
         "reconnect_attempts must be an integer in [1, 1000000] for rtsp://h/s, not 10000000"),
        ("a.mp4", "buffer_frames", 100000, "buffer_frames must be an integer in [1, 1024] for a.mp4, not 100000"),
        ("a.mp4", "buffer_frames", 0, "buffer_frames must be an integer in [1, 1024] for a.mp4, not 0"),
        ("a.mp4", "resize", "16000x12000",
         "resize must be (width, height) or 'WxH' with integers in [1, 8192] for a.mp4, not '16000x12000'"),
        ("a.mp4", "resize", 9000, "resize must be a longest side in [1, 8192] for a.mp4, not 9000"),
        ("a.mp4", "resize", (640.5, 480),
         "resize must be (width, height) or 'WxH' with integers in [1, 8192] for a.mp4, not (640.5, 480)"),
        ("/dev/video0", "size", "9000x9000",
         "size must be (width, height) or 'WxH' with integers in [1, 8192] for /dev/video0, not '9000x9000'"),
        ("images:/data/frames", "fps", 1e6, "fps must be a number in (0, 1000] for images:/data/frames, not 1000000.0"),
        ("/dev/video0", "input_format", "mjpeg;x",
         "input_format must be 1-32 letters, digits or '_' (e.g. 'mjpeg') for /dev/video0, not 'mjpeg;x'"),
        ("a.mp4", "preprocess", ["clahe", "clahe"],
         "preprocess must name each step at most once for a.mp4, not ['clahe', 'clahe']"),
        ("a.mp4", "preprocess", 3, "preprocess must be a list of steps (clahe, denoise, denoise_nlm) for a.mp4, not 3"),
        ("a.mp4", "av_options", {str(i): "1" for i in range(65)},
         "av_options must hold at most 64 FFmpeg options for a.mp4, not 65"),
        ("a.mp4", "realtime", "maybe", "realtime must be true or false for a.mp4, not 'maybe'"),
    ],
)
def test_every_option_has_a_hard_range(uri: str, option: str, value: object, message: str) -> None:
    with pytest.raises(SourceOptionError) as caught:
        parse_source(uri, **{option: value})
    assert (str(caught.value), caught.value.option) == (message, option)


def test_the_hard_ranges_hold_at_their_edges() -> None:
    spec = parse_source("rtsp://h/s", timeout_s=3600, max_backoff_s="3600", reconnect_attempts=4.0,
                        buffer_frames="1024", resize="8192x8192")
    assert (spec.timeout_s, spec.max_backoff_s, spec.reconnect_attempts, spec.buffer_frames, spec.resize_wh) == (
        3600.0, 3600.0, 4, 1024, (8192, 8192))


@pytest.mark.parametrize(
    ("uri", "option", "value", "message"),
    [
        ("CLIP", "timeout_s", 45, "timeout_s must be at most 30 on this server ([policy] max_timeout_s) for CLIP, not 45"),
        ("rtsp://cam1.lan/s", "max_backoff_s", 60,
         "max_backoff_s must be at most 30 on this server ([policy] max_backoff_s) for rtsp://cam1.lan/s, not 60"),
        ("rtsp://cam1.lan/s", "reconnect_attempts", 6,
         "reconnect_attempts must be at most 5 on this server ([policy] max_reconnect_attempts) for rtsp://cam1.lan/s, "
         "not 6"),
        ("CLIP", "buffer_frames", 100,
         "buffer_frames must be at most 32 on this server ([policy] max_buffer_frames) for CLIP, not 100"),
        ("CLIP", "resize", "4000x3000", "resize must be at most 2048 px a side and 4194304 pixels on this server "
                                        "([policy] max_resize_side, max_resize_pixels) for CLIP, not 4000x3000"),
        ("CLIP", "resize", "2048x4096", "resize must be at most 2048 px a side and 4194304 pixels on this server "
                                        "([policy] max_resize_side, max_resize_pixels) for CLIP, not 2048x4096"),
        ("CLIP", "resize", 3000, "resize must be at most 2048 px a side and 4194304 pixels on this server "
                                 "([policy] max_resize_side, max_resize_pixels) for CLIP, not 3000"),
        ("/dev/video0", "size", "4096x2160", "size must be at most 2048 px a side and 4194304 pixels on this server "
                                             "([policy] max_resize_side, max_resize_pixels) for /dev/video0, not 4096x2160"),
        ("FRAMES", "fps", 120, "fps must be at most 60 on this server ([policy] max_fps) for FRAMES, not 120"),
    ],
)
def test_every_option_has_a_server_cap(tmp_path: Path, uri: str, option: str, value: object, message: str) -> None:
    (tmp_path / "frames").mkdir()
    (tmp_path / "clip.mp4").write_bytes(b"")
    policy = SourcePolicy(schemes=frozenset({"file", "images", "rtsp", "v4l2"}), directories=(tmp_path,),
                          hosts=("cam1.lan",), devices=("/dev/video0",), max_reconnect_attempts=5)
    paths = {"CLIP": str(tmp_path / "clip.mp4"), "FRAMES": str(tmp_path / "frames")}
    uri = paths.get(uri, uri)
    with pytest.raises(SourceOptionError) as caught:
        parse_source(uri, policy=policy, **{option: value})
    assert (str(caught.value), caught.value.option) == (message.replace("CLIP", uri).replace("FRAMES", uri), option)
    # the same values without a policy are the operator's to choose
    parse_source(uri, **{option: value})


def test_the_reconnect_cap_is_the_default_of_a_client_source() -> None:
    policy = SourcePolicy(schemes=frozenset({"rtsp"}), hosts=("cam1.lan",), max_reconnect_attempts=5)
    assert parse_source("rtsp://cam1.lan/s", policy=policy).reconnect_attempts == 5
    assert parse_source("rtsp://cam1.lan/s", policy=policy, reconnect_attempts=2).reconnect_attempts == 2
    assert parse_source("rtsp://cam1.lan/s").reconnect_attempts is None
    with pytest.raises(SourceOptionError, match=r"^reconnect_attempts must be set, at most 5"):
        policy.check(parse_source("rtsp://cam1.lan/s"))


def test_the_config_policy_sets_the_caps(tmp_path: Path) -> None:
    from server.config import SourceCatalog, load_config

    make_clip(tmp_path / "clip.mp4", "libx264", n_frames=2, size_hw=(48, 64))
    path = tmp_path / "server.toml"
    path.write_text('[policy]\nallow_schemes = ["file"]\nallow_dirs = ["."]\nmax_timeout_s = 5\n'
                    'max_resize_side = 512\nmax_resize_pixels = 65536\n')
    catalog = SourceCatalog(load_config(path))
    clip = str(tmp_path / "clip.mp4")
    with pytest.raises(SourceOptionError) as caught:
        catalog.open_uri(clip, {"timeout_s": 6})
    assert caught.value.option == "timeout_s" and "at most 5 on this server" in str(caught.value)
    with pytest.raises(SourceOptionError) as caught:
        catalog.open_uri(clip, {"resize": "512x256"})
    assert caught.value.option == "resize" and "at most 512 px a side and 65536 pixels" in str(caught.value)
    with catalog.open_uri(clip, {"resize": "256x256"}) as source:  # timeout_s unset: the cap, not 10 s
        frame = source.get_latest(10)
        assert frame is not None and frame.image_rgb.shape == (256, 256, 3)
        assert source.spec.policy == catalog.policy and source.spec.timeout_s == 5
