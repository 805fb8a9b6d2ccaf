"""The cluster's bookkeeping without a cluster: placement, the directory's reservations and
recovery claims, the result records hosts send fronts, and ``serve --ray``'s flags.

(The same code on a real multi-node cluster: tests/test_ray_serve.py, tests/test_ray_hosts.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from server.ray_hosts import SessionDirectory, Snapshot, pick_host, record_result, result_record
from tracker.results import FrameResult, ObjectResult


def cap(sessions: int, objects: int, *, max_sessions: int = 4, max_objects: int | None = None,
        free_memory: int | None = None) -> dict:
    return {"sessions": sessions, "max_sessions": max_sessions, "objects": objects, "max_objects": max_objects,
            "free_device_memory": free_memory}


def test_a_new_session_goes_to_the_host_with_the_most_free_capacity():
    assert pick_host({"a": cap(2, 0), "b": cap(1, 9)}) == "b"  # free session slots first
    assert pick_host({"a": cap(1, 5), "b": cap(1, 2)}) == "b"  # then fewest objects (no object limit)
    assert pick_host({"a": cap(1, 5, max_objects=20), "b": cap(1, 2, max_objects=4)}) == "a"  # then free object slots
    assert pick_host({"a": cap(1, 2, free_memory=2 << 30), "b": cap(1, 2, free_memory=9 << 30)}) == "b"  # then memory


def test_hosts_at_a_limit_take_nothing_and_a_full_cluster_has_no_host():
    assert pick_host({"a": cap(4, 0), "b": cap(0, 4, max_objects=4)}) is None
    assert pick_host({"a": cap(4, 0), "b": cap(3, 1, max_objects=4)}) == "b"
    assert pick_host({}) is None


def test_two_fronts_opening_one_name_get_one_session():
    d = SessionDirectory()
    assert d.reserve("cam1") == "ok"
    assert d.reserve("cam1") == "opening"  # the other front waits
    d.placed("cam1", "host0")
    assert d.reserve("cam1") == "placed"  # … then joins it
    d.forget("cam1")
    assert d.reserve("cam1") == "ok"
    d.release("cam1")  # an open that failed frees the name
    assert d.reserve("cam1") == "ok"


def test_one_front_re_creates_a_lost_session_and_the_others_follow():
    d = SessionDirectory()
    d.placed("cam1", "host0")
    assert d.claim_recovery("cam1", "host0") == "go"
    assert d.claim_recovery("cam1", "host0") == "wait"
    d.recovered("cam1", "host1")
    assert d.claim_recovery("cam1", "host0") == "done" and d.host_of("cam1") == "host1"
    d.placed("cam2", "host1")
    assert d.claim_recovery("cam2", "host1") == "go"
    d.recovered("cam2", None)  # nowhere to go: the session is gone
    assert d.host_of("cam2") is None and d.claim_recovery("cam2", "host1") == "done"


def test_a_stale_copy_closing_or_saving_never_touches_the_live_session():
    d = SessionDirectory()
    d.placed("cam1", "host1")  # it moved from host0, which was only unreachable
    live = Snapshot("cam1", "push:cam1", None, {}, b"live", 10, [1], "host1", 5.0, "s1")
    d.save(live)
    d.save(Snapshot("cam1", "push:cam1", None, {}, b"stale", 99, [1], "host0", 9.0, "s1"))
    d.forget("cam1", "host0")
    assert d.host_of("cam1") == "host1" and d.snapshot("cam1") is live
    d.forget("cam1", "host1")
    assert d.host_of("cam1") is None and d.snapshot("cam1") is None


def test_the_directory_keeps_the_newest_snapshot():
    d = SessionDirectory()
    new = Snapshot("cam1", "push:cam1", None, {}, b"new", 60, [1], "host0", 20.0, "s1")
    d.save(new)
    d.save(Snapshot("cam1", "push:cam1", None, {}, b"old", 30, [1], "host0", 10.0, "s1"))  # arrived late
    assert d.snapshot("cam1") is new


def test_a_result_record_is_the_result_it_was_made_from():
    rng = np.random.default_rng(0)
    mask = rng.random((24, 32)) > 0.5
    result = FrameResult(7, 24, 32, pts_s=0.25, arrival_s=1.5, processed_s=1.75, source_index=9,
                         objects={3: ObjectResult(3, mask, 1.2345678, box_xyxy=(0, 0, 31, 23), is_prompted=True),
                                  5: ObjectResult(5, np.zeros((24, 32), bool), -4.5)})
    record = result_record(result, (0.01, 0.02, 0.03))
    assert record["timing"] == (0.01, 0.02, 0.03)
    back = record_result(record)
    assert (back.frame_idx, back.height, back.width, back.pts_s, back.source_index) == (7, 24, 32, 0.25, 9)
    assert sorted(back.objects) == [3, 5]
    assert np.array_equal(back.objects[3].mask_hw, mask) and back.objects[3].score == 1.2345678  # exact
    assert back.objects[3].box_xyxy == (0, 0, 31, 23) and back.objects[3].is_prompted
    assert not back.objects[5].mask_hw.any() and back.objects[5].box_xyxy is None


def test_serve_ray_flags_fill_the_cluster_table(tmp_path):
    from server.cli import build_parser, config_from_args
    from server.config import ConfigError, load_config

    args = build_parser().parse_args(["serve", "--ray", "10.0.0.2:6379", "--ray-hosts", "3", "--ray-host-gpus", "0.5"])
    cluster = config_from_args(args).cluster
    assert (cluster.address, cluster.hosts, cluster.host_gpus, cluster.namespace) == ("10.0.0.2:6379", 3, 0.5, "sam2-stream")
    assert config_from_args(build_parser().parse_args(["serve"])).cluster.address is None  # embedded by default
    path = tmp_path / "server.toml"
    path.write_text('[cluster]\naddress = "auto"\nmax_sessions_per_host = 2\nhost_resources = { sim_gpu = 1 }\n')
    cfg = load_config(path)
    assert (cfg.cluster.address, cfg.cluster.max_sessions_per_host, cfg.cluster.host_resources) == ("auto", 2, {"sim_gpu": 1})
    path.write_text('[cluster]\nhosts = 0\n')
    with pytest.raises(ConfigError, match="cluster.hosts"):
        load_config(path)
