"""The WebSocket front of ``serve --ray``: the sessions of :mod:`server.app` run on Ray session hosts.

:class:`RemoteSessionManager` has the interface :mod:`server.app` and
:mod:`server.connection` use of :class:`tracker.session.SessionManager` (open,
get, find_by_name, list, close, check_options, reap_idle, close_all) and
:class:`RemoteSession` that of :class:`tracker.session.TrackingSession` (subscribe,
add_prompt returning a future, remove_object, reset, pause, resume, info, stats).
So the protocol, the hubs and their newest-frame fan-out are unchanged: the
front's server does not know its sessions live elsewhere.

What crosses the cluster:

- **opens** ship a :class:`SourceOpener` (the front's config and policy, the name
  or URI) to the host the session is placed on, which opens the source there,
  next to its device; frames a client publishes (WebRTC) are relayed to the host
  by a :class:`RelayPushSource`, at most one frame in flight (newest-frame policy);
- **prompts and controls** are actor calls, run off the event loop;
- **results** come back as one stream per session per front: one poll thread
  while the session has subscribers on this front pulls the records after the
  last one it saw and hands the newest result (and every event) to the hub,
  which fans it out to this front's clients as today;
- every front sees every session: a refresh thread reads each host's session
  table every second (``list_sessions``, ``stats``, joining by name or id);
  named sessions are reserved in the directory, so two fronts opening one name
  at once get one session.

Faults: a poll (or a refresh) that finds the session's host dead asks the
directory to re-create the session; one front wins the claim and calls
:func:`server.ray_hosts.recover` (another host, the last snapshot, the same id
and name), the others wait for it; every front's stream then starts with the
``moved`` event and goes on. A front that dies loses only its connections: the
hosts and the directory are detached actors.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from server.ray_cluster import ClusterError
from server.ray_hosts import ensure_directory, ensure_hosts, place, record_object, record_result, recover
from tracker.ingest import PushSource
from tracker.session import SessionError, SessionEvent, SessionStats, check_tracking_options, notify_all

logger = logging.getLogger(__name__)

#: seconds between two reads of every host's session table
REFRESH_S = 1.0
#: longest wait of one poll on the host (it returns at once when a record is there)
POLL_WAIT_S = 1.0
#: a host that answers nothing for this long is taken for dead (its sessions move)
UNREACHABLE_S = 30.0


def _unwrap(exc: BaseException) -> BaseException:
    """The error an actor call raised on the host, as itself (a prompt error, a source error)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _call(ref: Any, timeout_s: float | None = None) -> Any:
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.RayTaskError as exc:
        raise _unwrap(exc) from None


def model_specs(config: Any, default_name: str | None = None) -> dict[str, Any]:
    """The models of ``[model]`` and ``[models.NAME]`` as what a session host builds (the default first)."""
    from tracker.annotate_many import ModelSpec

    def spec(m: Any) -> ModelSpec:
        return ModelSpec(model=m.name, checkpoint=config.resolve(m.checkpoint) if m.checkpoint else None,
                         device=m.device, image_size=m.image_size,
                         precision=None if m.precision == "auto" else m.precision, random_weights=m.random_weights)

    return {default_name or config.model.name: spec(config.model), **{k: spec(e) for k, e in config.models.items()}}


@dataclass(frozen=True)
class SourceOpener:
    """Opens a source where it is called (on the session host): a configured name
    (``open_named``) or a URI (``open_uri``) under the front's config and policy."""

    config: Any  # server.config.ServerConfig
    method: str
    args: tuple

    def __call__(self) -> Any:
        from server.config import SourceCatalog

        return getattr(SourceCatalog(self.config), self.method)(*self.args)


@dataclass
class _SourceStats:
    dropped: int = 0


@dataclass
class _SourceView:
    """What the server reads of a session's source, as its host last reported it."""

    display: str
    size: tuple[int, int] | None = None
    fps: float | None = None
    stats: _SourceStats = field(default_factory=_SourceStats)


class RelayPushSource(PushSource):
    """A ``push:`` source whose frames go to the session's host (WebRTC publishers feed it).

    At most one frame is in flight to the host; a frame pushed meanwhile is
    dropped (counted): the newest frame wins, as on a local push source.
    """

    def __init__(self, session: "RemoteSession", display: str) -> None:
        super().__init__(display if display.startswith("push:") else "push:relay")
        self.session = session
        self.display = display
        self.fps: float | None = None
        self.relay_stats = _SourceStats()
        self.relayed = 0
        self.relay_dropped = 0
        self._in_flight: Any = None

    @property
    def stats(self) -> _SourceStats:  # type: ignore[override]
        """The host's figures (``dropped``), as the refresh thread last read them."""
        return self.relay_stats

    def push(self, image_rgb: Any, pts_s: float | None = None) -> bool:
        import ray

        if self.session.state == "closed":
            return False
        if self._in_flight is not None:
            done, _ = ray.wait([self._in_flight], timeout=0)
            if not done:
                self.relay_dropped += 1
                return True
        self._in_flight = self.session.host_handle().push.remote(self.session.id, image_rgb, pts_s)
        self.relayed += 1
        return True

    def end(self) -> None:
        if self.session.state != "closed":
            try:
                self.session.host_handle().end_push.remote(self.session.id)
            except Exception:
                logger.debug("session %s: ending the relayed source failed", self.session.id, exc_info=True)
        super().end()


@dataclass
class _PredictorView:
    obj_ids: list[int] = field(default_factory=list)
    newest_frame_idx: int | None = None
    device: str = ""


class RemoteSession:
    """A session on a session host, as this front's server sees it (see the module docstring)."""

    def __init__(self, manager: "RemoteSessionManager", row: dict[str, Any]) -> None:
        self.manager = manager
        self.id: str = row["session_id"]
        self.name: str = row["name"]
        self.host: str = row["host"]
        self.state: str = row.get("state", "running")
        self.model_name: str = row.get("model") or ""
        self.stats = SessionStats()
        self.source: Any = _SourceView(str(row.get("source", "")))
        self.predictor = _PredictorView()
        self.created_s = time.time()
        self.moved_s = 0.0
        self.last_subscriber_s = time.time()
        self._row: dict[str, Any] = {}
        self._subscribers: dict[int, Callable[[Any], None]] = {}
        self._sub_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._poller: threading.Thread | None = None
        self._seq = 0
        self._fresh = True
        self._moving = threading.Lock()
        self.update(row)

    # ------------------------------------------------------------ the host's view

    def host_handle(self) -> Any:
        return self.manager.hosts[self.host]

    def update(self, row: dict[str, Any]) -> None:
        """Take the host's latest figures for this session (the refresh thread's table)."""
        self._row = row
        host = row.get("host", self.host)
        if host != self.host:  # another front moved it: read the new host's stream from its start
            self.manager._follow(self, host)
        if self.state != "closed":
            self.state = row.get("state", self.state)
        self.model_name = row.get("model") or self.model_name
        st = self.stats
        st.frames_in = row.get("frames_in", st.frames_in)
        st.frames_processed = row.get("frames_processed", st.frames_processed)
        st.frames_dropped = row.get("frames_dropped", st.frames_dropped)
        st.step_errors = row.get("step_errors", st.step_errors)
        st.prompts = row.get("prompts", st.prompts)
        if row.get("push") and not isinstance(self.source, RelayPushSource):
            self.source = RelayPushSource(self, self.source.display)  # frames pushed here go to the host
        src = self.source
        src.size = row.get("size", src.size)
        src.fps = row.get("fps", src.fps)
        src.stats.dropped = row.get("source_dropped", src.stats.dropped)
        p = self.predictor
        p.obj_ids = list(row.get("objects", p.obj_ids))
        p.newest_frame_idx = row.get("newest_frame_idx", p.newest_frame_idx)
        p.device = row.get("device", p.device)  # the host's device; info() names the host beside it

    def info(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "name": self.name,
            "source": self._row.get("source", self.source.display),
            "state": self.state,
            "objects": list(self.predictor.obj_ids),
            "model": self.model_name,
            "device": f"{self.predictor.device} on {self.host}",
            "tracking": dict(self._row.get("tracking", {})),
            "subscribers": self.subscriber_count,
            "frames_processed": self.stats.frames_processed,
            "frames_dropped": self.stats.frames_dropped,
            "newest_frame_idx": self.predictor.newest_frame_idx,
        }

    def tracking_values(self) -> dict[str, Any]:
        return dict(self._row.get("tracking_values", {}))

    # ------------------------------------------------------------ subscribers and the stream

    def subscribe(self, callback: Callable[[Any], None]) -> int:
        with self._lock:
            if self.state == "closed":
                raise SessionError(f"session {self.id} is closed")
            sub_id = next(self._sub_ids)
            self._subscribers[sub_id] = callback
            self.last_subscriber_s = time.time()
            if self._poller is None or not self._poller.is_alive():
                self._poller = threading.Thread(target=self._poll_loop, name=f"ray-poll-{self.id}", daemon=True)
                self._poller.start()
            return sub_id

    def subscribe_frames(self, callback: Any) -> int:
        raise SessionError(
            f"session {self.id} runs on the Ray session host {self.host}: its video stays there; "
            "receive its masks over the WebSocket instead of webrtc_view"
        )

    def unsubscribe(self, sub_id: int) -> None:
        with self._lock:
            self._subscribers.pop(sub_id, None)
            self.last_subscriber_s = time.time()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def _publish(self, item: Any) -> None:
        with self._lock:
            subs = list(self._subscribers.values())
        notify_all(subs, item, what=f"session {self.id}")

    def mark_closed(self, reason: str) -> None:
        """The session is gone (closed on its host, or lost for good): tell this front's subscribers once."""
        with self._lock:
            if self.state == "closed":
                return
            self.state = "closed"
        self._publish(SessionEvent(kind="closed", session_id=self.id, message=reason))
        with self._lock:
            self._subscribers.clear()

    def _poll_loop(self) -> None:
        """One stream per session per front: the records after the last one seen; the newest result goes on."""
        import ray

        failing_since: float | None = None
        self._fresh = True  # a new reader starts at the stream's end: past results are not replayed
        while True:
            with self._lock:  # decided under the lock subscribe() takes: no subscriber is left unread
                if self.state == "closed" or not self._subscribers or self.manager.stopped:
                    self._poller = None
                    return
            host = self.host
            try:
                if self._fresh:
                    self._seq = ray.get(self.host_handle().stream_seq.remote(self.id), timeout=15)
                    self._fresh = False
                records = ray.get(self.host_handle().poll.remote(self.id, self._seq, POLL_WAIT_S),
                                  timeout=POLL_WAIT_S + 15)
                failing_since = None
            except SystemExit:  # this process's Ray worker is shutting down
                return
            except ray.exceptions.RayTaskError as exc:  # the host has no such session: closed there
                self.mark_closed(f"the session is gone from its host {host}: {_unwrap(exc)}")
                return
            except ray.exceptions.ActorDiedError:
                self.manager.recover_session(self, lost=host)
                continue
            except Exception:  # unavailable or slow: taken for dead after UNREACHABLE_S
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > UNREACHABLE_S:
                    self.manager.recover_session(self, lost=host, fence=True)
                    failing_since = None
                else:
                    time.sleep(0.5)
                continue
            if self.host != host:  # followed to another host meanwhile: these records are the old stream's
                continue
            newest = None
            for record in records:
                self._seq = record["seq"]
                if record["kind"] == "result":
                    newest = record
                    continue
                if record["kind"] == "closed":
                    self.mark_closed(record.get("message") or "closed")
                    return
                if record["kind"] == "moved":
                    self.predictor.obj_ids = list(record.get("obj_ids") or [])
                self._publish(SessionEvent(kind=record["kind"], session_id=self.id, message=record.get("message") or "",
                                           obj_id=record.get("obj_id"), frame_idx=record.get("frame_idx")))
            if newest is not None:
                times = self.stats.times
                for queue, value in zip((times.queue_wait, times.encode, times.track), newest.get("timing") or ()):
                    if value is not None:
                        queue.append(value)
                result = record_result(newest)
                self.predictor.newest_frame_idx = result.frame_idx
                self.predictor.obj_ids = sorted(result.objects)
                self._publish(result)

    # ------------------------------------------------------------ controls (actor calls, off the event loop)

    def _check_open(self) -> None:
        if self.state == "closed":
            raise SessionError(f"session {self.id} is closed")

    def _submit(self, fn: Callable[[], Any]) -> Future:
        self._check_open()
        return self.manager.executor.submit(fn)

    def add_prompt(self, obj_id: int | None, **prompt: Any) -> Future:
        timeout_s = self.manager.prompt_timeout_s

        def run() -> Any:
            record = _call(self.host_handle().add_prompt.remote(self.id, obj_id, timeout_s=timeout_s, **prompt),
                           timeout_s + 5)
            result = record_object(record)
            if result.obj_id not in self.predictor.obj_ids:
                self.predictor.obj_ids = sorted([*self.predictor.obj_ids, result.obj_id])
            return result

        return self._submit(run)

    def remove_object(self, obj_id: int) -> Future:
        def run() -> None:
            self.predictor.obj_ids = _call(self.host_handle().remove_object.remote(self.id, obj_id), 120)

        return self._submit(run)

    def reset(self) -> Future:
        return self._submit(lambda: _call(self.host_handle().reset.remote(self.id), 120))

    def pause(self) -> None:
        """Pause on the host; returns at once (the server calls it on its event loop)."""
        self._control("pause", "paused")

    def resume(self) -> None:
        self._control("resume", "running")

    def _control(self, method: str, state: str) -> None:
        self._check_open()
        self.state = state  # the host's `paused` / `resumed` event follows in the stream
        ref = getattr(self.host_handle(), method).remote(self.id)

        def wait() -> None:
            try:
                state = _call(ref, 30)
                if self.state != "closed":
                    self.state = state
            except Exception as exc:
                logger.warning("session %s: %s on host %s failed: %s", self.id, method, self.host, exc)

        self.manager.executor.submit(wait)


class RemoteSessionManager:
    """This front's view of every session of the cluster (see the module docstring).

    Args:
        hosts: session host name → actor handle (:func:`server.ray_hosts.ensure_hosts`).
        directory: the :class:`~server.ray_hosts.SessionDirectory` actor.
        model_names: the models sessions may ask for (the first is the default).
        max_sessions: sessions in the whole cluster at most (``[limits] max_sessions``).
        max_objects: the ceiling of a session's ``max_objects``.
        prompt_timeout_s: how long a prompt may take on its host.
    """

    def __init__(self, hosts: dict[str, Any], directory: Any, *, model_names: list[str], max_sessions: int = 8,
                 max_objects: int = 16, prompt_timeout_s: float = 30.0) -> None:
        self.hosts = dict(hosts)
        self.directory = directory
        self.model_names = list(model_names)
        self.max_sessions = max_sessions
        self.max_objects = max_objects
        self.prompt_timeout_s = prompt_timeout_s
        self.executor = ThreadPoolExecutor(8, thread_name_prefix="ray-front")
        self.stopped = False
        self.dead: set[str] = set()
        self._sessions: dict[str, RemoteSession] = {}
        self._lock = threading.Lock()
        self._refreshed = threading.Event()
        self._refresher = threading.Thread(target=self._refresh_loop, name="ray-front-refresh", daemon=True)
        self._refresher.start()

    @classmethod
    def connect(cls, config: Any, model_specs: dict[str, Any]) -> "RemoteSessionManager":
        """Join the cluster of ``config.cluster``; start the directory and the session hosts where missing."""
        from server.ray_cluster import WorkerShape, connect

        cluster, limits = config.cluster, config.limits
        ray = connect(cluster.address, namespace=cluster.namespace)
        total = ray.cluster_resources()
        gpus = cluster.host_gpus if cluster.host_gpus is not None else (1.0 if total.get("GPU", 0.0) >= 1 else 0.0)
        shape = WorkerShape(cluster.host_cpus, gpus, tuple(sorted(cluster.host_resources.items())))
        count = cluster.hosts or shape.fits(total)
        if count < 1:
            raise ClusterError(f"the Ray cluster has no room for a session host ({shape.describe()} each; "
                               f"cluster: {total}); add nodes or lower [cluster] host_cpus / host_gpus")
        from tracker.session import SessionLimits

        host_limits = SessionLimits(max_objects=limits.max_objects, lost_after_frames=limits.lost_after_frames,
                                    idle_timeout_s=limits.idle_timeout_s, max_points_per_frame=limits.max_points_per_frame,
                                    prompts_per_step=limits.prompts_per_step)
        directory = ensure_directory(cluster.namespace)
        hosts = ensure_hosts(model_specs, count, namespace=cluster.namespace, directory=directory,
                             num_cpus=shape.num_cpus, num_gpus=shape.num_gpus, resources=dict(shape.resources),
                             start_timeout_s=cluster.start_timeout_s, max_sessions=cluster.max_sessions_per_host,
                             max_objects=cluster.max_objects_per_host, snapshot_every=cluster.snapshot_every,
                             limits=host_limits, predictor_options={"return_logits": False})
        logger.info("Ray cluster at %s: %d session host(s) (%s each) in namespace %r", cluster.address, len(hosts),
                    shape.describe(), cluster.namespace)
        return cls(hosts, directory, model_names=list(model_specs), max_sessions=limits.max_sessions,
                   max_objects=limits.max_objects, prompt_timeout_s=limits.prompt_timeout_s)

    # ------------------------------------------------------------ SessionManager's interface

    @property
    def default_model(self) -> str:
        return self.model_names[0]

    @property
    def workers(self) -> list[Any]:
        return []  # inference runs on the hosts

    def check_options(self, model: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
        return check_tracking_options(self.model_names, self.max_objects, model, options)

    def open_remote(self, source: Any, *, name: str, model: str | None = None,
                    options: dict[str, Any] | None = None, join: bool = False) -> tuple[RemoteSession, bool]:
        """Open ``source`` (a source string or a :class:`SourceOpener`) on the freest host as
        session ``name``; with ``join``, a session of that name already in the cluster is
        returned instead (named sources: any front joins them). Blocking: run it off the loop.
        Returns the session and whether it was created."""
        import ray

        options = self.check_options(model, options)
        deadline = time.monotonic() + 60
        base, copies = name, itertools.count(2)
        while True:
            verdict = _call(self.directory.reserve.remote(name), 10)
            if verdict == "ok":
                break
            if not join:  # names are the directory's keys: a second session on one URI gets "URI #2"
                name = f"{base} #{next(copies)}"
                continue
            if verdict == "placed":
                existing = self.find_by_name(name, wait=True)
                if existing is not None:
                    return existing, False
            if time.monotonic() > deadline:
                raise ClusterError(f"session {name!r} is being opened by another front and did not appear within 60 s")
            time.sleep(0.2)
        try:
            if len(self.list()) >= self.max_sessions:
                raise SessionError(f"the cluster already runs {self.max_sessions} sessions (the limit); "
                                   "close one or subscribe to one")
            try:
                host = place({k: v for k, v in self.hosts.items() if k not in self.dead})
            except ClusterError as exc:
                from server.protocol import ProtocolError

                raise ProtocolError("limit_exceeded", str(exc)) from None
            info = _call(self.hosts[host].open.remote(source, name=name, model=model, options=options), 120)
            ray.get(self.directory.placed.remote(name, host))
        except BaseException:
            self.directory.release.remote(name)
            raise
        rows = _call(self.hosts[host].sessions.remote(), 30)
        row = next((r for r in rows if r["session_id"] == info["session_id"]), {**info, "state": "running"})
        with self._lock:
            session = self._sessions.get(info["session_id"])
            if session is None:
                session = self._sessions[info["session_id"]] = RemoteSession(self, row)
            else:
                session.update(row)
        logger.info("session %s (%s) opened on %s", session.id, name, host)
        return session, True

    def get(self, session_id: str) -> RemoteSession:
        session = self._sessions.get(session_id)
        if session is None or session.state == "closed":
            raise SessionError(f"unknown session {session_id!r}; list_sessions shows the open ones")
        return session

    def find_by_name(self, name: str, wait: bool = False) -> RemoteSession | None:
        """The open session called ``name`` anywhere in the cluster (``wait``: until the next refresh has run)."""
        for attempt in range(2 if wait else 1):
            for s in self.list():
                if s.name == name and s.state != "closed":
                    return s
            if wait:
                self._refreshed.clear()
                self._refreshed.wait(REFRESH_S * 5)
        return None

    def list(self) -> list[RemoteSession]:
        with self._lock:  # the refresh thread changes the table
            sessions = list(self._sessions.values())
        return [s for s in sessions if s.state != "closed"]

    def close(self, session_id: str, reason: str = "closed by a client") -> None:
        session = self.get(session_id)
        try:
            _call(session.host_handle().close.remote(session_id, reason), 30)
        except SessionError:
            pass  # closed there already
        except Exception as exc:  # its host is dead or unreachable: nothing to recover it for
            logger.warning("session %s: closing it on %s failed (%s); forgotten", session_id, session.host, exc)
            self.directory.forget.remote(session.name)
        session.mark_closed(reason)
        logger.info("session %s closed: %s", session_id, reason)

    def reap_idle(self, now: float | None = None) -> list[str]:
        return []  # the hosts close sessions no front polls (server.ray_hosts.SessionHost.sessions)

    def close_all(self) -> None:
        """A front stopping leaves the cluster's sessions to the other fronts: it only stops reading them."""
        self.stopped = True
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ the cluster's table and faults

    def _refresh_loop(self) -> None:
        while not self.stopped:
            try:
                self.refresh()
            except Exception:
                logger.exception("reading the session hosts' tables failed")
            self._refreshed.set()
            time.sleep(REFRESH_S)

    def refresh(self) -> None:
        """Every host's sessions into this front's table; sessions of dead hosts move."""
        import ray

        asks = {name: h.sessions.remote() for name, h in self.hosts.items() if name not in self.dead}
        rows: dict[str, dict[str, Any]] = {}
        answered: set[str] = set()
        for name, ref in asks.items():
            try:
                for row in ray.get(ref, timeout=10):
                    rows[row["session_id"]] = row
                answered.add(name)
            except ray.exceptions.ActorDiedError:
                logger.warning("session host %s is dead", name)
                self.dead.add(name)
            except Exception:
                logger.debug("session host %s did not answer", name, exc_info=True)
        with self._lock:
            for sid, row in rows.items():
                session = self._sessions.get(sid)
                if session is None:
                    self._sessions[sid] = RemoteSession(self, row)
                elif not session._moving.locked():
                    session.update(row)
            for sid, session in list(self._sessions.items()):
                if session.state == "closed":
                    del self._sessions[sid]
                elif sid not in rows and session.host in answered and not session._moving.locked() \
                        and time.time() - max(session.created_s, session.moved_s) > 2 * REFRESH_S:
                    session.mark_closed(f"closed on its host {session.host}")
                elif session.host in self.dead and not (session._poller and session._poller.is_alive()) \
                        and not session._moving.locked():
                    threading.Thread(target=self.recover_session, args=(session,), kwargs={"lost": session.host},
                                     daemon=True).start()

    def recover_session(self, session: RemoteSession, *, lost: str, fence: bool = False) -> bool:
        """``session``'s host ``lost`` died: re-create it elsewhere (or follow the front that does).

        ``fence``: the host did not answer for :data:`UNREACHABLE_S` but may still run: it is
        killed first, so the session never runs twice.
        """
        import ray

        with session._moving:
            if session.host != lost or session.state == "closed":
                return True  # another thread of this front moved it already
            if fence:
                logger.warning("session host %s has not answered for %g s: killing it before its sessions move",
                               lost, UNREACHABLE_S)
                try:
                    ray.kill(self.hosts[lost], no_restart=True)
                except Exception:
                    logger.debug("killing %s failed", lost, exc_info=True)
            self.dead.add(lost)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not self.stopped:
                verdict = _call(self.directory.claim_recovery.remote(session.name, lost), 10)
                if verdict == "go":
                    try:
                        target, _ = recover(session.name, {k: v for k, v in self.hosts.items() if k not in self.dead},
                                            self.directory, lost=lost)
                    except Exception as exc:
                        self.directory.recovered.remote(session.name, None)
                        logger.error("session %s (%s) lost with its host %s: %s", session.id, session.name, lost, exc)
                        session.mark_closed(f"lost with its host {lost}: {_unwrap(exc)}")
                        return False
                    _call(self.directory.recovered.remote(session.name, target), 10)
                    logger.warning("session %s (%s): host %s lost, re-created on %s", session.id, session.name, lost,
                                   target)
                    self._follow(session, target)
                    return True
                if verdict == "done":
                    target = _call(self.directory.host_of.remote(session.name), 10)
                    if target is None or target == lost:
                        session.mark_closed(f"lost with its host {lost}")
                        return False
                    self._follow(session, target)
                    return True
                time.sleep(0.5)
            session.mark_closed(f"lost with its host {lost}: no other host took it within 120 s")
            return False

    def _follow(self, session: RemoteSession, host: str) -> None:
        session.host = host
        session.moved_s = time.time()
        session._seq = 0  # the new host's stream starts with the `moved` event: read it all
        session._fresh = False


__all__ = ["RelayPushSource", "RemoteSession", "RemoteSessionManager", "SourceOpener"]
