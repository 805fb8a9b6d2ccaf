"""The command line as a user runs it: track, annotate (exports equal to Meta's
predictor; killed and resumed), segment, and clear errors before long work."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tests.frames import moving_shapes, shape_centres, write_jpeg_folder
from tests.videogen import make_clip
from tracker.cli import main
from tracker.export import read_coco, read_davis, read_mot
from tracker.masks import decode_rle, encode_png

ROOT = Path(__file__).resolve().parents[1]
N, H, W = 24, 120, 160


def model_args(ckpt: Path) -> list[str]:
    return ["--model", "sam2.1-tiny", "--checkpoint", str(ckpt), "--image-size", "256", "--device", "cpu"]


@pytest.fixture(scope="module")
def clip_mp4(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "clip.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for f in moving_shapes(N, H, W):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def jpeg_clip(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli_jpeg") / "clip"
    write_jpeg_folder(moving_shapes(N, H, W, seed=5), folder)
    return folder


def prompts_file(tmp_path: Path, k: int = 6) -> Path:
    (x0, y0), (x1, y1) = shape_centres(k, H, W)[0], shape_centres(k, H, W)[1]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"prompts": [
        {"obj_id": 1, "frame": k, "points": [[x0, y0]], "labels": [1]},
        {"obj_id": 2, "frame": k, "box": [x1 - 14, y1 - 14, x1 + 14, y1 + 14]},
    ]}))
    return path


def test_track_writes_one_json_line_per_frame(clip_mp4, random_checkpoint, tmp_path):
    out = tmp_path / "t.jsonl"
    cx, cy = shape_centres(0, H, W)[0]
    assert main(["track", str(clip_mp4), "--point", f"1:{cx},{cy}", "--box", "2:90,60,140,110", "--out", str(out),
                 *model_args(random_checkpoint)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [rec["frame_idx"] for rec in lines] == list(range(N))
    assert [rec["source_index"] for rec in lines] == list(range(N))
    assert lines[3]["pts_s"] == pytest.approx(0.3)
    for rec in lines:
        assert set(rec["objects"]) == {"1", "2"} and rec["size_hw"] == [H, W]
        for obj in rec["objects"].values():
            assert decode_rle(obj["mask_rle"]).sum() == obj["area"]


def test_annotate_command_equals_meta_predictor(model, jpeg_clip, random_checkpoint, tmp_path):
    k = 6
    prompts = prompts_file(tmp_path, k)
    out = tmp_path / "out"
    args = ["annotate", str(jpeg_clip), "--prompts", str(prompts), "--out", str(out), "--quiet",
            "--format", "coco", "--format", "davis", "--format", "mot", *model_args(random_checkpoint)]
    assert main(args) == 0
    spec = json.loads(prompts.read_text())["prompts"]
    state = model.init_state(str(jpeg_clip))
    model.add_new_points_or_box(state, k, 1, points=spec[0]["points"], labels=[1])
    model.add_new_points_or_box(state, k, 2, box=spec[1]["box"])
    theirs = {}
    for reverse in (False, True):
        for f, ids, masks in model.propagate_in_video(state, reverse=reverse):
            theirs[f] = {oid: masks[i, 0].numpy() > 0 for i, oid in enumerate(ids)}
    coco = read_coco(out / "annotations.json")
    davis = read_davis(out / "clip")
    assert sorted(coco) == sorted(davis) == list(range(N))
    compared = 0
    for f in range(N):
        for oid in (1, 2):
            expected = theirs[f][oid]
            np.testing.assert_array_equal(coco[f].get(oid, np.zeros((H, W), bool)), expected)
            compared += int(expected.any())
    assert compared > N  # masks are not all empty
    # DAVIS: one label map per frame (the higher id wins overlaps)
    for f in range(N):
        label = np.zeros((H, W), np.uint8)
        for oid in (1, 2):
            label[theirs[f][oid]] = oid
        for oid in (1, 2):
            np.testing.assert_array_equal(davis[f].get(oid, np.zeros((H, W), bool)), label == oid)
    mot = read_mot(out / "clip.txt")
    assert set(mot) <= set(range(N)) and all(set(v) <= {1, 2} for v in mot.values())


def test_annotate_in_bf16_equals_meta_under_the_same_autocast(model, jpeg_clip, random_checkpoint, tmp_path):
    k = 6
    prompts = prompts_file(tmp_path, k)
    out = tmp_path / "out"
    args = ["annotate", str(jpeg_clip), "--prompts", str(prompts), "--out", str(out), "--quiet",
            "--format", "coco", "--precision", "bf16", *model_args(random_checkpoint)]
    assert main(args) == 0
    spec = json.loads(prompts.read_text())["prompts"]
    theirs = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.init_state(str(jpeg_clip))
        model.add_new_points_or_box(state, k, 1, points=spec[0]["points"], labels=[1])
        model.add_new_points_or_box(state, k, 2, box=spec[1]["box"])
        for reverse in (False, True):
            for f, ids, masks in model.propagate_in_video(state, reverse=reverse):
                theirs[f] = {oid: masks[i, 0].float().numpy() > 0 for i, oid in enumerate(ids)}
    coco = read_coco(out / "annotations.json")
    assert sorted(coco) == list(range(N))
    # annotate batches the two objects: in bf16 that rounds differently from
    # Meta's one-at-a-time loop (in fp32 within 1e-4), so edge pixels may flip
    worst = 0.0
    for f in range(N):
        for oid in (1, 2):
            mine, expected = coco[f].get(oid, np.zeros((H, W), bool)), theirs[f][oid]
            worst = max(worst, float((mine != expected).mean()))
    assert worst < 0.01, f"{worst:.2%} of the pixels differ"


def test_unknown_or_unusable_precision_is_refused(jpeg_clip, random_checkpoint, tmp_path, capsys, caplog):
    prompts = prompts_file(tmp_path, 0)
    with pytest.raises(SystemExit):
        main(["annotate", str(jpeg_clip), "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--precision", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    code = main(["annotate", str(jpeg_clip), "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--quiet",
                 "--precision", "fp16", *model_args(random_checkpoint)])
    assert code != 0
    assert "precision fp16 is for GPUs; on the CPU use bf16 (or fp32)" in caplog.text + capsys.readouterr().err


def test_annotate_killed_then_resumed_equals_uninterrupted(jpeg_clip, random_checkpoint, tmp_path):
    prompts = prompts_file(tmp_path, 4)

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "tracker.cli", "annotate", str(jpeg_clip), "--prompts", str(prompts), "--out",
                str(out), "--quiet", "--format", "coco", "--format", "davis", "--save-state-every", "3",
                *model_args(random_checkpoint), *extra]

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full = tmp_path / "full"
    subprocess.run(command(full), check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)

    part = tmp_path / "part"
    proc = subprocess.Popen(command(part), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list((part / "clip").glob("*.png"))) >= 9:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (part / "annotations.json").exists()
    done = len(list((part / "clip").glob("*.png")))
    assert 9 <= done < N

    subprocess.run(command(part, "--resume"), check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    a, b = read_coco(full / "annotations.json"), read_coco(part / "annotations.json")
    assert sorted(a) == sorted(b) == list(range(N))
    for f in a:
        assert sorted(a[f]) == sorted(b[f])
        for oid in a[f]:
            np.testing.assert_array_equal(a[f][oid], b[f][oid])
    for f in range(N):
        assert (full / "clip" / f"{f:05d}.png").read_bytes() == (part / "clip" / f"{f:05d}.png").read_bytes()


def test_segment_prints_scores_and_writes_pngs(jpeg_clip, random_checkpoint, tmp_path, capsys):
    out = tmp_path / "masks"
    images = sorted(jpeg_clip.glob("*.jpg"))[:3]
    assert main(["segment", *map(str, images), "--point", "1:40,40", "--box", "2:80,50,140,110", "--multimask",
                 "--out", str(out), *model_args(random_checkpoint)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 6 and all(len(r["masks"]) == 3 for r in records)
    for r in records:
        scores = [m["score"] for m in r["masks"]]
        assert scores == sorted(scores, reverse=True)
        assert all(Path(m["png"]).is_file() for m in r["masks"])


@pytest.fixture(scope="module")
def probed_clips(tmp_path_factory) -> dict[str, Path]:
    """Files whose probe matters: no frame count in the header (Matroska); a display
    matrix turning 160x120 (W x H) as stored into 120x160 upright; a truncated MP4
    whose header still says 24 frames."""
    folder = tmp_path_factory.mktemp("cli_probe")
    truncated = make_clip(folder / "truncated.mp4", n_frames=N, size_hw=(H, W), container_options={"movflags": "faststart"})
    data = truncated.path.read_bytes()
    truncated.path.write_bytes(data[: len(data) // 2])
    return {
        "mkv": make_clip(folder / "clip.mkv", n_frames=12, size_hw=(H, W), container_format="matroska").path,
        "rotated": make_clip(folder / "rotated.mp4", n_frames=12, size_hw=(H, W), rotation=90).path,
        "truncated": truncated.path,
    }


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if a model is built: what the command refuses, it refuses before."""
    import tracker.model

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(tracker.model, "build_model", refuse)


@pytest.mark.parametrize("video,frame,point,expected", [
    ("missing", 0, [5, 5], "source not found: {video} (no such file)"),
    ("folder", 99, [5, 5], "prompt on frame 99 but {video} has only 24 frames"),
    ("mp4", 24, [5, 5], "prompt on frame 24 but {video} has only 24 frames"),  # the container's count
    ("mkv", 12, [5, 5], "prompt on frame 12 but {video} has only 12 frames"),  # its packets, counted
    ("folder", 0, [500, 5], "prompt for object 1 on frame 0: point (500, 5) is outside the 160x120 frame"),
    ("rotated", 0, [140, 5], "prompt for object 1 on frame 0: point (140, 5) is outside the 120x160 frame"),
    ("mp4", 3, "mask", "mask {mask} is 10x10 but the video is 160x120"),
])
def test_annotate_refuses_bad_input_before_the_model_loads_and_leaves_nothing(
    video, frame, point, expected, jpeg_clip, clip_mp4, probed_clips, tmp_path, caplog, no_model
):
    path = {"missing": tmp_path / "nope.mp4", "folder": jpeg_clip, "mp4": clip_mp4}.get(video) or probed_clips[video]
    mask = tmp_path / "m.png"
    mask.write_bytes(encode_png(np.ones((10, 10), bool)))
    entry = {"obj_id": 1, "frame": frame, **({"mask": "m.png"} if point == "mask" else {"points": [point]})}
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([entry]))
    out = tmp_path / "out"
    assert main(["annotate", str(path), "--prompts", str(prompts), "--out", str(out), "--quiet", "--model", "sam2.1-tiny"]) == 2
    assert caplog.messages[-1] == expected.format(video=path, mask=mask)
    assert not out.exists()


def test_annotate_past_the_decoded_end_of_a_truncated_file_leaves_nothing(probed_clips, random_checkpoint, tmp_path, caplog):
    """The header says 24 frames, 11 decode: the prompt pass finds out, before any output is opened."""
    from tracker.ingest import open_source

    video = probed_clips["truncated"]
    with av.open(str(video)) as c:
        assert c.streams.video[0].frames == N
    with open_source(str(video), mode="file") as source:
        decoded = sum(1 for _ in source)
    assert 0 < decoded < 20
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"obj_id": 1, "frame": 20, "points": [[5, 5]]}]))
    out = tmp_path / "out"
    assert main(["annotate", str(video), "--prompts", str(prompts), "--out", str(out), "--quiet",
                 *model_args(random_checkpoint)]) == 2
    assert caplog.messages[-1] == f"prompt on frame 20 but {video} has only {decoded} frames"
    assert not out.exists()


@pytest.mark.parametrize("source,prompt,expected", [
    ("missing", ["--point", "5,5"], "source not found: {video} (no such file)"),
    ("rotated", ["--point", "140,5"], "prompt for object 1 on frame 0: point (140, 5) is outside the 120x160 frame"),
    ("mkv", ["--box", "2:10,10,170,50"], "prompt for object 2 on frame 0: box (10, 10, 170, 50) is outside the 160x120 frame"),
])
def test_track_refuses_bad_input_before_the_model_loads(source, prompt, expected, probed_clips, tmp_path, caplog, no_model):
    path = tmp_path / "nope.mp4" if source == "missing" else probed_clips[source]
    out = tmp_path / "t.jsonl"
    assert main(["track", str(path), *prompt, "--out", str(out), "--quiet", "--model", "sam2.1-tiny"]) == 2
    assert caplog.messages[-1] == expected.format(video=path)
    assert not out.exists()


def test_segment_refuses_a_point_outside_an_image_before_the_model_loads(jpeg_clip, tmp_path, caplog, no_model):
    images = sorted(jpeg_clip.glob("*.jpg"))[:2]
    assert main(["segment", *map(str, images), "--point", "1:150,110", "--point", "2:500,5", "--model", "sam2.1-tiny"]) == 2
    assert caplog.messages[-1] == f"prompt for object 2 on {images[0]}: point (500, 5) is outside the 160x120 frame"


def test_unknown_format_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["annotate", "v.mp4", "--prompts", "p.json", "--out", "o", "--format", "png"])
    assert "invalid choice: 'png'" in capsys.readouterr().err


def test_first_run_without_network_names_the_url_the_cache_checkpoint_and_random_weights(tmp_path, monkeypatch, caplog):
    """No network (here: nothing listens where the checkpoint would come from)."""
    from PIL import Image

    from tests.videogen import free_port

    port = free_port()
    monkeypatch.setenv("SAM2_STREAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SAM2_STREAM_CHECKPOINT_URL", f"http://127.0.0.1:{port}")
    image = tmp_path / "a.png"
    Image.fromarray(moving_shapes(1, H, W)[0]).save(image)
    assert main(["segment", str(image), "--point", "10,10", "--device", "cpu", "--image-size", "256"]) == 2
    url = f"http://127.0.0.1:{port}/092824/sam2.1_hiera_tiny.pt"
    assert caplog.messages[-1] == (
        f"cannot download {url}: connection refused; download {url} and save it as "
        f"{tmp_path / 'cache' / 'sam2.1_hiera_tiny.pt'}, or pass --checkpoint PATH, or add --random-weights 0 "
        "to try the pipeline without a checkpoint (random weights: meaningless masks)"
    )
    assert not (tmp_path / "cache" / "sam2.1_hiera_tiny.pt").exists()


#: the start of a log line as ``main`` formats it
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \S+: ")


def as_shown(stderr: str) -> list[str]:
    """stderr as a terminal leaves it: of each line, what follows its last carriage return."""
    return [line.rsplit("\r", 1)[-1] for line in stderr.split("\n")]


def assert_log_lines_on_their_own(stderr: str) -> None:
    """Every log line starts a line of its own: none is glued to a progress bar."""
    logged = [line for line in as_shown(stderr) if LOG_LINE.search(line)]
    assert logged, stderr
    for line in logged:
        assert LOG_LINE.match(line), f"a log line glued to the progress bar: {line!r}"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tracker.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_track_on_a_file_shows_a_progress_bar_that_log_lines_do_not_break(clip_mp4, random_checkpoint, tmp_path):
    out = tmp_path / "t.jsonl"
    done = run_cli("track", str(clip_mp4), "--point", "1:40,40", "--out", str(out), *model_args(random_checkpoint))
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == N
    bars = [seg for seg in done.stderr.replace("\n", "\r").split("\r") if seg.startswith("track clip.mp4:")]
    assert bars and f"100%" in bars[-1] and f" {N}/{N} " in bars[-1], bars[-3:]
    assert_log_lines_on_their_own(done.stderr)
    assert any("opened" in line for line in as_shown(done.stderr))  # logged while the bar was up


def test_annotate_shows_the_bar_to_the_counted_end_and_leaves_no_work_folder(probed_clips, random_checkpoint, tmp_path):
    """A Matroska file keeps no frame count: the bar's total comes from its packets."""
    video = probed_clips["mkv"]
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"obj_id": 1, "frame": 4, "points": [[40, 40]]}]))
    out = tmp_path / "out"
    done = run_cli("annotate", str(video), "--prompts", str(prompts), "--out", str(out), *model_args(random_checkpoint))
    assert done.returncode == 0, done.stderr
    bars = [seg for seg in done.stderr.replace("\n", "\r").split("\r") if seg.startswith("annotate clip:")]
    assert bars and "100%" in bars[-1] and " 12/12 " in bars[-1], bars[-3:]
    assert_log_lines_on_their_own(done.stderr)
    # no .annotate-work/, no partial journal; the run summary for `eval` beside the annotations
    assert sorted(p.name for p in out.iterdir()) == ["annotations.json", "clip.run.json"]
