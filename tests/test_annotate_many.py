"""Many videos in one ``annotate``: a manifest or a folder of videos, one after another
in-process (no Ray); each video's files byte for byte the one-video command's, a failing
video alone in the summary, clear errors for a bad manifest."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.frames import moving_shapes, write_jpeg_folder
from tests.videogen import make_clip
from tracker.annotate_many import ManifestError, VideoJob, find_videos, load_manifest
from tracker.cli import main

H, W = 96, 128


def model_args(checkpoint: Path) -> list[str]:
    return ["--model", "sam2.1-tiny", "--checkpoint", str(checkpoint), "--device", "cpu", "--image-size", "256"]


def write_prompts(path: Path, frame: int) -> None:
    path.write_text(json.dumps({"prompts": [{"obj_id": 1, "frame": frame, "points": [[40, 50]]},
                                            {"obj_id": 2, "frame": frame, "box": [70, 20, 120, 80]}]}))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """``v.mp4`` + ``v.json``, ``frames/`` + ``frames.json``, ``short.mp4`` with a prompt past its end,
    ``lonely.mp4`` without prompts, and files that are no video."""
    folder = tmp_path_factory.mktemp("many")
    make_clip(folder / "v.mp4", n_frames=6, size_hw=(H, W))
    write_prompts(folder / "v.json", 2)
    write_jpeg_folder(moving_shapes(5, H, W, seed=2), folder / "frames")
    write_prompts(folder / "frames.json", 0)
    make_clip(folder / "short.mp4", n_frames=3, size_hw=(H, W))
    write_prompts(folder / "short.json", 7)
    make_clip(folder / "lonely.mp4", n_frames=3, size_hw=(H, W))
    (folder / "notes.txt").write_text("not a video")
    (folder / "empty").mkdir()
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; the run summary by its frame count (it also holds the run's seconds)."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            rel = str(f.relative_to(folder))
            out[rel] = str(json.loads(f.read_text())["frames"]).encode() if rel.endswith(".run.json") else f.read_bytes()
    return out


def test_folder_of_videos_finds_each_video_with_its_prompts(videos, tmp_path):
    jobs = find_videos(videos, tmp_path / "out")
    assert jobs == [
        VideoJob(str(videos / "frames"), str(videos / "frames.json"), "frames", str(tmp_path / "out" / "frames")),
        VideoJob(str(videos / "lonely.mp4"), str(videos / "lonely.json"), "lonely", str(tmp_path / "out" / "lonely")),
        VideoJob(str(videos / "short.mp4"), str(videos / "short.json"), "short", str(tmp_path / "out" / "short")),
        VideoJob(str(videos / "v.mp4"), str(videos / "v.json"), "v", str(tmp_path / "out" / "v")),
    ]
    with pytest.raises(ManifestError) as err:
        find_videos(videos / "empty", tmp_path)
    assert str(err.value).startswith(f"{videos / 'empty'} holds no videos: expected video files (.mp4, ")


def test_folder_one_after_another_equals_one_video_runs_and_failures_are_summarised(
    videos, random_checkpoint, tmp_path, caplog
):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = main(["annotate", str(videos), "--out", str(out), "--format", "coco", "--format", "davis", "--quiet",
                     *model_args(random_checkpoint)])
    assert code == 1  # some videos failed; the others are written
    summary = [r.getMessage() for r in caplog.records if r.name == "tracker.annotate_many" and r.levelno == logging.WARNING]
    assert summary[0].startswith("annotated 4/4 videos: 2 written, 2 failed; 11 frames, ")
    assert summary[1:] == [
        f"  lonely: prompts file {videos / 'lonely.json'} not found",
        f"  short: prompt on frame 7 but {videos / 'short.mp4'} has only 3 frames",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["frames", "v"]  # a refused video writes nothing
    for name, video in (("v", videos / "v.mp4"), ("frames", videos / "frames")):
        one = tmp_path / "one" / name
        assert main(["annotate", str(video), "--prompts", str(videos / f"{name}.json"), "--out", str(one),
                     "--format", "coco", "--format", "davis", "--quiet", *model_args(random_checkpoint)]) == 0
        assert tree(out / name) == tree(one), name
        assert len(tree(one)) == 2 + len(list(video.glob("*.jpg")) if video.is_dir() else range(6))

    # --resume: written videos are skipped, not annotated again
    caplog.clear()
    with caplog.at_level(logging.INFO):
        main(["annotate", str(videos), "--out", str(out), "--resume", "--quiet", *model_args(random_checkpoint)])
    lines = [r.getMessage() for r in caplog.records if r.name == "tracker.annotate_many"]
    assert any(m.startswith("v: already written") for m in lines)
    assert any(m.startswith("frames: already written") for m in lines)


def test_manifest_relative_paths_and_names(videos, tmp_path):
    manifest = tmp_path / "job.jsonl"
    manifest.write_text(
        json.dumps({"video": str(videos / "v.mp4"), "prompts": str(videos / "v.json"), "name": "cam1"}) + "\n"
        + "# a comment, then a blank line\n\n"
        + json.dumps({"video": "clips/x.mp4", "prompts": "x.json"}) + "\n"
        + json.dumps({"video": "images:frames", "prompts": "f.json"}) + "\n"
    )
    jobs = load_manifest(manifest, "/o")
    assert jobs == [
        VideoJob(str(videos / "v.mp4"), str(videos / "v.json"), "cam1", "/o/cam1"),
        VideoJob(str(tmp_path / "clips/x.mp4"), str(tmp_path / "x.json"), "x", "/o/x"),
        VideoJob(f"images:{tmp_path / 'frames'}", str(tmp_path / "f.json"), "frames", "/o/frames"),
    ]
    as_list = tmp_path / "job.json"
    as_list.write_text(json.dumps({"videos": [{"video": "/v/a.mp4", "prompts": "/v/a.json"}]}))
    assert load_manifest(as_list, "/o") == [VideoJob("/v/a.mp4", "/v/a.json", "a", "/o/a")]


@pytest.mark.parametrize(("text", "expected"), [
    ('{"video": "a.mp4", "prompts": "a.json", "fps": 3}', "line 1: unknown field(s) fps (allowed: name, prompts, video)"),
    ('{"video": "a.mp4"}', "line 1: prompts must be a path, got None"),
    ('{"video": 3, "prompts": "a.json"}', "line 1: video must be a path, got 3"),
    ('{"video": "a.mp4", "prompts": "a.json", "name": "../x"}',
     "line 1: name must be a file name (no '/', not starting with '.'), got '../x'"),
    ('{"video": "a.mp4", "prompts": "a.json"}\n{"video": "b/a.mp4", "prompts": "b.json"}', None),
    ('{"video": "a.mp4", "prompts": "a.json"}\n{"video": "b.mp4", "prompts": ', "line 2: not valid JSON: "),
    ("[3]", "entry 0: expected an object with video and prompts, got int"),
    ("[]", None),
])
def test_bad_manifest_names_the_entry_and_field(text, expected, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(text)
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest, tmp_path / "out")
    if text == "[]":
        assert str(err.value) == f"manifest {manifest} lists no videos"
    elif expected is None:  # two videos writing one name
        assert str(err.value) == (
            f"manifest {manifest}: videos {tmp_path / 'a.mp4'} and {tmp_path / 'b/a.mp4'} both write 'a': give them distinct names"
        )
    else:
        assert str(err.value).startswith(f"manifest {manifest}, {expected}")


def test_command_line_refusals(tmp_path, caplog):
    assert main(["annotate", "--manifest", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert caplog.messages[-1] == f"manifest {tmp_path / 'none.jsonl'} not found"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"video": "a.mp4", "prompts": "a.json"}\n')
    assert main(["annotate", "--manifest", str(manifest), "--out", "o", "--video-name", "x"]) == 2
    assert caplog.messages[-1] == 'annotate: --video-name names one video; name each video of a manifest with "name"'
    with pytest.raises(SystemExit) as exit_:
        main(["annotate", "--out", "o"])
    assert str(exit_.value) == "annotate: give a video and --prompts, a folder of videos, or --manifest FILE"


def test_ray_flag_without_ray_says_how_to_install(monkeypatch, tmp_path, caplog):
    import builtins

    from server.cli import main as server_main

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"video": "a.mp4", "prompts": "a.json"}\n')
    assert server_main(["annotate", "--manifest", str(manifest), "--out", str(tmp_path / "o"), "--ray", "auto"]) == 2
    assert caplog.messages[-1] == "--ray needs Ray, an optional extra: pip install -e .[ray]"
