"""Image mode (one image, prompts, masks) for the model families served through
Hugging Face transformers, with the interface and semantics of
:class:`tracker.segment.ImageSegmenter` (SAM 2 through Meta's code).

The family's *video* model (the one the server and the streaming predictor
already hold) does the work, as the library's *image* model of that family
would do it (``EdgeTamModel.forward`` / ``Sam3TrackerModel.forward``): image
features from ``model.get_image_features`` with ``no_memory_embedding`` added
to the level the mask decoder reads, then the prompt encoder and the mask
decoder, every candidate of a multimask answer with its predicted IoU, no
object-score masking (that is the video path's). Prompt coordinates go through
the family's processor, masks come back at the source resolution through its
``post_process_masks``. Prompts are checked by :class:`ImageSegmenter`'s own
rules, so a bad prompt gets the same :class:`ImagePromptError` (message and
field) whatever the model.

One difference from the library is deliberate: transformers'
``Sam3TrackerModel`` keeps all four levels of SAM 3's vision neck and adds
``no_memory_embedding`` to the 0.5x level, which its decoder never reads, while
its video model (``Sam3TrackerVideoModel``: the first prompt on a frame) and
Meta's SAM 2 / SAM 3 image predictors add it to the 1x level the decoder
reads. Here it is added as the video model and Meta do, so an image prompt
answers as a prompt on a video frame would (``tests/test_families_image.py``).

:func:`make_segmenter` picks the segmenter for any model.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tracker.embedding_cache import image_digest, model_key
from tracker.errors import FrameError, PromptError
from tracker.masks import mask_box_xyxy
from tracker.model import model_autocast
from tracker.segment import (
    DEFAULT_MAX_POINTS,
    ImageEmbedding,
    ImagePromptError,
    ImageSegmenter,
    MaskCandidate,
    PreparedImage,
    SegmentResult,
    check_image_rgb,
)

logger = logging.getLogger(__name__)


def make_segmenter(model: torch.nn.Module, **options: Any) -> ImageSegmenter:
    """The image segmenter for ``model``: Meta's ``SAM2ImagePredictor`` for a SAM 2
    model, :class:`HFImageSegmenter` for a family served through transformers.
    ``options`` are :class:`ImageSegmenter`'s (``max_points``)."""
    from tracker.families import is_family_model

    if is_family_model(model):
        return HFImageSegmenter(model, **options)
    return ImageSegmenter(model, **options)


class HFImageSegmenter(ImageSegmenter):
    """:class:`ImageSegmenter` on a transformers video model
    (:func:`tracker.families.build_family_model`); see the module doc.

    It keeps :class:`ImageSegmenter`'s prompt checks, cache keys, batching
    (``embed``, out-of-memory splitting) and result types; what runs the model
    (``prepare``, ``embeddings_from_backbone``, ``encode_batch``, ``predict``)
    is the library's. ``ImageSegmenter.__init__`` is not called: it builds
    Meta's predictor, which only SAM 2 models have.

    Args:
        model: a family model (``tracker.model.build_model("edgetam" | "sam3-tracker")``).
        max_points: clicks one prompt may have.
    """

    def __init__(self, model: torch.nn.Module, *, max_points: int = DEFAULT_MAX_POINTS) -> None:
        from tracker.families.hf_video import _processor_of, family_of

        self.model = model
        self.family = family_of(model)
        self.processor = _processor_of(model)
        self.image_size = int(model.config.image_size)
        #: (h, w) of each feature level the mask decoder takes, finest first
        self.feature_sizes = [tuple(int(v) for v in s) for s in model.backbone_feature_sizes]
        #: side of the low-res logits the decoder returns and takes back as ``mask_input``
        self.mask_side = int(model.prompt_encoder.mask_input_size[0])
        self.max_points = int(max_points)
        self.model_key = model_key(model)
        self.device = next(model.parameters()).device
        self._current: ImageEmbedding | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ embeddings

    def prepare(self, image_rgb: np.ndarray) -> PreparedImage:
        """RGB pixels → the encoder's input by the family's processor (resize to
        S x S, normalise) and the cache digest; touches no model state."""
        check_image_rgb(image_rgb)
        with torch.inference_mode():
            pixels = self.processor(images=image_rgb, return_tensors="pt").pixel_values[0]
        return PreparedImage(pixels.float(), (int(image_rgb.shape[0]), int(image_rgb.shape[1])), image_digest(image_rgb))

    @torch.inference_mode()
    def embeddings_from_backbone(
        self, backbone_out: Any, images: Sequence[PreparedImage], *, start: int = 0
    ) -> list[ImageEmbedding]:
        """Embeddings of ``images`` from rows ``start…`` of a ``get_image_features``
        output (its ``fpn_hidden_states``: HW x B x C per level).

        Mirrors the library's image model after the encoder
        (``EdgeTamModel.get_image_embeddings``): ``no_memory_embedding`` added
        to the coarsest level, each level reshaped to B x C x h x w. Each
        embedding gets its own contiguous copy of its rows.
        """
        stop = start + len(images)
        feats = [f[:, start:stop] for f in backbone_out["fpn_hidden_states"]]
        if len(feats) != len(self.feature_sizes):
            raise FrameError(f"the image features have {len(feats)} levels, the mask decoder takes {len(self.feature_sizes)}")
        feats[-1] = feats[-1] + self.model.no_memory_embedding
        n = len(images)
        maps = [f.permute(1, 2, 0).reshape(n, -1, *size) for f, size in zip(feats, self.feature_sizes)]
        return self._split_embeddings(maps, images)

    def _run_encoder(self, batch: torch.Tensor) -> Any:
        return self.model.get_image_features(batch, return_dict=True)

    # ---------------------------------------------------------------- prompts

    def predict(
        self,
        embedding: ImageEmbedding | None = None,
        *,
        points_xy: Sequence[Sequence[float]] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        box_xyxy: Sequence[float] | np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = False,
    ) -> SegmentResult:
        """Masks for one object (points in pixels, labels 1/0, box x0 y0 x1 y1), as
        :meth:`ImageSegmenter.predict`; ``mask_input`` is one of a previous
        result's ``low_res_logits`` (``mask_side`` x ``mask_side``). Decoder only."""
        with self._lock:
            if embedding is None:
                embedding = self._current
        if embedding is None:
            raise PromptError("no image set: call set_image first")
        if embedding.model != self.model_key:
            raise FrameError(f"the embedding was made by model {embedding.model}, this segmenter runs {self.model_key}")
        if not isinstance(multimask, (bool, np.bool_)):
            raise ImagePromptError(f"multimask must be true or false, got {multimask!r}", "multimask")
        pts, lbl, box = self._check(embedding.size_hw, points_xy, labels, box_xyxy, mask_input is not None)
        logits = self._check_mask_input(mask_input)
        inputs = self._prompt_tensors(embedding.size_hw, pts, lbl, box, logits)
        with self._lock, torch.inference_mode(), model_autocast(self.model):
            low_res, ious = self._decode(embedding, multimask=bool(multimask), **inputs)
            (full,) = self.processor.post_process_masks(
                [low_res.float()], original_sizes=[list(embedding.size_hw)], binarize=False
            )
        low = low_res[0].float().cpu().numpy()  # C x side x side
        masks = (full[0] > 0).cpu().numpy()  # C x H x W
        scores = ious[0].float().cpu().numpy()
        order = np.argsort(-scores, kind="stable")
        return SegmentResult(
            candidates=[
                MaskCandidate(mask_hw=masks[i], score=float(scores[i]), box_xyxy=mask_box_xyxy(masks[i])) for i in order
            ],
            low_res_logits=low[order],
        )

    def _prompt_tensors(
        self,
        size_hw: tuple[int, int],
        pts: np.ndarray | None,
        lbl: np.ndarray | None,
        box: np.ndarray | None,
        logits: np.ndarray | None,
    ) -> dict[str, torch.Tensor | None]:
        """The checked prompt as the library's model takes it: coordinates scaled
        to S x S by the processor (image, object and point levels), logits 1 x 1 x side x side."""
        out: dict[str, torch.Tensor | None] = {"input_points": None, "input_labels": None, "input_boxes": None}
        kwargs: dict[str, Any] = {}
        if pts is not None:
            kwargs["input_points"] = [[pts.astype(np.float64).tolist()]]
            kwargs["input_labels"] = [[lbl.astype(np.int64).tolist()]]  # type: ignore[union-attr]
        if box is not None:
            kwargs["input_boxes"] = [[box.astype(np.float64).tolist()]]
        if kwargs:
            enc = self.processor(original_sizes=[list(size_hw)], return_tensors="pt", **kwargs)
            out.update({k: enc[k].to(self.device) for k in kwargs})
        out["input_masks"] = torch.from_numpy(logits[None]).to(self.device) if logits is not None else None
        return out

    def _decode(
        self,
        embedding: ImageEmbedding,
        *,
        input_points: torch.Tensor | None,
        input_labels: torch.Tensor | None,
        input_boxes: torch.Tensor | None,
        input_masks: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 x C x side x side low-res logits, 1 x C predicted IoUs).

        Mirrors ``EdgeTamModel.forward`` / ``Sam3TrackerModel.forward`` from
        ``image_embeddings`` on, with the video model's prompt encoder and mask
        decoder (the same modules and weights as the image model's).
        """
        m = self.model
        image_embeddings = [*embedding.high_res_feats, embedding.image_embed]
        device, dtype = image_embeddings[-1].device, image_embeddings[-1].dtype
        positional = m.get_image_wide_positional_embeddings()  # batch 1
        if input_points is None and input_boxes is None:  # no clicks: one empty point (label -1)
            input_points = torch.zeros(1, 1, 1, 2, dtype=dtype, device=device)
            input_labels = -torch.ones(1, 1, 1, dtype=torch.int32, device=device)
        if input_masks is not None and input_masks.shape[-2:] != m.prompt_encoder.mask_input_size:
            input_masks = F.interpolate(
                input_masks.float(), size=m.prompt_encoder.mask_input_size, align_corners=False, mode="bilinear", antialias=True
            ).to(input_masks.dtype)
        sparse, dense = m.prompt_encoder(
            input_points=input_points, input_labels=input_labels, input_boxes=input_boxes, input_masks=input_masks
        )
        low_res, ious, _, _ = m.mask_decoder(
            image_embeddings=image_embeddings[-1],
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            high_resolution_features=image_embeddings[:-1],
        )
        return low_res[:, 0], ious[:, 0]  # the one object of the prompt


__all__ = ["HFImageSegmenter", "make_segmenter"]
