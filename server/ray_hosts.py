"""Live sessions on Ray: session hosts (one actor per device) and the directory of sessions.

A :class:`SessionHost` actor owns what ``serve`` owns in one process: an
:class:`~tracker.session.InferenceWorker` on its device, the model it serves and
a :class:`~tracker.session.SessionManager`; sessions placed on it open their
source there (next to the GPU), or take frames relayed to them (``push:``
sources: :meth:`SessionHost.push`). What crosses the network is small and
explicit: prompts and controls (actor calls), per-frame results as compact
records (RLE masks, scores, boxes: :func:`tracker.cli.frame_record`) that a
front pulls in batches (:meth:`SessionHost.poll`, one stream per front, then
fanned out to that front's clients), and snapshots.

Faults: after each prompt and every ``snapshot_every`` frames the host
serialises the session's bounded tracking state (``predictor.state_dict()``,
no frame features) and hands it to the :class:`SessionDirectory` actor, which
also knows which host holds which session by name. When a host dies, the
session is re-created on another host from its last snapshot
(:func:`recover`): same name, same objects, the tracking state of its last
snapshot; its stream starts with a ``moved`` event. Ray's actor restarts are
not used for this: they re-run the constructor and keep no state.

Placement (:func:`place`): a new session goes to the live host with the most
free session slots, ties broken by fewer objects; a full cluster is a clear
:class:`~server.ray_cluster.ClusterError`.

Not done here (see docs/scaling.md): the WebSocket front of ``serve --ray``
that speaks this project's protocol to clients over these calls, and several
fronts behind a load balancer sharing the directory.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from server.ray_cluster import ClusterError, torch_threads_for_actor
from tracker.annotate_many import ModelSpec

logger = logging.getLogger(__name__)

#: results kept per session for fronts that poll (older ones are dropped: newest-frame policy)
STREAM_DEPTH = 64
#: frames between two snapshots of a session's tracking state
SNAPSHOT_EVERY = 30


def encode_state(state: dict[str, Any]) -> bytes:
    """A predictor's ``state_dict()`` as bytes (tensors on the CPU), for the object store."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def decode_state(data: bytes) -> dict[str, Any]:
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


@dataclass
class Snapshot:
    """A session's last saved tracking state and what is needed to open it again elsewhere."""

    name: str
    source: str
    model: str | None
    options: dict[str, Any]
    state: bytes
    frames: int
    obj_ids: list[int]
    host: str
    time_s: float


class SessionDirectory:
    """One actor for the cluster: session name → (host, last snapshot). Fronts and hosts share it."""

    def __init__(self) -> None:
        self._hosts: dict[str, str] = {}
        self._snapshots: dict[str, Snapshot] = {}

    def placed(self, name: str, host: str) -> None:
        self._hosts[name] = host

    def save(self, snapshot: Snapshot) -> None:
        old = self._snapshots.get(snapshot.name)
        if old is None or snapshot.time_s >= old.time_s:
            self._snapshots[snapshot.name] = snapshot

    def snapshot(self, name: str) -> Snapshot | None:
        return self._snapshots.get(name)

    def host_of(self, name: str) -> str | None:
        return self._hosts.get(name)

    def forget(self, name: str) -> None:
        self._hosts.pop(name, None)
        self._snapshots.pop(name, None)

    def sessions(self) -> dict[str, str]:
        return dict(self._hosts)


class _Stream:
    """A session's recent results and events as records, numbered; bounded."""

    def __init__(self, depth: int) -> None:
        self.records: deque[dict[str, Any]] = deque(maxlen=depth)
        self.seq = 0
        self.cond = threading.Condition()

    def push(self, record: dict[str, Any]) -> None:
        with self.cond:
            self.seq += 1
            self.records.append({**record, "seq": self.seq})
            self.cond.notify_all()

    def after(self, seq: int, wait_s: float) -> list[dict[str, Any]]:
        with self.cond:
            if self.seq <= seq and wait_s > 0:
                self.cond.wait(wait_s)
            return [r for r in self.records if r["seq"] > seq]


class SessionHost:
    """A Ray actor per device: its inference worker, the model it serves, the sessions placed on it.

    Threaded (``max_concurrency``): fronts poll streams while prompts run.
    """

    def __init__(
        self,
        spec: ModelSpec,
        name: str,
        directory: Any = None,
        *,
        max_sessions: int = 8,
        snapshot_every: int = SNAPSHOT_EVERY,
    ) -> None:
        import torch

        from tracker.session import InferenceWorker, SessionManager

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(torch_threads_for_actor())
        self.name = name
        self.directory = directory
        self.snapshot_every = max(1, int(snapshot_every))
        self.model = spec.build()
        self.worker = InferenceWorker(self.model, max_batch=1)
        self.manager = SessionManager(self.worker, max_sessions=max_sessions)
        self._streams: dict[str, _Stream] = {}
        self._sources: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------- lifecycle

    def where(self) -> str:
        import ray

        return f"{self.name} on {ray.util.get_node_ip_address()} pid {os.getpid()}"

    def capacity(self) -> dict[str, Any]:
        """Free session slots and objects tracked, for placement."""
        sessions = self.manager.list()
        return {
            "host": self.name,
            "sessions": len(sessions),
            "max_sessions": self.manager.max_sessions,
            "objects": sum(len(s.predictor.obj_ids) for s in sessions),
        }

    def open(
        self,
        source: str,
        *,
        name: str,
        model: str | None = None,
        options: dict[str, Any] | None = None,
        snapshot: Snapshot | None = None,
        moved_from: str | None = None,
    ) -> dict[str, Any]:
        """Open ``source`` here as session ``name`` (from ``snapshot``'s tracking state when given)."""
        from tracker.ingest import open_source

        src = open_source(source, mode="live")
        session = self.manager.open(src, name=name, model=model, options=options)
        stream = self._streams[session.id] = _Stream(STREAM_DEPTH)
        self._sources[session.id] = src
        self._meta[session.id] = {"source": source, "model": model, "options": dict(options or {}), "frames": 0}
        if snapshot is not None:  # no frame step between the open and the restored state
            session.pause()
            state = decode_state(snapshot.state)
            session.worker.submit(lambda: session.predictor.load_state_dict(state), session=session).result(60)
            session.resume()
            stream.push({"kind": "moved", "message": f"session {name} moved to {self.name}"
                         + (f" after {moved_from} was lost" if moved_from else ""), "obj_ids": snapshot.obj_ids})
        session.subscribe(lambda item, sid=session.id: self._on_item(sid, item))
        if self.directory is not None:
            self.directory.placed.remote(name, self.name)
        if snapshot is not None:
            self._save_snapshot(session.id)
        return {"session_id": session.id, "name": name, "host": self.name}

    def find(self, name: str) -> str | None:
        """The id of the open session called ``name`` here: any front joins a session by name."""
        session = self.manager.find_by_name(name)
        return session.id if session is not None else None

    def sessions(self) -> list[dict[str, Any]]:
        """The open sessions here, as ``list_sessions`` shows them."""
        return [{"session_id": s.id, "name": s.name, "state": s.state, "objects": sorted(s.predictor.obj_ids),
                 "frames_processed": s.stats.frames_processed, "host": self.name} for s in self.manager.list()]

    def close(self, session_id: str) -> None:
        session = self.manager.get(session_id)
        if self.directory is not None:
            self.directory.forget.remote(session.name)
        self.manager.close(session_id)
        self._streams.pop(session_id, None)
        self._sources.pop(session_id, None)
        self._meta.pop(session_id, None)

    # ------------------------------------------------------------- the stream

    def _on_item(self, session_id: str, item: Any) -> None:
        from tracker.cli import frame_record
        from tracker.results import FrameResult

        stream = self._streams.get(session_id)
        if stream is None:
            return
        if isinstance(item, FrameResult):
            stream.push({"kind": "result", **frame_record(item)})
            meta = self._meta[session_id]
            meta["frames"] += 1
            if meta["frames"] % self.snapshot_every == 0:
                threading.Thread(target=self._save_snapshot, args=(session_id,), daemon=True).start()
        else:
            stream.push({"kind": item.kind, "message": item.message, "obj_id": item.obj_id, "frame_idx": item.frame_idx})

    def poll(self, session_id: str, after_seq: int = 0, wait_s: float = 1.0) -> list[dict[str, Any]]:
        """Records after ``after_seq`` (waiting up to ``wait_s`` for one): one call per front, not per client."""
        stream = self._streams.get(session_id)
        if stream is None:
            raise ClusterError(f"no session {session_id!r} on host {self.name}")
        return stream.after(after_seq, min(max(wait_s, 0.0), 10.0))

    # ------------------------------------------------------------- controls

    def push(self, session_id: str, image_rgb: Any, pts_s: float | None = None) -> bool:
        """A frame relayed by a front to a ``push:`` session's source here."""
        return bool(self._sources[session_id].push(image_rgb, pts_s))

    def add_prompt(self, session_id: str, obj_id: int | None, **prompt: Any) -> dict[str, Any]:
        """A prompt as an actor call; the session's state is snapshotted once it is applied."""
        from tracker.masks import encode_rle

        session = self.manager.get(session_id)
        result = session.add_prompt(obj_id, **prompt).result(120)
        self._save_snapshot(session_id)
        return {"obj_id": result.obj_id, "score": result.score, "box_xyxy": result.box_xyxy,
                "mask_rle": encode_rle(result.mask_hw)}

    def snapshot(self, session_id: str) -> Snapshot:
        """The session's tracking state now, taken on the worker thread between steps."""
        session = self.manager.get(session_id)
        state = session.worker.submit(session.predictor.state_dict, session=session).result(60)
        meta = self._meta[session_id]
        return Snapshot(session.name, meta["source"], meta["model"], meta["options"], encode_state(state),
                        meta["frames"], sorted(session.predictor.obj_ids), self.name, time.time())

    def _save_snapshot(self, session_id: str) -> None:
        if self.directory is None:
            return
        try:
            self.directory.save.remote(self.snapshot(session_id))
        except Exception:  # the session closed meanwhile; nothing to keep
            logger.debug("snapshot of %s skipped", session_id, exc_info=True)


def start_hosts(spec: ModelSpec, count: int, *, directory: Any = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                resources: dict[str, float] | None = None, max_sessions: int = 8,
                snapshot_every: int = SNAPSHOT_EVERY) -> dict[str, Any]:
    """``count`` session hosts placed by Ray's scheduler (one per device: ``num_gpus`` each); name → handle."""
    import ray

    Host = ray.remote(max_concurrency=8, max_restarts=0)(SessionHost)
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if resources:
        options["resources"] = dict(resources)
    hosts = {f"host{i}": Host.options(**options).remote(spec, f"host{i}", directory, max_sessions=max_sessions,
                                                        snapshot_every=snapshot_every) for i in range(count)}
    ray.get([h.capacity.remote() for h in hosts.values()])
    return hosts


def place(hosts: dict[str, Any], timeout_s: float = 10.0) -> str:
    """The live host with the most free session slots (then fewest objects); a full cluster is an error."""
    import ray

    asks = {name: h.capacity.remote() for name, h in hosts.items()}
    free: list[tuple[int, int, str]] = []
    for name, ref in asks.items():
        try:
            c = ray.get(ref, timeout=timeout_s)
        except Exception:  # a dead or unreachable host takes no session
            continue
        if c["sessions"] < c["max_sessions"]:
            free.append((c["max_sessions"] - c["sessions"], -c["objects"], name))
    if not free:
        raise ClusterError(f"every session host is full or unreachable ({len(hosts)} hosts); add hosts or close sessions")
    return max(free)[2]


def recover(name: str, hosts: dict[str, Any], directory: Any, *, lost: str) -> tuple[str, dict[str, Any]]:
    """Re-create session ``name`` (its host ``lost`` died) on another host from its last snapshot."""
    import ray

    snapshot: Snapshot | None = ray.get(directory.snapshot.remote(name))
    if snapshot is None:
        raise ClusterError(f"session {name!r} has no snapshot to recover from")
    alive = {k: v for k, v in hosts.items() if k != lost}
    target = place(alive)
    info = ray.get(hosts[target].open.remote(snapshot.source, name=name, model=snapshot.model, options=snapshot.options,
                                             snapshot=snapshot, moved_from=lost))
    return target, info


__all__ = ["SessionDirectory", "SessionHost", "Snapshot", "place", "recover", "start_hosts"]
