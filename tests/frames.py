"""Synthetic frames for engine tests: coloured shapes moving over a textured background.

Frames are made in memory (no codec), so the tests that compare the engine with
Meta's predictor see exactly the same pixels on both sides (Meta's predictor
reads a JPEG folder; :func:`write_jpeg_folder` writes one and returns the frames
as decoded from it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: (colour, start xy as a fraction of w/h, velocity px/frame, half size px)
SHAPES = [
    ((230, 40, 40), (0.20, 0.30), (3.0, 1.0), 14),
    ((40, 210, 60), (0.70, 0.65), (-2.0, -1.5), 11),
    ((40, 80, 230), (0.45, 0.75), (1.5, -2.0), 9),
]


def shape_centres(i: int, h: int, w: int) -> list[tuple[float, float]]:
    return [(fx * w + vx * i, fy * h + vy * i) for _, (fx, fy), (vx, vy), _ in SHAPES]


def moving_shapes(n: int, h: int = 120, w: int = 160, seed: int = 0) -> list[np.ndarray]:
    """``n`` RGB uint8 frames; shape k is a filled square (k=0), disc (k=1), diamond (k=2)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    background = (40 + 30 * np.sin(xx / 7.0)[..., None] + 20 * np.cos(yy / 5.0)[..., None]).astype(np.float32)
    background = np.repeat(background, 3, axis=2) + rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    frames = []
    for i in range(n):
        img = background.copy()
        for k, ((colour, _, _, r), (cx, cy)) in enumerate(zip(SHAPES, shape_centres(i, h, w))):
            if k == 0:
                inside = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
            elif k == 1:
                inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            else:
                inside = np.abs(xx - cx) + np.abs(yy - cy) <= r
            img[inside] = colour
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


def write_jpeg_folder(frames: list[np.ndarray], folder: Path) -> list[np.ndarray]:
    """Write ``00000.jpg``… (the layout Meta's ``init_state`` reads) and return the
    frames decoded back from those files, so both predictors get identical pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    decoded = []
    for i, frame in enumerate(frames):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(frame).save(path, quality=95)
        decoded.append(np.array(Image.open(path).convert("RGB")))
    return decoded
