"""Annotating many videos on a real local multi-node Ray cluster: every video's files
byte for byte the single-machine command's, failing videos (bad prompts; every worker lost) alone in the
summary, and a worker killed mid-video resumed on another with identical files.

The cluster (``ray.cluster_utils.Cluster``: 2 nodes, 1 CPU each, a custom
``sim_gpu`` resource standing in for a GPU, memory and object store set, token
auth) runs inside a loopback-only network namespace (``tests/ray_netns.py``).
On the CPU, float results depend on torch's thread count: the workers get one
CPU each, so the single-machine reference runs on one thread too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.ray_netns import in_namespace, run_module_in_namespace

if not in_namespace():

    def test_in_loopback_namespace() -> None:
        """Re-executes this module under ``unshare -n`` (see tests/ray_netns.py)."""
        run_module_in_namespace(__file__, timeout_s=400)

else:
    import torch

    from tests.frames import moving_shapes, write_jpeg_folder
    from tests.videogen import make_clip

    MIB = 2**20
    NODE = dict(num_cpus=1, resources={"sim_gpu": 1}, memory=1024 * MIB, object_store_memory=96 * MIB)
    H, W = 96, 128
    #: name -> (frames, first prompted frame); "long" is the one whose worker is killed
    VIDEOS = {"a": (6, 2), "b": (8, 0), "c": (7, 3), "long": (12, 3)}

    @pytest.fixture(scope="module")
    def cluster():
        import ray
        from ray.cluster_utils import Cluster

        c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        c.add_node(**NODE)
        ray.init(address=c.address, logging_level="WARNING")
        c.wait_for_nodes()
        assert ray.cluster_resources()["sim_gpu"] == 2
        yield c
        ray.shutdown()
        c.shutdown()

    @pytest.fixture(scope="module")
    def videos(tmp_path_factory) -> Path:
        """A folder of videos, each with NAME.json beside it: three MP4s and a folder of frames."""
        folder = tmp_path_factory.mktemp("ray_videos")
        for name, (n, k) in VIDEOS.items():
            if name == "c":
                write_jpeg_folder(moving_shapes(n, H, W, seed=5), folder / name)
            else:
                make_clip(folder / f"{name}.mp4", n_frames=n, size_hw=(H, W))
            prompts = [{"obj_id": 1, "frame": k, "points": [[40, 50]]}, {"obj_id": 2, "frame": k, "box": [70, 20, 120, 80]}]
            (folder / f"{name}.json").write_text(json.dumps({"prompts": prompts}))
        return folder

    @pytest.fixture(scope="module")
    def reference(videos, model, random_checkpoint, tmp_path_factory) -> Path:
        """Each video as the single-machine command writes it (its ``annotate_video``, the model of
        the same checkpoint loaded once), on one thread as the workers run."""
        from tracker.annotate_many import VideoJob
        from tracker.cli import annotate_video

        out = tmp_path_factory.mktemp("ray_reference")
        _, options = spec_and_options(random_checkpoint)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for name in VIDEOS:
                video = videos / name if name == "c" else videos / f"{name}.mp4"
                job = VideoJob(str(video), str(videos / f"{name}.json"), name, str(out / name))
                annotate_video(job, options, lambda: model, quiet=True)
        finally:
            torch.set_num_threads(threads)
        return out

    def spec_and_options(checkpoint: Path, save_every: int = 50):
        from tracker.annotate_many import AnnotateOptions, ModelSpec

        spec = ModelSpec(model="sam2.1-tiny", checkpoint=str(checkpoint), device="cpu", image_size=256)
        return spec, AnnotateOptions(formats=("coco", "davis"), save_state_every=save_every, model_name="sam2.1-tiny")

    def shape():
        from server.ray_cluster import WorkerShape

        return WorkerShape(num_cpus=1, resources=(("sim_gpu", 1.0),))

    def files(folder: Path, resumed: bool = False) -> dict[str, bytes]:
        """Every output file's bytes; the run summary (the run's seconds) by its frame count only, and
        not at all for a resumed run (it counts the frames of the run's own part, as a resumed command's does)."""
        out = {}
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                rel = str(f.relative_to(folder))
                if rel.endswith(".run.json"):
                    if not resumed:
                        out[rel] = str(json.loads(f.read_text())["frames"]).encode()
                else:
                    out[rel] = f.read_bytes()
        return out

    def test_videos_on_the_cluster_equal_single_machine_runs(cluster, videos, reference, random_checkpoint, tmp_path):
        import ray

        from server.ray_annotate import run_on_ray
        from tracker.annotate_many import JobProgress, VideoJob, find_videos

        jobs = [j for j in find_videos(videos, tmp_path) if j.name != "long"]
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"prompts": [{"obj_id": 1, "frame": 40, "points": [[5, 5]]}]}))
        jobs.insert(1, VideoJob(str(videos / "a.mp4"), str(bad), "bad", str(tmp_path / "bad")))
        # a video whose every worker dies (killed as it starts): it fails after max_attempts, alone
        jobs.insert(2, VideoJob(str(videos / "a.mp4"), str(videos / "a.json"), "doomed", str(tmp_path / "doomed")))
        spec, options = spec_and_options(random_checkpoint)
        progress = JobProgress(len(jobs))
        events = []

        def record_and_kill(event) -> None:
            events.append(event)
            if event.kind == "started" and event.name == "doomed":
                ray.kill(event.actor, no_restart=True)

        outcomes = run_on_ray(jobs, options, spec, shape=shape(), progress=progress, on_event=record_and_kill,
                              max_attempts=2, progress_every_s=0.3)
        by_name = {o.name: o for o in outcomes}
        assert sorted(by_name) == ["a", "b", "bad", "c", "doomed"]
        assert by_name["bad"].ok is False and by_name["bad"].attempts == 1
        assert by_name["bad"].error == f"prompt on frame 40 but {videos / 'a.mp4'} has only 6 frames"
        assert by_name["doomed"].ok is False and by_name["doomed"].attempts == 2
        assert by_name["doomed"].error == "its worker died 2 times (last: ActorDiedError)"
        assert [e.attempt for e in events if e.kind == "lost"] == [1, 2]
        for name in ("a", "b", "c"):
            assert by_name[name].ok and by_name[name].frames == VIDEOS[name][0]
            assert files(tmp_path / name) == files(reference / name), name
        assert (progress.done, progress.failed, progress.frames) == (3, 2, 6 + 8 + 7)
        assert progress.summary()[1:] == [f"  bad: {by_name['bad'].error}", f"  doomed: {by_name['doomed'].error}"]
        assert len({o.worker for o in outcomes if o.ok}) >= 2, "videos ran side by side on the two nodes"
        assert {e.kind for e in events} >= {"started", "finished"}

    def test_worker_killed_mid_video_resumes_elsewhere_with_identical_files(cluster, videos, reference, random_checkpoint, tmp_path):
        import ray

        from server.ray_annotate import run_on_ray
        from tracker.annotate import STATE_FILE
        from tracker.annotate_many import WORK_DIR, find_videos

        jobs = [j for j in find_videos(videos, tmp_path) if j.name in ("long", "a")]
        spec, options = spec_and_options(random_checkpoint, save_every=2)
        killed = []

        def kill_once(event) -> None:  # the "long" video's worker, once its first state is saved
            state = tmp_path / "long" / WORK_DIR / STATE_FILE
            if event.kind == "progress" and event.name == "long" and not killed and state.is_file():
                killed.append(event.frames)
                ray.kill(event.actor, no_restart=True)

        outcomes = run_on_ray(jobs, options, spec, shape=shape(), on_event=kill_once, progress_every_s=0.2)
        by_name = {o.name: o for o in outcomes}
        assert killed, "the long video ended before its worker could be killed"
        long = by_name["long"]
        assert long.ok and long.attempts == 2 and long.resumed_from is not None
        assert by_name["a"].ok and by_name["a"].attempts == 1
        assert files(tmp_path / "long", resumed=True) == files(reference / "long", resumed=True)
        assert len(files(reference / "long", resumed=True)) == 1 + VIDEOS["long"][0]  # the COCO file, a PNG per frame
        assert files(tmp_path / "a") == files(reference / "a")
        assert not (tmp_path / "long" / WORK_DIR).exists()
