"""Image mode: SAM 2 on single images (zero-shot), through Meta's ``SAM2ImagePredictor``.

The embedding is computed once per image (``set_image``) and reused for every
prompt on it; one loaded model serves a whole folder. Prompts are checked with
the same rules and messages as the video paths (``tracker.prompts``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from tracker.errors import FrameError, PromptError
from tracker.masks import mask_box_xyxy
from tracker.model import model_autocast
from tracker.prompts import check_prompt


@dataclass
class MaskCandidate:
    mask_hw: np.ndarray  # bool, image H x W
    score: float  # SAM's predicted IoU of this mask
    box_xyxy: tuple[int, int, int, int] | None


@dataclass
class SegmentResult:
    """The masks for one prompt: one, or three with ``multimask`` (best first)."""

    candidates: list[MaskCandidate]
    low_res_logits: np.ndarray  # (C, S/4, S/4): feed back as ``mask_input`` to refine

    @property
    def best(self) -> MaskCandidate:
        return self.candidates[0]


class ImageSegmenter:
    """``SAM2ImagePredictor`` on one of our models (any ``image_size``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model = model
        self.predictor = SAM2ImagePredictor(model)
        s = int(model.image_size)
        # Meta's class assumes 1024 input (256/128/64 feature maps); follow the model
        self.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        self._size_hw: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.device = next(model.parameters()).device

    def set_image(self, image_rgb: np.ndarray) -> None:
        """Embed an image (H x W x 3 uint8 RGB); later prompts reuse the embedding."""
        if not isinstance(image_rgb, np.ndarray) or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
            shape = getattr(image_rgb, "shape", None)
            raise FrameError(f"image must be H x W x 3 RGB, got {shape if shape is not None else type(image_rgb).__name__}")
        if image_rgb.dtype != np.uint8:
            raise FrameError(f"image must be uint8 RGB, got dtype {image_rgb.dtype}")
        with self._lock, torch.inference_mode(), model_autocast(self.model):
            self.predictor.set_image(image_rgb)
            self._size_hw = (int(image_rgb.shape[0]), int(image_rgb.shape[1]))

    def predict(
        self,
        *,
        points_xy: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        box_xyxy: Sequence[float] | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = False,
    ) -> SegmentResult:
        """Masks for one object on the current image (points in pixels; labels 1/0)."""
        if self._size_hw is None:
            raise PromptError("no image set: call set_image first")
        checked = check_prompt(self._size_hw, points_xy, labels, box_xyxy)
        with self._lock, torch.inference_mode(), model_autocast(self.model):
            masks, ious, low_res = self.predictor.predict(
                point_coords=checked.points_xy if len(checked.points_xy) else None,
                point_labels=checked.labels if len(checked.labels) else None,
                box=checked.box_xyxy,
                mask_input=mask_input,
                multimask_output=multimask,
            )
        order = np.argsort(-ious, kind="stable")
        return SegmentResult(
            candidates=[
                MaskCandidate(mask_hw=masks[i].astype(bool), score=float(ious[i]), box_xyxy=mask_box_xyxy(masks[i]))
                for i in order
            ],
            low_res_logits=low_res[order],
        )


def segment(
    image_rgb: np.ndarray,
    *,
    model: torch.nn.Module | None = None,
    segmenter: ImageSegmenter | None = None,
    **prompt: Any,
) -> SegmentResult:
    """One image, one prompt: ``segment(img, model=m, points_xy=[[x, y]], labels=[1])``."""
    if segmenter is None:
        if model is None:
            raise ValueError("segment needs a model or a segmenter")
        segmenter = ImageSegmenter(model)
    segmenter.set_image(image_rgb)
    return segmenter.predict(**prompt)
