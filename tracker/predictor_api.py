"""The one predictor interface every model family implements.

SAM 2 / 2.1 implement it in :class:`tracker.predictor.StreamingPredictor` (on
Meta's ``SAM2Base``), the transformers families in
:class:`tracker.families.hf_video.HFVideoPredictor`;
:func:`tracker.families.make_predictor` picks one for a model. Sessions, the
inference worker, ``track`` and ``annotate`` use nothing else.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np
import torch

from tracker.predictor import PredictorStats, PreparedFrame
from tracker.results import FrameResult, ObjectResult


class Predictor(Protocol):
    model: torch.nn.Module
    device: torch.device
    image_size: int
    stats: PredictorStats
    #: frames the model is told the video has (a stream: none; offline: set it)
    num_frames: int

    @property
    def obj_ids(self) -> list[int]: ...

    @property
    def newest_frame_idx(self) -> int | None: ...

    @property
    def prompt_frames(self) -> list[int]: ...

    def stored_entries(self) -> dict[str, int]: ...

    def track(self, image_rgb: np.ndarray | torch.Tensor, **timing: Any) -> FrameResult: ...

    def encode(self, frame_idx: int, image_rgb: np.ndarray | torch.Tensor | PreparedFrame, **timing: Any) -> None: ...

    def forward_batch(self, pixels: torch.Tensor) -> list[dict[str, Any]]: ...

    def encode_features(self, features: dict[str, Any], *, source_size: tuple[int, int], **timing: Any) -> int: ...

    def propagate(self, frame_idx: int, *, reverse: bool = False, obj_ids: Sequence[int] | None = None) -> FrameResult: ...

    def add_prompt(self, obj_id: int, **prompt: Any) -> ObjectResult: ...

    def finalize_prompts(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def remove_object(self, obj_id: int) -> None: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...

    def prepare_frame(self, image_rgb: np.ndarray | torch.Tensor, source_size: tuple[int, int] | None = None) -> PreparedFrame: ...

    def to_model_input(self, image_rgb: np.ndarray | torch.Tensor | PreparedFrame) -> torch.Tensor: ...
