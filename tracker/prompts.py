"""Checking click/box/mask prompts against a frame, and object ids, shared by
every entry point (live predictor, offline annotator, image mode), so a bad
prompt gets the same clear message wherever it comes from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tracker.errors import PromptError

#: object ids are 1 .. 2**31 - 1: what the protocol's ``obj_id`` (an int32 > 0)
#: and every export format can name
OBJ_ID_MIN = 1
OBJ_ID_MAX = 2**31 - 1


def check_obj_id(obj_id: Any) -> int:
    """``obj_id`` as an int, or a PromptError when it is not an integer in
    [OBJ_ID_MIN, OBJ_ID_MAX]."""
    if isinstance(obj_id, bool) or not isinstance(obj_id, (int, np.integer)):
        raise PromptError(f"object id must be an integer, got {obj_id!r}")
    if not OBJ_ID_MIN <= int(obj_id) <= OBJ_ID_MAX:
        raise PromptError(f"object id must be in [{OBJ_ID_MIN}, {OBJ_ID_MAX}], got {int(obj_id)}")
    return int(obj_id)


@dataclass
class CheckedPrompt:
    """A prompt that fits its frame; coordinates in source pixels.

    ``points_xy``/``labels`` hold clicks only (labels 1/0); the box is separate
    (SAM 2 adds it as two leading points labelled 2 and 3).
    """

    points_xy: np.ndarray  # (N, 2) float32
    labels: np.ndarray  # (N,) int32
    box_xyxy: np.ndarray | None  # (4,) float32
    mask_hw: np.ndarray | None  # bool

    def sam_points(self) -> tuple[np.ndarray, np.ndarray]:
        """Box corners first (labels 2, 3), then the clicks, as SAM 2 was trained."""
        if self.box_xyxy is None:
            return self.points_xy, self.labels
        return (
            np.concatenate([self.box_xyxy.reshape(2, 2), self.points_xy], axis=0),
            np.concatenate([np.array([2, 3], dtype=np.int32), self.labels]),
        )


def check_prompt(size_hw: tuple[int, int], points_xy: Any = None, labels: Any = None, box_xyxy: Any = None, mask_hw: Any = None) -> CheckedPrompt:
    """Validate one prompt for a frame of ``size_hw``; raise PromptError saying what is wrong."""
    h, w = size_hw
    empty_pts, empty_lbl = np.zeros((0, 2), dtype=np.float32), np.zeros((0,), dtype=np.int32)
    if mask_hw is not None:
        if points_xy is not None or box_xyxy is not None:
            raise PromptError("give either a mask or points/box for one prompt, not both")
        mask = np.asarray(mask_hw)
        if mask.ndim != 2:
            raise PromptError(f"mask must be H x W, got shape {mask.shape}")
        if mask.shape != (h, w):
            raise PromptError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the frame is {w}x{h}")
        return CheckedPrompt(empty_pts, empty_lbl, None, mask.astype(bool))
    if (points_xy is None) != (labels is None):
        raise PromptError("points and labels must be given together")
    if points_xy is None and box_xyxy is None:
        raise PromptError("a prompt needs points, a box or a mask")
    coords, lbls = empty_pts, empty_lbl
    if points_xy is not None:
        coords = np.asarray(points_xy, dtype=np.float32).reshape(-1, 2) if len(points_xy) else coords
        raw = np.asarray(labels).reshape(-1)
        if len(coords) == 0 and box_xyxy is None:
            raise PromptError("the point list is empty; give at least one point")
        if len(raw) != len(coords):
            raise PromptError(f"{len(coords)} points but {len(raw)} labels")
        if len(raw) and not np.isin(raw, (0, 1)).all():
            raise PromptError(f"labels must be 1 (positive) or 0 (negative), got {raw.tolist()}")
        if not np.isfinite(coords).all():
            raise PromptError("point coordinates must be finite numbers")
        outside = (coords[:, 0] < 0) | (coords[:, 0] > w - 1) | (coords[:, 1] < 0) | (coords[:, 1] > h - 1)
        if outside.any():
            x, y = coords[np.flatnonzero(outside)[0]]
            raise PromptError(f"point ({x:g}, {y:g}) is outside the {w}x{h} frame")
        lbls = raw.astype(np.int32)
    box = None
    if box_xyxy is not None:
        box = np.asarray(box_xyxy, dtype=np.float32).reshape(-1)
        if box.shape != (4,) or not np.isfinite(box).all():
            raise PromptError(f"box must be 4 numbers x0, y0, x1, y1, got {np.asarray(box_xyxy).ravel().tolist()}")
        x0, y0, x1, y1 = box.tolist()
        if not (x1 > x0 and y1 > y0):
            raise PromptError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty: need x0 < x1 and y0 < y1")
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise PromptError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the {w}x{h} frame")
    return CheckedPrompt(coords, lbls, box, None)
