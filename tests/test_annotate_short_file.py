"""Offline annotation of a video *file* shorter than SAM 2's object-pointer window.

Meta's ``SAM2VideoPredictor`` sizes the window of object pointers by
``min(num_frames, max_obj_ptrs_in_encoder)`` (16) and scales their temporal
encoding by it, so on a clip of fewer than 16 frames the frame count changes
every mask after the first prompt. ``annotate`` knows the count of an image
folder from its files; for a file it counts the decoded frames. With a
checkpoint whose temporal encoding of the pointers is strong (a random one with
``obj_ptr_tpos_proj`` scaled up: a balanced random one barely reacts), a wrong
count shows as hundreds of pixels; here the file's masks must equal Meta's on
the same decoded frames, for a container that states its frame count (MP4), one
that does not (Matroska) and one whose header says more than decodes (a
truncated MP4).
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TEST_IMAGE_SIZE, TEST_SEED
from tests.frames import moving_shapes, shape_centres
from tests.videogen import ENCODER_OPTIONS
from tracker.annotate import AnnotateStats, Prompt, annotate

N, H, W = 10, 120, 160
K = 3  # the prompted frame: forward to the end, backward to frame 0
TOL = 1e-4
#: how much stronger than random the pointers' temporal encoding is made
TPOS_SCALE = 50.0


@pytest.fixture(scope="module")
def tpos_model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """The test model's random weights with ``obj_ptr_tpos_proj`` x50, saved in Meta's format and loaded back."""
    from tracker.checkpoints import save_checkpoint
    from tracker.model import build_model, model_state_dict

    net = build_model("sam2.1-tiny", device="cpu", image_size=TEST_IMAGE_SIZE, random_weights_seed=TEST_SEED)
    with torch.no_grad():
        net.obj_ptr_tpos_proj.weight.mul_(TPOS_SCALE)
        net.obj_ptr_tpos_proj.bias.mul_(TPOS_SCALE)
    path = tmp_path_factory.mktemp("ckpt_tpos") / "sam2.1_hiera_tiny_tpos.pt"
    save_checkpoint(model_state_dict(net), path)
    return build_model("sam2.1-tiny", checkpoint=path, device="cpu", image_size=TEST_IMAGE_SIZE)


def encode(path: Path, frames: list[np.ndarray], fmt: str | None = None, options: dict[str, str] | None = None) -> Path:
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = dict(ENCODER_OPTIONS["libx264"])
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded_as_meta_folder(video: Path, folder: Path) -> int:
    """The file's frames as our ingest decodes them, in a folder Meta's ``init_state`` reads.

    Meta's loader takes ``NNNNN.jpg`` names only, and opens each with PIL, which
    reads a file by its content: lossless PNG data under ``.jpg`` names gives it
    exactly the decoded pixels.
    """
    from tracker.ingest import open_source

    folder.mkdir()
    n = 0
    with open_source(str(video), mode="file") as source:
        for frame in source:
            Image.fromarray(frame.image_rgb).save(folder / f"{frame.index:05d}.jpg", format="PNG")
            n += 1
    return n


def meta_logits(model: torch.nn.Module, folder: Path, prompts: list[Prompt]) -> dict:
    state = model.init_state(str(folder))
    for p in prompts:
        model.add_new_points_or_box(state, p.frame_idx, p.obj_id, points=p.points_xy, labels=p.labels)
    out: dict[int, dict[int, np.ndarray]] = {}
    for reverse in (False, True):
        for f, ids, logits in model.propagate_in_video(state, reverse=reverse):
            out[f] = {oid: logits[i, 0].numpy() for i, oid in enumerate(ids)}
    return out


def prompts_on(k: int) -> list[Prompt]:
    (x0, y0), (x1, y1) = shape_centres(k, H, W)[:2]
    return [Prompt(1, k, points_xy=[[x0, y0]], labels=[1]), Prompt(2, k, points_xy=[[x1, y1], [5.0, 5.0]], labels=[1, 0])]


@pytest.mark.parametrize("container", ["mp4", "mkv", "truncated"])
def test_short_file_equals_meta_on_its_decoded_frames(tpos_model, container, tmp_path):
    """``truncated``: an MP4 of 24 frames cut in half, whose header still says 24
    (a full window): the decoded count decides, as it does for Meta."""
    if container == "truncated":
        video = encode(tmp_path / "clip.mp4", moving_shapes(24, H, W, seed=7), options={"movflags": "faststart"})
        data = video.read_bytes()
        video.write_bytes(data[: len(data) // 2])
    else:
        video = encode(tmp_path / f"clip.{container}", moving_shapes(N, H, W, seed=7), "matroska" if container == "mkv" else None)
    with av.open(str(video)) as c:  # a count in the header, none, a wrong one
        assert c.streams.video[0].frames == {"mp4": N, "mkv": 0, "truncated": 24}[container]
    folder = tmp_path / "decoded"
    n = decoded_as_meta_folder(video, folder)
    assert n == N if container != "truncated" else K < n < 16
    prompts = prompts_on(K)
    theirs = meta_logits(tpos_model, folder, prompts)

    stats = AnnotateStats()
    results = {r.frame_idx: r for r in annotate(str(video), prompts, model=tpos_model, stats=stats)}
    assert sorted(results) == sorted(theirs) == list(range(n))
    worst, flipped = 0.0, 0
    for f in range(n):
        for oid in (1, 2):
            mine, expected = results[f].objects[oid].logits_hw, theirs[f][oid]
            worst = max(worst, float(np.abs(mine - expected).max()))
            flipped += int(((mine > 0) != (expected > 0)).sum())
    assert worst <= TOL and flipped == 0, f"logits differ by up to {worst:.3g}, {flipped} mask pixels"
    assert stats.video_frames == n
