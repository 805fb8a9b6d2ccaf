"""EdgeTAM (Meta, CVPR 2025) through transformers' ``EdgeTamVideoModel``.

SAM 2's design with a RepViT-M1 image encoder (timm's ``repvit_m1``), a 2D
spatial perceiver that compresses each frame's memory to 256 + 256 latents, and
two memory-attention layers: on a CPU its frame costs a fraction of
sam2.1-tiny's.

Beware: transformers' ``EdgeTamVideoConfig()`` with no arguments builds a *Hiera*
vision encoder (its ``vision_config`` defaults to ``sam2_vision_model``), and
``EdgeTamVisionConfig()``'s own default names its timm architecture under a
misspelt key. :meth:`EdgeTam.config` spells the RepViT backbone out and
:meth:`EdgeTam.check_architecture` refuses anything else.
"""

from __future__ import annotations

from typing import Any

import torch

from tracker.errors import ModelConfigError
from tracker.families.base import HFFamily, require_transformers

#: timm architecture of EdgeTAM's image encoder, and the feature levels it hands on
REPVIT_ARCH = "repvit_m1"
_REPVIT_ARGS = {"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]}


class EdgeTam(HFFamily):
    name = "edgetam"
    title = "EdgeTAM"
    image_size = 1024
    size_multiple = 32
    licence = "Apache-2.0 (code and weights)"
    memory_attention_counts_spatial = True  # its perceiver's latents: RoPE repeats per memory frame

    def model_class(self) -> type:
        return require_transformers().EdgeTamVideoModel

    def session_class(self) -> type:
        require_transformers()
        from transformers.models.edgetam_video.modeling_edgetam_video import EdgeTamVideoInferenceSession

        return EdgeTamVideoInferenceSession

    def segmentation_output_class(self) -> type:
        require_transformers()
        from transformers.models.edgetam_video.modeling_edgetam_video import EdgeTamVideoSegmentationOutput

        return EdgeTamVideoSegmentationOutput

    def config(self, *, image_size: int | None = None, reduced: bool = False) -> Any:
        """EdgeTAM's released architecture. ``reduced`` keeps RepViT-M1 and the
        perceiver (the architecture) but narrows the memory attention's MLP and
        the memory fuser and shortens the memory (4 frames, 6 object pointers),
        for fast tests."""
        tf = require_transformers()
        backbone = tf.TimmWrapperConfig(architecture=REPVIT_ARCH, model_args=dict(_REPVIT_ARGS))
        vision = tf.EdgeTamVisionConfig(backbone_config=backbone)
        extra: dict[str, Any] = {}
        if reduced:
            extra = {
                # a shorter memory: the same model, fewer frames for a test to pass its reach
                "num_maskmem": 4,
                "max_object_pointers_in_encoder": 6,
                "memory_attention_mlp_hidden_size": 256,
                "memory_fuser_intermediate_dim": 256,
                "perceiver_resampler_mlp_intermediate_size": 64,
            }
        config = tf.EdgeTamVideoConfig(vision_config=vision, **extra)
        self.resize_config(config, self.check_image_size(image_size or self.image_size))
        return config

    def check_image_size(self, image_size: int) -> int:
        super().check_image_size(image_size)
        if image_size < 256:
            # the perceiver pools the 1/16 feature map into a 16 x 16 grid of latents
            raise ModelConfigError(
                f"image_size {image_size} is too small for EdgeTAM: its perceiver needs at least 256 "
                "(a 16 x 16 grid at 1/16 scale); the official weights use 1024"
            )
        return int(image_size)

    def resize_config(self, config: Any, image_size: int) -> None:
        s = self.check_image_size(image_size)
        config.image_size = s
        config.prompt_encoder_config.image_size = s
        config.vision_config.backbone_feature_sizes = [[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]]
        config.memory_attention_rope_feat_sizes = [s // 16, s // 16]

    def processor(self, image_size: int) -> Any:
        tf = require_transformers()
        size = {"height": image_size, "width": image_size}
        return tf.Sam2VideoProcessor(
            image_processor=tf.Sam2ImageProcessor(size=size, mask_size={"height": image_size // 4, "width": image_size // 4}),
            video_processor=tf.Sam2VideoVideoProcessor(size=size),
            target_size=image_size,
        )

    def speed_up(self, model: torch.nn.Module) -> list[str]:
        """RepViT in its inference form (timm's re-parameterisation) and the
        vision encoder's convolutions in NHWC (see :mod:`tracker.families.speedups`)."""
        from tracker.families.speedups import channels_last, fuse_reparameterizable

        fused = fuse_reparameterizable(model.vision_encoder.backbone.timm_model)
        channels_last(model.vision_encoder)
        return [f"RepViT re-parameterised ({fused} modules fused)", "vision encoder channels-last"]

    def check_architecture(self, model: torch.nn.Module) -> None:
        vision = getattr(model, "vision_encoder", None)
        backbone = getattr(vision, "backbone", None)
        timm_model = getattr(backbone, "timm_model", None)
        stem = type(next(iter(timm_model.children()))).__name__ if timm_model is not None else ""
        arch = getattr(getattr(model.config.vision_config, "backbone_config", None), "architecture", None)
        if type(vision).__name__ != "EdgeTamVisionModel" or arch != REPVIT_ARCH or not stem.startswith("RepVit"):
            raise ModelConfigError(
                f"this EdgeTAM model's image encoder is {type(vision).__name__} / {arch or type(backbone).__name__}, "
                f"not {REPVIT_ARCH}: the config did not describe EdgeTAM (EdgeTamVideoConfig() alone builds a Hiera encoder)"
            )


FAMILY = EdgeTam()
