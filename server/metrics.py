"""Prometheus metrics of a running server, served as text at ``GET /metrics``.

Two kinds of figures:

* measured as things happen (histograms and counters kept here): per-stage
  latency of every delivered frame, frames sent to clients and dropped for slow
  clients, requests and errors by type/code, connections;
* read from the live objects when scraped (a custom collector calling a
  snapshot function the server provides): sessions, clients, objects, frames
  in / processed / dropped per session, inference-worker steps and batch fill.

Each server owns its own registry (not prometheus_client's global one), so
several servers in one process (tests, benchmarks) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: seconds; from sub-millisecond serialisation to multi-second CPU model steps
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)

#: stages of :attr:`ServerMetrics.stage_seconds`
STAGES: tuple[str, ...] = ("queue", "encode", "track", "serialize", "deliver", "total")

CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass
class SessionSample:
    session_id: str
    name: str
    frames_in: int
    frames_processed: int
    frames_dropped: int  # replaced in the session's mailbox (model busy)
    source_dropped: int  # replaced in the source's buffer (reader busy)
    step_errors: int
    objects: int
    subscribers: int


@dataclass
class ClientSample:
    client_id: int
    frames_sent: int
    frames_dropped: int


@dataclass
class Snapshot:
    """What the server reports about itself at scrape time."""

    sessions: list[SessionSample] = field(default_factory=list)
    clients: list[ClientSample] = field(default_factory=list)
    worker_steps: int = 0
    worker_batched_frames: int = 0
    #: image mode's figures (``server.protocol.ImagesStatsInfo``), None where it is off
    images: Any = None


class _StateCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield GaugeMetricFamily("sam2_stream_sessions", "Open tracking sessions", value=len(snap.sessions))
        yield GaugeMetricFamily("sam2_stream_clients", "Connected WebSocket clients", value=len(snap.clients))
        yield GaugeMetricFamily(
            "sam2_stream_objects", "Objects tracked, all sessions", value=sum(s.objects for s in snap.sessions)
        )
        labels = ["session", "name"]
        families = {
            "objects": GaugeMetricFamily("sam2_stream_session_objects", "Objects tracked by a session", labels=labels),
            "subscribers": GaugeMetricFamily(
                "sam2_stream_session_subscribers", "Clients subscribed to a session", labels=labels
            ),
            "frames_in": CounterMetricFamily(
                "sam2_stream_frames_in", "Frames a session's reader handed to the model", labels=labels
            ),
            "frames_processed": CounterMetricFamily(
                "sam2_stream_frames_processed", "Frames the model processed", labels=labels
            ),
            "step_errors": CounterMetricFamily(
                "sam2_stream_step_errors", "Failed model steps (frame dropped, session kept)", labels=labels
            ),
        }
        dropped = CounterMetricFamily(
            "sam2_stream_frames_dropped",
            "Frames replaced by a newer one before use: where=source (reader busy) or worker (model busy)",
            labels=labels + ["where"],
        )
        for s in snap.sessions:
            values = [s.session_id, s.name]
            for key, family in families.items():
                family.add_metric(values, getattr(s, key))
            dropped.add_metric(values + ["source"], s.source_dropped)
            dropped.add_metric(values + ["worker"], s.frames_dropped)
        yield from families.values()
        yield dropped
        per_client = GaugeMetricFamily(
            "sam2_stream_client_dropped_frames",
            "Frames replaced before a connected client took them (it reads slower than results come)",
            labels=["client"],
        )
        for c in snap.clients:
            per_client.add_metric([str(c.client_id)], c.frames_dropped)
        yield per_client
        yield CounterMetricFamily(
            "sam2_stream_worker_steps", "Inference worker steps (one image-encoder call each)", value=snap.worker_steps
        )
        yield CounterMetricFamily(
            "sam2_stream_worker_batched_frames",
            "Frames through the image encoder; / steps = mean batch size",
            value=snap.worker_batched_frames,
        )
        im = snap.images
        if im is not None:
            for name, doc, value in (
                ("cache_hits", "Image embeddings found in the cache", im.cache_hits),
                ("cache_misses", "Image embeddings not in the cache (encoded)", im.cache_misses),
                ("cache_evictions", "Image embeddings evicted to stay within the budget", im.cache_evictions),
                ("encoder_batches", "Image-encoder calls for images", im.encoder_batches),
                ("encoded", "Images through those calls; / encoder_batches = mean batch", im.images_encoded),
                ("segments", "Image prompts answered", im.segments),
                ("recomputed", "Image prompts whose evicted embedding was encoded again", im.recomputed),
            ):
                yield CounterMetricFamily(f"sam2_stream_images_{name}", doc, value=value)
            for name, doc, value in (
                ("cache_bytes", "Bytes the cached image embeddings hold", im.cache_bytes),
                ("cache_entries", "Image embeddings cached", im.cache_entries),
                ("cache_budget_bytes", "The image embedding cache's budget ([images] cache_bytes)", im.cache_budget_bytes),
                ("open", "Images open, all clients", im.open_images),
            ):
                yield GaugeMetricFamily(f"sam2_stream_images_{name}", doc, value=value)


class ServerMetrics:
    """The registry behind ``/metrics`` and the instruments the server updates."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.stage_seconds = Histogram(
            "sam2_stream_stage_seconds",
            "Per-frame latency by stage: queue (waiting for the inference worker), encode (image encoder share), "
            "track (memory attention, heads, memory encoder), serialize (mask and JSON encoding), deliver "
            "(masks ready to written to a client), total (frame arrival to written to a client)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.frames_sent = Counter("sam2_stream_frames_sent", "Frame messages written to clients", registry=self.registry)
        self.client_frames_dropped = Counter(
            "sam2_stream_client_frames_dropped",
            "Frame messages replaced by a newer one before a slow client took them",
            registry=self.registry,
        )
        self.requests = Counter("sam2_stream_requests", "Requests by type", ["type"], registry=self.registry)
        self.errors = Counter("sam2_stream_errors", "Error replies by code", ["code"], registry=self.registry)
        self.connections = Counter("sam2_stream_connections", "WebSocket connections accepted", registry=self.registry)
        self.registry.register(_StateCollector(snapshot))

    def observe(self, stage: str, seconds: float | None) -> None:
        if seconds is not None and seconds >= 0:
            self.stage_seconds.labels(stage).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything above."""
        return generate_latest(self.registry)
