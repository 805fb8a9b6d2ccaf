"""A folder of JPEG/PNG frames, the layout Meta's SAM 2 tools read and write.

Decoded with OpenCV rather than PyAV: each file is a separate image, and
OpenCV decodes a JPEG in one call without a demuxer per file. Files are
ordered the way SAM 2's ``load_video_frames`` orders them (by the integer in
the name, ``00000.jpg``...), with a natural sort for other names, and a frame's
index is its position in that order, so indices match annotation file names
even when an unreadable file is skipped.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

import av.error

from tracker.errors import SourceError, SourceNotAllowedError, SourceNotFoundError, SourceUnsupportedError
from tracker.sources.base import Pacer, ThreadedSource
from tracker.sources.delivery import SourceEvent
from tracker.sources.frame import FrameConverter
from tracker.sources.policed_io import open_file_checked
from tracker.sources.policy import SourcePolicy
from tracker.sources.spec import IMAGE_SUFFIXES, SourceSpec

log = logging.getLogger("tracker.ingest")

def list_image_files(folder: Path) -> list[Path]:
    """The folder's JPEG/PNG files in frame order (numeric names numerically, others naturally)."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]

    def key(path: Path) -> tuple[int, tuple[object, ...]]:
        if path.stem.isdigit():
            return 0, (int(path.stem), path.name)
        parts = re.split(r"(\d+)", path.name)
        return 1, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)

    return sorted(files, key=key)


def read_image_rgb(path: Path, policy: SourcePolicy | None = None, display: str = "") -> np.ndarray | None:
    """H x W x 3 uint8 RGB, or None if the file cannot be decoded.

    EXIF orientation is ignored on purpose: SAM 2's loader (PIL) ignores it, and
    masks annotated on those frames are in the stored orientation. With a
    ``policy``, the file opened is checked against it (a symlink swapped in
    after the folder was checked raises :class:`SourceNotAllowedError`).
    """
    try:
        if policy is None:
            data = np.fromfile(path, np.uint8)
        else:
            with open_file_checked(str(path), policy, display) as f:
                data = np.frombuffer(f.read(), np.uint8)
    except (OSError, av.error.FFmpegError, SourceUnsupportedError):
        return None
    image_bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image_bgr is None:
        return None
    return cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)


class ImageFolderSource(ThreadedSource):
    """Frames of an image folder, read on a thread (see the module doc)."""

    def __init__(
        self,
        spec: SourceSpec,
        policy: SourcePolicy | None = None,
        on_event: Callable[[SourceEvent], None] | None = None,
    ) -> None:
        super().__init__(spec, on_event)
        policy = policy or spec.policy
        self._policy = policy
        folder = Path(spec.location)
        if not folder.exists():
            raise SourceNotFoundError(f"source not found: {spec.display} (no such folder)")
        if not folder.is_dir():
            raise SourceUnsupportedError(f"cannot read {spec.display}: images: needs a folder, not a file")
        self._files = list_image_files(folder)
        if not self._files:
            raise SourceUnsupportedError(f"cannot read {spec.display}: the folder has no .jpg, .jpeg or .png frames")
        if policy is not None and not all(policy.allows_path(p) for p in self._files):
            raise SourceNotAllowedError(f"source {spec.display} not allowed: a frame file links outside the allowed folders")
        self._converter = FrameConverter(spec)
        self.fps = spec.fps
        first = read_image_rgb(self._files[0], policy, spec.display)
        if first is not None:
            self.size = (first.shape[0], first.shape[1])
        log.info("opened %s: %d frames, %s mode", spec.display, len(self._files), spec.mode)
        self._start()

    def _run(self) -> None:
        fps = self.spec.fps
        pacer = Pacer(self._stop, fps) if self.spec.realtime else None
        for position, path in enumerate(self._files):
            if self._stop.is_set():
                return
            try:
                image_rgb = read_image_rgb(path, self._policy, self.spec.display)
            except SourceError as exc:
                self._fail(exc)
                return
            if image_rgb is None:
                self._buffer.count(decode_errors=1)
                log.warning("%s: skipping %s (not a readable image)", self.spec.display, path.name)
                continue
            pts_s = position / fps if fps else None
            if pacer is not None and not pacer.wait(pts_s):
                return
            self._next_index = position
            frame = self._converter.from_array(image_rgb, position, pts_s, time.time())
            self._next_index = position + 1
            if not self._buffer.put(frame):
                return
        self._end()
