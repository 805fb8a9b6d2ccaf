"""What every streaming predictor does the same way, whatever the model family:
the frame check, ``track`` (the next frame, encoded then propagated) and the
one-kind prompt shortcuts over ``add_prompt``. The prompt window and the point
budget live in :mod:`tracker.prompt_window`; a family's predictor adds only
what its model needs (encoder calls, memories, pruning)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from tracker.errors import FrameError
from tracker.results import FrameResult, ObjectResult


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
