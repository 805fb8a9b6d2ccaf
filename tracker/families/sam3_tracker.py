"""SAM 3's tracker (Meta, November 2025) through transformers'
``Sam3TrackerVideoModel``: SAM 2's streaming memory design on SAM 3's
perception encoder (a windowed ViT with 14-pixel patches at 1008 px).

Only the tracker (points, boxes and masks of chosen objects) is served; SAM 3's
text-prompted detector is not. Its checkpoint is gated: it is published under
Meta's SAM License, which restricts some uses; read it before you deploy.
"""

from __future__ import annotations

from typing import Any

import torch

from tracker.errors import ModelConfigError
from tracker.families.base import HFFamily, require_transformers

_PATCH = 14


class Sam3Tracker(HFFamily):
    name = "sam3-tracker"
    title = "SAM 3 tracker"
    image_size = 1008
    size_multiple = _PATCH
    licence = "SAM License (Meta; restricts some uses, gated download)"
    memory_batch_dim = 1  # its memory features are stored (HW, B, C)
    memory_in_session_dtype = True

    def model_class(self) -> type:
        return require_transformers().Sam3TrackerVideoModel

    def session_class(self) -> type:
        require_transformers()
        from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
            Sam3TrackerVideoInferenceSession,
        )

        return Sam3TrackerVideoInferenceSession

    def segmentation_output_class(self) -> type:
        require_transformers()
        from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoSegmentationOutput

        return Sam3TrackerVideoSegmentationOutput

    def config(self, *, image_size: int | None = None, reduced: bool = False) -> Any:
        """SAM 3's released tracker. ``reduced`` keeps the architecture (windowed
        ViT with global layers, FPN neck, SAM 2 heads and memory) with a narrow,
        two-layer ViT and a shorter memory (4 frames, 6 object pointers), for fast tests."""
        tf = require_transformers()
        from transformers.models.sam3.configuration_sam3 import Sam3ViTConfig, Sam3VisionConfig

        if reduced:
            vit = Sam3ViTConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=2,
                window_size=4,
                global_attn_indexes=[1],
                pretrain_image_size=112,
            )
            config = tf.Sam3TrackerVideoConfig(
                vision_config=Sam3VisionConfig(backbone_config=vit),
                num_maskmem=4,
                max_object_pointers_in_encoder=6,
                memory_attention_mlp_hidden_size=256,
                memory_fuser_intermediate_dim=256,
            )
        else:
            config = tf.Sam3TrackerVideoConfig()
        self.resize_config(config, image_size or (224 if reduced else self.image_size))
        return config

    def check_image_size(self, image_size: int, window: int = 24) -> int:
        grid = image_size // _PATCH
        if image_size % _PATCH != 0 or grid % window != 0:
            raise ModelConfigError(
                f"image_size {image_size} does not fit the SAM 3 tracker: it must be a multiple of {_PATCH * window} "
                f"({_PATCH}-pixel patches in windows of {window}); the official weights use {self.image_size}"
            )
        return int(image_size)

    def resize_config(self, config: Any, image_size: int) -> None:
        window = int(config.vision_config.backbone_config.window_size)
        config.image_size = self.check_image_size(image_size, window)

    def processor(self, image_size: int) -> Any:
        tf = require_transformers()
        size = {"height": image_size, "width": image_size}
        half = [0.5, 0.5, 0.5]
        return tf.Sam3TrackerVideoProcessor(
            image_processor=tf.Sam3ImageProcessor(size=size, mask_size={"height": image_size // 14 * 4, "width": image_size // 14 * 4}),
            video_processor=tf.Sam2VideoVideoProcessor(size=size, image_mean=half, image_std=half),
            target_size=image_size,
        )

    def check_architecture(self, model: torch.nn.Module) -> None:
        vision = getattr(model, "vision_encoder", None)
        backbone = getattr(vision, "backbone", None)
        if type(vision).__name__ != "Sam3VisionModel" or type(backbone).__name__ != "Sam3ViTModel":
            raise ModelConfigError(
                f"this SAM 3 tracker's image encoder is {type(vision).__name__}/{type(backbone).__name__}, "
                "not SAM 3's perception encoder (Sam3VisionModel/Sam3ViTModel)"
            )


FAMILY = Sam3Tracker()
