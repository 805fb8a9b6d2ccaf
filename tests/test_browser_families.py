"""The operator page with EdgeTAM at 1024 px on this CPU: a click on the frame on
screen is accepted (the frame the page shows, not the newest) and the object is
tracked on the frames after it.

The model is EdgeTAM's full architecture (RepViT-M1, the perceiver, two
memory-attention layers) at its trained 1024 px with seeded random weights, so
one step takes a couple of seconds here; the prompt window keeps the frames on
screen, so the click still lands."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tests.test_browser import (  # noqa: E402
    VIDEO_PIXELS,
    browser,  # noqa: F401  (the module's Chromium fixture)
    chromium,
    click,
    http_base,
    page_server,
    prompt_until_answered,
    screenshot,
    wait_for,
    wait_for_object_1_near,
    wait_for_video,
    write_clip,
)
from tests.test_server import make_config  # noqa: E402
from tracker.model import build_model  # noqa: E402

pytestmark = [pytest.mark.network, pytest.mark.timeout(480), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def edgetam_1024() -> torch.nn.Module:
    net = build_model("edgetam", device="cpu", random_weights_seed=0)
    assert net.image_size == 1024
    return net


def test_click_at_1024_px_with_edgetam_is_tracked(edgetam_1024, browser, tmp_path):  # noqa: F811
    clip = write_clip(tmp_path / "clip.mp4", n=40, repeat=6)
    # a prompt on the frame on screen re-tracks the frames after it: seconds each at 1024 px here
    config = make_config(sources={"clip": str(clip)}, limits={"prompt_timeout_s": 150.0})
    config.model.name = "edgetam"
    with page_server(edgetam_1024, config) as st, chromium(browser) as (page, watch):
        page.goto(http_base(st))
        wait_for(page, "() => window.sam2stream.hello !== null", "the server's hello")
        hello = page.evaluate("() => window.sam2stream.hello")
        assert hello["model"]["family"] == "EdgeTAM" and hello["model"]["image_size"] == 1024
        page.click("#open")
        wait_for(page, "() => window.sam2stream.frames.length > 0", "mask frames", timeout=90)
        wait_for_video(page, "clip")
        video = wait_for(page, f"() => {{ const v = ({VIDEO_PIXELS})(); return v && v.red > 100 && v; }}", "the red square")
        sx, sy = video["redCentre"]
        shown_before = page.evaluate("() => window.sam2stream.shown.frame_idx")
        sent, reply = prompt_until_answered(page, watch, "add_points", click(page, (sx, sy)), timeout=180)
        assert reply["type"] == "reply", reply
        assert reply["obj_id"] == 1
        assert shown_before <= sent["frame_idx"] == reply["frame_idx"]  # the frame on screen, not "newest"
        wait_for_object_1_near(page, (sx, sy), 40)
        # tracked: later frames carry object 1 with a mask
        later = wait_for(
            page,
            "(f) => { const s = window.sam2stream; return s.shown && s.shown.frame_idx > f + 1"
            " && s.shown.objects.some(o => o.obj_id === 1) && s.shown.frame_idx; }",
            "object 1 on later frames",
            timeout=120,
            arg=reply["frame_idx"],
        )
        assert later > reply["frame_idx"] + 1
        screenshot(page, "browser_edgetam_1024")
        assert not watch.errors, watch.errors
