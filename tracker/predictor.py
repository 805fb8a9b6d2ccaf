"""A SAM 2 predictor for live streams: frames arrive one at a time, prompts any time.

Meta's ``SAM2VideoPredictor`` wants the whole video up front (``init_state``
decodes every frame to float32 at 1024²) and keeps every frame's outputs, so it
cannot follow a camera. This module keeps Meta's model and its per-frame
functions (``forward_image``, ``_prepare_backbone_features``, ``track_step`` with
``_prepare_memory_conditioned_features``, ``_encode_new_memory``) and replaces
only the bookkeeping around them:

* per object, an ``output_dict`` with SAM 2's ``cond_frame_outputs`` /
  ``non_cond_frame_outputs``, pruned to what SAM 2 can still attend to
  (``num_maskmem`` memory frames, ``max_obj_ptrs_in_encoder`` object pointers,
  a capped set of conditioning frames) plus the prompt window;
* a ring buffer of the last frames' image features, so a prompt may name a frame
  the operator saw a moment ago; the object is conditioned on that frame and
  re-tracked up to the newest frame from the buffered features;
* the image encoder runs once per frame for all objects; objects whose memory
  has the same layout go through memory attention and the heads as one batch.

Results equal Meta's predictor given the same frames and prompts (see
``tests/test_predictor_equivalence.py``) as long as the video has at least
``max_obj_ptrs_in_encoder`` (16) frames: Meta sizes the object-pointer window by
``min(num_frames, 16)``, a stream has no ``num_frames``, so we always use 16.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tracker.errors import FrameNotAvailableError, PromptError
from tracker.model import autocast_context, model_precision
from tracker.predictor_shared import PreparedFrame, StreamingMethods, check_rgb_frame
from tracker.prompt_window import PromptWindow, WindowFrame, check_point_budget
from tracker.prompts import check_obj_id, check_prompt
from tracker.results import FrameResult, ObjectResult, mask_box_xyxy

logger = logging.getLogger(__name__)

#: a number of frames so large that ``min(num_frames, max_obj_ptrs_in_encoder)``
#: never depends on it (see module docstring)
_STREAM_NUM_FRAMES = 1 << 30

_IMG_MEAN = (0.485, 0.456, 0.406)
_IMG_STD = (0.229, 0.224, 0.225)


@dataclass
class _ObjectState:
    """SAM 2's per-object tracking state (``output_dict_per_obj[obj_idx]`` in Meta's code)."""

    obj_id: int
    output_dict: dict[str, dict[int, dict[str, Any]]] = field(
        default_factory=lambda: {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    )
    point_inputs: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    first_frame_idx: int = 0
    last_frame_idx: int = -1  # newest frame this object has an output for
    # newest frame tracking has passed for this object: prompts on frames in
    # [first_frame_idx, tracked_upto] are corrections (Meta: frames_tracked_per_obj)
    tracked_upto: int = -1
    # non-cond outputs right after the first prompt kept for a later backward pass
    keep_after_first: int = 0

    def output_on(self, frame_idx: int) -> dict[str, Any] | None:
        out = self.output_dict["cond_frame_outputs"].get(frame_idx)
        if out is None:
            out = self.output_dict["non_cond_frame_outputs"].get(frame_idx)
        return out


@dataclass
class PredictorStats:
    frames: int = 0
    prompts: int = 0
    catch_up_frames: int = 0


def _to_device(value: Any, device: torch.device, key: str = "") -> Any:
    """``value`` with every tensor inside (dicts, lists, tuples) on ``device``.

    On the CPU, float tensors become float32 except ``maskmem_features``, which
    stay bfloat16 as this predictor (and Meta's) stores them: state computed
    under CUDA autocast holds bfloat16 pointers and masks that a float32 model
    on the CPU cannot multiply with.
    """
    if isinstance(value, torch.Tensor):
        if device.type == "cpu" and value.is_floating_point() and key != "maskmem_features":
            return value.to(device=device, dtype=torch.float32)
        return value if value.device == device else value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device, key) for v in value)
    return value


class StreamingPredictor(StreamingMethods):
    """Track prompted objects through frames that arrive one at a time.

    Args:
        model: a SAM 2 model built by :func:`tracker.model.build_model` (Meta's
            ``SAM2VideoPredictor`` class, i.e. a ``SAM2Base``).
        prompt_window_s: how far back (source/arrival time) a prompt may reach.
        max_prompt_frames: hard cap on frames kept for prompting (features are
            a few MiB per frame at 1024²).
        min_prompt_frames: the last processed frames kept for prompting however
            old they are (capped by ``max_prompt_frames``): the frames a client
            can have on screen. A time window alone would hold only the newest
            frame once one model step takes longer than ``prompt_window_s``
            (SAM 2 at 1024 px on a CPU), and every click would land outside it.
        max_points_per_frame: clicks one object may hold on one frame, over all
            its prompts there (``clear_old_points=False`` adds them up). A box's
            two corners are not counted: a box always starts the frame's prompt
            afresh (as in SAM 2), so there is at most one. Bounds a prompt's cost.
        max_cond_frames: conditioning frames kept per object: the first prompt
            plus the most recent ones. Meta's predictor keeps all; results stay
            equal to Meta's while an object has at most this many prompted frames.
        corrections_as_cond: a click on an already tracked frame becomes a
            conditioning frame (Meta's ``add_all_frames_to_correct_as_cond``), so
            a live correction keeps acting on later frames.
        batch_objects: run objects with the same memory layout as one batch
            through memory attention and the heads (default). Results agree
            with Meta's per-object loop within 1e-4; ``False`` runs objects one
            at a time as Meta's predictor does, matching its arithmetic bit for
            bit. On CPU batching measured 3-13% faster for 1-8 objects
            (``bench/bench_predictor.py objects``); on CUDA it is the point.
        return_logits: also hand out float mask logits at the source resolution.
        resize: ``"pil"`` resizes frames exactly as Meta's JPEG loader does
            (PIL bicubic); ``"cv2"`` is faster (OpenCV area/linear).
        keep_for_reverse: keep the outputs just after each object's first
            prompt, which tracking backwards from that prompt reads (offline).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        prompt_window_s: float = 2.0,
        max_prompt_frames: int = 60,
        min_prompt_frames: int = 4,
        max_cond_frames: int = 8,
        corrections_as_cond: bool = True,
        batch_objects: bool = True,
        return_logits: bool = True,
        resize: str = "pil",
        keep_for_reverse: bool = False,
        max_points_per_frame: int = 64,
    ) -> None:
        if max_cond_frames < 2:
            raise ValueError("max_cond_frames must be at least 2 (the first prompt and the latest)")
        if resize not in ("pil", "cv2"):
            raise ValueError("resize must be 'pil' or 'cv2'")
        self.model = model
        self.device: torch.device = next(model.parameters()).device
        self.precision = model_precision(model)
        self.image_size: int = int(model.image_size)
        if int(max_points_per_frame) < 1:
            raise ValueError("max_points_per_frame must be at least 1")
        self.max_points_per_frame = int(max_points_per_frame)
        self.max_cond_frames = int(max_cond_frames)
        self.corrections_as_cond = corrections_as_cond
        self.batch_objects = bool(batch_objects)
        self.return_logits = return_logits
        self.resize = resize
        self.keep_for_reverse = keep_for_reverse
        #: frame count handed to SAM 2; a stream has none (see module docstring),
        #: an offline video sets its real count to match Meta's pointer window
        self.num_frames = _STREAM_NUM_FRAMES
        # SAM 2 looks back this many frames for memories / object pointers
        stride = int(getattr(model, "memory_temporal_stride_for_eval", 1))
        self._lookback = max(int(model.max_obj_ptrs_in_encoder), stride * int(model.num_maskmem)) + 1
        self._lock = threading.RLock()
        self._mean = torch.tensor(_IMG_MEAN, dtype=torch.float32, device=self.device)[:, None, None]
        self._std = torch.tensor(_IMG_STD, dtype=torch.float32, device=self.device)[:, None, None]
        self.stats = PredictorStats()
        #: the frames a prompt may name, each with its image features (``payload``:
        #: ``forward_image``'s ``backbone_fpn``, batch 1)
        self._frames = PromptWindow(
            prompt_window_s=prompt_window_s, max_prompt_frames=max_prompt_frames, min_prompt_frames=min_prompt_frames
        )
        self._objects: dict[int, _ObjectState] = {}
        self._pending: set[tuple[int, int]] = set()  # (obj_id, frame_idx) awaiting memory encoding
        self._vision_pos_enc: list[torch.Tensor] | None = None
        self._maskmem_pos_enc: list[torch.Tensor] | None = None
        self._next_frame_idx = 0

    # ------------------------------------------------------------------ public API

    @property
    def obj_ids(self) -> list[int]:
        return list(self._objects)

    @property
    def prompt_window_s(self) -> float:
        return self._frames.prompt_window_s

    @property
    def max_prompt_frames(self) -> int:
        return self._frames.max_prompt_frames

    @property
    def min_prompt_frames(self) -> int:
        return self._frames.min_prompt_frames

    @property
    def newest_frame_idx(self) -> int | None:
        return self._frames.newest

    @property
    def prompt_frames(self) -> list[int]:
        """Frame indices a prompt may currently name."""
        return list(self._frames)

    def stored_entries(self) -> dict[str, int]:
        """How many per-frame things are held (the bounded-memory claim, observable)."""
        with self._lock:
            cond = sum(len(o.output_dict["cond_frame_outputs"]) for o in self._objects.values())
            non_cond = sum(len(o.output_dict["non_cond_frame_outputs"]) for o in self._objects.values())
            points = sum(len(o.point_inputs) for o in self._objects.values())
            return {"frames": len(self._frames), "cond": cond, "non_cond": non_cond, "points": points}

    @torch.inference_mode()
    def encode(
        self,
        frame_idx: int,
        image_rgb: np.ndarray | torch.Tensor | PreparedFrame,
        *,
        pts_s: float | None = None,
        arrival_s: float | None = None,
        source_index: int | None = None,
        source_size: tuple[int, int] | None = None,
    ) -> None:
        """Run the image encoder on a frame and keep its features under ``frame_idx``.

        ``track`` does this for the next frame of a stream; offline users (the
        annotator) place frames at their own indices, in any order.
        """
        with self._lock:
            img = self.to_model_input(image_rgb)
            if source_size is None:
                source_size = (
                    image_rgb.source_size
                    if isinstance(image_rgb, PreparedFrame)
                    else (int(image_rgb.shape[0]), int(image_rgb.shape[1]))
                )
            with autocast_context(self.device, self.precision):
                backbone_out = self.model.forward_image(img)
            self.encode_features(
                backbone_out,
                frame_idx=frame_idx,
                source_size=source_size,
                pts_s=pts_s,
                arrival_s=arrival_s,
                source_index=source_index,
            )

    @torch.inference_mode()
    def forward_batch(self, pixels: torch.Tensor) -> list[dict[str, Any]]:
        """SAM 2's image encoder on a batch of frames (``to_model_input``'s,
        stacked); one :meth:`encode_features` input per frame. The inference
        worker batches several sessions' frames through here."""
        with autocast_context(self.device, self.precision):
            backbone = self.model.forward_image(pixels)
        return [
            {
                "backbone_fpn": [f[i : i + 1] for f in backbone["backbone_fpn"]],
                "vision_pos_enc": [p[i : i + 1] for p in backbone["vision_pos_enc"]],
            }
            for i in range(pixels.shape[0])
        ]

    @torch.inference_mode()
    def encode_features(
        self,
        backbone_out: dict[str, Any],
        *,
        source_size: tuple[int, int],
        frame_idx: int | None = None,
        pts_s: float | None = None,
        arrival_s: float | None = None,
        source_index: int | None = None,
    ) -> int:
        """Keep image features computed elsewhere (batch 1 of ``forward_image``'s
        output); the inference worker batches several sessions' frames through the
        encoder and hands each predictor its slice. Returns the frame index used
        (default: the next one)."""
        with self._lock:
            if frame_idx is None:
                frame_idx = self._next_frame_idx
            # prompted frames must get their memories while their features are
            # still held: the new frame may push them out of the window
            self._consolidate_pending()
            h, w = source_size
            self._remember_frame(frame_idx, backbone_out, (int(h), int(w)), pts_s, arrival_s, source_index)
            self._next_frame_idx = max(self._next_frame_idx, frame_idx + 1)
            self.stats.frames += 1
            return frame_idx

    @torch.inference_mode()
    def propagate(self, frame_idx: int, *, reverse: bool = False, obj_ids: Sequence[int] | None = None) -> FrameResult:
        """Track objects on an encoded frame from their memories and return the masks.

        Objects with a prompt (a conditioning frame) on ``frame_idx`` keep the
        prompted output, as ``SAM2VideoPredictor.propagate_in_video`` does.
        ``reverse`` tracks backwards in time (memories from later frames).
        """
        with self._lock:
            if frame_idx not in self._frames:
                raise FrameNotAvailableError(f"frame {frame_idx} has not been encoded")
            self._consolidate_pending()
            objs = [self._objects[i] for i in obj_ids] if obj_ids is not None else list(self._objects.values())
            tracked = [o for o in objs if frame_idx not in o.output_dict["cond_frame_outputs"]]
            outputs = self._track_objects(frame_idx, tracked, reverse=reverse)
            for obj, out in zip(tracked, outputs):
                self._store_output(obj, frame_idx, out, is_cond=False)
                if not reverse:
                    obj.tracked_upto = max(obj.tracked_upto, frame_idx)
            self._prune(frame_idx, reverse=reverse)
            return self._frame_result(frame_idx, {o.obj_id: o for o in objs})

    @torch.inference_mode()
    def add_prompt(
        self,
        obj_id: int,
        *,
        points_xy: Sequence[Sequence[float]] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        box_xyxy: Sequence[float] | None = None,
        mask_hw: np.ndarray | None = None,
        frame_idx: int | None = None,
        clear_old_points: bool = True,
    ) -> ObjectResult:
        """Prompt object ``obj_id`` (new, or a correction) on a recent frame.

        Points/box are in source pixels ((x, y), labels 1 = positive, 0 =
        negative). ``frame_idx`` defaults to the newest frame; an older frame in
        the prompt window conditions the object there and re-tracks it up to the
        newest frame from buffered features. Returns the object's mask on the
        prompted frame. Mirrors ``SAM2VideoPredictor.add_new_points_or_box`` /
        ``add_new_mask``.
        """
        with self._lock:
            entry = self._frame_for_prompt(frame_idx)
            frame_idx = entry.frame_idx
            obj_id = self._check_obj_id(obj_id)
            point_inputs, mask_inputs = self._prompt_inputs(entry, points_xy, labels, box_xyxy, mask_hw)
            obj = self._objects.get(obj_id)
            is_new = obj is None
            if obj is None:
                obj = _ObjectState(
                    obj_id=obj_id, first_frame_idx=frame_idx, keep_after_first=self._lookback if self.keep_for_reverse else 0
                )
            if box_xyxy is not None and not clear_old_points:
                raise PromptError(
                    "a box cannot be added to earlier points (SAM 2 takes the box first); "
                    "send it with clear_old_points true"
                )
            if point_inputs is not None and not clear_old_points:
                old = obj.point_inputs.get(frame_idx)
                if old is not None:
                    point_inputs = {
                        "point_coords": torch.cat([old["point_coords"], point_inputs["point_coords"]], dim=1),
                        "point_labels": torch.cat([old["point_labels"], point_inputs["point_labels"]], dim=1),
                    }
            if point_inputs is not None:
                clicks = int((point_inputs["point_labels"] < 2).sum())  # labels 2 and 3 are box corners
                check_point_budget(self.max_points_per_frame, obj_id, frame_idx, clicks, clear_old_points)
            prev_out = obj.output_on(frame_idx)
            is_init_cond_frame = not (obj.first_frame_idx <= frame_idx <= obj.tracked_upto)
            prev_logits = None
            if point_inputs is not None and prev_out is not None and prev_out["pred_masks"] is not None:
                prev_logits = torch.clamp(prev_out["pred_masks"].to(self.device), -32.0, 32.0)
            out = self._run_frame(
                entry,
                [obj],
                is_init_cond_frame=is_init_cond_frame,
                point_inputs=point_inputs,
                mask_inputs=mask_inputs,
                run_mem_encoder=False,
                prev_sam_mask_logits=prev_logits,
            )
            if is_new:
                self._objects[obj_id] = obj
            obj.first_frame_idx = min(obj.first_frame_idx, frame_idx)
            if point_inputs is not None:
                obj.point_inputs[frame_idx] = point_inputs
            else:
                obj.point_inputs.pop(frame_idx, None)
            is_cond = is_init_cond_frame or self.corrections_as_cond
            self._store_output(obj, frame_idx, out, is_cond=is_cond)
            self._cap_cond_frames(obj)
            self.stats.prompts += 1
            result = self._object_result(obj, frame_idx, entry.source_hw, is_prompted=True)
            newest = self.newest_frame_idx
            if newest is not None and frame_idx < newest:
                self._catch_up(obj, frame_idx + 1, newest)
            return result

    def finalize_prompts(self) -> None:
        """Encode the memories of prompted frames now (else done before the next
        tracking step). Offline users call it while the prompted frame's features
        are still held; mirrors ``propagate_in_video_preflight``."""
        with self._lock, torch.inference_mode():
            self._consolidate_pending()

    def state_dict(self) -> dict[str, Any]:
        """The tracking state (bounded: memories, pointers, prompts), without frame
        features; with :meth:`load_state_dict` a run can stop and resume exactly."""
        with self._lock:
            self.finalize_prompts()
            return {
                "objects": {
                    obj_id: {
                        "output_dict": o.output_dict,
                        "point_inputs": o.point_inputs,
                        "first_frame_idx": o.first_frame_idx,
                        "last_frame_idx": o.last_frame_idx,
                        "tracked_upto": o.tracked_upto,
                        "keep_after_first": o.keep_after_first,
                    }
                    for obj_id, o in self._objects.items()
                },
                "maskmem_pos_enc": self._maskmem_pos_enc,
                "vision_pos_enc": self._vision_pos_enc,
                "next_frame_idx": self._next_frame_idx,
                "num_frames": self.num_frames,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take over a :meth:`state_dict`, from this predictor or another one on
        another device (tensors move to this one's device; see ``_to_device``)."""
        state = _to_device(state, self.device)
        with self._lock:
            self._objects = {int(k): _ObjectState(obj_id=int(k), **v) for k, v in state["objects"].items()}
            self._maskmem_pos_enc = state["maskmem_pos_enc"]
            self._vision_pos_enc = state["vision_pos_enc"]
            self._next_frame_idx = int(state["next_frame_idx"])
            self.num_frames = int(state["num_frames"])
            for obj in self._objects.values():
                for key in ("cond_frame_outputs", "non_cond_frame_outputs"):
                    for out in obj.output_dict[key].values():
                        out["maskmem_pos_enc"] = self._maskmem_pos_enc
            self._frames.clear()
            self._pending.clear()

    def remove_object(self, obj_id: int) -> None:
        with self._lock:
            if obj_id not in self._objects:
                raise PromptError(f"unknown object id {obj_id}; tracked object ids: {self.obj_ids}")
            del self._objects[obj_id]

    def reset(self) -> None:
        """Forget every object and prompt (frames in the prompt window stay)."""
        with self._lock:
            self._objects.clear()

    def close(self) -> None:
        """Free everything held (features, memories)."""
        with self._lock:
            self._objects.clear()
            self._frames.clear()

    # ------------------------------------------------------------------ frames

    def prepare(self, image_rgb: np.ndarray | torch.Tensor) -> np.ndarray:
        """Check a frame and resize it to the model's S x S (uint8 RGB).

        Split from the rest of preprocessing so offline users can keep frames at
        model size (a few hundred KiB each) instead of decoded size.
        """
        image_rgb = check_rgb_frame(image_rgb)
        h, w = image_rgb.shape[:2]
        s = self.image_size
        if (h, w) == (s, s):
            return np.array(image_rgb)
        if self.resize == "pil":
            return np.array(Image.fromarray(np.ascontiguousarray(image_rgb)).resize((s, s)))
        import cv2

        interp = cv2.INTER_AREA if (h > s or w > s) else cv2.INTER_LINEAR
        return cv2.resize(image_rgb, (s, s), interpolation=interp)

    def _frame_pixels(self, image_ss: np.ndarray) -> torch.Tensor:
        """A prepared frame's tensor: its uint8 pixels (normalised on the device, in :meth:`to_model_input`)."""
        return torch.from_numpy(image_ss)

    def to_model_input(self, image_rgb: np.ndarray | torch.Tensor | PreparedFrame) -> torch.Tensor:
        """HxWx3 uint8 RGB → 1x3xSxS normalised, as Meta's ``load_video_frames`` does."""
        if isinstance(image_rgb, PreparedFrame):
            pixels = self._prepared_pixels(image_rgb)
        else:
            pixels = torch.from_numpy(self.prepare(image_rgb)).to(self.device)
        img = pixels.permute(2, 0, 1).float() / 255.0
        img -= self._mean
        img /= self._std
        return img.unsqueeze(0)

    def _remember_frame(
        self,
        frame_idx: int,
        backbone_out: dict[str, Any],
        source_hw: tuple[int, int],
        pts_s: float | None,
        arrival_s: float | None,
        source_index: int | None,
    ) -> None:
        if self._vision_pos_enc is None:
            # positional encodings depend on the feature sizes only: keep one copy
            self._vision_pos_enc = [p[:1] for p in backbone_out["vision_pos_enc"]]
        self._frames.add(
            frame_idx,
            source_hw,
            pts_s=pts_s,
            arrival_s=arrival_s,
            source_index=source_index,
            payload=list(backbone_out["backbone_fpn"]),
        )

    def _frame_for_prompt(self, frame_idx: int | None) -> WindowFrame:
        return self._frames.frame_for_prompt(frame_idx)

    def _features(self, entry: WindowFrame, batch_size: int) -> tuple[list, list, list]:
        """(vision_feats, vision_pos_embeds, feat_sizes) expanded to ``batch_size``;
        mirrors ``SAM2VideoPredictor._get_image_feature``."""
        assert self._vision_pos_enc is not None
        backbone_out = {
            "backbone_fpn": [f.expand(batch_size, -1, -1, -1) for f in entry.payload],
            "vision_pos_enc": [p.expand(batch_size, -1, -1, -1) for p in self._vision_pos_enc],
        }
        _, vision_feats, vision_pos_embeds, feat_sizes = self.model._prepare_backbone_features(backbone_out)
        return vision_feats, vision_pos_embeds, feat_sizes

    # ------------------------------------------------------------------ prompts

    def _check_obj_id(self, obj_id: Any) -> int:
        return check_obj_id(obj_id)

    def _prompt_inputs(
        self,
        entry: WindowFrame,
        points_xy: Any,
        labels: Any,
        box_xyxy: Any,
        mask_hw: Any,
    ) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None]:
        h, w = entry.source_hw
        checked = check_prompt((h, w), points_xy, labels, box_xyxy, mask_hw)
        if checked.mask_hw is not None:
            return None, self._mask_input(checked.mask_hw)
        coords, lbls = checked.sam_points()
        points = torch.from_numpy(coords)[None] / torch.tensor([w, h], dtype=torch.float32) * self.image_size
        return {
            "point_coords": points.to(self.device),
            "point_labels": torch.from_numpy(lbls)[None].to(self.device),
        }, None

    def _mask_input(self, mask_hw: np.ndarray) -> torch.Tensor:
        """Mirrors ``SAM2VideoPredictor.add_new_mask``'s resize to the model size."""
        mask = torch.from_numpy(mask_hw)[None, None].float().to(self.device)
        s = self.image_size
        if mask.shape[-2:] != (s, s):
            mask = F.interpolate(mask, size=(s, s), align_corners=False, mode="bilinear", antialias=True)
            mask = (mask >= 0.5).float()
        return mask

    # ------------------------------------------------------------------ tracking

    def _run_frame(
        self,
        entry: WindowFrame,
        objs: list[_ObjectState],
        *,
        is_init_cond_frame: bool,
        point_inputs: dict[str, torch.Tensor] | None,
        mask_inputs: torch.Tensor | None,
        run_mem_encoder: bool,
        prev_sam_mask_logits: torch.Tensor | None = None,
        output_dict: dict[str, dict[int, dict[str, Any]]] | None = None,
        reverse: bool = False,
    ) -> dict[str, Any]:
        """One ``track_step`` for ``objs`` (batched) on a buffered frame; returns
        the compact output. Mirrors ``SAM2VideoPredictor._run_single_frame_inference``."""
        vision_feats, vision_pos, feat_sizes = self._features(entry, len(objs))
        with autocast_context(self.device, self.precision):
            current_out = self.model.track_step(
                frame_idx=entry.frame_idx,
                is_init_cond_frame=is_init_cond_frame,
                current_vision_feats=vision_feats,
                current_vision_pos_embeds=vision_pos,
                feat_sizes=feat_sizes,
                point_inputs=point_inputs,
                mask_inputs=mask_inputs,
                output_dict=output_dict if output_dict is not None else objs[0].output_dict,
                num_frames=self.num_frames,
                track_in_reverse=reverse,
                run_mem_encoder=run_mem_encoder,
                prev_sam_mask_logits=prev_sam_mask_logits,
            )
        maskmem_features = current_out["maskmem_features"]
        if maskmem_features is not None:
            # Meta stores memories as bfloat16 (also on CPU); equal results need equal rounding
            maskmem_features = maskmem_features.to(torch.bfloat16)
            self._keep_maskmem_pos_enc(current_out["maskmem_pos_enc"])
        pred_masks = current_out["pred_masks"]
        if getattr(self.model, "fill_hole_area", 0) > 0:
            from sam2.utils.misc import fill_holes_in_mask_scores

            pred_masks = fill_holes_in_mask_scores(pred_masks, self.model.fill_hole_area)
        return {
            "maskmem_features": maskmem_features,
            "pred_masks": pred_masks,
            "obj_ptr": current_out["obj_ptr"],
            "object_score_logits": current_out["object_score_logits"],
        }

    def _keep_maskmem_pos_enc(self, maskmem_pos_enc: list[torch.Tensor] | None) -> None:
        if self._maskmem_pos_enc is None and maskmem_pos_enc is not None:
            self._maskmem_pos_enc = [x[0:1].clone() for x in maskmem_pos_enc]

    def _track_objects(self, frame_idx: int, objs: list[_ObjectState], *, reverse: bool = False) -> list[dict[str, Any]]:
        """Track ``objs`` on ``frame_idx`` (a non-conditioning frame for all of them)."""
        if not objs:
            return []
        entry = self._frames[frame_idx]
        groups: list[list[int]] = []
        if self.batch_objects and len(objs) > 1:
            by_layout: dict[tuple, list[int]] = {}
            for i, obj in enumerate(objs):
                by_layout.setdefault(self._memory_layout(obj, frame_idx, reverse), []).append(i)
            groups = list(by_layout.values())
        else:
            groups = [[i] for i in range(len(objs))]
        results: list[dict[str, Any] | None] = [None] * len(objs)
        for group in groups:
            members = [objs[i] for i in group]
            out = self._run_frame(
                entry,
                members,
                is_init_cond_frame=False,
                point_inputs=None,
                mask_inputs=None,
                run_mem_encoder=True,
                output_dict=self._batched_output_dict(members, frame_idx, reverse) if len(members) > 1 else None,
                reverse=reverse,
            )
            for k, i in enumerate(group):
                results[i] = {key: (v[k : k + 1] if v is not None else None) for key, v in out.items()}
        return results  # type: ignore[return-value]

    def _reach(self, frame_idx: int, reverse: bool) -> tuple[int, int]:
        """Frames whose non-conditioning outputs SAM 2 may read when tracking ``frame_idx``."""
        return (frame_idx, frame_idx + self._lookback) if reverse else (frame_idx - self._lookback, frame_idx)

    def _memory_layout(self, obj: _ObjectState, frame_idx: int, reverse: bool = False) -> tuple:
        """Objects whose memories sit on the same frames can share one batch."""
        lo, hi = self._reach(frame_idx, reverse)
        cond = tuple(sorted(obj.output_dict["cond_frame_outputs"]))
        non_cond = tuple(sorted(t for t in obj.output_dict["non_cond_frame_outputs"] if lo <= t <= hi))
        return cond, non_cond

    def _batched_output_dict(
        self, objs: list[_ObjectState], frame_idx: int, reverse: bool = False
    ) -> dict[str, dict[int, dict[str, Any]]]:
        """Stack the objects' memories frame by frame (same layout, see _memory_layout)."""
        lo, hi = self._reach(frame_idx, reverse)
        merged: dict[str, dict[int, dict[str, Any]]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        for key in merged:
            first = objs[0].output_dict[key]
            for t in first:
                if key == "non_cond_frame_outputs" and not lo <= t <= hi:
                    continue
                outs = [o.output_dict[key][t] for o in objs]
                merged[key][t] = {
                    "maskmem_features": torch.cat([o["maskmem_features"] for o in outs], dim=0),
                    "maskmem_pos_enc": [p.expand(len(objs), -1, -1, -1) for p in self._maskmem_pos_enc or []],
                    "obj_ptr": torch.cat([o["obj_ptr"] for o in outs], dim=0),
                }
        return merged

    def _store_output(self, obj: _ObjectState, frame_idx: int, out: dict[str, Any], *, is_cond: bool) -> None:
        out["maskmem_pos_enc"] = self._maskmem_pos_enc if out["maskmem_features"] is not None else None
        if out["maskmem_features"] is None:
            self._pending.add((obj.obj_id, frame_idx))
        if is_cond:
            obj.output_dict["cond_frame_outputs"][frame_idx] = out
            obj.output_dict["non_cond_frame_outputs"].pop(frame_idx, None)
        else:
            obj.output_dict["non_cond_frame_outputs"][frame_idx] = out
        obj.last_frame_idx = max(obj.last_frame_idx, frame_idx)

    def _consolidate_pending(self) -> None:
        """Encode memories of prompted frames; mirrors ``propagate_in_video_preflight``."""
        for obj_id, t in sorted(self._pending):
            obj = self._objects.get(obj_id)
            out = obj.output_on(t) if obj is not None else None
            if out is not None and out["maskmem_features"] is None:
                self._encode_prompted_memory(obj, t, out)  # type: ignore[arg-type]
        self._pending.clear()

    @torch.inference_mode()
    def _encode_prompted_memory(self, obj: _ObjectState, frame_idx: int, out: dict[str, Any]) -> None:
        entry = self._frames.get(frame_idx)
        if entry is None:  # left the window before it was ever used: nothing to attend to
            return
        vision_feats, _, feat_sizes = self._features(entry, 1)
        s = self.image_size
        high_res_masks = F.interpolate(out["pred_masks"], size=(s, s), mode="bilinear", align_corners=False)
        with autocast_context(self.device, self.precision):
            maskmem_features, maskmem_pos_enc = self.model._encode_new_memory(
                current_vision_feats=vision_feats,
                feat_sizes=feat_sizes,
                pred_masks_high_res=high_res_masks,
                object_score_logits=out["object_score_logits"],
                is_mask_from_pts=True,
            )
        self._keep_maskmem_pos_enc(maskmem_pos_enc)
        out["maskmem_features"] = maskmem_features.to(torch.bfloat16)
        out["maskmem_pos_enc"] = self._maskmem_pos_enc

    def _catch_up(self, obj: _ObjectState, start: int, end: int) -> None:
        """Re-track one object over buffered frames after a prompt on an older frame
        (Meta: ``propagate_in_video(start_frame_idx=...)`` for that object)."""
        self._consolidate_pending()
        for t in range(start, end + 1):
            if t in obj.output_dict["cond_frame_outputs"]:
                continue
            (out,) = self._track_objects(t, [obj])
            self._store_output(obj, t, out, is_cond=False)
            obj.tracked_upto = max(obj.tracked_upto, t)
            self.stats.catch_up_frames += 1

    def _cap_cond_frames(self, obj: _ObjectState) -> None:
        cond = obj.output_dict["cond_frame_outputs"]
        if len(cond) <= self.max_cond_frames:
            return
        keys = sorted(cond)
        keep = {keys[0], *keys[-(self.max_cond_frames - 1) :]}
        for t in keys:
            if t not in keep:
                del cond[t]

    def _prune(self, frame_idx: int, reverse: bool = False) -> None:
        """Drop outputs SAM 2 can no longer attend to and the prompt window no longer needs.

        Outputs just after an object's first prompt are kept (``keep_after_first``
        frames): tracking backwards from that prompt reads them, as Meta's
        reverse propagation does.
        """
        oldest_prompt_frame = min(self._frames) if self._frames else frame_idx
        for obj in self._objects.values():
            non_cond = obj.output_dict["non_cond_frame_outputs"]
            if reverse:
                hi = frame_idx + self._lookback
                stale = [t for t in non_cond if t > hi]
            else:
                lo = min(frame_idx, oldest_prompt_frame) - self._lookback
                keep_hi = obj.first_frame_idx + obj.keep_after_first
                stale = [t for t in non_cond if t < lo and not (obj.first_frame_idx < t <= keep_hi)]
            for t in stale:
                del non_cond[t]
            for t in [t for t in obj.point_inputs if t < oldest_prompt_frame]:
                del obj.point_inputs[t]

    # ------------------------------------------------------------------ results

    def _object_result(self, obj: _ObjectState, frame_idx: int, source_hw: tuple[int, int], *, is_prompted: bool) -> ObjectResult:
        out = obj.output_on(frame_idx)
        assert out is not None
        logits = self._video_res_logits(out["pred_masks"], source_hw)
        return self._make_object_result(obj.obj_id, logits[0, 0], out, is_prompted)

    def _video_res_logits(self, pred_masks: torch.Tensor, source_hw: tuple[int, int]) -> torch.Tensor:
        """Mirrors ``SAM2VideoPredictor._get_orig_video_res_output``."""
        pred_masks = pred_masks.to(self.device)
        if tuple(pred_masks.shape[-2:]) == tuple(source_hw):
            return pred_masks
        return F.interpolate(pred_masks.float(), size=source_hw, mode="bilinear", align_corners=False)

    def _make_object_result(self, obj_id: int, logits_hw: torch.Tensor, out: dict[str, Any], is_prompted: bool) -> ObjectResult:
        mask = (logits_hw > 0).cpu().numpy()
        return ObjectResult(
            obj_id=obj_id,
            mask_hw=mask,
            score=float(out["object_score_logits"].reshape(-1)[0]),
            logits_hw=logits_hw.float().cpu().numpy() if self.return_logits else None,
            box_xyxy=mask_box_xyxy(mask),
            is_prompted=is_prompted,
        )

    def _frame_result(self, frame_idx: int, objs: dict[int, _ObjectState]) -> FrameResult:
        entry = self._frames[frame_idx]
        result = FrameResult(
            frame_idx=frame_idx,
            height=entry.source_hw[0],
            width=entry.source_hw[1],
            pts_s=entry.pts_s,
            arrival_s=entry.arrival_s,
            source_index=entry.source_index,
        )
        if objs:
            outs = [o.output_on(frame_idx) for o in objs.values()]
            all_masks = torch.cat([out["pred_masks"] for out in outs], dim=0)  # type: ignore[index]
            logits = self._video_res_logits(all_masks, entry.source_hw)
            for k, (obj_id, out) in enumerate(zip(objs, outs)):
                result.objects[obj_id] = self._make_object_result(obj_id, logits[k, 0], out, False)  # type: ignore[arg-type]
        result.processed_s = time.time()
        return result
