"""The operator page's files over HTTP: server/page.py and what it serves.

Path resolution is checked without sockets (:func:`server.page.resolve_static`);
then a real server with ``routes=page_routes()`` answers raw HTTP requests
(paths sent byte for byte, as an attacker would, not normalised by a client
library): content types, security headers, 404s, traversal refused, the page
public while its WebSocket needs the token. The page's COCO RLE decoder
(``static/rle.js``) is checked against pycocotools under Node.js when it is
installed, and so are image mode's PNG / COCO RLE downloads
(``static/imagemask.js``, against Pillow, zlib and pycocotools);
tests/test_browser.py and tests/test_browser_image.py run the page itself in
Chromium. Last,
``sam2-stream serve`` serves the page, and leaves it out with ``--no-page``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util
from websockets.sync.client import connect

from server.app import ServerThread, TrackingServer
from server.page import CONTENT_TYPES, STATIC_DIR, content_type, page_routes, resolve_static
from tests.test_server import Raw, make_config
from tracker.export import object_colour
from tracker.masks import encode_rle

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "page-test-token"

network = pytest.mark.network


# ---------------------------------------------------------------- resolving paths, no sockets


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    static = tmp_path / "static"
    (static / "js").mkdir(parents=True)
    (static / "index.html").write_text("<html></html>")
    (static / "app.js").write_text("export {};")
    (static / "js" / "lib.js").write_text("export {};")
    (static / ".secret.js").write_text("hidden")
    (static / "notes.py").write_text("not a page type")
    (tmp_path / "outside.js").write_text("outside")
    (static / "link-out.js").symlink_to(tmp_path / "outside.js")
    (static / "link-in.js").symlink_to(static / "app.js")
    return static


def test_resolve_static_finds_the_folder_s_own_files(root):
    assert resolve_static("app.js", root) == (root / "app.js").resolve()
    assert resolve_static("js/lib.js", root) == (root / "js" / "lib.js").resolve()
    assert resolve_static("%61pp.js", root) == (root / "app.js").resolve()  # percent-decoded
    assert resolve_static("link-in.js", root) == (root / "app.js").resolve()  # a link that stays inside


@pytest.mark.parametrize(
    "name",
    [
        "",
        "missing.js",
        "js",  # a folder
        "js/",
        "../outside.js",
        "js/../../outside.js",
        "%2e%2e/outside.js",
        "..%2foutside.js",
        "%2E%2E%2Foutside.js",
        "js/%2e%2e/%2e%2e/outside.js",
        "..\\outside.js",
        "%5c..%5coutside.js",
        "/etc/passwd",
        "%2fetc%2fpasswd",
        "//etc/passwd",
        "./app.js",
        "js//lib.js",
        "app.js%00.html",
        ".secret.js",
        "notes.py",  # not a type the page serves
        "link-out.js",  # a symlink leading out of the folder
        "%ff.js",  # not UTF-8
    ],
)
def test_resolve_static_refuses(root, name):
    assert resolve_static(name, root) is None


def test_content_types_of_the_page_s_files():
    assert content_type(Path("index.html")) == "text/html; charset=utf-8"
    assert content_type(Path("app.js")) == "text/javascript; charset=utf-8"  # module scripts need a JS type
    assert content_type(Path("style.css")) == "text/css; charset=utf-8"
    assert content_type(Path("x.PY")) is None
    for path in STATIC_DIR.iterdir():
        assert content_type(path) is not None, f"{path.name}: no content type, it would never be served"


def test_the_page_loads_nothing_from_elsewhere_and_its_references_exist():
    index = (STATIC_DIR / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', index)
    assert "/static/app.js" in refs and "/static/style.css" in refs
    for ref in refs:
        assert ref.startswith(("/static/", "data:")), f"index.html refers to {ref!r}: only /static/ files may load"
        if ref.startswith("/static/"):
            assert resolve_static(ref[len("/static/") :]) is not None, ref
    for js in STATIC_DIR.glob("*.js"):
        for module in re.findall(r'^import .* from "([^"]+)";$', js.read_text(), re.M):
            assert module.startswith("./") and (STATIC_DIR / module[2:]).is_file(), f"{js.name} imports {module!r}"
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"""["'(]\s*(https?:)?//""", text), f"{path.name} refers to another host"


def test_page_routes():
    routes = page_routes()
    assert set(routes) == {"/", "/index.html", "/static/"}


# ---------------------------------------------------------------- the page over HTTP


def raw_get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """``GET path`` sent byte for byte (no client-side normalisation); status, headers, body."""
    host, port = url.split("//")[1].strip("/").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        parsed[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


@pytest.fixture()
def page_server(model):
    st = ServerThread(TrackingServer(make_config(), model, routes=page_routes())).start()
    try:
        yield st
    finally:
        st.stop()


@network
def test_the_page_and_its_files_with_their_types(page_server):
    url = page_server.url
    for path in ("/", "/index.html"):
        status, headers, body = raw_get(url, path)
        assert status == 200 and body == (STATIC_DIR / "index.html").read_bytes()
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert headers["content-length"] == str(len(body))
        assert "default-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-cache"
    for path in sorted(STATIC_DIR.iterdir()):
        status, headers, body = raw_get(url, f"/static/{path.name}")
        assert status == 200 and body == path.read_bytes(), path.name
        assert headers["content-type"] == CONTENT_TYPES[path.suffix], path.name
    status, headers, body = raw_get(url, "/static/app.js?v=2#frag")
    assert status == 200 and body == (STATIC_DIR / "app.js").read_bytes()
    # the server's own endpoints are untouched
    assert json.loads(raw_get(url, "/healthz")[2])["status"] == "ok"
    assert raw_get(url, "/nothing.html")[0] == 404


@network
@pytest.mark.parametrize(
    "path",
    [
        "/static/",
        "/static/missing.js",
        "/static/../page.py",
        "/static/../../pyproject.toml",
        "/static/%2e%2e/page.py",
        "/static/..%2fpage.py",
        "/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "/static/..\\page.py",
        "/static/%5c..%5cpage.py",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
        "/static/app.js%00.html",
        "/static/%ff.js",
        "/static/./app.js",
        "/static/.hidden.js",
    ],
)
def test_missing_files_and_traversal_are_404(page_server, path):
    status, headers, body = raw_get(page_server.url, path)
    assert status == 404, (path, body)
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert b"no such file" in body


@network
def test_websocket_upgrades_to_the_page_s_path_still_speak_the_protocol(page_server):
    client = Raw(page_server.url)
    assert client.hello["type"] == "hello"
    assert client.request("list_sessions")["sessions"] == []
    client.close()


@network
def test_the_page_is_public_but_its_websocket_needs_the_token(model):
    config = make_config(server={"token": TOKEN, "require_token": True})
    st = ServerThread(TrackingServer(config, model, routes=page_routes())).start()
    try:
        url = st.url
        assert raw_get(url, "/")[0] == 200  # a page holds nothing; the token travels in its #fragment
        assert raw_get(url, "/static/app.js")[0] == 200
        assert raw_get(url, "/metrics")[0] == 401
        with pytest.raises(Exception, match="401"):
            connect(url, open_timeout=10, proxy=None)
        with pytest.raises(Exception, match="401"):
            connect(url + "?token=wrong", open_timeout=10, proxy=None)
        client = Raw(url + f"?token={TOKEN}")  # what the page sends
        assert client.hello["type"] == "hello"
        client.close()
    finally:
        st.stop()


# ---------------------------------------------------------------- the page's RLE decoder


NODE = shutil.which("node") or shutil.which("nodejs")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
@pytest.mark.skipif(NODE is None, reason="no Node.js to run static/rle.js (tests/test_browser.py runs it in Chromium)")
def test_rle_js_decodes_what_the_server_encodes():
    rng = np.random.default_rng(3)
    masks = [np.zeros((2, 3), bool), np.ones((4, 5), bool), rng.random((31, 47)) > 0.6, rng.random((120, 160)) > 0.98]
    big = np.zeros((720, 1280), bool)
    big[50:700, 100:1200] = True
    big[300:310, :] = False
    masks.append(big)
    cases = [{"size": list(m.shape), "counts": encode_rle(m)["counts"]} for m in masks]
    script = """
      const src = require('fs').readFileSync(process.argv[1], 'utf8');
      import('data:text/javascript,' + encodeURIComponent(src)).then((rle) => {
        const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));
        const runs = (bits) => { const out = []; let v = 0, n = 0;
          for (const b of bits) { if (b === v) n++; else { out.push(n); v = b; n = 1; } } out.push(n); return out; };
        const colours = []; for (let id = 1; id <= 260; id++) colours.push(rle.objectColour(id));
        process.stdout.write(JSON.stringify({runs: cases.map((c) => runs(rle.decodeMask(c))), colours,
          bad: (() => { try { rle.decodeMask({size: [2, 2], counts: '1'}); return null; } catch (e) { return e.message; } })()}));
      });
    """
    out = subprocess.run(
        [NODE, "-e", script, str(STATIC_DIR / "rle.js")], input=json.dumps(cases), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for m, case, runs in zip(masks, cases, result["runs"]):
        got = np.repeat(np.arange(len(runs)) % 2 == 1, runs).reshape(m.shape)
        np.testing.assert_array_equal(got, m)
        np.testing.assert_array_equal(got, mask_util.decode({"size": case["size"], "counts": case["counts"].encode()}) > 0)
    assert [tuple(c) for c in result["colours"]] == [object_colour(i) for i in range(1, 261)]
    assert result["bad"] == "RLE counts cover 1 pixels, the mask has 4"


def run_speed_js(cases: dict[str, dict]) -> dict[str, dict]:
    """``static/speed.js`` under Node.js: for each case, the model's and the video's rate and the notice."""
    script = """
      const src = require('fs').readFileSync(process.argv[1], 'utf8');
      import('data:text/javascript,' + encodeURIComponent(src)).then((speed) => {
        const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));
        const out = {};
        for (const [name, c] of Object.entries(cases)) {
          out[name] = {model: speed.modelFps(c.frames), video: speed.videoFps(c.session, c.frames),
                       notice: speed.slowNotice(c.session, c.frames, c.model)};
        }
        process.stdout.write(JSON.stringify(out));
      });
    """
    out = subprocess.run(
        [NODE, "-e", script, str(STATIC_DIR / "speed.js")], input=json.dumps(cases), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def frames_at(processed_s: list[float], model_s: float, source_index: list[int] | None = None, fps: float = 25.0) -> list[dict]:
    index = source_index or [round(t * fps) for t in processed_s]
    return [{"processed_s": 1000.0 + t, "model_s": model_s, "source_index": i, "pts_s": i / fps} for t, i in zip(processed_s, index)]


@pytest.mark.skipif(NODE is None, reason="no Node.js to run static/speed.js (tests/test_browser.py runs it in Chromium)")
def test_speed_js_says_when_the_model_is_slower_than_the_video_and_what_would_help():
    cpu_1024 = {"name": "sam2.1-tiny", "image_size": 1024, "device": "cpu"}
    cases = {
        # the case: SAM 2.1 tiny at 1024 px on a 2-core CPU, one step every 5 s, a 25 fps camera
        "cpu_1024": {"session": {"fps": 25}, "frames": frames_at([0, 5, 10, 15], 4.9), "model": cpu_1024},
        # one frame so far: its time in the model says
        "first_frame": {"session": {"fps": 30}, "frames": [{"processed_s": 5.0, "model_s": 10.0}],
                        "model": {"name": "large", "image_size": 1024, "device": "cpu"}},
        # no fps in the session: from source_index over pts_s (30 fps), one frame a second
        "from_pts": {"session": {"fps": None}, "frames": frames_at([0, 1, 2], 0.9, [0, 30, 60], fps=30),
                     "model": {"name": "sam2.1-tiny", "image_size": 512, "device": "cuda:0"}},
        "keeps_up": {"session": {"fps": 25}, "frames": frames_at([0, 0.04, 0.08, 0.12], 0.03), "model": cpu_1024},
        "a_slow_source": {"session": {"fps": 5}, "frames": frames_at([0, 0.2, 0.4], 0.03, fps=5), "model": cpu_1024},
        "unknown_rate": {"session": {"fps": None}, "frames": [{"processed_s": 5.0, "model_s": 3.0}], "model": cpu_1024},
        "no_frames": {"session": {"fps": 25}, "frames": [], "model": cpu_1024},
    }
    got = run_speed_js(cases)
    assert got["cpu_1024"] == {
        "model": pytest.approx(0.2),
        "video": 25,
        "notice": "The model runs at 0.20 frames/s, slower than the video (25 frames/s): masks come for about 1 frame "
        "in 125. What would help: a GPU (serve --device cuda), a smaller input (serve --image-size 512).",
    }
    assert got["first_frame"]["notice"] == (
        "The model runs at 0.10 frames/s, slower than the video (30 frames/s): masks come for about 1 frame in 300. "
        "What would help: a GPU (serve --device cuda), a smaller input (serve --image-size 512), a lighter model "
        "(serve --model sam2.1-tiny)."
    )
    assert got["from_pts"]["video"] == pytest.approx(30) and got["from_pts"]["notice"] == (
        "The model runs at 1 frames/s, slower than the video (30 frames/s): masks come for about 1 frame in 30. "
        "It already runs the lightest setting on a GPU: fewer sessions on this device would help."
    )
    assert got["keeps_up"]["model"] == pytest.approx(25) and got["keeps_up"]["notice"] == ""
    assert got["a_slow_source"]["notice"] == ""  # the model waits for the source, not the other way round
    assert got["unknown_rate"] == {"model": pytest.approx(1 / 3), "video": None, "notice": ""}
    assert got["no_frames"] == {"model": None, "video": 25, "notice": ""}


# ---------------------------------------------------------------- image mode's downloads and prompts


def run_imagemask_js(cases: dict) -> dict:
    """``static/imagemask.js`` under Node.js: PNG bytes (base64) of masks, COCO RLE objects, prompt fields."""
    script = """
      const src = require('fs').readFileSync(process.argv[1], 'utf8');
      import('data:text/javascript,' + encodeURIComponent(src)).then((im) => {
        const c = JSON.parse(require('fs').readFileSync(0, 'utf8'));
        const err = (f) => { try { f(); return null; } catch (e) { return e.message; } };
        process.stdout.write(JSON.stringify({
          pngs: c.masks.map((m) => Buffer.from(im.encodeMaskPng(Uint8Array.from(m.bits), m.w, m.h)).toString('base64')),
          rles: c.candidates.map((cand) => im.cocoRle(cand)),
          fields: c.prompts.map((p) => im.segmentFields('im1', p.prompts, p.options)),
          base64: im.toBase64(Uint8Array.from(c.bytes)),
          crc: im.crc32(Buffer.from('IEND')),
          adler: im.adler32(Buffer.from('Wikipedia')),
          tooLarge: c.sizes.map(([size, hello]) => im.fileTooLarge(size, hello)),
          errors: [err(() => im.encodeMaskPng(new Uint8Array(5), 2, 2)),
                   err(() => im.segmentFields('im1', {points: [], labels: [], box: null}, {multimask: true, previous: null})),
                   err(() => im.cocoRle({score: 1, mask: {format: 'png'}}))],
        }));
      });
    """
    out = subprocess.run(
        [NODE, "-e", script, str(STATIC_DIR / "imagemask.js")], input=json.dumps(cases), capture_output=True, text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
@pytest.mark.skipif(NODE is None, reason="no Node.js to run static/imagemask.js (tests/test_browser_image.py runs it in Chromium)")
def test_imagemask_js_png_and_coco_rle_round_trip_and_prompt_fields():
    import base64
    import io
    import zlib

    from PIL import Image

    rng = np.random.default_rng(5)
    big = np.zeros((300, 400), bool)  # 300 x 401 bytes of rows: several stored deflate blocks
    big[20:280, 50:390] = True
    masks = [np.zeros((1, 1), bool), np.ones((3, 7), bool), rng.random((37, 53)) > 0.5, big]
    candidates = [
        {"score": 0.9, "area": int(m.sum()), "box_xyxy": [1, 2, 5, 9], "mask": {"format": "rle", **encode_rle(m)}}
        for m in masks
    ]
    prompts = [
        {"prompts": {"points": [[3, 4], [10, 2]], "labels": [1, 0], "box": None}, "options": {"multimask": True, "previous": None}},
        {"prompts": {"points": [], "labels": [], "box": [1, 2, 30, 40]}, "options": {"multimask": False, "previous": 2}},
        {"prompts": {"points": [[5, 6]], "labels": [1], "box": [0, 0, 9, 9]}, "options": {"multimask": True, "previous": 0}},
    ]
    raw = bytes(range(256)) * 3 + b"\x00\xff"
    got = run_imagemask_js(
        {"masks": [{"bits": m.astype(int).ravel().tolist(), "w": m.shape[1], "h": m.shape[0]} for m in masks],
         "candidates": candidates, "prompts": prompts, "bytes": list(raw),
         "sizes": [[16 * 2**20, {"limits": {}}], [16 * 2**20 + 1, {"limits": {}}], [16 * 2**20 + 1, None],
                   [3 * 2**20, {"limits": {"image_max_bytes": 2**20}}], [2**20, {"limits": {"image_max_bytes": 2**20}}]]}
    )
    for m, png in zip(masks, got["pngs"]):
        image = Image.open(io.BytesIO(base64.b64decode(png)))
        image.load()  # checks every chunk's CRC and the zlib stream's Adler-32
        assert image.mode == "L" and image.size == (m.shape[1], m.shape[0])
        np.testing.assert_array_equal(np.asarray(image), m.astype(np.uint8) * 255)
    for m, cand, rle in zip(masks, candidates, got["rles"]):
        assert rle["size"] == list(m.shape) and rle["counts"] == cand["mask"]["counts"]
        np.testing.assert_array_equal(mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}) > 0, m)
        assert rle["score"] == 0.9 and rle["area"] == m.sum() and rle["bbox"] == [1, 2, 5, 8]  # COCO x, y, w, h
    assert got["fields"] == [
        {"image_id": "im1", "multimask": True, "mask_format": "rle", "points_xy": [[3, 4], [10, 2]], "labels": [1, 0]},
        {"image_id": "im1", "multimask": False, "mask_format": "rle", "box_xyxy": [1, 2, 30, 40], "previous": 2},
        {"image_id": "im1", "multimask": True, "mask_format": "rle", "points_xy": [[5, 6]], "labels": [1],
         "box_xyxy": [0, 0, 9, 9], "previous": 0},
    ]
    assert base64.b64decode(got["base64"]) == raw
    assert got["crc"] == zlib.crc32(b"IEND") and got["adler"] == zlib.adler32(b"Wikipedia")
    too_large = "the file has 16.0 MiB; this server takes images up to 16.0 MiB ([images] max_bytes)"
    assert got["tooLarge"] == [
        "", too_large, too_large, "the file has 3.0 MiB; this server takes images up to 1.0 MiB ([images] max_bytes)", "",
    ]
    assert got["errors"] == [
        "the mask has 5 pixels, 2 x 2 needs 4",
        "click on the image or drag a box first",
        "the candidate has no RLE mask",
    ]


# ---------------------------------------------------------------- sam2-stream serve


def serve(*flags: str) -> tuple[subprocess.Popen, str]:
    """``sam2-stream serve`` as a process on a free port; returns it and its WebSocket URL."""
    cmd = [sys.executable, "-m", "server.cli", "serve", "--random-weights", "0", "--image-size", "256",
           "--port", "0", "--source", "cam=push:cam", "--device", "cpu", *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 90
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if m := re.search(r"listening on (ws://\S+/)", line):
            return proc, m.group(1)
    proc.kill()
    raise AssertionError("sam2-stream serve did not start")


@network
@pytest.mark.timeout(180)
def test_serve_command_serves_the_page_unless_told_not_to():
    proc, url = serve()
    try:
        status, headers, body = raw_get(url, "/")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert body == (STATIC_DIR / "index.html").read_bytes()
        assert raw_get(url, "/static/app.js")[0] == 200
    finally:
        proc.terminate()
        proc.wait(30)
    proc, url = serve("--no-page")
    try:
        assert raw_get(url, "/")[0] == 426  # "/" is the WebSocket's alone: upgrade required
        assert raw_get(url, "/static/app.js")[0] == 404
    finally:
        proc.terminate()
        proc.wait(30)
