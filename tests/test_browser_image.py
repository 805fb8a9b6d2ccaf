"""The operator page's image mode in a real headless Chromium against a real server.

Same set-up as ``tests/test_browser.py`` (Debian's ``/usr/bin/chromium``
driven by Playwright's driver, the random-weight SAM 2.1 tiny of ``conftest``,
the page from ``page_routes()``), so masks are meaningless: the test checks
that the masks the server sent for the operator's prompts are the ones the
page lists and draws, that the same prompts over the Python client (a second
connection, the embedding from the shared cache) give the same masks and
scores, and that the downloads decode to the mask on screen.

User paths: switch to image mode, choose a generated PNG, click (a positive
point), pick each candidate in turn (the overlay is exactly that mask),
shift-click (a negative point, refining the candidate on screen), drag a box;
download the mask as PNG and as COCO RLE; switch to live video and back (the
image and its answer stay); clear the prompts; choose a file that is not an
image (the server's error is shown), then drop the picture on the page (served
from the cache). An EXIF-rotated JPEG shown and prompted upright; a reconnect
(the server forgets images with their connection) opens the file again; a
file larger than the server takes is refused before it is sent.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from server.client import SyncClient
from tests.test_browser import CHROMIUM, Watch, browser, chromium, http_base, page_server, screenshot, wait_for
from tests.test_server import make_config
from tracker.export import object_colour
from tracker.masks import decode_rle

__all__ = ["browser"]  # the module-scoped Chromium fixture, shared with tests/test_browser.py

pytestmark = [
    pytest.mark.network,
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # pycocotools vs numpy 2
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

H, W = 150, 200  # neither the video's 4:3 nor square: the overlay must follow the picture's own size

#: the #image-masks canvas (nothing but the chosen mask is drawn there): its size, drawn pixels, colours
IMAGE_OVERLAY = """() => {
  const c = document.getElementById('image-masks');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const bits = new Array(c.width * c.height);
  const colours = {};
  for (let i = 0, p = 0; i < d.length; i += 4, p++) {
    bits[p] = d[i + 3] ? '1' : '0';
    if (d[i + 3]) { const k = `${d[i]},${d[i + 1]},${d[i + 2]},${d[i + 3]}`; colours[k] = (colours[k] || 0) + 1; }
  }
  return {width: c.width, height: c.height, bits: bits.join(''), colours};
}"""

#: drop a file named shapes.png with these bytes (base64) on the picture, as a file manager would
DROP = """(b64) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], 'shapes.png', {type: 'image/png'}));
  const view = document.getElementById('image-view');
  view.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
  view.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""

#: drop a file of ``n`` zero bytes named ``name`` on the picture
DROP_ZEROS = """([name, n]) => {
  const dt = new DataTransfer();
  dt.items.add(new File([new Uint8Array(n)], name, {type: 'image/png'}));
  document.getElementById('image-view').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""

ANSWERS = "(n) => { const a = window.sam2stream.image.answer; return a && a.answer >= n && !window.sam2stream.image.busy; }"


def picture(h: int = H, w: int = W) -> np.ndarray:
    """A dark picture with a bright disc and a blue rectangle (uint8 RGB, h x w)."""
    yy, xx = np.mgrid[:h, :w]
    image = np.full((h, w, 3), 30, np.uint8)
    image[(yy - 70) ** 2 + (xx - 60) ** 2 < 35**2] = (230, 220, 40)
    image[30:120, 120:185] = (40, 60, 220)
    return image


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def image_xy(page: Any, x: float, y: float) -> tuple[float, float]:
    """Screen position of image pixel (x, y)'s centre on the page's picture."""
    box = page.locator("#image-marks").bounding_box()
    width, height = page.evaluate("() => [document.getElementById('image-marks').width, document.getElementById('image-marks').height]")
    return box["x"] + (x + 0.5) * box["width"] / width, box["y"] + (y + 0.5) * box["height"] / height


def overlay_mask(page: Any, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    """The drawn pixels of #image-masks, whose size must be ``shape`` (the image's, h x w)."""
    got = page.evaluate(IMAGE_OVERLAY)
    assert (got["height"], got["width"]) == shape
    return np.frombuffer(got["bits"].encode(), np.uint8).reshape(shape) == ord("1")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


class ConnWatch(Watch):
    """:class:`tests.test_browser.Watch` telling the page's WebSockets apart
    (``_conn``: 1, 2, … in order of opening): request ids start again on each."""

    def _on_websocket(self, ws: Any) -> None:
        self._conns = conn = getattr(self, "_conns", 0) + 1

        def sent(payload: Any) -> None:
            if isinstance(payload, str):
                self.sent.append({**json.loads(payload), "_conn": conn})

        def received(payload: Any) -> None:
            if isinstance(payload, str) and (msg := json.loads(payload))["type"] != "frame":
                self.received.append({**msg, "_conn": conn})

        ws.on("framesent", sent)
        ws.on("framereceived", received)

    def answer(self, request: dict) -> dict | None:
        return next(
            (m for m in self.received
             if m["_conn"] == request["_conn"] and m.get("id") == request["id"] and m["type"] in ("reply", "error")),
            None,
        )


@contextmanager
def operator_page(browser: Any) -> Iterator[tuple[Any, ConnWatch]]:
    with chromium(browser) as (page, _):
        yield page, ConnWatch(page)


def exchange(watch: ConnWatch, type: str, n: int) -> tuple[dict, dict]:
    """The page's ``n``-th ``type`` request (1-based, over all its connections) and its answer."""
    sent = watch.requests(type)[n - 1]
    answer = watch.answer(sent)
    assert answer is not None, f"no answer to {sent}"
    return sent, answer


def masks_of(reply: dict) -> list[np.ndarray]:
    return [decode_rle(m["mask"]) for m in reply["masks"]]


def check_candidates(page: Any, reply: dict) -> None:
    """The list shows the reply's scores best first; picking each candidate draws exactly its mask."""
    scores = [m["score"] for m in reply["masks"]]
    assert scores == sorted(scores, reverse=True), f"not best first: {scores}"
    shown = page.evaluate("() => [...document.querySelectorAll('#image-candidates li .score')].map(e => e.textContent)")
    assert shown == [f"{s:.3f}" for s in scores]
    masks = masks_of(reply)
    for k, mask in enumerate(masks):
        page.click(f"#image-candidates li[data-candidate='{k}']")
        assert page.evaluate("() => window.sam2stream.image.chosen") == k
        drawn = overlay_mask(page)
        assert iou(drawn, mask) > 0.9 and np.array_equal(drawn, mask), f"candidate {k}: IoU {iou(drawn, mask):.3f}"
        if mask.any():
            colours = page.evaluate(IMAGE_OVERLAY)["colours"]
            r, g, b = object_colour(1)
            assert set(colours) == {f"{r},{g},{b},128"}, colours


def test_operator_segments_an_image_refines_it_and_downloads_the_mask(model, browser, tmp_path):
    image = picture()
    data = png_bytes(image)
    path = tmp_path / "shapes.png"
    path.write_bytes(data)
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"these are notes, not a picture\n")
    with page_server(model, make_config()) as st, operator_page(browser) as (page, watch), SyncClient(st.url) as client:
        page.goto(http_base(st))
        wait_for(page, "() => window.sam2stream.hello !== null", "the server's hello")
        assert page.is_visible("#live-mode") and not page.is_visible("#image-mode")
        page.click("#mode-image")
        assert page.is_visible("#image-mode") and not page.is_visible("#live-mode")

        # ---- choose the picture: it is uploaded as it is, shown at the size the server reports
        page.set_input_files("#image-file", str(path))
        wait_for(page, "() => window.sam2stream.image.imageId", "the image_open reply")
        sent, opened = exchange(watch, "image_open", 1)
        assert base64.b64decode(sent["data"]) == data
        assert opened["type"] == "reply" and (opened["height"], opened["width"]) == (H, W)
        info = page.text_content("#image-info")
        assert info.startswith(f"shapes.png · {W} × {H} · embedding "), info
        pixels = page.evaluate(
            "() => { const c = document.getElementById('image-pixels');"
            " return [c.width, c.height, Array.from(c.getContext('2d').getImageData(60, 70, 1, 1).data)]; }"
        )
        assert pixels[:2] == [W, H] and pixels[2][:3] == [230, 220, 40]  # the disc's centre, upright and unscaled

        # the same picture over a second connection: the embedding from the cache, the same answers
        remote = client.open_image(data)
        assert remote.image.cached and (remote.image.height, remote.image.width) == (H, W)

        # ---- a click: a positive point, three candidates
        page.mouse.click(*image_xy(page, 60, 70))
        wait_for(page, ANSWERS, "the first answer", arg=1)
        sent, reply = exchange(watch, "image_segment", 1)
        assert reply["type"] == "reply", reply
        assert sent["points_xy"] == [[60, 70]] and sent["labels"] == [1] and sent["multimask"] is True
        assert "previous" not in sent and "box_xyxy" not in sent
        assert len(reply["masks"]) == 3
        same = remote.segment(points=[[60, 70]], labels=[1], multimask=True)
        for got, want in zip(masks_of(reply), same.masks):
            np.testing.assert_array_equal(got, want)
        assert [m["score"] for m in reply["masks"]] == pytest.approx(same.scores, abs=1e-5)
        check_candidates(page, reply)
        masks = masks_of(reply)
        assert any(m.any() for m in masks), "every candidate is empty: nothing drawn to compare"

        # ---- pick the second candidate, then shift-click: a negative point refining it
        page.click("#image-candidates li[data-candidate='1']")
        page.keyboard.down("Shift")
        page.mouse.click(*image_xy(page, 150, 75))
        page.keyboard.up("Shift")
        wait_for(page, ANSWERS, "the refined answer", arg=2)
        sent, refined = exchange(watch, "image_segment", 2)
        assert refined["type"] == "reply", refined
        assert sent["points_xy"] == [[60, 70], [150, 75]] and sent["labels"] == [1, 0] and sent["previous"] == 1
        same = remote.segment(points=[[60, 70], [150, 75]], labels=[1, 0], multimask=True, previous=1)
        for got, want in zip(masks_of(refined), same.masks):
            np.testing.assert_array_equal(got, want)
        assert [m["score"] for m in refined["masks"]] == pytest.approx(same.scores, abs=1e-5)
        check_candidates(page, refined)

        # ---- a drag: a box, with the points so far, refining the candidate on screen
        page.click("#image-candidates li[data-candidate='0']")
        page.mouse.move(*image_xy(page, 20, 30))
        page.mouse.down()
        page.mouse.move(*image_xy(page, 110, 115), steps=6)
        page.mouse.up()
        wait_for(page, ANSWERS, "the box's answer", arg=3)
        sent, boxed = exchange(watch, "image_segment", 3)
        assert boxed["type"] == "reply", boxed
        assert sent["box_xyxy"] == [20, 30, 110, 115] and sent["previous"] == 0 and sent["labels"] == [1, 0]
        same = remote.segment(points=[[60, 70], [150, 75]], labels=[1, 0], box=[20, 30, 110, 115], multimask=True, previous=0)
        for got, want in zip(masks_of(boxed), same.masks):
            np.testing.assert_array_equal(got, want)
        check_candidates(page, boxed)
        screenshot(page, "image-mode")

        # ---- downloads: the chosen candidate as a PNG and as COCO RLE
        chosen = next((k for k, m in enumerate(masks_of(boxed)) if m.any()), 0)
        page.click(f"#image-candidates li[data-candidate='{chosen}']")
        want = masks_of(boxed)[chosen]
        with page.expect_download() as dl:
            page.click("#image-download-png")
        assert dl.value.suggested_filename == "shapes-mask.png"
        png = Image.open(dl.value.path())
        png.load()
        assert png.mode == "L" and png.size == (W, H)
        np.testing.assert_array_equal(np.asarray(png) > 0, want)
        assert set(np.unique(np.asarray(png))) <= {0, 255}
        with page.expect_download() as dl:
            page.click("#image-download-rle")
        assert dl.value.suggested_filename == "shapes-mask.rle.json"
        rle = json.loads(Path(dl.value.path()).read_text())
        assert rle["size"] == [H, W] and rle["score"] == boxed["masks"][chosen]["score"]
        np.testing.assert_array_equal(mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}) > 0, want)

        # ---- live video and back: nothing reloads, the answer is still on screen
        page.click("#mode-live")
        assert page.is_visible("#live-mode") and not page.is_visible("#image-mode")
        page.click("#mode-image")
        assert page.evaluate("() => window.sam2stream.image.answer.answer") == 3
        np.testing.assert_array_equal(overlay_mask(page), want)

        # ---- clear the prompts: no candidates, nothing drawn, the next click starts afresh
        page.click("#image-clear")
        assert not overlay_mask(page).any() and page.evaluate("() => window.sam2stream.image.answer") is None
        assert page.is_disabled("#image-download-png") and page.is_disabled("#image-download-rle")
        assert page.locator("#image-candidates li[data-candidate]").count() == 0
        page.mouse.click(*image_xy(page, 150, 75))
        wait_for(page, ANSWERS, "an answer after clearing", arg=4)
        sent, fresh = exchange(watch, "image_segment", 4)
        assert fresh["type"] == "reply" and sent["points_xy"] == [[150, 75]] and "previous" not in sent
        np.testing.assert_array_equal(overlay_mask(page), masks_of(fresh)[0])

        # ---- not an image: the server's error on the page; then the picture dropped on it, from the cache
        page.set_input_files("#image-file", str(bad))
        wait_for(page, "() => document.getElementById('message').textContent.includes('invalid_image')",
                 "the invalid_image error on the page")
        sent, error = exchange(watch, "image_open", 2)
        assert error["type"] == "error" and error["code"] == "invalid_image" and error["field"] == "data"
        assert error["message"] in page.text_content("#message")
        page.evaluate(DROP, base64.b64encode(data).decode())
        wait_for(page, "() => window.sam2stream.image.imageId && window.sam2stream.image.opened", "the dropped image's image_open")
        sent, reopened = exchange(watch, "image_open", 3)
        assert base64.b64decode(sent["data"]) == data and reopened["cached"] is True
        assert "embedding cached" in page.text_content("#image-info")
        page.mouse.click(*image_xy(page, 150, 75))
        wait_for(page, ANSWERS, "an answer on the reopened image", arg=1)
        sent, again = exchange(watch, "image_segment", 5)
        assert again["type"] == "reply" and sent["points_xy"] == [[150, 75]] and "previous" not in sent
        assert page.evaluate("() => document.getElementById('message').hidden")
        assert watch.errors == [], watch.errors


def test_an_exif_rotated_photo_is_shown_upright_and_reopened_after_a_reconnect(model, browser, tmp_path):
    """A JPEG stored 200 x 150 whose EXIF says "rotate 90° clockwise": the server
    and the page both use the upright 150 x 200 picture, so a click lands on
    the upright pixel. Connect again (the server forgot the image with the old
    connection): the page opens the file again (cached) and the next prompt
    starts afresh, without ``previous``."""
    stored = picture()
    exif = Image.Exif()
    exif[0x0112] = 6  # the picture was taken rotated: display it turned 90° clockwise
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif)
    data = buf.getvalue()
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    upright = np.rot90(stored, k=-1)  # 200 x 150: the disc's centre (60, 70) stored is at (79, 60) upright
    uh, uw = upright.shape[:2]
    with page_server(model, make_config()) as st, operator_page(browser) as (page, watch), SyncClient(st.url) as client:
        page.goto(http_base(st))
        wait_for(page, "() => window.sam2stream.hello !== null", "the server's hello")
        page.click("#mode-image")
        page.set_input_files("#image-file", str(path))
        wait_for(page, "() => window.sam2stream.image.imageId", "the image_open reply")
        opened = exchange(watch, "image_open", 1)[1]
        assert (opened["width"], opened["height"], opened["exif_orientation"]) == (uw, uh, 6)
        shown = page.evaluate(
            "() => { const c = document.getElementById('image-pixels');"
            " return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }"
        )
        assert shown[:2] == [uw, uh]
        rgb = np.asarray(shown[2], np.uint8).reshape(uh, uw, 4)[..., :3]
        assert np.abs(rgb.astype(int) - upright.astype(int)).mean() < 6, "the picture on the page is not the upright photo"

        page.mouse.click(*image_xy(page, 79, 60))
        wait_for(page, ANSWERS, "the first answer", arg=1)
        sent, reply = exchange(watch, "image_segment", 1)
        assert reply["type"] == "reply" and sent["points_xy"] == [[79, 60]]
        assert all(m["mask"]["size"] == [uh, uw] for m in reply["masks"])
        same = client.open_image(data).segment(points=[[79, 60]], labels=[1], multimask=True)
        for got, want in zip(masks_of(reply), same.masks):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(overlay_mask(page, (uh, uw)), masks_of(reply)[0])
        screenshot(page, "image-mode-upright")

        page.click("#connect")  # a new connection: the server closed the old one's images
        wait_for(page, "() => window.sam2stream.image.imageId && window.sam2stream.image.opened", "the image opened again")
        sent, reopened = exchange(watch, "image_open", 2)
        assert base64.b64decode(sent["data"]) == data and reopened["cached"] is True
        assert reopened["image_id"] != opened["image_id"]
        page.mouse.click(*image_xy(page, 100, 150))
        wait_for(page, "() => { const s = window.sam2stream.image; return s.answer && s.answer.image_id === s.imageId && !s.busy; }",
                 "an answer on the reopened image")
        sent, again = exchange(watch, "image_segment", 2)
        assert again["type"] == "reply", again
        assert sent["image_id"] == reopened["image_id"] and "previous" not in sent
        assert sent["points_xy"] == [[79, 60], [100, 150]] and sent["labels"] == [1, 1]  # the prompts so far, kept

        # a file larger than the server takes is refused before it is sent (the message would close the WebSocket)
        page.evaluate(DROP_ZEROS, ["huge.png", 16 * 2**20 + 1])  # made in the page: nothing to carry over
        wait_for(page, "() => document.getElementById('message').textContent.includes('huge.png')", "the size refusal")
        assert page.text_content("#message") == (
            "huge.png: the file has 16.0 MiB; this server takes images up to 16.0 MiB ([images] max_bytes)"
        )
        assert len(watch.requests("image_open")) == 2 and page.evaluate("() => window.sam2stream.conn.ready")
        assert page.evaluate("() => window.sam2stream.image.name") == "rotated.jpg"  # the picture on screen stays
        assert watch.errors == [], watch.errors
