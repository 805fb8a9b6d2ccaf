"""Ingest: every way frames reach the predictor, behind one call.

``open_source("rtsp://cam/stream")`` (or a file, folder, URL, camera, or
``push:NAME``) returns a :class:`VideoSource` yielding :class:`Frame` objects:
RGB, upright, optionally resized for the model, each with a frame index, the
source's PTS in seconds and the wall-clock arrival time.

Two delivery policies, picked by ``mode``:

* ``"live"`` (default for network streams, cameras and push sources): a
  decode thread keeps only the newest frame; the consumer always gets the
  freshest picture, older undelivered frames are dropped and counted, and no
  queue grows. Network sources time out instead of hanging, reconnect with
  backoff, and report ``dropped`` / ``reconnected`` events.
* ``"file"`` (default for files and folders): every frame in order, decoded
  ahead into a bounded queue so the model never waits on decoding.

Example::

    from tracker.ingest import open_source

    with open_source("rtsp://user:pw@10.0.0.5/stream", timeout_s=5, resize=1024) as source:
        for frame in source:              # newest frame each time
            predict(frame.image_rgb)      # frame.source_size: size to scale masks back to
            for event in source.events.drain():
                print(event.kind, event.message)   # credentials redacted

The server parses client-supplied sources with a :class:`SourcePolicy`
(``parse_source(uri, policy=...)`` or ``open_source(uri, policy=...)``): it is
checked before anything looks at the file system, and it travels with the spec,
so every URL the reader opens for it (HLS segments and keys, redirects,
reconnects) is checked too. Programs decoding full-resolution video in file mode may call
:func:`tracker.allocator.keep_freed_memory` once at start-up (an allocator setting:
decoded frames' buffers reused instead of page-faulted in again). What does not live here: the model, prompts, the network server.
The implementation is in :mod:`tracker.sources`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tracker.errors import SourceError
from tracker.sources.av_source import AVSource
from tracker.sources.base import VideoSource
from tracker.sources.delivery import EventKind, EventLog, FrameBuffer, SourceEvent, SourceStats
from tracker.sources.frame import Frame, FrameConverter, output_size_hw, quarter_turns
from tracker.sources.images import ImageFolderSource, list_image_files
from tracker.sources.push import PushSource
from tracker.sources.policy import HostPattern, SourcePolicy
from tracker.sources.spec import (
    NETWORK_KINDS,
    PREPROCESS_STEPS,
    SCHEMES,
    SourceSpec,
    parse_source,
    redact,
)

__all__ = [
    "AVSource",
    "EventKind",
    "EventLog",
    "Frame",
    "FrameBuffer",
    "FrameConverter",
    "HostPattern",
    "ImageFolderSource",
    "NETWORK_KINDS",
    "PREPROCESS_STEPS",
    "PushSource",
    "SCHEMES",
    "SourceEvent",
    "SourcePolicy",
    "SourceSpec",
    "SourceStats",
    "VideoSource",
    "list_image_files",
    "open_source",
    "output_size_hw",
    "parse_source",
    "quarter_turns",
    "redact",
]


def open_source(
    source: SourceSpec | str,
    *,
    policy: SourcePolicy | None = None,
    on_event: Callable[[SourceEvent], None] | None = None,
    **options: Any,
) -> VideoSource:
    """Open a source and start decoding it.

    Args:
        source: a source string (see :func:`parse_source`) or a parsed spec.
        policy: if given, the source must pass it (server side, for client input),
            and so must every URL the reader opens for it.
        on_event: called on the decode thread for each :class:`SourceEvent`;
            must return quickly. ``source.events`` records them either way.
        **options: source options (see :func:`parse_source`); only with a string.

    Returns:
        A started :class:`VideoSource`; use it as a context manager.

    Raises:
        SourceNotFoundError, SourceUnsupportedError, SourceConnectionError,
        SourceNotAllowedError, SourceError: with a message naming the source
        (credentials redacted) and what to do.
    """
    if isinstance(source, SourceSpec):
        if options:
            raise SourceError(f"options for {source.display} go to parse_source when passing a SourceSpec")
        spec = source
        if policy is not None:
            policy.check(spec)
            spec = dataclasses.replace(spec, policy=policy)
    else:
        spec = parse_source(source, policy=policy, **options)
    if spec.kind == "push":
        return PushSource(spec, on_event=on_event)
    if spec.kind == "images":
        return ImageFolderSource(spec, on_event=on_event)
    return AVSource(spec, on_event=on_event)
