"""What the engine hands out per processed frame.

Plain dataclasses so the server, the exporters and user code share one shape.
Masks are at the *source* resolution (what the user sees), not the model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tracker.masks import mask_box_xyxy  # noqa: F401  (re-exported for result consumers)


@dataclass
class ObjectResult:
    """One object's outcome on one frame.

    ``score`` is SAM 2's object-score logit: > 0 means the model thinks the object
    is visible; the mask is empty when it is not.
    """

    obj_id: int
    mask_hw: np.ndarray  # bool, source H x W
    score: float
    logits_hw: np.ndarray | None = None  # float32 mask logits at source H x W
    box_xyxy: tuple[int, int, int, int] | None = None  # inclusive pixel bounds
    is_prompted: bool = False  # this frame carried a prompt for this object

    @property
    def visible(self) -> bool:
        return self.score > 0.0

    @property
    def area(self) -> int:
        return int(self.mask_hw.sum())


@dataclass
class FrameResult:
    """All tracked objects on one processed frame, with the frame's timestamps."""

    frame_idx: int
    height: int
    width: int
    pts_s: float | None = None  # source presentation time, seconds
    arrival_s: float | None = None  # wall clock when the frame reached us
    processed_s: float | None = None  # wall clock when the result was ready
    source_index: int | None = None  # the source's own frame counter (may skip: live drops)
    objects: dict[int, ObjectResult] = field(default_factory=dict)

    @property
    def obj_ids(self) -> list[int]:
        return list(self.objects)
