"""The streaming bookkeeping every model family shares: which recent frames a
prompt may still name, and how many clicks one object may hold on a frame.

A live operator clicks on the frame on screen, which the model processed a
moment ago; the predictor must still hold what it needs to condition an object
there. Which frames those are does not depend on the model family, so it lives
here once: the window keeps the last ``min_prompt_frames`` frames however old,
more within ``prompt_window_s`` of the newest (source time, else arrival time),
never more than ``max_prompt_frames``. Each family keeps its own per-frame
payload (image features) for exactly the frames this window holds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from tracker.errors import FrameNotAvailableError, PromptError


@dataclass
class WindowFrame:
    """One processed frame in the prompt window."""

    frame_idx: int
    source_hw: tuple[int, int]
    pts_s: float | None
    arrival_s: float
    source_index: int | None
    payload: Any = None  # the family's features for this frame


class PromptWindow:
    """The recent frames a prompt may name, oldest first.

    ``on_drop`` is called with each frame that leaves the window, so a family can
    free the features it keeps elsewhere (a transformers session's cache).
    """

    def __init__(
        self,
        *,
        prompt_window_s: float = 2.0,
        max_prompt_frames: int = 60,
        min_prompt_frames: int = 4,
        on_drop: Callable[[WindowFrame], None] | None = None,
    ) -> None:
        self.prompt_window_s = float(prompt_window_s)
        self.max_prompt_frames = max(1, int(max_prompt_frames))
        self.min_prompt_frames = max(1, min(int(min_prompt_frames), self.max_prompt_frames))
        self._frames: OrderedDict[int, WindowFrame] = OrderedDict()
        self._on_drop = on_drop

    def __contains__(self, frame_idx: object) -> bool:
        return frame_idx in self._frames

    def __len__(self) -> int:
        return len(self._frames)

    def __iter__(self) -> Iterator[int]:
        return iter(self._frames)

    def get(self, frame_idx: int) -> WindowFrame | None:
        return self._frames.get(frame_idx)

    def __getitem__(self, frame_idx: int) -> WindowFrame:
        return self._frames[frame_idx]

    @property
    def newest(self) -> int | None:
        return next(reversed(self._frames)) if self._frames else None

    @property
    def oldest(self) -> int | None:
        return next(iter(self._frames)) if self._frames else None

    def add(
        self,
        frame_idx: int,
        source_hw: tuple[int, int],
        *,
        pts_s: float | None = None,
        arrival_s: float | None = None,
        source_index: int | None = None,
        payload: Any = None,
    ) -> WindowFrame:
        """Hold a new frame and let go of those the window no longer covers."""
        arrival = arrival_s if arrival_s is not None else time.time()
        entry = WindowFrame(frame_idx, (int(source_hw[0]), int(source_hw[1])), pts_s, arrival, source_index, payload)
        self._frames[frame_idx] = entry
        while len(self._frames) > self.max_prompt_frames:
            self._drop_oldest()
        newest_t = pts_s if pts_s is not None else arrival
        key = "pts_s" if pts_s is not None else "arrival_s"
        while len(self._frames) > self.min_prompt_frames:
            t = getattr(next(iter(self._frames.values())), key)
            if t is None or newest_t - t <= self.prompt_window_s:
                break
            self._drop_oldest()
        return entry

    def _drop_oldest(self) -> None:
        _, entry = self._frames.popitem(last=False)
        if self._on_drop is not None:
            self._on_drop(entry)

    def clear(self) -> None:
        while self._frames:
            self._drop_oldest()

    def frame_for_prompt(self, frame_idx: int | None) -> WindowFrame:
        """The frame a prompt names (default: the newest), or an error saying
        which frames are held and why."""
        if not self._frames:
            raise FrameNotAvailableError("no frame has been processed yet; prompt after the first frame arrives")
        if frame_idx is None:
            return self._frames[next(reversed(self._frames))]
        entry = self._frames.get(int(frame_idx))
        if entry is not None:
            return entry
        first, last = self.oldest, self.newest
        if frame_idx > last:  # type: ignore[operator]
            raise FrameNotAvailableError(f"frame {frame_idx} has not been processed yet (newest is {last})")
        if self.min_prompt_frames >= self.max_prompt_frames:
            kept = f"the last {self.max_prompt_frames} processed frames"
        else:
            kept = (
                f"the last {self.min_prompt_frames} processed frames, more within {self.prompt_window_s:g} s "
                f"of the newest, at most {self.max_prompt_frames}"
            )
        raise FrameNotAvailableError(
            f"frame {frame_idx} is older than the prompt window (frames {first}..{last}: {kept}); "
            f"prompt on a frame in it, e.g. the newest ({last})"
        )


def check_point_budget(limit: int, obj_id: int, frame_idx: int, n_points: int, clear_old_points: bool) -> None:
    """Refuse a prompt that would leave object ``obj_id`` with more than ``limit``
    clicks on ``frame_idx``: the prompt encoder's cost grows with them, and a
    client adding points without clearing them could otherwise grow one object's
    prompt without bound."""
    if n_points <= limit:
        return
    if clear_old_points:
        raise PromptError(f"a prompt has {n_points} points, more than the {limit} allowed per object and frame")
    raise PromptError(
        f"object {obj_id} would have {n_points} points on frame {frame_idx}, more than the {limit} "
        f"allowed per object and frame; send clear_old_points true to replace its points there, "
        f"or prompt on a newer frame"
    )
