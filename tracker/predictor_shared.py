"""What every streaming predictor does the same way, whatever the model family:
the frame check, ``track`` (the next frame, encoded then propagated) and the
one-kind prompt shortcuts over ``add_prompt``. The prompt window and the point
budget live in :mod:`tracker.prompt_window`; a family's predictor adds only
what its model needs (encoder calls, memories, pruning)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from tracker.errors import FrameError
from tracker.results import FrameResult, ObjectResult


@dataclass(frozen=True)
class PreparedFrame:
    """A frame already resized to the model's S x S, ready for the encoder.

    Made by a predictor's ``prepare_frame``, which is safe to call on
    another thread: an offline reader resizes (and, on CUDA, pins) the next
    frames while the model works on this one, so decoding and preprocessing
    overlap inference instead of adding to it.
    """

    image: np.ndarray  # S x S x 3 uint8 RGB
    pixels: torch.Tensor  # ``image`` as a tensor (a pinned copy when the model is on CUDA)
    source_size: tuple[int, int]  # (height, width) before the resize



def check_rgb_frame(image_rgb: Any) -> np.ndarray:
    """A frame as H x W x 3 uint8 RGB numpy, or a FrameError saying what it is instead."""
    if isinstance(image_rgb, torch.Tensor):
        image_rgb = image_rgb.detach().cpu().numpy()
    if not isinstance(image_rgb, np.ndarray):
        raise FrameError(f"frame must be a numpy array or torch tensor, got {type(image_rgb).__name__}")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise FrameError(f"frame must be H x W x 3 RGB, got shape {tuple(image_rgb.shape)}")
    if image_rgb.dtype != np.uint8:
        raise FrameError(f"frame must be uint8 RGB, got dtype {image_rgb.dtype}")
    h, w = image_rgb.shape[:2]
    if h < 1 or w < 1:
        raise FrameError(f"frame is empty: shape {tuple(image_rgb.shape)}")
    return image_rgb


class StreamingMethods:
    """``track`` and the prompt shortcuts, for a predictor with ``encode``,
    ``propagate``, ``add_prompt``, ``_lock`` and ``_next_frame_idx``."""

    _lock: Any
    _next_frame_idx: int
    device: torch.device
    image_size: int

    def prepare(self, image_rgb: Any) -> np.ndarray: ...  # type: ignore[empty-body]  # noqa: D102  (the family's)

    def _frame_pixels(self, image_ss: np.ndarray) -> torch.Tensor: ...  # type: ignore[empty-body]  # noqa: D102

    def prepare_frame(self, image_rgb: np.ndarray | torch.Tensor, source_size: tuple[int, int] | None = None) -> PreparedFrame:
        """``prepare`` for a reader thread: touches no tracking state.

        On CUDA the pixels are copied to pinned memory, so the copy to the GPU
        in ``encode`` is asynchronous. ``source_size`` defaults to the frame's
        own (height, width).
        """
        image = self.prepare(image_rgb)
        if source_size is None:
            source_size = (int(image_rgb.shape[0]), int(image_rgb.shape[1]))
        pixels = self._frame_pixels(image)
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()
        return PreparedFrame(image, pixels, (int(source_size[0]), int(source_size[1])))

    def _prepared_pixels(self, frame: PreparedFrame) -> torch.Tensor:
        """A prepared frame's tensor on the device, once it is known to fit this model."""
        if frame.image.shape[:2] != (self.image_size, self.image_size):
            raise FrameError(
                f"prepared frame is {frame.image.shape[1]}x{frame.image.shape[0]}, "
                f"this model takes {self.image_size}x{self.image_size}: prepare it with this predictor"
            )
        return frame.pixels.to(self.device, non_blocking=True)

    def encode(self, frame_idx: int, image_rgb: Any, **timing: Any) -> None: ...  # noqa: D102  (the family's)

    def propagate(self, frame_idx: int, **kw: Any) -> FrameResult: ...  # type: ignore[empty-body]  # noqa: D102

    def add_prompt(self, obj_id: int, **prompt: Any) -> ObjectResult: ...  # type: ignore[empty-body]  # noqa: D102

    @torch.inference_mode()
    def track(
        self,
        image_rgb: np.ndarray | torch.Tensor,
        *,
        pts_s: float | None = None,
        arrival_s: float | None = None,
        source_index: int | None = None,
        source_size: tuple[int, int] | None = None,
    ) -> FrameResult:
        """Take the next frame, track every object on it, return their masks.

        Args:
            image_rgb: H x W x 3 uint8 RGB (numpy or torch).
            pts_s / arrival_s / source_index: carried into the result.
            source_size: (height, width) the frame had before any resize on
                decode; masks and prompt coordinates use it. Default: image size.
        """
        with self._lock:
            frame_idx = self._next_frame_idx
            self.encode(
                frame_idx, image_rgb, pts_s=pts_s, arrival_s=arrival_s, source_index=source_index, source_size=source_size
            )
            return self.propagate(frame_idx)

    def add_points(
        self,
        obj_id: int,
        points_xy: Sequence[Sequence[float]] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        *,
        frame_idx: int | None = None,
        clear_old_points: bool = True,
    ) -> ObjectResult:
        return self.add_prompt(
            obj_id, points_xy=points_xy, labels=labels, frame_idx=frame_idx, clear_old_points=clear_old_points
        )

    def add_box(
        self,
        obj_id: int,
        box_xyxy: Sequence[float],
        *,
        points_xy: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        frame_idx: int | None = None,
    ) -> ObjectResult:
        return self.add_prompt(obj_id, box_xyxy=box_xyxy, points_xy=points_xy, labels=labels, frame_idx=frame_idx)

    def add_mask(self, obj_id: int, mask_hw: np.ndarray, *, frame_idx: int | None = None) -> ObjectResult:
        return self.add_prompt(obj_id, mask_hw=mask_hw, frame_idx=frame_idx)
