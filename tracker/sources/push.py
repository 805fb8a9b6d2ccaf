"""Frames handed in by code: WebRTC tracks, a robot client, tests.

The pusher's thread does the resize/preprocess work, so a slow consumer never
slows the pusher down in live mode (the newest frame replaces an undelivered
one, as for a camera). In file mode ``push`` blocks while the bounded queue is
full: back-pressure for offline producers that must not lose frames.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tracker.errors import FrameError
from tracker.sources.base import VideoSource
from tracker.sources.delivery import SourceEvent
from tracker.sources.frame import FrameConverter
from tracker.sources.spec import SourceSpec, parse_source


class PushSource(VideoSource):
    """A source fed by :meth:`push`; ``PushSource("robot1")`` or ``open_source("push:robot1")``."""

    def __init__(
        self,
        spec_or_name: SourceSpec | str = "push",
        on_event: Callable[[SourceEvent], None] | None = None,
        **options: Any,
    ) -> None:
        if isinstance(spec_or_name, SourceSpec):
            spec = spec_or_name
        else:
            uri = spec_or_name if spec_or_name.startswith("push:") else f"push:{spec_or_name}"
            spec = parse_source(uri, **options)
        super().__init__(spec, on_event)
        self._converter = FrameConverter(spec)
        self._lock = threading.Lock()  # one pusher at a time: indices follow push order
        self._ended = False

    @property
    def name(self) -> str:
        return self.spec.location

    def push(self, image_rgb: np.ndarray, pts_s: float | None = None) -> bool:
        """Hand in one H x W x 3 uint8 RGB frame; False once the consumer closed the source.

        The array is copied unless resizing/preprocessing already made a new
        one, so the caller may reuse its buffer.

        Raises:
            FrameError: ``image_rgb`` is not an H x W x 3 uint8 array.
        """
        if not isinstance(image_rgb, np.ndarray) or image_rgb.ndim != 3 or image_rgb.shape[2] != 3 \
                or image_rgb.dtype != np.uint8 or 0 in image_rgb.shape:
            shape = getattr(image_rgb, "shape", None)
            dtype = getattr(image_rgb, "dtype", type(image_rgb).__name__)
            raise FrameError(
                f"push source {self.name}: image_rgb must be an H x W x 3 uint8 array, got shape {shape} dtype {dtype}"
            )
        with self._lock:
            if self._buffer.closed or self._ended:
                return False
            frame = self._converter.from_array(image_rgb, self._next_index, pts_s, time.time())
            if np.may_share_memory(frame.image_rgb, image_rgb):
                frame.image_rgb = frame.image_rgb.copy()
            self._next_index += 1
            self.size = frame.source_size
            return self._buffer.put(frame)

    def end(self) -> None:
        """No more frames: consumers finish after the frames already pushed."""
        with self._lock:
            if not self._ended:
                self._ended = True
                self._end()
