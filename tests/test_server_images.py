"""Image mode through the real server (``image_open`` / ``image_segment`` /
``image_close`` on 127.0.0.1): masks and scores equal Meta's
``SAM2ImagePredictor`` (set_image + predict, the seeded random-weight model of
conftest) on the same image and prompts, single and multimask, with and without
chained logits, in every mask format; every bad input answered with a typed
error naming the field and followed by a good request on the same connection;
the shared embedding cache (a second client's upload does no encoder work,
eviction then reuse gives the same masks); the inference worker's image
scheduling; the Python client (async and sync); CPU fallback on CUDA OOM."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from server.client import Client, RemoteError, SyncClient
from tests.faults import fail_on_call
from tests.frames import moving_shapes, shape_centres
from tests.meta_image import meta_image_predictor, meta_predict
from tests.test_server import Raw as _Raw
from tests.test_server import http_get, make_config, running
from tracker.embedding_cache import EmbeddingCache
from tracker.masks import decode_png, decode_rle, mask_to_polygons, polygons_to_mask
from tracker.segment import ImageSegmenter
from tracker.session import InferenceWorker

pytestmark = [pytest.mark.network, pytest.mark.timeout(180)]

H, W = 120, 160


_open_raws: list[_Raw] = []


def Raw(url: str, **kw) -> _Raw:
    """A hand-speaking client, closed after the test (the server limits
    connections per address)."""
    raw = _Raw(url, **kw)
    _open_raws.append(raw)
    return raw


@pytest.fixture(autouse=True)
def _close_raws():
    yield
    while _open_raws:
        try:
            _open_raws.pop().ws.close()
        except Exception:
            pass


def png(image: np.ndarray | Image.Image, **kw) -> bytes:
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    im.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return moving_shapes(1, H, W, seed=7)[0]


@pytest.fixture(scope="module")
def meta(model, image):
    return meta_image_predictor(model, image)


@pytest.fixture(scope="module")
def server(model):
    with running(model, make_config(sources={})) as st:
        yield st


def wire_masks(reply: dict) -> list[np.ndarray]:
    """The reply's masks as bool arrays, whatever their format."""
    out = []
    for m in reply["masks"]:
        mask = m["mask"]
        if mask["format"] == "rle":
            out.append(decode_rle({"size": mask["size"], "counts": mask["counts"]}))
        elif mask["format"] == "png":
            out.append(decode_png(reply["_payload"][mask["offset"] : mask["offset"] + mask["length"]]))
        else:
            out.append(polygons_to_mask(mask["polygons"], *mask["size"]))
    return out


def assert_same(reply: dict, theirs, multimask: bool) -> None:
    masks, ious, _ = theirs
    assert len(reply["masks"]) == (3 if multimask else 1)
    for got, mask, iou, m in zip(wire_masks(reply), masks, ious, reply["masks"]):
        np.testing.assert_array_equal(got, mask)
        assert m["score"] == pytest.approx(float(iou), abs=1e-6)
        assert m["area"] == int(mask.sum())
    scores = [m["score"] for m in reply["masks"]]
    assert scores == sorted(scores, reverse=True)


PROMPTS = [
    dict(points_xy=[list(shape_centres(0, H, W)[0])], labels=[1]),
    dict(points_xy=[list(shape_centres(0, H, W)[1]), [5.0, 5.0]], labels=[1, 0]),
    dict(box_xyxy=[50.0, 60.0, 110.0, 110.0]),
    dict(box_xyxy=[50.0, 60.0, 110.0, 110.0], points_xy=[[80.0, 85.0]], labels=[0]),
]


# ---------------------------------------------------------------- equality


@pytest.mark.parametrize("multimask", [False, True])
def test_masks_and_scores_equal_meta(server, image, meta, multimask):
    raw = Raw(server.url)
    opened = raw.request("image_open", data=b64(png(image)))
    assert (opened["width"], opened["height"]) == (W, H)
    assert opened["format"] == "PNG" and opened["image_id"].startswith("im")
    for prompt in PROMPTS:
        reply = raw.request("image_segment", image_id=opened["image_id"], multimask=multimask, **prompt)
        assert (reply["width"], reply["height"]) == (W, H)
        assert_same(reply, meta_predict(meta, prompt, multimask), multimask)


@pytest.mark.parametrize("multimask", [False, True])
def test_chained_logits_equal_meta(server, image, meta, multimask):
    """A click, then the same click plus one more with the best mask's logits
    (``previous: 0``), then the logits alone, as SAM's notebooks refine."""
    raw = Raw(server.url)
    image_id = raw.request("image_open", data=b64(png(image)))["image_id"]
    prompt = PROMPTS[0]
    first = raw.request("image_segment", image_id=image_id, multimask=True, **prompt)
    _, _, meta_low = meta_predict(meta, prompt, True)
    more = dict(prompt, points_xy=[*prompt["points_xy"], [30.0, 100.0]], labels=[1, 1])
    second = raw.request("image_segment", image_id=image_id, multimask=multimask, previous=0, **more)
    theirs = meta_predict(meta, more, multimask, mask_input=meta_low[0][None])
    assert_same(second, theirs, multimask)
    assert (first["answer"], second["answer"]) == (1, 2)
    # the logits alone refine too, from the answer just given
    third = raw.request("image_segment", image_id=image_id, multimask=multimask, previous=0)
    assert_same(third, meta_predict(meta, {}, multimask, mask_input=theirs[2][0][None]), multimask)


@pytest.mark.parametrize("fmt", ["png", "polygon", "none"])
def test_every_mask_format(server, image, meta, fmt):
    raw = Raw(server.url)
    image_id = raw.request("image_open", data=b64(png(image)))["image_id"]
    reply = raw.request("image_segment", image_id=image_id, multimask=True, mask_format=fmt, **PROMPTS[0])
    masks, ious, _ = meta_predict(meta, PROMPTS[0], True)
    assert [m["score"] for m in reply["masks"]] == pytest.approx([float(v) for v in ious], abs=1e-6)
    if fmt == "none":
        assert all("mask" not in m or m["mask"] is None for m in reply["masks"])
        assert [m["area"] for m in reply["masks"]] == [int(m.sum()) for m in masks]
        return
    got = wire_masks(reply)
    for g, m in zip(got, masks):
        if fmt == "png":
            np.testing.assert_array_equal(g, m)  # exact
        else:  # lossy (outlines simplified, holes filled): the polygons of Meta's mask
            np.testing.assert_array_equal(g, polygons_to_mask(mask_to_polygons(m), H, W))


# ---------------------------------------------------------------- bad input


def cmyk_jpeg(image: np.ndarray) -> bytes:
    return png(Image.fromarray(image).convert("CMYK"), format="JPEG", quality=95)


def png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BAD_OPENS = [
    ("not an image", dict(data=b64(b"hello, this is not a picture" * 10)), "invalid_image", "data"),
    ("not base64", dict(data="!!!not base64!!!"), "invalid_image", "data"),
    ("empty", dict(data=""), "invalid_image", "data"),
    ("bomb", dict(data=b64(png_header(60000, 60000))), "image_too_large", "data"),
    ("both", dict(data="aGk=", name="x.png"), "invalid_message", "data"),
    ("neither", dict(), "invalid_message", "data"),
]


def good_segment(raw: Raw, image_id: str) -> None:
    reply = raw.request("image_segment", image_id=image_id, **PROMPTS[0])
    assert len(reply["masks"]) == 1


@pytest.mark.parametrize("case, fields, code, field", BAD_OPENS, ids=[c[0] for c in BAD_OPENS])
def test_bad_images_answered_then_a_good_request(server, image, case, fields, code, field):
    raw = Raw(server.url)
    err = raw.error("image_open", **fields)
    assert (err["code"], err["field"]) == (code, field), err
    good_segment(raw, raw.request("image_open", data=b64(png(image)))["image_id"])


def test_truncated_image(server, image):
    raw = Raw(server.url)
    data = png(image)
    err = raw.error("image_open", data=b64(data[: len(data) // 2]))
    assert (err["code"], err["field"]) == ("invalid_image", "data")
    assert "truncated" in err["message"]
    good_segment(raw, raw.request("image_open", data=b64(data))["image_id"])


def test_pixel_and_byte_limits_from_the_config(model, image):
    config = make_config(sources={}, images={"max_pixels": 100 * 100, "max_bytes": 40_000})
    with running(model, config) as st:
        raw = Raw(st.url)
        err = raw.error("image_open", data=b64(png(image)))  # 160 x 120 > 100 x 100
        assert (err["code"], err["field"]) == ("image_too_large", "data")
        assert "19200 pixels, the limit is 10000 pixels" in err["message"]
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("padding", "x" * 50_000)
        data = png(image[:50, :50], pnginfo=info, compress_level=0)  # few pixels, many bytes
        assert len(data) > 40_000
        err = raw.error("image_open", data=b64(data))
        assert (err["code"], err["field"]) == ("image_too_large", "data")
        small = raw.request("image_open", data=b64(png(image[:50, :50])))
        assert (small["width"], small["height"]) == (50, 50)


@pytest.mark.parametrize(
    "how",
    ["16-bit", "cmyk", "gray", "palette", "alpha"],
)
def test_other_modes_are_converted_as_segment_does(server, image, how):
    """Each mode reaches the model as ``tracker.image_input`` converts it: the
    server's masks equal the in-process segmenter's on the decoded pixels."""
    from tracker.image_input import decode_image

    pil = Image.fromarray(image)
    data = {
        "16-bit": lambda: png(Image.fromarray(image[:, :, 0].astype(np.uint16) * 257)),
        "cmyk": lambda: cmyk_jpeg(image),
        "gray": lambda: png(pil.convert("L")),
        "palette": lambda: png(pil.convert("P", palette=Image.ADAPTIVE, colors=16)),
        "alpha": lambda: png(pil.convert("RGBA")),
    }[how]()
    raw = Raw(server.url)
    opened = raw.request("image_open", data=b64(data))
    reply = raw.request("image_segment", image_id=opened["image_id"], multimask=True, **PROMPTS[0])
    seg = ImageSegmenter(server.server.model)
    ours = seg.predict(seg.encode(decode_image(data).image_rgb), multimask=True, **PROMPTS[0])
    for got, cand in zip(wire_masks(reply), ours.candidates):
        np.testing.assert_array_equal(got, cand.mask_hw)
    assert [m["score"] for m in reply["masks"]] == pytest.approx([c.score for c in ours.candidates], abs=1e-6)


def test_exif_orientation_is_honoured(server):
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:10, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright it is 40 wide, 60 high
    data = png(Image.fromarray(stored), format="JPEG", exif=exif, quality=95)
    raw = Raw(server.url)
    opened = raw.request("image_open", data=b64(data))
    assert (opened["width"], opened["height"], opened["exif_orientation"]) == (40, 60, 6)
    err = raw.error("image_segment", image_id=opened["image_id"], points_xy=[[50, 10]], labels=[1])
    assert (err["code"], err["field"]) == ("prompt_error", "points_xy[0]")  # x = 50 is outside 40 columns
    raw.request("image_segment", image_id=opened["image_id"], points_xy=[[35, 55]], labels=[1])


BAD_PROMPTS = [
    (dict(points_xy=[[10, 10], [500, 10]], labels=[1, 1]), "prompt_error", "points_xy[1]"),
    (dict(points_xy=[[10, -3]], labels=[1]), "prompt_error", "points_xy[0]"),
    (dict(box_xyxy=[10, 10, 900, 50]), "prompt_error", "box_xyxy"),
    (dict(), "prompt_error", "points_xy"),
    (dict(points_xy=[[1, 1]] * 65, labels=[1] * 65), "invalid_message", "points_xy"),
    (dict(points_xy=[[1, 1]], labels=[1, 0]), "invalid_message", "labels"),
    (dict(points_xy=[[1, 1]], labels=[1], previous=0), "prompt_error", "previous"),
    (dict(points_xy=[[1, 1]], labels=[1], previous=3), "invalid_message", "previous"),
    (dict(points_xy=[[1, 1]], labels=[1], multimask="yes"), "invalid_message", "multimask"),
]


@pytest.mark.parametrize("prompt, code, field", BAD_PROMPTS)
def test_bad_prompts_answered_then_a_good_request(server, image, prompt, code, field):
    raw = Raw(server.url)
    image_id = raw.request("image_open", data=b64(png(image)))["image_id"]
    err = raw.error("image_segment", image_id=image_id, **prompt)
    assert (err["code"], err["field"]) == (code, field), err
    good_segment(raw, image_id)


def test_previous_beyond_the_last_answer(server, image):
    raw = Raw(server.url)
    image_id = raw.request("image_open", data=b64(png(image)))["image_id"]
    raw.request("image_segment", image_id=image_id, multimask=False, **PROMPTS[0])
    err = raw.error("image_segment", image_id=image_id, previous=2, **PROMPTS[0])
    assert (err["code"], err["field"]) == ("prompt_error", "previous")
    assert "has 1 mask(s)" in err["message"]
    raw.request("image_segment", image_id=image_id, previous=0, **PROMPTS[0])


def test_unknown_closed_and_other_connections_images(server, image):
    raw, other = Raw(server.url), Raw(server.url)
    err = raw.error("image_segment", image_id="im000000000000", **PROMPTS[0])
    assert (err["code"], err["field"]) == ("unknown_image", "image_id")
    image_id = raw.request("image_open", data=b64(png(image)))["image_id"]
    err = other.error("image_segment", image_id=image_id, **PROMPTS[0])  # ids are per connection
    assert (err["code"], err["field"]) == ("unknown_image", "image_id")
    assert raw.request("image_close", image_id=image_id)["closed"] is True
    err = raw.error("image_segment", image_id=image_id, **PROMPTS[0])
    assert (err["code"], err["field"]) == ("unknown_image", "image_id")
    err = raw.error("image_close", image_id=image_id)
    assert err["code"] == "unknown_image"
    good_segment(raw, raw.request("image_open", data=b64(png(image)))["image_id"])


def test_open_limit_per_connection(model, image):
    with running(model, make_config(sources={}, images={"max_open_per_client": 2})) as st:
        raw = Raw(st.url)
        ids = [raw.request("image_open", data=b64(png(image)))["image_id"] for _ in range(2)]
        err = raw.error("image_open", data=b64(png(image)))
        assert err["code"] == "limit_exceeded" and "2 images open" in err["message"]
        raw.request("image_close", image_id=ids[0])
        good_segment(raw, raw.request("image_open", data=b64(png(image)))["image_id"])


def test_image_opens_are_rate_limited(model, image):
    with running(model, make_config(sources={}, images={"opens_per_s": 0.01, "open_burst": 1})) as st:
        raw = Raw(st.url)
        image_id = raw.request("image_open", data=b64(png(image)))["image_id"]
        err = raw.error("image_open", data=b64(png(image)))
        assert err["code"] == "rate_limited" and "retry in" in err["message"]
        good_segment(raw, image_id)


def test_named_images_under_the_folder_policy(model, image, tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "sub" / "a.png").write_bytes(png(image))
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(image))
    (photos / "link.png").symlink_to(secret)
    os.mkfifo(photos / "fifo.png")  # opened blocking, it would hang the thread that reads it
    with running(model, make_config(sources={}, images={"dirs": [str(photos)]})) as st:
        raw = Raw(st.url)
        opened = raw.request("image_open", name="sub/a.png")
        assert (opened["width"], opened["height"]) == (W, H)
        answers = []
        for name in ["missing.png", "../secret.png", str(secret), "link.png", "sub", "fifo.png"]:
            err = raw.error("image_open", name=name)
            assert (err["code"], err["field"]) == ("image_not_found", "name"), (name, err)
            answers.append(err["message"].replace(repr(name), "NAME"))
        assert len(set(answers)) == 1  # outside and missing look the same
        good_segment(raw, opened["image_id"])


def test_large_messages_other_than_image_open_still_close_1009(model):
    from websockets.exceptions import ConnectionClosed

    with running(model, make_config(sources={})) as st:
        assert st.server.max_size > st.server.config.server.max_message_bytes
        raw = Raw(st.url, max_size=2**26)
        raw.send("list_sessions", padding="x" * (2**20 + 10))
        with pytest.raises(ConnectionClosed) as closed:
            raw.recv(10)
        assert closed.value.rcvd.code == 1009


def test_an_image_above_max_message_bytes_goes_through(model):
    noise = np.random.default_rng(1).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    data = png(noise, compress_level=0)
    assert len(b64(data)) > 2**20
    with running(model, make_config(sources={})) as st:
        raw = Raw(st.url, max_size=2**26)
        opened = raw.request("image_open", data=b64(data))
        assert (opened["width"], opened["height"]) == (700, 700)


# ---------------------------------------------------------------- cache


def count_encoder_calls(model, monkeypatch) -> list[int]:
    """Batch sizes of every ``forward_image`` call from now on."""
    calls: list[int] = []
    original = model.forward_image

    def counting(x):
        calls.append(int(x.shape[0]))
        return original(x)

    monkeypatch.setattr(model, "forward_image", counting)
    return calls


def test_second_client_same_bytes_no_encoder_work(model, image, monkeypatch):
    with running(model, make_config(sources={})) as st:
        calls = count_encoder_calls(model, monkeypatch)
        first, second = Raw(st.url), Raw(st.url)
        a = first.request("image_open", data=b64(png(image)))
        assert a["cached"] is False and a["embed_s"] > 0 and calls == [1]
        # the same pixels, other bytes (another compression level): the same entry
        b = second.request("image_open", data=b64(png(image, compress_level=9)))
        assert b["cached"] is True and b["embed_s"] == 0.0 and calls == [1]
        ra = first.request("image_segment", image_id=a["image_id"], multimask=True, **PROMPTS[1])
        rb = second.request("image_segment", image_id=b["image_id"], multimask=True, **PROMPTS[1])
        assert calls == [1]
        assert [m["mask"] for m in ra["masks"]] == [m["mask"] for m in rb["masks"]]
        stats = first.request("stats")["images"]
        assert stats["cache_hits"] >= 3 and stats["cache_misses"] == 1 and stats["cache_entries"] == 1
        assert stats["images_encoded"] == 2 and stats["encoder_batches"] == 2  # the hit went through embed too
        status, text, _ = http_get(st.url.replace("ws://", "http://") + "metrics")
        assert status == 200
        assert "sam2_stream_images_cache_misses_total 1.0" in text
        assert "sam2_stream_images_cache_entries 1.0" in text


def test_eviction_then_reuse_recomputes_the_same_masks(model, image, monkeypatch):
    seg = ImageSegmenter(model)
    one = seg.encode(image).nbytes
    with running(model, make_config(sources={}, images={"cache_bytes": one})) as st:  # room for one embedding
        calls = count_encoder_calls(model, monkeypatch)
        raw = Raw(st.url)
        a = raw.request("image_open", data=b64(png(image)))["image_id"]
        before = raw.request("image_segment", image_id=a, multimask=True, **PROMPTS[0])
        other = moving_shapes(1, H, W, seed=11)[0]
        raw.request("image_open", data=b64(png(other)))  # evicts the first
        assert len(calls) == 2
        after = raw.request("image_segment", image_id=a, multimask=True, **PROMPTS[0])
        assert len(calls) == 3 and after["embed_s"] > 0
        assert [m["mask"] for m in after["masks"]] == [m["mask"] for m in before["masks"]]
        assert [m["score"] for m in after["masks"]] == [m["score"] for m in before["masks"]]
        stats = raw.request("stats")["images"]
        assert stats["cache_evictions"] >= 2 and stats["recomputed"] == 1
        assert stats["cache_bytes"] <= one


def test_many_images_stay_within_the_budget(model):
    seg = ImageSegmenter(model)
    one = seg.encode(moving_shapes(1, 32, 32, seed=0)[0]).nbytes
    with running(model, make_config(sources={}, images={"cache_bytes": 3 * one, "max_open_per_client": 20})) as st:
        raw = Raw(st.url)
        for k in range(8):
            raw.request("image_open", data=b64(png(moving_shapes(1, 32, 32, seed=100 + k)[0])))
        stats = raw.request("stats")["images"]
        assert stats["cache_entries"] == 3 and stats["cache_bytes"] <= 3 * one and stats["cache_evictions"] == 5


def test_rss_stays_bounded_with_many_images_and_the_open_bytes_budget_holds(model):
    """Many distinct uploads, each closed after a prompt: the process's RSS grows by far
    less than the embeddings would take if the cache kept them all (what it keeps is
    the budget). Then the server-wide ``open_bytes`` budget refuses an upload that
    would hold more image files than it allows, naming it."""
    import gc

    import psutil

    seg = ImageSegmenter(model)
    one = seg.encode(moving_shapes(1, 32, 32, seed=0)[0]).nbytes
    files = [png(moving_shapes(1, 64, 64, seed=300 + k)[0]) for k in range(32)]
    proc = psutil.Process()
    config = make_config(sources={}, images={
        "cache_bytes": 2 * one, "open_bytes": 3 * max(map(len, files)),
        "opens_per_s": 1000.0, "open_burst": 1000,  # the rate limits are not what this test is about
    }, limits={"prompts_per_s": 1000.0, "prompt_burst": 1000.0})
    with running(model, config) as st:
        raw = Raw(st.url)

        def one_image(data: bytes) -> None:
            image_id = raw.request("image_open", data=b64(data))["image_id"]
            raw.request("image_segment", image_id=image_id, points_xy=[[10, 10]], labels=[1])
            raw.request("image_close", image_id=image_id)

        for data in files[:8]:  # warm-up: allocator pools, caches, threads
            one_image(data)
        gc.collect()
        rss_before = proc.memory_info().rss
        for data in files[8:]:
            one_image(data)
        gc.collect()
        growth = proc.memory_info().rss - rss_before
        unbounded = (len(files) - 8) * one  # what keeping every embedding would take
        assert growth < unbounded / 2, (growth, unbounded)
        assert raw.request("stats")["images"]["cache_bytes"] <= 2 * one
        held = [raw.request("image_open", data=b64(data))["image_id"] for data in files[:3]]
        err = raw.error("image_open", data=b64(files[3]))
        assert (err["code"], err["field"]) == ("limit_exceeded", "data")
        assert "[images] open_bytes" in err["message"]
        raw.request("image_close", image_id=held[0])
        raw.request("image_open", data=b64(files[3]))  # room again


# ---------------------------------------------------------------- scheduling


def test_concurrent_uploads_share_one_encoder_batch(model, monkeypatch):
    """Images pending at one worker round go through ``forward_image`` together."""
    worker = InferenceWorker(model, name="test-images")
    try:
        seg = ImageSegmenter(model)
        cache: EmbeddingCache = EmbeddingCache(1 << 30)
        gate = threading.Event()
        worker.submit(gate.wait)  # holds the worker while the uploads queue
        calls = count_encoder_calls(model, monkeypatch)
        prepared = [seg.prepare(moving_shapes(1, 40, 50, seed=k)[0]) for k in range(4)]
        futures = [worker.submit_image_embed(seg, p, cache) for p in prepared]
        prompt = worker.submit_image_prompt(lambda: "decoder")
        order: list[str] = []
        futures[0].add_done_callback(lambda f: order.append("embed"))
        prompt.add_done_callback(lambda f: order.append("prompt"))
        gate.set()
        results = [f.result(60) for f in futures]
        assert calls == [4] and worker.image_batches == 1
        assert order == ["prompt", "embed"]  # the decoder-only work ran first
        for p, r in zip(prepared, results):
            torch.testing.assert_close(r.embedding.image_embed, seg.encode(p).image_embed, atol=1e-5, rtol=0)
    finally:
        worker.stop()


def test_a_live_session_steps_between_image_batches(model):
    """Uploads queued while a live camera always has a frame waiting: the worker
    never runs two image batches without a frame step between them, and on a CPU
    (where a batch costs the sum of its images) a batch holds one image while a
    live frame waits, whatever ``max_batch`` says: live video waits one image at most."""
    log: list[str] = []
    with running(model, make_config(images={"max_batch": 8, "max_open_per_client": 8})) as st:
        worker = st.server.worker
        step, batch = worker._step_frames, worker._run_image_batch

        def logged_step() -> bool:
            did = step()
            if did:
                log.append("frame")
            return did

        def logged_batch() -> bool:
            did = batch()
            if did:
                log.append("images")
            return did

        worker._step_frames, worker._run_image_batch = logged_step, logged_batch
        viewer = Raw(st.url)
        sid = viewer.request("open", source="cam")["session"]["session_id"]
        source = st.server.manager.get(sid).source
        stop = threading.Event()

        def camera() -> None:
            k = 0
            while not stop.wait(0.01):  # faster than the model: a frame always waits
                source.push(moving_shapes(1, H, W, seed=k % 5)[0], pts_s=k / 100)
                k += 1

        feeder = threading.Thread(target=camera, daemon=True)
        feeder.start()
        try:
            viewer.next_frame()

            async def uploads() -> None:
                async with Client(st.url) as c:
                    await asyncio.gather(*(c.open_image(moving_shapes(1, 40, 50, seed=50 + k)[0]) for k in range(4)))

            asyncio.run(uploads())
        finally:
            stop.set()
            feeder.join(5)
    batches = [i for i, what in enumerate(log) if what == "images"]
    assert len(batches) == 4  # on the CPU with a frame waiting: one image per batch
    for a, b in zip(batches, batches[1:]):
        assert "frame" in log[a + 1 : b], log


def test_out_of_memory_for_an_image_falls_back_to_the_cpu(model, image, monkeypatch):
    """CUDA OOM while encoding an upload (injected): with cpu_fallback the image
    is encoded by a CPU copy of the model and its answers equal the model's."""
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    with running(model, make_config(sources={}, model={"cpu_fallback": True})) as st:
        fail_on_call(st.server.images.segmenter, "encode_batch", 1, oom)
        raw = Raw(st.url)
        opened = raw.request("image_open", data=b64(png(image)))
        reply = raw.request("image_segment", image_id=opened["image_id"], multimask=True, **PROMPTS[0])
        seg = ImageSegmenter(model)
        ours = seg.predict(seg.encode(image), multimask=True, **PROMPTS[0])
        for got, cand in zip(wire_masks(reply), ours.candidates):
            assert (got != cand.mask_hw).mean() < 1e-3
        assert raw.request("stats")["images"]["cpu_fallbacks"] == 1


def test_out_of_memory_without_fallback_is_an_error_and_the_next_open_works(model, image, monkeypatch):
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
    with running(model, make_config(sources={})) as st:
        fail_on_call(st.server.images.segmenter, "encode_batch", 1, oom)
        raw = Raw(st.url)
        err = raw.error("image_open", data=b64(png(image)))
        assert err["code"] == "error" and "out of CUDA memory" in err["message"] and "cpu_fallback" in err["message"]
        good_segment(raw, raw.request("image_open", data=b64(png(image)))["image_id"])


# ---------------------------------------------------------------- Python client


def test_async_client(server, image, meta):
    async def main():
        async with Client(server.url) as c:
            im = await c.open_image(image)  # an array: sent as a lossless PNG
            assert (im.width, im.height) == (W, H)
            result = await im.segment(points=PROMPTS[0]["points_xy"], labels=[1], multimask=True)
            masks, ious, _ = meta_predict(meta, PROMPTS[0], True)
            for got, mask in zip(result.masks, masks):
                np.testing.assert_array_equal(got, mask)
            assert result.scores == pytest.approx([float(v) for v in ious], abs=1e-6)
            png_result = await im.segment(box=PROMPTS[2]["box_xyxy"], mask_format="png")
            m, _, _ = meta_predict(meta, PROMPTS[2], False)
            np.testing.assert_array_equal(png_result.best, m[0])
            again = await c.open_image(png(image))  # file bytes
            assert again.cached
            await im.close()
            with pytest.raises(RemoteError) as err:
                await im.segment(points=[[1, 1]])
            assert err.value.code == "unknown_image" and err.value.field == "image_id"

    asyncio.run(main())


def test_sync_client_with_a_path(server, image, meta, tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png(image))
    with SyncClient(server.url) as c:
        im = c.open_image(path)
        result = im.segment(points=PROMPTS[0]["points_xy"], labels=[1])
        masks, ious, _ = meta_predict(meta, PROMPTS[0], False)
        np.testing.assert_array_equal(result.best, masks[0])
        refined = im.segment(points=PROMPTS[0]["points_xy"], labels=[1], previous=0)
        assert refined.answer == 2
        im.close()


# ---------------------------------------------------------------- HTTP


def http(method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=body if method != "GET" else None, method=method, headers=headers or {})
    try:
        with opener.open(request, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_http_open_segment_delete_equal_meta(model, image, meta):
    import json

    token = {"Authorization": "Bearer s3cret"}
    config = make_config(sources={}, server={"token": "s3cret"}, images={"http_port": 0})
    with running(model, config) as st:
        base = f"http://127.0.0.1:{st.server.images_http.port}/v1/images"
        assert http("POST", base, png(image))[0] == 401  # same token rule as the WebSocket
        status, body = http("POST", base, png(image), token)
        assert status == 200, body
        opened = json.loads(body)
        assert (opened["width"], opened["height"], opened["cached"]) == (W, H, False)
        seg_url = f"{base}/{opened['image_id']}/segment"
        status, body = http("POST", seg_url, json.dumps(dict(multimask=True, **PROMPTS[0])).encode(), token)
        assert status == 200, body
        reply = json.loads(body)
        assert_same(reply, meta_predict(meta, PROMPTS[0], True), True)
        # chained, over HTTP too
        status, body = http("POST", seg_url, json.dumps(dict(previous=0, **PROMPTS[0])).encode(), token)
        assert status == 200 and json.loads(body)["answer"] == 2
        # errors: typed, with an HTTP status
        status, body = http("POST", seg_url, json.dumps({"points_xy": [[999, 1]], "labels": [1]}).encode(), token)
        assert status == 400 and json.loads(body)["field"] == "points_xy[0]"
        status, body = http("POST", base, b"not an image", token)
        assert status == 400 and json.loads(body)["error"] == "invalid_image"
        status, body = http("POST", base, png_header(60000, 60000), token)
        assert status == 413 and json.loads(body)["error"] == "image_too_large"
        status, body = http("POST", seg_url, b"{not json", token)
        assert status == 400 and json.loads(body)["error"] == "invalid_json"
        assert http("GET", base, headers=token)[0] == 405
        assert http("DELETE", f"{base}/{opened['image_id']}", headers=token) == (
            200, json.dumps({"image_id": opened["image_id"], "closed": True}).encode()
        )
        status, body = http("POST", seg_url, json.dumps(PROMPTS[0]).encode(), token)
        assert status == 404 and json.loads(body)["error"] == "unknown_image"
        # the WebSocket shares the cache: the same pixels are a hit there
        raw = Raw(st.url + "?token=s3cret")
        assert raw.request("image_open", data=b64(png(image)))["cached"] is True


def test_http_origin_rule(model, image):
    config = make_config(sources={}, server={"allow_origins": ["https://ok.example"]}, images={"http_port": 0})
    with running(model, config) as st:
        base = f"http://127.0.0.1:{st.server.images_http.port}/v1/images"
        assert http("POST", base, png(image), {"Origin": "https://evil.example"})[0] == 403
        assert http("POST", base, png(image), {"Origin": "https://ok.example"})[0] == 200
        assert http("POST", base, png(image))[0] == 200  # scripts send no Origin


def test_http_bodies_are_bounded_and_connections_limited_per_address(model, image):
    """The HTTP port keeps the WebSocket's rules: a prompt body is at most
    ``max_message_bytes`` and nested at most 32 deep (a 400, no traceback), and one
    address holds at most ``max_clients_per_address`` connections (503)."""
    import json

    config = make_config(sources={}, server={"max_clients_per_address": 2}, images={"http_port": 0})
    with running(model, config) as st:
        port = st.server.images_http.port
        base = f"http://127.0.0.1:{port}/v1/images"
        status, body = http("POST", base, png(image))
        assert status == 200, body
        seg_url = f"{base}/{json.loads(body)['image_id']}/segment"
        deep = '{"points_xy": ' + "[" * 5000 + "]" * 5000 + "}"
        status, body = http("POST", seg_url, deep.encode())
        assert status == 400 and json.loads(body)["error"] == "invalid_message", body
        # a prompt body over max_message_bytes: refused from its Content-Length, before it is sent
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            path = seg_url.split(str(port), 1)[1]
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {2**20 + 10}\r\n\r\n".encode())
            answer = s.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 413 "), answer
        held = []
        try:
            for _ in range(2):  # two connections that send nothing yet hold both slots of this address
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                held.append(s)
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(f"DELETE /v1/images/x HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                answer = s.recv(4096).decode()
            assert answer.startswith("HTTP/1.1 503 ") and "per address" in answer, answer
        finally:
            for s in held:
                s.close()
        deadline = time.time() + 10
        while (status := http("POST", seg_url, json.dumps(PROMPTS[0]).encode())[0]) == 503 and time.time() < deadline:
            time.sleep(0.2)
        assert status == 200
