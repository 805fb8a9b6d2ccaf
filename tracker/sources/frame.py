"""Frames as the predictor sees them, and the conversion that makes them.

:class:`Frame` is what every source yields. :class:`FrameConverter` turns a
decoded ``av.VideoFrame`` (or an RGB array from a folder or a push) into one:
display-matrix rotation applied, RGB, optionally resized for the model and
cleaned up with OpenCV. It runs on the decode thread, so the consumer (the
model) receives frames ready to use.

Colour: PyAV 18 converts through ``sws_scale_frame`` with the frame's own
colour matrix and range, so BT.709, full-range ``yuvj*`` and 10-bit frames come
out right without extra arguments (the tests check this against FFmpeg and
against the BT.709 formula).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import av
import cv2
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

from tracker.sources.spec import SourceSpec

log = logging.getLogger("tracker.ingest")

_ROTATE_CODES = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}


@dataclass(eq=False)
class Frame:
    """One video frame, ready for the predictor.

    Attributes:
        index: the source's frame counter; strictly increasing, continues across
            reconnects; a gap means frames were dropped (live mode) or lost.
        pts_s: presentation time in seconds as the source stamped it
            (``pts * time_base``), or ``None`` when the source has none. It is
            the source's clock: it may start anywhere and restarts when a
            server restarts.
        arrival_s: wall clock (``time.time()``) when the frame left the decoder.
        image_rgb: H x W x 3 uint8, C-contiguous, upright, resized if asked.
        source_size: (height, width) of the upright frame before any resize:
            what masks must be scaled back to.
    """

    index: int
    pts_s: float | None
    arrival_s: float
    image_rgb: np.ndarray
    source_size: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of :attr:`image_rgb`."""
        return self.image_rgb.shape[0], self.image_rgb.shape[1]


def quarter_turns(rotation_deg: float) -> int:
    """Counter-clockwise quarter turns that make a frame upright.

    ``rotation_deg`` is FFmpeg's display-matrix angle (``frame.rotation``,
    counter-clockwise); players rotate by it, as ``ffmpeg``'s autorotate does.
    Angles that are not multiples of 90 are rounded to the nearest one.
    """
    return int(round(rotation_deg / 90.0)) % 4


def output_size_hw(
    source_hw: tuple[int, int], resize_wh: tuple[int, int] | None, max_side: int | None
) -> tuple[int, int]:
    """(height, width) a frame of ``source_hw`` is delivered at.

    ``resize_wh`` forces a size; ``max_side`` only ever shrinks, keeping the
    aspect ratio, so small sources are not blown up for nothing.
    """
    height, width = source_hw
    if resize_wh is not None:
        return resize_wh[1], resize_wh[0]
    if max_side is not None and max(height, width) > max_side:
        scale = max_side / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))
    return height, width


class FrameConverter:
    """Makes :class:`Frame` objects for one source; not shared between threads.

    Keeps one swscale context (re-used while the frame geometry stays the same,
    which is most of the cost saved) and one CLAHE object.
    """

    def __init__(self, spec: SourceSpec, interpolation: Interpolation = Interpolation.BILINEAR) -> None:
        self._resize_wh = spec.resize_wh
        self._max_side = spec.max_side
        self._autorotate = spec.autorotate
        self._steps = spec.preprocess
        self._interpolation = interpolation
        self._reformatter = VideoReformatter()
        self._clahe: cv2.CLAHE | None = None

    def from_av(self, av_frame: av.VideoFrame, index: int, arrival_s: float) -> Frame:
        """Convert a decoded frame: rotate, RGB and resize in one swscale pass, then preprocess."""
        turns = quarter_turns(av_frame.rotation) if self._autorotate else 0
        raw_hw = (av_frame.height, av_frame.width)
        upright_hw = (raw_hw[1], raw_hw[0]) if turns % 2 else raw_hw
        out_h, out_w = output_size_hw(upright_hw, self._resize_wh, self._max_side)
        scale_w, scale_h = (out_h, out_w) if turns % 2 else (out_w, out_h)
        rgb_frame = self._reformatter.reformat(
            av_frame, width=scale_w, height=scale_h, format="rgb24", interpolation=self._interpolation
        )
        image_rgb: np.ndarray = rgb_frame.to_ndarray()
        if turns:
            image_rgb = cv2.rotate(image_rgb, _ROTATE_CODES[turns])
        image_rgb = self._preprocess(np.ascontiguousarray(image_rgb))
        return Frame(index, frame_pts_s(av_frame), arrival_s, image_rgb, upright_hw)

    def from_array(self, image_rgb: np.ndarray, index: int, pts_s: float | None, arrival_s: float) -> Frame:
        """Convert an RGB array (folders, push): resize with OpenCV, then preprocess."""
        source_hw = (image_rgb.shape[0], image_rgb.shape[1])
        out_h, out_w = output_size_hw(source_hw, self._resize_wh, self._max_side)
        if (out_h, out_w) != source_hw:
            shrink = out_h * out_w < source_hw[0] * source_hw[1]
            image_rgb = cv2.resize(image_rgb, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        image_rgb = self._preprocess(np.ascontiguousarray(image_rgb))
        return Frame(index, pts_s, arrival_s, image_rgb, source_hw)

    def _preprocess(self, image_rgb: np.ndarray) -> np.ndarray:
        for step in self._steps:
            if step == "clahe":
                # Equalise lightness only, so colours do not shift: dim, foggy and
                # backlit footage gains local contrast for the image encoder.
                if self._clahe is None:
                    self._clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
                lab = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2LAB)
                lab[..., 0] = self._clahe.apply(np.ascontiguousarray(lab[..., 0]))
                image_rgb = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
            elif step == "denoise":
                # Edge-preserving and a few ms per frame: fine for live use.
                image_rgb = cv2.bilateralFilter(image_rgb, d=5, sigmaColor=40, sigmaSpace=5)
            elif step == "denoise_nlm":
                # Much stronger and ~100x slower: for offline annotation of noisy footage.
                image_rgb = cv2.fastNlMeansDenoisingColored(image_rgb, None, 5, 5, 7, 21)
        return image_rgb


def frame_pts_s(av_frame: av.VideoFrame) -> float | None:
    """The frame's presentation time in seconds, falling back to its DTS; None if neither."""
    stamp = av_frame.pts if av_frame.pts is not None else av_frame.dts
    if stamp is None or av_frame.time_base is None:
        return None
    return float(stamp * av_frame.time_base)
