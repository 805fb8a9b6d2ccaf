"""Image mode: SAM 2 on single images (zero-shot), through Meta's ``SAM2ImagePredictor``.

An image's embedding (what ``SAM2ImagePredictor.set_image`` computes) is made
once and every prompt on it runs the prompt encoder and mask decoder only. The
work is split so that a server can place each part where it belongs:

1. :meth:`ImageSegmenter.prepare` (any thread, no model): RGB pixels → the
   encoder's input, Meta's own ``SAM2Transforms``, plus the pixel digest that
   keys the embedding cache (:mod:`tracker.embedding_cache`);
2. :meth:`ImageSegmenter.encode_batch` / :meth:`ImageSegmenter.embed` (the
   inference worker): several images through ``SAM2Base.forward_image`` as one
   batch (they all are S x S by then), or :meth:`embeddings_from_backbone` on a
   slice of a batch the worker ran for video frames and images together;
3. :meth:`ImageSegmenter.predict` (decoder only, milliseconds): points, box,
   multimask, chained low-res logits, on any :class:`ImageEmbedding`.

Images reach it decoded by :mod:`tracker.image_input` (the one conversion path
for files and uploads). Prompts are checked with the same rules and messages
as the video paths (``tracker.prompts``); errors here also name the field.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from tracker.embedding_cache import EmbeddingCache, EmbeddingKey, image_digest, model_key
from tracker.errors import FrameError, PromptError
from tracker.image_input import ImageLimits, decode_image, load_image, rgb_from_array
from tracker.masks import mask_box_xyxy
from tracker.model import model_autocast
from tracker.prompts import check_prompt

logger = logging.getLogger(__name__)

#: clicks per prompt, the protocol's own limit for a prompt's points
DEFAULT_MAX_POINTS = 64


class ImagePromptError(PromptError):
    """A :class:`PromptError` of image mode that names the request field at fault
    (``field``: ``"points_xy[2]"``, ``"labels"``, ``"box_xyxy"``, ``"mask_input"``…)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class MaskCandidate:
    mask_hw: np.ndarray  # bool, image H x W
    score: float  # SAM's predicted IoU of this mask
    box_xyxy: tuple[int, int, int, int] | None


@dataclass
class SegmentResult:
    """The masks for one prompt: one, or three with ``multimask`` (best first)."""

    candidates: list[MaskCandidate]
    low_res_logits: np.ndarray  # (C, S/4, S/4): feed one back as ``mask_input`` to refine

    @property
    def best(self) -> MaskCandidate:
        return self.candidates[0]


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """An image as the image encoder takes it (``SAM2Transforms`` applied).

    Small and fixed-size (3 x S x S floats: 12 MiB at 1024), so a server may
    keep it to re-encode an image whose embedding was evicted.
    """

    pixels: torch.Tensor  # 3 x S x S float32 on the CPU, normalised as Meta's transform does
    size_hw: tuple[int, int]  # the image's (height, width)
    digest: str  # :func:`tracker.embedding_cache.image_digest` of its RGB pixels


@dataclass(frozen=True, eq=False)
class ImageEmbedding:
    """What ``SAM2ImagePredictor.set_image`` keeps in ``_features``, for one image."""

    image_embed: torch.Tensor  # 1 x C x S/16 x S/16 (no_mem_embed added, as Meta does)
    high_res_feats: tuple[torch.Tensor, ...]  # (1 x C0 x S/4 x S/4, 1 x C1 x S/8 x S/8)
    size_hw: tuple[int, int]  # the image's (height, width): prompts are checked against it
    model: str  # :func:`tracker.embedding_cache.model_key` of the model that made it

    @property
    def nbytes(self) -> int:
        """Tensor bytes held (what the embedding cache's budget counts)."""
        return sum(int(t.numel()) * t.element_size() for t in (self.image_embed, *self.high_res_feats))


@dataclass(frozen=True)
class Embedded:
    """One image's embedding from :meth:`ImageSegmenter.embed`, and how it was got."""

    embedding: ImageEmbedding
    cached: bool  # found in the cache (or a duplicate of an image earlier in the same call)
    encode_s: float  # this image's share of the encoder call (0 when cached)


class ImageSegmenter:
    """``SAM2ImagePredictor`` on one of our models (any ``image_size``), over
    embeddings that live outside it (see the module doc).

    Args:
        model: a SAM 2 model (``tracker.model.build_model``).
        max_points: clicks one prompt may have.
    """

    def __init__(self, model: torch.nn.Module, *, max_points: int = DEFAULT_MAX_POINTS) -> None:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model = model
        self.predictor = SAM2ImagePredictor(model)
        s = int(model.image_size)
        self.image_size = s
        # Meta's class assumes 1024 input (256/128/64 feature maps); follow the model
        self.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        #: side of the mask decoder's low-res logits (a ``mask_input``'s size)
        self.mask_side = s // 4
        self.max_points = int(max_points)
        self.model_key = model_key(model)
        self.device = next(model.parameters()).device
        self._current: ImageEmbedding | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ embeddings

    def prepare(self, image_rgb: np.ndarray) -> PreparedImage:
        """RGB pixels → encoder input and cache digest; touches no model state,
        so an event loop's executor or a decoding thread may call it."""
        check_image_rgb(image_rgb)
        with torch.inference_mode():
            pixels = self.predictor._transforms(image_rgb)  # ToTensor, Resize((S, S)), Normalize
        return PreparedImage(pixels, (int(image_rgb.shape[0]), int(image_rgb.shape[1])), image_digest(image_rgb))

    def cache_key(self, image: PreparedImage) -> EmbeddingKey:
        """The key of ``image``'s embedding by this segmenter's model."""
        return EmbeddingKey(image.digest, self.model_key)

    def model_inputs(self, images: Sequence[PreparedImage]) -> torch.Tensor:
        """B x 3 x S x S on the model's device: the worker may concatenate this
        with video frames' inputs for one ``forward_image`` call."""
        if not images:
            raise FrameError("no images to encode")
        for image in images:
            if tuple(image.pixels.shape) != (3, self.image_size, self.image_size):
                raise FrameError(
                    f"prepared image is {tuple(image.pixels.shape)}, this model takes 3 x {self.image_size} x "
                    f"{self.image_size}: prepare it with this segmenter"
                )
        return torch.stack([image.pixels for image in images], dim=0).to(self.device)

    @torch.inference_mode()
    def embeddings_from_backbone(
        self, backbone_out: dict[str, Any], images: Sequence[PreparedImage], *, start: int = 0
    ) -> list[ImageEmbedding]:
        """Embeddings of ``images`` from rows ``start…`` of a ``forward_image`` output.

        Mirrors the part of ``SAM2ImagePredictor.set_image_batch`` after the
        encoder. Each embedding gets its own contiguous copy of its rows, so it
        holds (and the cache counts) one image's memory, not the batch's.
        """
        stop = start + len(images)
        rows = {
            "backbone_fpn": [f[start:stop] for f in backbone_out["backbone_fpn"]],
            "vision_pos_enc": [p[start:stop] for p in backbone_out["vision_pos_enc"]],
        }
        _, vision_feats, _, _ = self.model._prepare_backbone_features(rows)
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        n = len(images)
        feats = [
            feat.permute(1, 2, 0).reshape(n, -1, *feat_size)
            for feat, feat_size in zip(vision_feats[::-1], self.predictor._bb_feat_sizes[::-1])
        ][::-1]
        return self._split_embeddings(feats, images)

    def _split_embeddings(self, maps: list[torch.Tensor], images: Sequence[PreparedImage]) -> list[ImageEmbedding]:
        """One embedding per image from batched feature maps (coarsest last)."""
        own = torch.contiguous_format  # one layout, however many images the batch had
        return [
            ImageEmbedding(
                image_embed=maps[-1][i : i + 1].clone(memory_format=own),
                high_res_feats=tuple(m[i : i + 1].clone(memory_format=own) for m in maps[:-1]),
                size_hw=image.size_hw,
                model=self.model_key,
            )
            for i, image in enumerate(images)
        ]

    def _run_encoder(self, batch: torch.Tensor) -> Any:
        """The model's image encoder on a batch (``embeddings_from_backbone`` reads its output)."""
        return self.model.forward_image(batch)

    @torch.inference_mode()
    def encode_batch(self, images: Sequence[PreparedImage | np.ndarray]) -> list[ImageEmbedding]:
        """Several images through the image encoder as one batch (one encoder
        call); equal to encoding them one by one (see tests)."""
        prepared = [im if isinstance(im, PreparedImage) else self.prepare(im) for im in images]
        batch = self.model_inputs(prepared)
        with model_autocast(self.model):
            return self.embeddings_from_backbone(self._run_encoder(batch), prepared)

    def encode(self, image: PreparedImage | np.ndarray) -> ImageEmbedding:
        return self.encode_batch([image])[0]

    def embed(
        self,
        images: Sequence[PreparedImage],
        cache: EmbeddingCache[ImageEmbedding] | None = None,
        *,
        max_batch: int | None = None,
    ) -> list[Embedded]:
        """Embeddings of ``images``, in order: cached ones looked up, the rest
        encoded in batches of ``max_batch`` (default: all in one) and cached.

        Meant for the inference worker: the lookup happens here, on the thread
        that encodes, so an image uploaded twice while the first upload waited
        is found in the cache instead of encoded twice; duplicates within one
        call are encoded once. Batching pays on GPUs; on a CPU one image at a
        time was as fast or faster (``bench/bench_images.py batch``: 0.85-0.93x
        for batches of 4 at 1024), so pass ``max_batch=1`` there.
        """
        out: list[Embedded | None] = [None] * len(images)
        todo: dict[EmbeddingKey, list[int]] = {}
        for i, image in enumerate(images):
            key = self.cache_key(image)
            if key in todo:
                todo[key].append(i)
                continue
            hit = cache.get(key) if cache is not None else None
            if hit is not None:
                out[i] = Embedded(hit, True, 0.0)
            else:
                todo[key] = [i]
        keys = list(todo)
        step = max(1, int(max_batch)) if max_batch else max(1, len(keys))
        for k in range(0, len(keys), step):
            chunk = keys[k : k + step]
            t0 = time.perf_counter()
            embeddings = self._encode_or_split([images[todo[key][0]] for key in chunk])
            share = (time.perf_counter() - t0) / len(chunk)
            for key, embedding in zip(chunk, embeddings):
                if cache is not None:
                    cache.put(key, embedding)
                first, *dups = todo[key]
                out[first] = Embedded(embedding, False, share)
                for j in dups:
                    out[j] = Embedded(embedding, True, 0.0)
        assert all(e is not None for e in out)
        return out  # type: ignore[return-value]

    def _encode_or_split(self, images: list[PreparedImage]) -> list[ImageEmbedding]:
        """:meth:`encode_batch`; out of CUDA memory with several images, one by one
        (as the inference worker does for video frames). An image that does not
        fit alone raises, for the caller's CPU fallback."""
        try:
            return self.encode_batch(images)
        except torch.cuda.OutOfMemoryError:
            if len(images) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("image encoder out of memory for %d images at once; encoding them one by one", len(images))
            return [self.encode_batch([image])[0] for image in images]

    def set_image(self, image_rgb: np.ndarray) -> None:
        """Embed an image (H x W x 3 uint8 RGB); later prompts without an
        embedding argument reuse it."""
        embedding = self.encode(image_rgb)
        with self._lock:
            self._current = embedding

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
        """Masks for one object (points in pixels, labels 1/0, box x0 y0 x1 y1).

        ``embedding`` defaults to the last :meth:`set_image`. ``mask_input`` is
        one of a previous result's ``low_res_logits`` (S/4 x S/4), to refine it as
        SAM does. Runs Meta's ``SAM2ImagePredictor.predict`` on the embedding:
        decoder only.
        """
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
        with self._lock, torch.inference_mode(), model_autocast(self.model):
            p = self.predictor
            p._features = {"image_embed": embedding.image_embed, "high_res_feats": list(embedding.high_res_feats)}
            p._orig_hw = [embedding.size_hw]
            p._is_image_set, p._is_batch = True, False
            try:
                masks, ious, low_res = p.predict(
                    point_coords=pts, point_labels=lbl, box=box, mask_input=logits, multimask_output=bool(multimask)
                )
            finally:
                p.reset_predictor()  # hold no embedding the cache may have evicted
        order = np.argsort(-ious, kind="stable")
        return SegmentResult(
            candidates=[
                MaskCandidate(mask_hw=masks[i].astype(bool), score=float(ious[i]), box_xyxy=mask_box_xyxy(masks[i]))
                for i in order
            ],
            low_res_logits=low_res[order],
        )

    def _check(
        self, size_hw: tuple[int, int], points_xy: Any, labels: Any, box_xyxy: Any, has_mask_input: bool
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """The prompt as Meta's predictor takes it, or an ImagePromptError naming the field."""
        if has_mask_input and points_xy is None and labels is None and box_xyxy is None:
            return None, None, None  # refine the previous mask from its logits alone
        if points_xy is not None:
            try:
                pts = np.asarray(points_xy, dtype=np.float64)
            except (TypeError, ValueError):
                raise ImagePromptError("points_xy must be a list of [x, y] pairs of numbers", "points_xy") from None
            if pts.size and (pts.ndim != 2 or pts.shape[1] != 2):
                raise ImagePromptError(f"points_xy must be a list of [x, y] pairs, got shape {pts.shape}", "points_xy")
            if len(pts) > self.max_points:
                raise ImagePromptError(
                    f"too many points: {len(pts)} given, at most {self.max_points} per prompt", "points_xy"
                )
        try:
            checked = check_prompt(size_hw, points_xy, labels, box_xyxy)
        except (TypeError, ValueError) as e:  # PromptError, or labels/box that are not numbers
            message = str(e) if isinstance(e, PromptError) else f"the prompt's labels or box are not numbers: {e}"
            raise ImagePromptError(message, _culprit(size_hw, points_xy, labels, box_xyxy)) from None
        has_points = len(checked.points_xy) > 0
        return (
            checked.points_xy if has_points else None,
            checked.labels if has_points else None,
            checked.box_xyxy,
        )

    def _check_mask_input(self, mask_input: Any) -> np.ndarray | None:
        if mask_input is None:
            return None
        side = self.mask_side
        try:
            logits = np.asarray(mask_input, dtype=np.float32)
        except (TypeError, ValueError):
            raise ImagePromptError("mask_input must be an array of low-res logits", "mask_input") from None
        if logits.shape == (side, side):
            logits = logits[None]
        if logits.shape != (1, side, side):
            raise ImagePromptError(
                f"mask_input must be {side} x {side} low-res logits (a previous result's low_res_logits[i]), "
                f"got shape {logits.shape}",
                "mask_input",
            )
        if not np.isfinite(logits).all():
            raise ImagePromptError("mask_input must hold finite numbers", "mask_input")
        return logits


def check_image_rgb(image_rgb: Any) -> None:
    """An image mode input is H x W x 3 uint8 RGB, or a FrameError saying what it is instead."""
    if not isinstance(image_rgb, np.ndarray) or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        shape = getattr(image_rgb, "shape", None)
        raise FrameError(f"image must be H x W x 3 RGB, got {shape if shape is not None else type(image_rgb).__name__}")
    if image_rgb.dtype != np.uint8:
        raise FrameError(f"image must be uint8 RGB, got dtype {image_rgb.dtype}")
    if image_rgb.shape[0] < 1 or image_rgb.shape[1] < 1:
        raise FrameError(f"image is empty: shape {tuple(image_rgb.shape)}")


def _culprit(size_hw: tuple[int, int], points_xy: Any, labels: Any, box_xyxy: Any) -> str:
    """The field a rejected prompt failed on; check_prompt has decided it is bad."""
    if (points_xy is None) != (labels is None):
        return "labels" if labels is None else "points_xy"
    if points_xy is None and box_xyxy is None:
        return "points_xy"
    if points_xy is not None:
        pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        try:
            lbl = np.asarray(labels).reshape(-1)
            good_labels = len(lbl) == len(pts) and bool(np.isin(lbl, (0, 1)).all())
        except (TypeError, ValueError):
            good_labels = False
        if len(pts) == 0 and box_xyxy is None:
            return "points_xy"
        if not good_labels:
            return "labels"
        h, w = size_hw
        bad = ~np.isfinite(pts).all(axis=1) | (pts[:, 0] < 0) | (pts[:, 0] > w - 1) | (pts[:, 1] < 0) | (pts[:, 1] > h - 1)
        if bad.any():
            return f"points_xy[{int(np.flatnonzero(bad)[0])}]"
    return "box_xyxy"


def load_rgb(image: np.ndarray | bytes | str | os.PathLike, limits: ImageLimits | None = None) -> np.ndarray:
    """H x W x 3 uint8 RGB from an array, encoded bytes or a file, through
    :mod:`tracker.image_input` (the one conversion path of image mode)."""
    if isinstance(image, np.ndarray):
        return rgb_from_array(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(image, limits).image_rgb
    return load_image(image, limits).image_rgb


def segment(
    image: np.ndarray | bytes | str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    segmenter: ImageSegmenter | None = None,
    **prompt: Any,
) -> SegmentResult:
    """One image, one prompt: ``segment("photo.jpg", model=m, points_xy=[[x, y]], labels=[1])``."""
    if segmenter is None:
        if model is None:
            raise ValueError("segment needs a model or a segmenter")
        from tracker.families.hf_image import make_segmenter  # it imports this module

        segmenter = make_segmenter(model)
    return segmenter.predict(segmenter.encode(load_rgb(image)), **prompt)
