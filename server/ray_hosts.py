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

The WebSocket front over these actors is :mod:`server.ray_front`; several
fronts share the hosts and the directory (named actors in one Ray namespace,
:func:`ensure_hosts`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from server.ray_cluster import ClusterError, torch_threads_for_actor
from tracker.allocator import keep_freed_memory
from tracker.annotate_many import ModelSpec

logger = logging.getLogger(__name__)

#: results kept per session for fronts that poll (older ones are dropped: newest-frame policy)
STREAM_DEPTH = 64
#: frames between two snapshots of a session's tracking state
SNAPSHOT_EVERY = 30
#: a front's claim to re-create a lost session lapses after this long (the front may have died meanwhile)
RECOVERY_CLAIM_S = 120.0
#: a front's reservation of a name lapses after this long (an open takes less: sources time out sooner)
RESERVATION_S = 150.0
#: a closed session's stream stays readable this long, so every front sees its ``closed`` event
CLOSED_STREAM_S = 30.0


def encode_state(state: dict[str, Any]) -> bytes:
    """A predictor's ``state_dict()`` as bytes (tensors on the CPU), for the object store."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def decode_state(data: bytes) -> dict[str, Any]:
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def result_record(result: Any, timing: tuple[float | None, float | None, float | None] = (None, None, None)) -> dict[str, Any]:
    """A FrameResult as a compact, exact record for a front (RLE masks, scores as computed)."""
    return {
        "kind": "result", "frame_idx": result.frame_idx, "size_hw": (result.height, result.width),
        "pts_s": result.pts_s, "arrival_s": result.arrival_s, "processed_s": result.processed_s,
        "source_index": result.source_index, "timing": timing,
        "objects": {obj_id: object_record(r) for obj_id, r in result.objects.items()},
    }


def object_record(r: Any) -> dict[str, Any]:
    from tracker.masks import encode_rle

    return {"obj_id": r.obj_id, "score": r.score, "box_xyxy": r.box_xyxy, "is_prompted": r.is_prompted,
            "mask_rle": encode_rle(r.mask_hw)}


def record_object(rec: dict[str, Any]) -> Any:
    """An :func:`object_record` as the ObjectResult it was made from (mask decoded)."""
    from tracker.masks import decode_rle
    from tracker.results import ObjectResult

    box = rec["box_xyxy"]
    return ObjectResult(rec["obj_id"], decode_rle(rec["mask_rle"]), rec["score"],
                        box_xyxy=None if box is None else tuple(box), is_prompted=rec["is_prompted"])


def record_result(record: dict[str, Any]) -> Any:
    """A :func:`result_record` as the FrameResult it was made from."""
    from tracker.results import FrameResult

    h, w = record["size_hw"]
    return FrameResult(record["frame_idx"], h, w, pts_s=record["pts_s"], arrival_s=record["arrival_s"],
                       processed_s=record["processed_s"], source_index=record["source_index"],
                       objects={k: record_object(v) for k, v in record["objects"].items()})


@dataclass
class Snapshot:
    """A session's last saved tracking state and what is needed to open it again elsewhere."""

    name: str
    #: a source string, or a picklable callable that opens it (the front's catalog: ``server.ray_front.SourceOpener``)
    source: Any
    model: str | None
    options: dict[str, Any]
    state: bytes
    frames: int
    obj_ids: list[int]
    host: str
    time_s: float
    session_id: str = ""


def _take_lease(leases: dict[str, float], name: str, lapse_s: float) -> bool:
    """Take ``name``'s lease in ``leases`` unless someone took it less than ``lapse_s`` ago
    (a lease lapses: its holder, a front, may have died while holding it)."""
    started = leases.get(name)
    if started is not None and time.time() - started < lapse_s:
        return False
    leases[name] = time.time()
    return True


class SessionDirectory:
    """One actor for the cluster: session name → (host, last snapshot). Fronts and hosts share it."""

    def __init__(self) -> None:
        self._hosts: dict[str, str] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._recovering: dict[str, float] = {}  # name -> when a front claimed its re-creation
        self._reserved: dict[str, float] = {}  # name -> when a front began to open it

    def node_id(self) -> str:
        """The Ray node the directory runs on (the head's)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def reserve(self, name: str) -> str:
        """A front is about to open session ``name``: ``ok`` (go on), ``placed`` (it runs: join
        it), ``opening`` (another front is opening it: wait). Names are unique in the cluster."""
        if name in self._hosts:
            return "placed"
        return "ok" if _take_lease(self._reserved, name, RESERVATION_S) else "opening"

    def release(self, name: str) -> None:
        """The open of a reserved name failed."""
        self._reserved.pop(name, None)

    def placed(self, name: str, host: str) -> None:
        self._hosts[name] = host
        self._reserved.pop(name, None)

    def save(self, snapshot: Snapshot) -> None:
        placed = self._hosts.get(snapshot.name)
        if placed is not None and placed != snapshot.host:
            return  # a stale copy on a host the session has left
        old = self._snapshots.get(snapshot.name)
        if old is None or snapshot.time_s >= old.time_s:
            self._snapshots[snapshot.name] = snapshot

    def snapshot(self, name: str) -> Snapshot | None:
        return self._snapshots.get(name)

    def host_of(self, name: str) -> str | None:
        return self._hosts.get(name)

    def forget(self, name: str, host: str | None = None) -> None:
        """``name`` closed (on ``host``: only if the directory has it there, so a stale copy
        closing never takes the live session's entry and snapshot with it)."""
        if host is not None and self._hosts.get(name, host) != host:
            return
        self._hosts.pop(name, None)
        self._snapshots.pop(name, None)
        self._recovering.pop(name, None)

    def claim_recovery(self, name: str, lost: str) -> str:
        """``go``: the caller re-creates ``name``, whose host ``lost`` died (one front
        does, whichever asks first); ``wait``: another front is at it; ``done``: it
        already lives elsewhere (or was closed)."""
        if self._hosts.get(name) != lost:
            return "done"
        return "go" if _take_lease(self._recovering, name, RECOVERY_CLAIM_S) else "wait"

    def recovered(self, name: str, host: str | None) -> None:
        """The claim of :meth:`claim_recovery` is over: ``name`` lives on ``host`` (None: it could not be re-created)."""
        self._recovering.pop(name, None)
        if host is None:
            self._hosts.pop(name, None)
        else:
            self._hosts[name] = host

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
    """A Ray actor per device: its inference worker, the models it serves, the sessions placed on it.

    Threaded (``max_concurrency``): fronts poll streams while prompts run.

    Args:
        spec: the model to build here, or several by name (the first is the default),
            as ``serve``'s ``[model]`` and ``[models.NAME]`` give them.
        name: this host's name in the directory.
        directory: the :class:`SessionDirectory` actor (None: no snapshots, no names).
        max_sessions / max_objects: this host's share of the cluster (placement reads them).
        limits / predictor_options: what ``serve`` gives its own ``SessionManager``.
        snapshot_every: frames between two snapshots (also after every prompt and control).
    """

    def __init__(
        self,
        spec: ModelSpec | dict[str, ModelSpec],
        name: str,
        directory: Any = None,
        *,
        max_sessions: int = 8,
        max_objects: int | None = None,
        snapshot_every: int = SNAPSHOT_EVERY,
        limits: Any = None,
        predictor_options: dict[str, Any] | None = None,
    ) -> None:
        import torch

        from tracker.session import InferenceWorker, SessionLimits, SessionManager

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(torch_threads_for_actor())
        keep_freed_memory()  # an actor's process does not go through the CLI
        self.name = name
        self.directory = directory
        self.snapshot_every = max(1, int(snapshot_every))
        self.max_objects = max_objects
        specs = spec if isinstance(spec, dict) else {spec.model: spec}
        models = {key: s.build() for key, s in specs.items()}
        self.model = next(iter(models.values()))
        self.limits = limits or SessionLimits()
        self.worker = InferenceWorker(self.model, max_batch=1)
        self.manager = SessionManager(self.worker, max_sessions=max_sessions, limits=self.limits,
                                      predictor_options=predictor_options, models=models)
        self._streams: dict[str, _Stream] = {}
        self._sources: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._closed: dict[str, float] = {}  # session id -> when it closed (its stream kept a while)

    # ------------------------------------------------------------- lifecycle

    def where(self) -> str:
        import ray

        return f"{self.name} on {ray.util.get_node_ip_address()} pid {os.getpid()}"

    def node_id(self) -> str:
        """The Ray node this host runs on (tests remove that node)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def capacity(self) -> dict[str, Any]:
        """Free session slots, objects tracked and device memory, for placement."""
        import torch

        sessions = self.manager.list()
        free_memory = None
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            free_memory = int(torch.cuda.mem_get_info(device)[0])
        return {
            "host": self.name,
            "sessions": len(sessions),
            "max_sessions": self.manager.max_sessions,
            "objects": sum(len(s.predictor.obj_ids) for s in sessions),
            "max_objects": self.max_objects,
            "free_device_memory": free_memory,
        }

    def open(
        self,
        source: Any,
        *,
        name: str,
        model: str | None = None,
        options: dict[str, Any] | None = None,
        snapshot: Snapshot | None = None,
        moved_from: str | None = None,
        session_id: str | None = None,
    ) -> dict[str, Any]:
        """Open ``source`` here as session ``name`` (from ``snapshot``'s tracking state when given).

        ``source`` is a source string (live mode) or a picklable callable that opens
        it here, next to this host's device (the front's catalog, with its policy).
        """
        from tracker.ingest import open_source

        src = source() if callable(source) else open_source(source, mode="live")
        session = self.manager.open(src, name=name, model=model, options=options, session_id=session_id)
        try:
            return self._start(session, src, source, name, model, options, snapshot, moved_from)
        except BaseException:  # nothing half-open stays behind (a session nobody knows of, its camera)
            self._meta.pop(session.id, None)
            self._streams.pop(session.id, None)
            self._sources.pop(session.id, None)
            with contextlib.suppress(Exception):
                self.manager.close(session.id, "its open failed")
            raise

    def _start(self, session: Any, src: Any, source: Any, name: str, model: str | None,
               options: dict[str, Any] | None, snapshot: Snapshot | None, moved_from: str | None) -> dict[str, Any]:
        stream = self._streams[session.id] = _Stream(STREAM_DEPTH)
        self._sources[session.id] = src
        self._meta[session.id] = {"source": source, "model": model, "options": dict(options or {}), "frames": 0,
                                  "polled_s": time.monotonic(), "session": session}
        if snapshot is not None:  # no frame step between the open and the restored state
            session.pause()
            state = decode_state(snapshot.state)
            session.worker.submit(lambda: session.predictor.load_state_dict(state), session=session).result(60)
            session.resume()  # before the stream's subscriber: the stream starts with `moved`
            stream.push({"kind": "moved", "message": f"session {name} moved to {self.name}"
                         + (f" after {moved_from} was lost" if moved_from else ""), "obj_ids": snapshot.obj_ids,
                         "obj_id": None, "frame_idx": None})
        session.subscribe(lambda item, sid=session.id: self._on_item(sid, item))
        if self.directory is not None:  # awaited: whoever asks the directory next finds it here
            import ray

            ray.get(self.directory.placed.remote(name, self.name))
        if snapshot is not None:
            self._save_snapshot(session.id)
        return {"session_id": session.id, "name": name, "host": self.name}

    def find(self, name: str) -> str | None:
        """The id of the open session called ``name`` here: any front joins a session by name."""
        session = self.manager.find_by_name(name)
        return session.id if session is not None else None

    def sessions(self) -> list[dict[str, Any]]:
        """The open sessions here, with what ``list_sessions`` and ``stats`` show; closes idle ones first."""
        self._reap_idle()
        out = []
        for s in self.manager.list():
            st, src = s.stats, s.source
            size = getattr(src, "size", None)
            out.append({
                **s.info(), "host": self.name, "objects": sorted(s.predictor.obj_ids),
                "frames_in": st.frames_in, "step_errors": st.step_errors, "prompts": st.prompts,
                "source_dropped": int(src.stats.dropped), "size": None if size is None else tuple(size),
                "fps": getattr(src, "fps", None), "tracking_values": s.tracking_values(),
                "push": hasattr(src, "push"),
            })
        return out

    def _reap_idle(self) -> None:
        """Close sessions no front has polled for the idle timeout (a front polls while it has subscribers)."""
        now = time.monotonic()
        for sid, meta in list(self._meta.items()):
            if now - meta["polled_s"] > self.limits.idle_timeout_s:
                with contextlib.suppress(Exception):
                    self.close(sid, f"no subscriber for {self.limits.idle_timeout_s:g} s")
        for sid, at in list(self._closed.items()):
            if now - at > CLOSED_STREAM_S:
                self._closed.pop(sid, None)
                self._streams.pop(sid, None)

    def close(self, session_id: str, reason: str = "closed by a client") -> None:
        session = self.manager.get(session_id)
        if self.directory is not None:
            self.directory.forget.remote(session.name, self.name)
        self.manager.close(session_id, reason)  # its `closed` event goes into the stream
        self._sources.pop(session_id, None)
        self._meta.pop(session_id, None)
        self._closed[session_id] = time.monotonic()

    def stop(self) -> None:
        """Close every session here (``serve --ray`` shutting the cluster's hosts down)."""
        for s in self.manager.list():
            with contextlib.suppress(Exception):
                self.close(s.id, "the session host is shutting down")
        self.worker.stop()

    # ------------------------------------------------------------- the stream

    def _on_item(self, session_id: str, item: Any) -> None:
        from tracker.results import FrameResult

        stream = self._streams.get(session_id)
        if stream is None:
            return
        if isinstance(item, FrameResult):
            meta = self._meta.get(session_id)
            if meta is None:  # closing
                return
            times = meta["session"].stats.times  # this frame's entries are the newest
            timing = tuple(q[-1] if q else None for q in (times.queue_wait, times.encode, times.track))
            stream.push(result_record(item, timing))
            meta["frames"] += 1
            if meta["frames"] % self.snapshot_every == 0:
                threading.Thread(target=self._save_snapshot, args=(session_id,), daemon=True).start()
        else:
            stream.push({"kind": item.kind, "message": item.message, "obj_id": item.obj_id, "frame_idx": item.frame_idx})

    def stream_seq(self, session_id: str) -> int:
        """The number of the newest record of the session's stream: where a new reader starts."""
        stream = self._streams.get(session_id)
        if stream is None:
            raise ClusterError(f"no session {session_id!r} on host {self.name}")
        return stream.seq

    def poll(self, session_id: str, after_seq: int = 0, wait_s: float = 1.0) -> list[dict[str, Any]]:
        """Records after ``after_seq`` (waiting up to ``wait_s`` for one): one call per front, not per client."""
        stream = self._streams.get(session_id)
        if stream is None:
            raise ClusterError(f"no session {session_id!r} on host {self.name}")
        meta = self._meta.get(session_id)
        if meta is not None:
            meta["polled_s"] = time.monotonic()
        return stream.after(after_seq, min(max(wait_s, 0.0), 10.0))

    # ------------------------------------------------------------- controls

    def push(self, session_id: str, image_rgb: Any, pts_s: float | None = None) -> bool:
        """A frame relayed by a front to a ``push:`` session's source here (WebRTC, pushed frames)."""
        source = self._sources.get(session_id)
        if source is None:
            return False
        return bool(source.push(image_rgb, pts_s))

    def end_push(self, session_id: str) -> None:
        """The relayed source has no more frames (its publisher left)."""
        source = self._sources.get(session_id)
        if source is not None and hasattr(source, "end"):
            source.end()

    def add_prompt(self, session_id: str, obj_id: int | None, **prompt: Any) -> dict[str, Any]:
        """A prompt as an actor call; the session's state is snapshotted once it is applied."""
        session = self.manager.get(session_id)
        timeout_s = float(prompt.pop("timeout_s", 120.0))
        result = session.add_prompt(obj_id, **prompt).result(timeout_s)
        self._save_snapshot(session_id)
        return object_record(result)

    def remove_object(self, session_id: str, obj_id: int) -> list[int]:
        session = self.manager.get(session_id)
        session.remove_object(obj_id).result(120)
        self._save_snapshot(session_id)
        return list(session.predictor.obj_ids)

    def reset(self, session_id: str) -> None:
        session = self.manager.get(session_id)
        session.reset().result(120)
        self._save_snapshot(session_id)

    def pause(self, session_id: str) -> str:
        session = self.manager.get(session_id)
        session.pause()
        return session.state

    def resume(self, session_id: str) -> str:
        session = self.manager.get(session_id)
        session.resume()
        return session.state

    def snapshot(self, session_id: str) -> Snapshot:
        """The session's tracking state now, taken on the worker thread between steps."""
        session = self.manager.get(session_id)
        state = session.worker.submit(session.predictor.state_dict, session=session).result(60)
        meta = self._meta[session_id]
        return Snapshot(session.name, meta["source"], meta["model"], meta["options"], encode_state(state),
                        meta["frames"], sorted(session.predictor.obj_ids), self.name, time.time(), session.id)

    def _save_snapshot(self, session_id: str) -> None:
        if self.directory is None:
            return
        try:
            self.directory.save.remote(self.snapshot(session_id))
        except Exception:  # the session closed meanwhile; nothing to keep
            logger.debug("snapshot of %s skipped", session_id, exc_info=True)


HOST_ACTOR_PREFIX = "sam2-stream-host"
DIRECTORY_ACTOR = "sam2-stream-directory"
#: the resource only the head node has (ray._common.constants.HEAD_NODE_RESOURCE_NAME)
HEAD_NODE_RESOURCE = "node:__internal_head__"


def _host_class(max_concurrency: int = 16) -> Any:
    import ray

    return ray.remote(max_concurrency=max_concurrency, max_restarts=0)(SessionHost)


def start_hosts(spec: ModelSpec | dict[str, ModelSpec], count: int, *, directory: Any = None, num_cpus: float = 1.0,
                num_gpus: float = 0.0, resources: dict[str, float] | None = None, max_sessions: int = 8,
                snapshot_every: int = SNAPSHOT_EVERY, **host_options: Any) -> dict[str, Any]:
    """``count`` session hosts placed by Ray's scheduler (one per device: ``num_gpus`` each); name → handle."""
    import ray

    Host = _host_class()
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if resources:
        options["resources"] = dict(resources)
    hosts = {f"host{i}": Host.options(**options).remote(spec, f"host{i}", directory, max_sessions=max_sessions,
                                                        snapshot_every=snapshot_every, **host_options)
             for i in range(count)}
    ray.get([h.capacity.remote() for h in hosts.values()])
    return hosts


def ensure_directory(namespace: str) -> Any:
    """The cluster's one :class:`SessionDirectory` (a detached named actor), started by the first front.

    It lives on the head node (as Ray's own detached state actors do): never on a node
    whose loss it must survive. The head holds the cluster's GCS, so losing it is losing
    the cluster anyway.
    """
    import ray

    Directory = ray.remote(max_restarts=0, num_cpus=0)(SessionDirectory)
    return Directory.options(name=DIRECTORY_ACTOR, namespace=namespace, lifetime="detached", get_if_exists=True,
                             resources={HEAD_NODE_RESOURCE: 0.001}).remote()


def ensure_hosts(spec: ModelSpec | dict[str, ModelSpec], count: int, *, namespace: str, directory: Any,
                 num_cpus: float = 1.0, num_gpus: float = 0.0, resources: dict[str, float] | None = None,
                 start_timeout_s: float = 120.0, **host_options: Any) -> dict[str, Any]:
    """The session hosts ``sam2-stream-host0`` … ``count-1`` of ``namespace``: the running ones,
    started where missing. Detached named actors: every front shares them, and they
    outlive the front that started them (a front that dies loses only its connections).

    Raises:
        ClusterError: the cluster cannot hold them within ``start_timeout_s`` (say how many
            hosts it has room for with ``[cluster] hosts``).
    """
    import ray

    Host = _host_class()
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "namespace": namespace,
                               "lifetime": "detached", "get_if_exists": True}
    if resources:
        options["resources"] = dict(resources)
    hosts = {}
    for i in range(count):
        name = f"{HOST_ACTOR_PREFIX}{i}"
        hosts[name] = Host.options(name=name, **options).remote(spec, name, directory, **host_options)
    refs = {name: h.capacity.remote() for name, h in hosts.items()}
    ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=start_timeout_s)
    if pending:
        missing = [n for n, r in refs.items() if r in pending]
        for n in missing:
            with contextlib.suppress(Exception):
                ray.kill(hosts[n], no_restart=True)
        raise ClusterError(
            f"the cluster has no room for session host(s) {', '.join(missing)} within {start_timeout_s:g} s "
            f"(each needs {num_cpus:g} CPU, {num_gpus:g} GPU{''.join(f', {v:g} {k}' for k, v in (resources or {}).items())}; "
            f"cluster: {ray.cluster_resources()}); set [cluster] hosts lower or add nodes")
    for name, ref in refs.items():
        ray.get(ref)  # a host that failed to start (a missing checkpoint) says why here
    return hosts


def pick_host(capacities: dict[str, dict[str, Any]]) -> str | None:
    """The host with the most free capacity among ``capacities`` (:meth:`SessionHost.capacity`
    of each live host): free session slots, then free object slots (fewest objects where
    unlimited), then free device memory. Hosts at a limit take nothing: None when all are."""
    free: list[tuple[int, int, int, str]] = []
    for name, c in capacities.items():
        limit = c.get("max_objects")
        objects_free = -c["objects"] if limit is None else limit - c["objects"]
        if c["sessions"] < c["max_sessions"] and (limit is None or objects_free > 0):
            free.append((c["max_sessions"] - c["sessions"], objects_free, c.get("free_device_memory") or 0, name))
    return max(free)[3] if free else None


def place(hosts: dict[str, Any], timeout_s: float = 10.0) -> str:
    """The live host :func:`pick_host` chooses; a full (or unreachable) cluster is an error."""
    import ray

    asks = {name: h.capacity.remote() for name, h in hosts.items()}
    capacities = {}
    for name, ref in asks.items():
        try:
            capacities[name] = ray.get(ref, timeout=timeout_s)
        except Exception:  # a dead or unreachable host takes no session
            continue
    chosen = pick_host(capacities)
    if chosen is None:
        raise ClusterError(f"every session host is full or unreachable ({len(hosts)} hosts); add hosts or close sessions")
    return chosen


def recover(name: str, hosts: dict[str, Any], directory: Any, *, lost: str) -> tuple[str, dict[str, Any]]:
    """Re-create session ``name`` (its host ``lost`` died) on another host from its last snapshot."""
    import ray

    snapshot: Snapshot | None = ray.get(directory.snapshot.remote(name))
    if snapshot is None:
        raise ClusterError(f"session {name!r} has no snapshot to recover from")
    alive = {k: v for k, v in hosts.items() if k != lost}
    target = place(alive)
    # bounded well below RECOVERY_CLAIM_S, so no other front's claim can start while this open runs
    info = ray.get(hosts[target].open.remote(snapshot.source, name=name, model=snapshot.model, options=snapshot.options,
                                             snapshot=snapshot, moved_from=lost, session_id=snapshot.session_id or None),
                   timeout=RECOVERY_CLAIM_S / 2)
    return target, info


__all__ = ["SessionDirectory", "SessionHost", "Snapshot", "ensure_directory", "ensure_hosts", "pick_host", "place", "recover",
           "record_result", "result_record", "start_hosts"]
