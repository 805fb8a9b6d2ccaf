"""Several objects tracked through one frame in one batch, for the transformers
families: the library's own tracking step, with the objects stacked.

transformers' ``*VideoModel.forward`` runs its objects one at a time ("per-object
inputs can differ", and its ``_prepare_vision_features`` cannot expand a list to
a batch), so N objects cost N passes of memory attention, mask decoder and
memory encoder, where SAM 2's predictor (and Meta's) runs them as one batch.
On a frame where every object is simply tracked (no new prompt, no
conditioning output there: a live stream's every frame but the prompted ones)
this module does what the library's loop does for each object, with the
library's own functions, but batched:

* each object's memory (its memory frames, object pointers and their
  positional encodings) is gathered by the library's helpers exactly as it
  would for that object alone; objects whose memories have the same layout
  go through memory attention as one batch;
* the mask decoder and the memory encoder (and EdgeTAM's perceiver) run once
  for all objects, as SAM 3's tracker already does for its memory encoder;
* each object's output is stored in the session as the library stores it.

The outputs equal the library's object-by-object loop up to float rounding
(``tests/test_families.py`` runs both at 1e-4). Frames with a prompt, and a
single object, go through the library's own ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch


#: objects per call of the SAM head: the library's multimask selection builds
#: an objects x objects tensor of full-resolution masks (see ``_sam_head``), so
#: a batch is cut into chunks of this many (16 masks of 1024 x 1024 at most)
HEAD_CHUNK = 4


def plain_tracking_frame(model: torch.nn.Module, session: Any, frame_idx: int) -> bool:
    """True when the library would simply track every object of ``session`` on
    ``frame_idx`` (the model has a memory, no object has new inputs, none has a
    conditioning output there) and there is more than one object to batch."""
    n = session.get_obj_num()
    if n < 2 or session.obj_with_new_inputs or int(model.num_maskmem) <= 0:
        return False
    return all(frame_idx not in session.output_dict_per_obj[i]["cond_frame_outputs"] for i in range(n))


def _object_memory(
    model: torch.nn.Module, session: Any, obj_idx: int, frame_idx: int, *, reverse: bool, streaming: bool
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """One object's memory-attention inputs, built by the library's helpers as in
    its ``_prepare_memory_conditioned_features`` (steps 2-4): (memory,
    positional encodings, object-pointer tokens, spatial memory frames)."""
    device = model.device
    outputs = model._gather_memory_frame_outputs(session, obj_idx, frame_idx, reverse)
    memories, positions = model._build_memory_attention_inputs(outputs, device)
    n_spatial = len(memories)
    offsets, pointers, max_pointers = model._get_object_pointers(
        session, obj_idx, frame_idx, session.num_frames, device, reverse, streaming
    )
    n_pointer_tokens = 0
    if pointers:
        ptr, ptr_pos = model._process_object_pointers(offsets, pointers, max_pointers, 1, model.hidden_dim, device)
        if ptr is not None:
            memories.append(ptr)
            positions.append(ptr_pos)
            n_pointer_tokens = ptr.shape[0]
    return torch.cat(memories, dim=0), torch.cat(positions, dim=0), n_pointer_tokens, n_spatial


def track_batched(model: torch.nn.Module, session: Any, frame_idx: int, *, reverse: bool, streaming: bool) -> Any:
    """Track every object of ``session`` on ``frame_idx`` (a
    :func:`plain_tracking_frame`) in one batch; store each object's output as
    the library does and return what its ``forward`` returns."""
    family = model.stream_family
    n = session.get_obj_num()
    feats, pos = model._prepare_vision_features(session, frame_idx, batch_size=1)
    height, width = model.backbone_feature_sizes[-1]
    channels = model.hidden_dim
    current, current_pos = feats[-1], pos[-1]  # (HW, 1, C)

    # memory attention, one batch per memory layout (usually one for all)
    memories = [_object_memory(model, session, i, frame_idx, reverse=reverse, streaming=streaming) for i in range(n)]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (memory, memory_pos, n_ptr, n_spatial) in enumerate(memories):
        # same layout and dtypes (a batch must not promote one object's memory)
        groups.setdefault((memory.shape[0], n_ptr, n_spatial, memory.dtype, memory_pos.dtype), []).append(i)
    pix_feat: list[torch.Tensor | None] = [None] * n
    for (_, n_ptr, n_spatial, _, _), members in groups.items():
        b = len(members)
        memory = torch.cat([memories[i][0] for i in members], dim=1)
        memory_pos = torch.cat([memories[i][1] for i in members], dim=1)
        if family.memory_in_session_dtype:
            memory = memory.to(dtype=session.dtype)
        extra = {"num_spatial_memory_tokens": n_spatial} if family.memory_attention_counts_spatial else {}
        out = model.memory_attention(
            current_vision_features=current.expand(-1, b, -1),
            current_vision_position_embeddings=current_pos.expand(-1, b, -1),
            memory=memory,
            memory_posision_embeddings=memory_pos,  # sic, the library's name
            num_object_pointer_tokens=n_ptr,
            **extra,
        )
        # (1, B, HW, C) -> B x C x H x W (the library's reshape, for a batch)
        conditioned = out.reshape(b, height * width, channels).transpose(1, 2).reshape(b, channels, height, width)
        for k, i in enumerate(members):
            pix_feat[i] = conditioned[k : k + 1]

    # the SAM head, then the memory encoder for all objects (as SAM 3's ``_batch_encode_memories``)
    sam = _sam_head(model, feats, torch.cat(pix_feat, dim=0))
    maskmem, maskmem_pos = model._encode_new_memory(
        current_vision_feats=current.expand(-1, n, -1),
        pred_masks_high_res=sam["high_res_masks"],
        object_score_logits=sam["object_score_logits"],
        is_mask_from_pts=False,
    )
    d = family.memory_batch_dim
    for i in range(n):
        current_out = {
            "pred_masks": sam["pred_masks"][i : i + 1].clone(),
            "object_pointer": sam["object_pointer"][i : i + 1].clone(),
            "maskmem_features": maskmem.narrow(d, i, 1).clone(),
            "maskmem_pos_enc": maskmem_pos.narrow(d, i, 1).clone(),
            "object_score_logits": sam["object_score_logits"][i : i + 1].clone(),
        }
        session.store_output(i, frame_idx, output_value=current_out, is_conditioning_frame=False)
        session.frames_tracked_per_obj[i][frame_idx] = {"reverse": reverse}
    # what the library's ``forward`` returns for the frame
    return family.segmentation_output_class()(
        object_ids=session.obj_ids.copy(), pred_masks=sam["pred_masks"],
        object_score_logits=sam["object_score_logits"].squeeze(-1), frame_idx=frame_idx,
    )


_HEAD_OUTPUTS = ("pred_masks", "high_res_masks", "object_pointer", "object_score_logits")


def _sam_head(model: torch.nn.Module, feats: list[torch.Tensor], pix_feat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The library's ``_single_frame_forward`` (no prompt) on the memory-conditioned
    features of B objects, in chunks of :data:`HEAD_CHUNK`; its outputs per object,
    concatenated.

    With multimask output (the released configs track with it), the library
    selects each object's best mask as ``[batch_inds, object_batch_inds,
    best_iou_inds]`` with ``best_iou_inds`` of shape (B, 1): that broadcasts to
    B x B, entry [r, c] being object c's mask at object r's best index, so
    object i's own choice is the diagonal (the chunks keep that B x B small)."""
    multimask = model._use_multimask(False, None)
    # the high-resolution levels, (HW)BC -> BCHW, shared by every object
    high_res = [x.permute(1, 2, 0).view(1, x.size(2), *s) for x, s in zip(feats[:-1], model.backbone_feature_sizes[:-1])]
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in _HEAD_OUTPUTS}
    for start in range(0, pix_feat.shape[0], HEAD_CHUNK):
        chunk = pix_feat[start : start + HEAD_CHUNK]
        b = chunk.shape[0]
        out = model._single_frame_forward(
            pixel_values=None, input_points=None, input_labels=None, input_masks=None,
            image_embeddings=[x.expand(b, -1, -1, -1) for x in high_res] + [chunk], multimask_output=multimask,
        )  # fmt: skip
        for k in _HEAD_OUTPUTS:
            value = getattr(out, k)
            if k != "object_score_logits" and b > 1 and value.shape[1] == b:
                diag = torch.arange(b, device=value.device)
                value = value[diag, diag].unsqueeze(1)
            parts[k].append(value)
    return {k: torch.cat(v, dim=0) for k, v in parts.items()}
