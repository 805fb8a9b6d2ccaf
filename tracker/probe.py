"""What a local source says about itself before any model work: size, frame rate, frame count.

The command line checks what can be checked before it loads a model (seconds)
or decodes a video (minutes): that the source exists, that no prompt is on a
frame past the end, and that no point or box lies outside the frame. It asks
:func:`probe_source`, which reads only what is cheap:

* a video file: the container's header (PyAV), one decoded frame for the
  upright size (FFmpeg's display matrix, read from the frame as the ingest
  reads it), and the frame count from the header or, where the container keeps
  none (Matroska, MPEG-TS...), from its packets, demuxed without decoding;
* an image folder: the number of frame files and the first one's size, read
  from its header.

Network streams, cameras and push sources are not probed (opening them is the
real work; they have no frame count): their probe knows nothing.

A header's count can be wrong (a truncated file): it is good for the checks and
a progress bar, not for results. What needs the exact count (the object-pointer
window of a short clip in :mod:`tracker.annotate`) counts decoded frames.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tracker.errors import PromptError, SourceNotFoundError, SourceUnsupportedError

logger = logging.getLogger(__name__)

#: where :attr:`SourceProbe.frame_count` came from
CountSource = Literal["folder", "header", "packets", "none"]


@dataclass(frozen=True)
class SourceProbe:
    """A source's geometry and length, as far as they are known without decoding it."""

    display: str  #: the source as messages name it (credentials redacted)
    kind: str  #: the ingest's kind: file, images, rtsp, http, ...
    size_hw: tuple[int, int] | None = None  #: upright (height, width) before any resize
    fps: float | None = None
    frame_count: int | None = None  #: None: unknown (a live source, or not counted)
    count_from: CountSource = "none"

    @property
    def is_local(self) -> bool:
        """A file or an image folder: frames in order, a known length."""
        return self.kind in ("file", "images")

    def check_frame(self, frame_idx: int) -> None:
        """PromptError when ``frame_idx`` lies past the end (where the length is known)."""
        if self.frame_count is not None and frame_idx >= self.frame_count:
            raise PromptError(f"prompt on frame {frame_idx} but {self.display} has only {self.frame_count} frames")


def probe_source(source: str, *, count_frames: bool = True, **options: Any) -> SourceProbe:
    """Probe ``source`` (a source string as :func:`tracker.ingest.open_source` takes it).

    Args:
        count_frames: where the container keeps no frame count, demux the whole
            file to count its packets (I/O only, no decoding); False leaves the
            count unknown there.
        **options: source options (``autorotate`` matters here; all are checked).

    Raises:
        SourceNotFoundError, SourceUnsupportedError, SourceError: as opening the
            source would, with the same messages.
    """
    from tracker.ingest import parse_source

    spec = parse_source(source, **{"mode": "file", **options})
    if spec.kind == "images":
        return _probe_folder(spec)
    if spec.kind == "file":
        return _probe_file(spec, count_frames)
    return SourceProbe(spec.display, spec.kind)


def _probe_folder(spec: Any) -> SourceProbe:
    from PIL import Image

    from tracker.ingest import list_image_files

    folder = Path(spec.location)
    if not folder.exists():
        raise SourceNotFoundError(f"source not found: {spec.display} (no such folder)")
    if not folder.is_dir():
        raise SourceUnsupportedError(f"cannot read {spec.display}: images: needs a folder, not a file")
    files = list_image_files(folder)
    if not files:
        raise SourceUnsupportedError(f"cannot read {spec.display}: the folder has no .jpg, .jpeg or .png frames")
    size_hw = None
    for path in files[:8]:  # an unreadable file is skipped by the reader too
        try:
            with Image.open(path) as image:  # the header only; EXIF orientation ignored, as the reader does
                size_hw = (image.height, image.width)
            break
        except OSError:
            continue
    return SourceProbe(spec.display, spec.kind, size_hw, spec.fps, len(files), "folder")


def _probe_file(spec: Any, count_frames: bool) -> SourceProbe:
    import av

    from tracker.sources.av_reader import configure_decoder, open_container
    from tracker.sources.frame import quarter_turns

    opened = open_container(spec)
    container, stream = opened.container, opened.stream
    try:
        configure_decoder(stream, live=True)  # slice threads: the first frame comes out of the first packets
        codec = stream.codec_context
        header = int(stream.frames or 0)
        first, packets = None, 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                packets += 1
                if first is None:
                    try:
                        first = next(iter(codec.decode(packet)), None)
                    except av.error.FFmpegError:
                        continue  # a damaged packet: the reader skips it too
                elif header or not count_frames:
                    break
            if first is None:
                first = next(iter(codec.decode(None)), None)
        except av.error.FFmpegError as exc:  # unreadable data further on: count what was read
            logger.debug("probing %s stopped after %d packets: %s", spec.display, packets, exc)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate  # as the ingest reads it
        fps = float(rate) if rate else None
        if first is not None:
            turns = quarter_turns(first.rotation) if spec.autorotate else 0
            size_hw = (first.width, first.height) if turns % 2 else (first.height, first.width)
        else:
            size_hw = None  # nothing decodes: the reader will say so
    finally:
        opened.close()
    if header:
        return SourceProbe(spec.display, spec.kind, size_hw, fps, header, "header")
    if count_frames:
        return SourceProbe(spec.display, spec.kind, size_hw, fps, packets, "packets")
    return SourceProbe(spec.display, spec.kind, size_hw, fps)


def check_points(
    size_hw: tuple[int, int] | None,
    prompts: Iterable[tuple[str, list[list[float]] | None, list[int] | None, list[float] | None]],
) -> None:
    """Check ``(where, points_xy, labels, box_xyxy)`` prompts against a frame of ``size_hw``.

    ``where`` starts the message ("prompt for object 1 on frame 0"). Nothing is
    checked when the size is unknown (a live source): the predictor checks
    every prompt against its frame anyway.
    """
    from tracker.prompts import check_prompt

    if size_hw is None:
        return
    for where, points_xy, labels, box_xyxy in prompts:
        try:
            check_prompt(size_hw, points_xy, labels, box_xyxy)
        except PromptError as e:
            raise PromptError(f"{where}: {e}") from None


__all__ = ["SourceProbe", "check_points", "probe_source"]
