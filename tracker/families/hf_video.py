"""A live-stream predictor over Hugging Face transformers' video models
(EdgeTAM, SAM 3's tracker, ...), with the same interface and guarantees as
:class:`tracker.predictor.StreamingPredictor` for SAM 2.

transformers' ``*VideoModel`` already streams: a session made with
``video=None`` takes frames one at a time (``model(session, frame=pixels)``).
But it keeps everything it ever computed (pixels, image features, every
frame's outputs including a full-resolution mask per object), so a camera
fills memory. This module drives the library's own model and session, and
around its calls keeps only what the model can still attend to:

* non-conditioning outputs within ``max(max_object_pointers_in_encoder,
  num_maskmem)`` frames of the oldest frame a prompt may still name (the
  library reads memories from the ``num_maskmem - 1`` previous frames and
  object pointers from the previous ``max_object_pointers_in_encoder - 1``);
* conditioning outputs capped per object (the first prompt plus the most
  recent): the library attends to all of them when ``max_cond_frame_num`` is
  -1, so outputs equal its own while an object has at most
  ``max_cond_frames`` prompted frames (as for SAM 2 in ``tracker.predictor``);
* image features of the prompt window only (:class:`tracker.prompt_window.PromptWindow`),
  pixels never (features are cached before the library would need them), and
  no full-resolution masks once the step that encoded them into memory is over.

Every prediction is the library's own: the same model calls in the same order
as an unpruned session, so the outputs are equal (``tests/test_families.py``);
on frames where several objects are simply tracked, the same calls with the
objects stacked into one batch (:mod:`tracker.families.batched_step`), equal up
to float rounding.
How the library behaves is kept, e.g. a correction on a tracked frame becomes
a non-conditioning output (``corrections_as_cond=True`` promotes it, as SAM 2's
``add_all_frames_to_correct_as_cond`` does, at the price of that equality), and
a prompt re-runs every object on the prompted frame.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

import numpy as np
import torch

from tracker.errors import FrameNotAvailableError, PromptError
from tracker.families.base import HFFamily
from tracker.families.batched_step import plain_tracking_frame, track_batched
from tracker.families.instance_patch import InstancePatch
from tracker.model import autocast_context, model_precision
from tracker.predictor import PredictorStats, _to_device
from tracker.predictor_shared import PreparedFrame, StreamingMethods, check_rgb_frame
from tracker.prompt_window import PromptWindow, WindowFrame, check_point_budget
from tracker.prompts import check_obj_id, check_prompt
from tracker.results import FrameResult, ObjectResult, mask_box_xyxy

logger = logging.getLogger(__name__)

#: the offline frame count of a stream that has none (see ``num_frames``)
_STREAM_NUM_FRAMES = 1 << 30
#: the library only stores, never reads, the pixels of a frame whose features
#: are already cached; this stands in for them (see ``_forward``)
_NO_PIXELS = torch.empty(0)


def family_of(model: torch.nn.Module) -> HFFamily:
    family = getattr(model, "stream_family", None)
    if not isinstance(family, HFFamily):
        raise TypeError("not a transformers model built by tracker.families.build_family_model")
    return family


class _MaskScoreShape(InstancePatch):
    """transformers 5.23's ``_use_mask_as_output`` (a mask prompt) returns object
    scores of shape (B, 1) where the SAM head returns (B, 1, 1); a session that
    holds other objects then fails to concatenate the frame's scores
    (``RuntimeError: Tensors must have same number of dimensions``). This gives
    the mask prompt's scores the head's shape; the values are unchanged (the
    library runs one object per call, B = 1). Installed on each model by
    :func:`install_library_fixes`; picklable, so a CPU copy keeps it."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.function(self.module, *args, **kwargs)
        if out.object_score_logits is not None and out.object_score_logits.dim() == 2:
            out.object_score_logits = out.object_score_logits[:, None]
        return out


class _PerceiverOneByOne(InstancePatch):
    """transformers 5.23's EdgeTAM perceiver fails on a batch of more than one
    memory (``latents_2d...expand(batch, -1, -1).view(...)``: "view size is not
    compatible"), which the batched step (:mod:`tracker.families.batched_step`)
    hands it; this runs such a batch one memory at a time (what the library's
    object-by-object loop does) and stacks the results. Picklable."""

    def __call__(self, features: torch.Tensor, positions: torch.Tensor | None = None) -> Any:
        if features.shape[0] <= 1:
            return self.function(self.module, features, positions)
        parts = [
            self.function(self.module, features[i : i + 1], None if positions is None else positions[i : i + 1])
            for i in range(features.shape[0])
        ]
        return tuple(None if part[0] is None else torch.cat(part, dim=0) for part in zip(*parts))


def install_library_fixes(model: torch.nn.Module) -> None:
    """Work around the library's defects on this model instance (see
    :class:`_MaskScoreShape`, :class:`_PerceiverOneByOne`); the classes
    themselves are left alone."""
    if hasattr(type(model), "_use_mask_as_output"):
        _MaskScoreShape.install(model, "_use_mask_as_output")
    perceiver = getattr(model, "spatial_perceiver", None)
    if perceiver is not None:
        _PerceiverOneByOne.install(perceiver, "forward")


def _streaming_session_class(base: type) -> type:
    """The family's session with ``num_frames`` taken from the predictor: the
    library counts the frames it holds, and we hold only a window of them."""

    class StreamingSession(base):  # type: ignore[misc,valid-type]
        frames_total = 0

        @property
        def num_frames(self) -> int:
            return self.frames_total

    StreamingSession.__name__ = StreamingSession.__qualname__ = f"Streaming{base.__name__}"
    return StreamingSession


class HFVideoPredictor(StreamingMethods):
    """Track prompted objects through frames that arrive one at a time, with a
    transformers video model (:func:`tracker.families.build_family_model`).

    The arguments are :class:`tracker.predictor.StreamingPredictor`'s.
    ``batch_objects``: on a frame where every object is simply tracked, run them
    as one batch (:mod:`tracker.families.batched_step`; the library alone runs
    them one by one); False runs the library's own loop. ``resize`` is accepted
    for the same interface (frames are resized as the library's processor does).
    ``independent_objects`` gives each object a session of its own (offline
    annotation tracks each object from its own first prompt).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        prompt_window_s: float = 2.0,
        max_prompt_frames: int = 60,
        min_prompt_frames: int = 4,
        max_cond_frames: int = 8,
        corrections_as_cond: bool = False,
        batch_objects: bool = True,
        return_logits: bool = True,
        resize: str = "pil",
        keep_for_reverse: bool = False,
        max_points_per_frame: int = 64,
        independent_objects: bool = False,
    ) -> None:
        if max_cond_frames < 2:
            raise ValueError("max_cond_frames must be at least 2 (the first prompt and the latest)")
        if int(max_points_per_frame) < 1:
            raise ValueError("max_points_per_frame must be at least 1")
        self.model = model
        self.family = family_of(model)
        self.device: torch.device = next(model.parameters()).device
        self.precision = model_precision(model)
        self.image_size: int = int(model.config.image_size)
        self.processor = _processor_of(model)
        self.max_points_per_frame = int(max_points_per_frame)
        self.max_cond_frames = int(max_cond_frames)
        self.corrections_as_cond = bool(corrections_as_cond)
        self.batch_objects = bool(batch_objects)
        self.return_logits = return_logits
        self.keep_for_reverse = keep_for_reverse
        #: frames the library is told the video has: a stream has no count (the
        #: library's streaming path), an offline video sets its real count
        self.num_frames = _STREAM_NUM_FRAMES
        config = model.config
        self._lookback = max(int(config.max_object_pointers_in_encoder), int(config.num_maskmem)) + 1
        self.window = PromptWindow(
            prompt_window_s=prompt_window_s,
            max_prompt_frames=max_prompt_frames,
            min_prompt_frames=min_prompt_frames,
            on_drop=self._forget_frame,
        )
        self.stats = PredictorStats()
        self._lock = threading.RLock()
        self._session_class = _streaming_session_class(self.family.session_class())
        #: one library session for all objects (a live stream: the library's
        #: multi-object semantics), or one per object (offline annotation: each
        #: object tracked on its own from its first prompt, as Meta's per-object
        #: reference runs); all share one feature cache
        self.independent_objects = bool(independent_objects)
        self.session = self._new_session()
        self._cache = self.session.cache
        self._per_object: dict[int, Any] = {}
        self._next_frame_idx = 0
        self._first_frame: dict[int, int] = {}  # obj_id -> its first prompted frame

    # ------------------------------------------------------------------ public API

    @property
    def prompt_window_s(self) -> float:
        return self.window.prompt_window_s

    @property
    def max_prompt_frames(self) -> int:
        return self.window.max_prompt_frames

    @property
    def min_prompt_frames(self) -> int:
        return self.window.min_prompt_frames

    @property
    def obj_ids(self) -> list[int]:
        with self._lock:
            if self.independent_objects:
                return list(self._per_object)
            return list(self.session.obj_ids)

    @property
    def newest_frame_idx(self) -> int | None:
        with self._lock:
            return self.window.newest

    @property
    def prompt_frames(self) -> list[int]:
        with self._lock:
            return list(self.window)

    def stored_entries(self) -> dict[str, int]:
        """How many per-frame things are held (the bounded-memory claim, observable)."""
        with self._lock:
            held = {"frames": len(self.window), "features": len(self._cache._vision_features)}
            counts = {"cond": 0, "non_cond": 0, "points": 0, "pixels": 0, "tracked": 0}
            for s in self._sessions():
                for od in s.output_dict_per_obj.values():
                    counts["cond"] += len(od["cond_frame_outputs"])
                    counts["non_cond"] += len(od["non_cond_frame_outputs"])
                counts["points"] += sum(len(p) for p in s.point_inputs_per_obj.values())
                counts["points"] += sum(len(m) for m in s.mask_inputs_per_obj.values())
                counts["pixels"] += len(s.processed_frames or {})
                counts["tracked"] += sum(len(t) for t in s.frames_tracked_per_obj.values())
            return {**held, **counts}

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
        """Run the image encoder on a frame and keep its features under ``frame_idx``."""
        with self._lock:
            pixels = self.to_model_input(image_rgb)
            if source_size is None:
                source_size = (
                    image_rgb.source_size
                    if isinstance(image_rgb, PreparedFrame)
                    else (int(image_rgb.shape[0]), int(image_rgb.shape[1]))
                )
            (features,) = self.forward_batch(pixels)
            self.encode_features(
                features, frame_idx=frame_idx, source_size=source_size, pts_s=pts_s, arrival_s=arrival_s, source_index=source_index
            )

    @torch.inference_mode()
    def forward_batch(self, pixels: torch.Tensor) -> list[dict[str, Any]]:
        """The image encoder on a batch of frames (``to_model_input``'s, stacked);
        one feature dict per frame, as the library caches them. The inference
        worker batches several sessions' frames through here."""
        with autocast_context(self.device, self.precision):
            out = self.model.get_image_features(pixels.to(self.device), return_dict=True)
        feats, pos = out.fpn_hidden_states, out.fpn_position_encoding
        return [
            {"vision_feats": [f[:, i : i + 1] for f in feats], "vision_pos_embeds": [p[:, i : i + 1] for p in pos]}
            for i in range(pixels.shape[0])
        ]

    @torch.inference_mode()
    def encode_features(
        self,
        features: dict[str, Any],
        *,
        source_size: tuple[int, int],
        frame_idx: int | None = None,
        pts_s: float | None = None,
        arrival_s: float | None = None,
        source_index: int | None = None,
    ) -> int:
        """Keep one frame's features (a :meth:`forward_batch` item) under
        ``frame_idx`` (default: the next one); returns the index used."""
        with self._lock:
            if frame_idx is None:
                frame_idx = self._next_frame_idx
            self._cache.cache_vision_features(frame_idx, features)
            self.window.add(frame_idx, source_size, pts_s=pts_s, arrival_s=arrival_s, source_index=source_index)
            self._next_frame_idx = max(self._next_frame_idx, frame_idx + 1)
            self.stats.frames += 1
            return frame_idx

    @torch.inference_mode()
    def propagate(self, frame_idx: int, *, reverse: bool = False, obj_ids: Sequence[int] | None = None) -> FrameResult:
        """Track objects on an encoded frame and return the masks of ``obj_ids``
        (default: all). With one shared session the library runs every object
        on the frame; an object with a prompt there keeps its prompted output."""
        with self._lock:
            entry = self.window.get(frame_idx)
            if entry is None:
                raise FrameNotAvailableError(f"frame {frame_idx} has not been encoded")
            wanted = self.obj_ids if obj_ids is None else [int(o) for o in obj_ids]
            if self.independent_objects:
                sessions = [self._per_object[o] for o in wanted if o in self._per_object]
            else:
                sessions = [self.session] if self.session.obj_ids else []
            if not sessions:
                return self._frame_result(entry, [], [])
            streaming = self.num_frames == _STREAM_NUM_FRAMES and not reverse and frame_idx == self._next_frame_idx - 1
            outs = []
            for s in sessions:
                before = _session_state(s)
                try:
                    outs.append(self._forward(s, frame_idx, reverse=reverse, streaming=streaming))
                except BaseException:
                    _load_session(s, before)  # a failed step (out of memory...) leaves no half-written frame
                    raise
            self._prune(frame_idx, reverse=reverse)
            return self._frame_result(entry, outs, wanted)

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
        """Prompt object ``obj_id`` (new, or a correction) on a frame of the
        prompt window (default: the newest), through the library's processor
        and model; an older frame re-tracks its session up to the newest."""
        with self._lock:
            entry = self.window.frame_for_prompt(frame_idx)
            frame_idx = entry.frame_idx
            obj_id = check_obj_id(obj_id)
            checked = check_prompt(entry.source_hw, points_xy, labels, box_xyxy, mask_hw)
            if box_xyxy is not None and not clear_old_points:
                raise PromptError(
                    "a box cannot be added to earlier points (SAM 2 takes the box first); "
                    "send it with clear_old_points true"
                )
            known = obj_id in self.obj_ids
            if checked.mask_hw is None:
                clicks = len(checked.labels)
                if not clear_old_points and known:
                    s = self._session_of(obj_id)
                    old = s.point_inputs_per_obj[s.obj_id_to_idx(obj_id)].get(frame_idx)
                    if old is not None:
                        clicks += int((old["point_labels"] < 2).sum())
                check_point_budget(self.max_points_per_frame, obj_id, frame_idx, clicks, clear_old_points)
            session = self._session_of(obj_id, create=True)
            before = _session_state(session)
            newest = self.newest_frame_idx
            try:
                obj_idx = session.obj_id_to_idx(obj_id)  # adds the object (the library's way)
                self._add_inputs(session, frame_idx, obj_id, entry.source_hw, checked, clear_old_points)
                was_tracked = frame_idx in session.frames_tracked_per_obj[obj_idx]
                out = self._forward(session, frame_idx, reverse=False, streaming=False)
                if was_tracked and self.corrections_as_cond:
                    od = session.output_dict_per_obj[obj_idx]
                    if frame_idx in od["non_cond_frame_outputs"]:
                        od["cond_frame_outputs"][frame_idx] = od["non_cond_frame_outputs"].pop(frame_idx)
                self._cap_cond_frames(session, obj_idx)
                result = self._object_results(entry, [out], [obj_id], is_prompted=True)[obj_id]
                if newest is not None and frame_idx < newest:
                    for t in range(frame_idx + 1, newest + 1):
                        self._forward(session, t, reverse=False, streaming=False)
                        self.stats.catch_up_frames += 1
            except BaseException:
                # a failed prompt changes nothing: the session as it was (a new
                # object gone, a known one with its old inputs and outputs)
                _load_session(session, before)
                if not known and self.independent_objects:
                    self._per_object.pop(obj_id, None)
                raise
            self._first_frame[obj_id] = min(self._first_frame.get(obj_id, frame_idx), frame_idx)
            self.stats.prompts += 1
            self._prune(newest if newest is not None else frame_idx)
            return result

    def finalize_prompts(self) -> None:
        """Nothing to do: the library encodes a prompted frame's memory in the
        same call (kept for the common interface)."""

    def state_dict(self) -> dict[str, Any]:
        """The tracking state (bounded: memories, pointers, prompts), without frame
        features; with :meth:`load_state_dict` a run can stop and resume exactly."""
        with self._lock:
            return {
                "family": self.family.name,
                "independent_objects": self.independent_objects,
                "sessions": [_session_state(s) for s in self._sessions()],
                "first_frame": dict(self._first_frame),
                "next_frame_idx": self._next_frame_idx,
                "num_frames": self.num_frames,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take over a :meth:`state_dict` (from this predictor or one on another device)."""
        if state.get("family") != self.family.name:
            raise ValueError(f"a {state.get('family')!r} state cannot be loaded into a {self.family.name} predictor")
        if bool(state.get("independent_objects")) != self.independent_objects:
            raise ValueError("a state of per-object sessions and one of a shared session do not mix")
        state = _to_device(state, self.device)
        with self._lock:
            self.window.clear()
            self._per_object.clear()
            sessions = [_load_session(self._new_session(), one) for one in state["sessions"]]
            if self.independent_objects:
                self.session = self._new_session()
                self._per_object = {int(s.obj_ids[0]): s for s in sessions}
            else:
                self.session = sessions[0] if sessions else self._new_session()
            self._first_frame = {int(k): int(v) for k, v in state["first_frame"].items()}
            self._next_frame_idx = int(state["next_frame_idx"])
            self.num_frames = int(state["num_frames"])

    def remove_object(self, obj_id: int) -> None:
        with self._lock:
            if obj_id not in self.obj_ids:
                raise PromptError(f"unknown object id {obj_id}; tracked object ids: {self.obj_ids}")
            self._drop_object(obj_id)

    def reset(self) -> None:
        """Forget every object and prompt (frames in the prompt window stay)."""
        with self._lock:
            self.session.reset_tracking_data()
            self._per_object.clear()
            self._first_frame.clear()

    def close(self) -> None:
        """Free everything held (features, memories)."""
        with self._lock:
            self.window.clear()
            self.session.reset_inference_session()
            self._per_object.clear()
            self._cache.clear_all()
            self._first_frame.clear()

    # ------------------------------------------------------------------ frames

    def prepare(self, image_rgb: np.ndarray | torch.Tensor) -> np.ndarray:
        """Check a frame and resize it to the model's S x S (uint8 RGB) as the
        library's image processor does (bilinear with antialiasing on uint8),
        so a prepared frame gives the processor's own pixels."""
        image_rgb = check_rgb_frame(image_rgb)
        h, w = image_rgb.shape[:2]
        s = self.image_size
        if (h, w) == (s, s):
            return np.array(image_rgb)
        import torchvision.transforms.v2.functional as TF

        chw = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1)
        resized = TF.resize(chw, [s, s], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return resized.permute(1, 2, 0).contiguous().numpy()

    def to_model_input(self, image_rgb: np.ndarray | torch.Tensor | PreparedFrame) -> torch.Tensor:
        """HxWx3 uint8 RGB → 1x3xSxS pixel values, as the library's processor makes them."""
        if isinstance(image_rgb, PreparedFrame):
            return self._prepared_pixels(image_rgb)
        return self._normalise(self.prepare(image_rgb)).to(self.device)

    def _frame_pixels(self, image_ss: np.ndarray) -> torch.Tensor:
        """A prepared frame's tensor: the processor's pixel values."""
        return self._normalise(image_ss)

    def _normalise(self, image_ss: np.ndarray) -> torch.Tensor:
        return self.processor(images=image_ss, return_tensors="pt").pixel_values

    # ------------------------------------------------------------------ internals

    def _new_session(self) -> Any:
        session = self._session_class(
            inference_device=self.device,
            inference_state_device=self.device,
            video_storage_device=self.device,
            dtype=torch.float32,
            max_vision_features_cache_size=1 << 30,  # the prompt window decides (``_forget_frame``)
        )
        session.processed_frames = {}
        if hasattr(self, "_cache"):
            session.cache = self._cache  # one frame's features serve every session
        return session

    def _sessions(self) -> list[Any]:
        return list(self._per_object.values()) if self.independent_objects else [self.session]

    def _session_of(self, obj_id: int, *, create: bool = False) -> Any:
        if not self.independent_objects:
            return self.session
        session = self._per_object.get(obj_id)
        if session is None and create:
            session = self._per_object[obj_id] = self._new_session()
        return session

    def _forget_frame(self, entry: WindowFrame) -> None:
        self._cache._vision_features.pop(entry.frame_idx, None)

    def _forward(self, s: Any, frame_idx: int, *, reverse: bool, streaming: bool) -> Any:
        """One call of the library's model on a frame whose features are cached.

        ``streaming`` takes the library's streaming path (a new frame of a
        stream: ``model(session, frame=...)``), where the object-pointer window
        does not depend on a frame count; the pixels it would store are never
        read (the features are cached), so none are handed over or kept.
        """
        s.frames_total = self._next_frame_idx if self.num_frames == _STREAM_NUM_FRAMES else self.num_frames
        if frame_idx not in self._cache._vision_features:
            raise FrameNotAvailableError(f"frame {frame_idx}'s features are no longer held")
        with autocast_context(self.device, self.precision):
            if self.batch_objects and plain_tracking_frame(self.model, s, frame_idx):
                out = track_batched(self.model, s, frame_idx, reverse=reverse, streaming=streaming)
            elif streaming:
                out = self.model(s, frame_idx=frame_idx, frame=_NO_PIXELS)
            else:
                out = self.model(s, frame_idx=frame_idx, reverse=reverse)
        s.processed_frames.pop(frame_idx, None)
        for od in s.output_dict_per_obj.values():
            for key in ("cond_frame_outputs", "non_cond_frame_outputs"):
                stored = od[key].get(frame_idx)
                if stored is not None:
                    stored.pop("high_res_masks", None)  # only the step that just ran reads it
        return out

    def _add_inputs(
        self, session: Any, frame_idx: int, obj_id: int, source_hw: tuple[int, int], checked: Any, clear_old_points: bool
    ) -> None:
        kwargs: dict[str, Any] = {}
        if checked.mask_hw is not None:
            kwargs["input_masks"] = torch.from_numpy(checked.mask_hw)
        else:
            if len(checked.labels):
                kwargs["input_points"] = [[checked.points_xy.astype(np.float64).tolist()]]
                kwargs["input_labels"] = [[checked.labels.astype(np.int64).tolist()]]
            if checked.box_xyxy is not None:
                kwargs["input_boxes"] = [[checked.box_xyxy.astype(np.float64).tolist()]]
        self.processor.add_inputs_to_inference_session(
            session,
            frame_idx=frame_idx,
            obj_ids=[obj_id],
            original_size=source_hw,
            clear_old_inputs=clear_old_points,
            **kwargs,
        )

    def _drop_object(self, obj_id: int) -> None:
        """Forget an object. The library has no way to remove one from a
        session: its per-object tables are rebuilt without it (object indices
        are positions in ``obj_ids``)."""
        self._first_frame.pop(obj_id, None)
        if self.independent_objects:
            self._per_object.pop(obj_id, None)
            return
        s = self.session
        keep = [o for o in s.obj_ids if o != obj_id]
        old_idx = {o: s.obj_id_to_idx(o) for o in keep}
        tables = {name: {o: getattr(s, name)[old_idx[o]] for o in keep} for name in _PER_OBJECT_TABLES}
        s.reset_tracking_data()
        for o in keep:
            i = s.obj_id_to_idx(o)
            for name, table in tables.items():
                getattr(s, name)[i] = table[o]

    def _cap_cond_frames(self, session: Any, obj_idx: int) -> None:
        cond = session.output_dict_per_obj[obj_idx]["cond_frame_outputs"]
        if len(cond) <= self.max_cond_frames:
            return
        keys = sorted(cond)
        keep = {keys[0], *keys[-(self.max_cond_frames - 1) :]}
        for t in keys:
            if t not in keep:
                del cond[t]

    def _prune(self, frame_idx: int, reverse: bool = False) -> None:
        """Drop what the library can no longer read: outputs (and the record of
        tracked frames) beyond the memory/pointer reach of any frame a prompt or
        the next step may touch, and prompts on frames that left the window."""
        oldest = self.window.oldest if self.window.oldest is not None else frame_idx
        for s in self._sessions():
            for obj_idx, obj_id in enumerate(s.obj_ids):
                first = self._first_frame.get(obj_id, 0)
                keep_hi = first + (self._lookback if self.keep_for_reverse else 0)
                if reverse:
                    hi = frame_idx + self._lookback

                    def stale(t: int) -> bool:
                        return t > hi
                else:
                    lo = min(frame_idx, oldest) - self._lookback

                    def stale(t: int) -> bool:
                        return t < lo and not (first < t <= keep_hi)

                non_cond = s.output_dict_per_obj[obj_idx]["non_cond_frame_outputs"]
                for t in [t for t in non_cond if stale(t)]:
                    del non_cond[t]
                tracked = s.frames_tracked_per_obj[obj_idx]
                for t in [t for t in tracked if stale(t)]:
                    del tracked[t]
                for table in (s.point_inputs_per_obj[obj_idx], s.mask_inputs_per_obj[obj_idx]):
                    for t in [t for t in table if t not in self.window]:
                        del table[t]

    # ------------------------------------------------------------------ results

    def video_res_logits(self, pred_masks: torch.Tensor, source_hw: tuple[int, int]) -> torch.Tensor:
        """Low-resolution mask logits → source resolution, by the library's own
        post-processing (to S x S, then to the source size)."""
        (logits,) = self.processor.post_process_masks([pred_masks.float()], original_sizes=[list(source_hw)], binarize=False)
        return logits

    def _object_results(self, entry: WindowFrame, outs: list[Any], obj_ids: list[int], *, is_prompted: bool) -> dict[int, ObjectResult]:
        rows: dict[int, tuple[torch.Tensor, float]] = {}
        wanted = set(obj_ids)
        for out in outs:
            scores = out.object_score_logits.reshape(len(out.object_ids), -1)
            for i, o in enumerate(out.object_ids):
                if o in wanted:
                    rows[o] = (out.pred_masks[i : i + 1], float(scores[i, 0]))
        order = [o for o in obj_ids if o in rows]
        if not order:
            return {}
        logits = self.video_res_logits(torch.cat([rows[o][0] for o in order]), entry.source_hw)
        results = {}
        for k, o in enumerate(order):
            logits_hw = logits[k, 0]
            mask = (logits_hw > 0).cpu().numpy()
            results[o] = ObjectResult(
                obj_id=o,
                mask_hw=mask,
                score=rows[o][1],
                logits_hw=logits_hw.float().cpu().numpy() if self.return_logits else None,
                box_xyxy=mask_box_xyxy(mask),
                is_prompted=is_prompted,
            )
        return results

    def _frame_result(self, entry: WindowFrame, outs: list[Any], obj_ids: list[int]) -> FrameResult:
        result = FrameResult(
            frame_idx=entry.frame_idx,
            height=entry.source_hw[0],
            width=entry.source_hw[1],
            pts_s=entry.pts_s,
            arrival_s=entry.arrival_s,
            source_index=entry.source_index,
        )
        if outs:
            result.objects = self._object_results(entry, outs, obj_ids, is_prompted=False)
        result.processed_s = time.time()
        return result


_PER_OBJECT_TABLES = ("point_inputs_per_obj", "mask_inputs_per_obj", "output_dict_per_obj", "frames_tracked_per_obj")


def _copy_table(name: str, table: dict) -> dict:
    """A table's structure copied (the library replaces per-frame entries, never
    changes stored tensors in place, so this is a snapshot)."""
    if name == "output_dict_per_obj":
        return {key: dict(frames) for key, frames in table.items()}
    return dict(table)


def _session_state(s: Any) -> dict[str, Any]:
    """A session's tracking state, detached from the session (later steps and
    pruning do not change it): for snapshots, and to undo a failed step."""
    n = len(s.obj_ids)
    return {
        "obj_ids": list(s.obj_ids),
        **{name: [_copy_table(name, getattr(s, name)[i]) for i in range(n)] for name in _PER_OBJECT_TABLES},
        "obj_with_new_inputs": list(s.obj_with_new_inputs),
        "video_hw": (s.video_height, s.video_width),
    }


def _load_session(s: Any, state: dict[str, Any]) -> Any:
    s.reset_tracking_data()
    if s.processed_frames:
        s.processed_frames.clear()
    for i, obj_id in enumerate(state["obj_ids"]):
        s.obj_id_to_idx(int(obj_id))
        for name in _PER_OBJECT_TABLES:
            getattr(s, name)[i] = state[name][i]
    s.obj_with_new_inputs = list(state["obj_with_new_inputs"])
    s.video_height, s.video_width = state["video_hw"]
    return s
def _processor_of(model: torch.nn.Module) -> Any:
    """One processor per model (predictors of one model share it)."""
    proc = getattr(model, "stream_processor", None)
    if proc is None:
        proc = family_of(model).processor(int(model.config.image_size))
        model.stream_processor = proc  # type: ignore[assignment]
    return proc
