"""An LRU cache of image embeddings with a memory budget, shared by every client.

What is cached is what ``SAM2ImagePredictor.set_image`` computes (see
:class:`tracker.segment.ImageEmbedding`): the image encoder's work, seconds on
a CPU, which every later prompt on the image reuses through the mask decoder
alone (milliseconds).

Keys (:class:`EmbeddingKey`) are the pair (image content, model):

- the image part is the sha256 of the *decoded pixels* and their shape
  (:func:`image_digest`), not of the uploaded bytes. The embedding is a
  function of the pixels only, so the same picture as PNGs of two compression
  levels, with or without metadata, from a path or as an array, shares one
  entry. Hashing 1024 x 1024 RGB pixels takes about 2 ms, nothing
  next to the encoder; decoding before the lookup is the price.
- the model part is :func:`model_key`: one key per loaded model object (a CPU
  fallback copy or another precision is another key, as its embeddings
  differ), never reused within a process even when a model is freed.

The budget is the sum of the entries' ``nbytes`` (tensor bytes, on whatever
device they live), never exceeded: least recently used entries are evicted
before an insert, and an entry bigger than the whole budget is not kept
(``rejected``). Evicted entries are not recomputed here: the caller encodes the
image again when :meth:`EmbeddingCache.get` misses. Every method takes one
lock, so the cache can be shared by the inference worker and the event loop.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
import torch


#: a server's default budget: about 64 images at image_size 1024 in float32
#: (16 MiB each: image_embed 4 MiB, high_res_feats 8 + 4 MiB), 128 in bf16
DEFAULT_BUDGET_BYTES = 1 << 30


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=Sized)


@dataclass(frozen=True)
class EmbeddingKey:
    """Which image (pixel digest) embedded by which model (:func:`model_key`)."""

    image: str
    model: str


def image_digest(image_rgb: np.ndarray) -> str:
    """sha256 (hex) of an image's shape, dtype and pixels: equal pixels, equal digest."""
    image = np.ascontiguousarray(image_rgb)
    h = hashlib.sha256(f"{image.dtype.str}:{'x'.join(map(str, image.shape))}:".encode())
    h.update(memoryview(image).cast("B"))
    return h.hexdigest()


_model_serials: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
_serial_counter = itertools.count(1)
_serial_lock = threading.Lock()


def model_key(model: torch.nn.Module) -> str:
    """A name for one loaded model object, e.g. ``"sam2-1024px-cuda:0-auto#1"``.

    The serial number makes it unique per object for the life of the process
    (``id()`` may be reused after a model is freed); size, device and
    precision are there for people reading logs and metrics.
    """
    with _serial_lock:
        serial = _model_serials.get(model)
        if serial is None:
            serial = next(_serial_counter)
            _model_serials[model] = serial
    device = next(model.parameters()).device
    precision = str(getattr(model, "autocast_precision", "auto"))
    return f"sam2-{int(getattr(model, 'image_size', 0))}px-{device}-{precision}#{serial}"


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache's counters, for ``stats`` replies and ``/metrics``."""

    hits: int
    misses: int
    inserts: int
    evictions: int
    rejected: int  # entries bigger than the whole budget, not kept
    bytes: int
    entries: int
    budget_bytes: int


class EmbeddingCache(Generic[V]):
    """LRU over values with an ``nbytes`` (see the module doc).

    Args:
        budget_bytes: the most bytes the kept values may hold together; 0
            keeps nothing (every lookup misses).
    """

    def __init__(self, budget_bytes: int) -> None:
        if int(budget_bytes) < 0:
            raise ValueError(f"budget_bytes must be 0 or more, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[EmbeddingKey, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._inserts = self._evictions = self._rejected = 0

    def get(self, key: EmbeddingKey) -> V | None:
        """The value (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def peek(self, key: EmbeddingKey) -> V | None:
        """The value without counting or refreshing it (is this image still cached?)."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def put(self, key: EmbeddingKey, value: V) -> bool:
        """Keep ``value`` as the most recently used, evicting the least recently
        used until it fits; False (nothing evicted) when it alone exceeds the budget."""
        size = int(value.nbytes)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.budget_bytes:
                self._rejected += 1
                if old is not None:  # a key's old value is gone either way
                    self._evictions += 1
                return False
            while self._bytes + size > self.budget_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self._evictions += 1
            self._entries[key] = (value, size)
            self._bytes += size
            self._inserts += 1
            return True

    def discard(self, key: EmbeddingKey) -> bool:
        """Drop one entry (not counted as an eviction); False when it was not there."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._bytes -= entry[1]
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                inserts=self._inserts,
                evictions=self._evictions,
                rejected=self._rejected,
                bytes=self._bytes,
                entries=len(self._entries),
                budget_bytes=self.budget_bytes,
            )
