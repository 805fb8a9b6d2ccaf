"""Shared fixtures: one seeded random-weight SAM 2.1 tiny model at image_size 256,
saved in Meta's checkpoint format and loaded back through the project's loader."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEST_IMAGE_SIZE = 256
TEST_SEED = 1234


def pytest_configure(config: pytest.Config) -> None:
    # tests run on CPU; two cores on CI
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    logging.getLogger("tracker").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random-weight checkpoint file in the official format."""
    from tracker.checkpoints import save_checkpoint
    from tracker.model import build_model, model_state_dict

    net = build_model("sam2.1-tiny", device="cpu", image_size=TEST_IMAGE_SIZE, random_weights_seed=TEST_SEED)
    path = tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny_random.pt"
    save_checkpoint(model_state_dict(net), path)
    return path


@pytest.fixture(scope="session")
def model(random_checkpoint: Path) -> torch.nn.Module:
    from tracker.model import build_model

    return build_model("sam2.1-tiny", checkpoint=random_checkpoint, device="cpu", image_size=TEST_IMAGE_SIZE)


@pytest.fixture(scope="session")
def second_model() -> torch.nn.Module:
    """Another model with other (seeded random) weights: sessions choosing models."""
    from tracker.model import build_model

    return build_model("sam2.1-tiny", device="cpu", image_size=TEST_IMAGE_SIZE, random_weights_seed=TEST_SEED + 1)
