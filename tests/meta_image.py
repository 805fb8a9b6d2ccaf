"""Meta's ``SAM2ImagePredictor`` as the reference for image-mode tests (engine and server)."""

from __future__ import annotations

import numpy as np
import torch


def meta_image_predictor(model: torch.nn.Module, image: np.ndarray):  # -> SAM2ImagePredictor
    """Meta's image predictor on ``image``, its feature sizes set for the model's image size
    (Meta's code assumes 1024 px)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    p = SAM2ImagePredictor(model)
    s = model.image_size
    p._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    p.set_image(image)
    return p


def meta_predict(meta, prompt: dict, multimask: bool, mask_input: np.ndarray | None = None):
    """Meta's answer to ``prompt`` (``points_xy``/``labels``/``box_xyxy``): bool masks,
    IoU scores and low-res logits, best first."""
    pts = np.array(prompt["points_xy"], np.float32) if "points_xy" in prompt else None
    lbl = np.array(prompt["labels"], np.int32) if "labels" in prompt else None
    box = np.array(prompt["box_xyxy"], np.float32) if "box_xyxy" in prompt else None
    masks, ious, low = meta.predict(
        point_coords=pts, point_labels=lbl, box=box, mask_input=mask_input, multimask_output=multimask
    )
    order = np.argsort(-ious, kind="stable")
    return masks[order].astype(bool), ious[order], low[order]
