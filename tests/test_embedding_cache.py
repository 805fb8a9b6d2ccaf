"""The embedding cache: LRU order, a byte budget that is never exceeded (also
under threads), stats; keyed by decoded pixels and model, so the same picture
is encoded once whatever bytes bring it, and an evicted image is encoded again
with the same masks."""

from __future__ import annotations

import gc
import io
import threading
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from tests.frames import moving_shapes
from tracker.embedding_cache import CacheStats, EmbeddingCache, EmbeddingKey, image_digest, model_key
from tracker.image_input import decode_image
from tracker.segment import ImageSegmenter


@dataclass
class Blob:
    nbytes: int


def key(name: str) -> EmbeddingKey:
    return EmbeddingKey(name, "m")


class CheckedCache(EmbeddingCache):
    """Checks after every insert that the entries' bytes sum to ``bytes`` within the budget."""

    def put(self, k, value):
        kept = super().put(k, value)
        with self._lock:
            total = sum(size for _, size in self._entries.values())
            assert total == self._bytes <= self.budget_bytes
        return kept


# ----------------------------------------------------------------- the LRU


def test_lru_order_budget_and_stats():
    cache = CheckedCache(100)
    a, b, c = Blob(40), Blob(40), Blob(30)
    assert cache.put(key("a"), a) and cache.put(key("b"), b)
    assert cache.get(key("a")) is a  # a is now the most recent: b goes first
    assert cache.put(key("c"), c)
    assert key("b") not in cache and cache.peek(key("a")) is a and cache.peek(key("c")) is c
    assert cache.get(key("b")) is None
    assert cache.stats() == CacheStats(hits=1, misses=1, inserts=3, evictions=1, rejected=0, bytes=70, entries=2, budget_bytes=100)


def test_peek_neither_counts_nor_refreshes():
    cache = CheckedCache(80)
    cache.put(key("a"), Blob(40))
    cache.put(key("b"), Blob(40))
    assert cache.peek(key("a")) is not None and cache.peek(key("x")) is None
    cache.put(key("c"), Blob(40))  # a is still the least recently used
    assert key("a") not in cache and key("b") in cache
    assert (cache.stats().hits, cache.stats().misses) == (0, 0)


def test_oversize_is_not_kept_and_replacing_a_key_frees_its_bytes():
    cache = CheckedCache(100)
    cache.put(key("a"), Blob(60))
    cache.put(key("a"), Blob(30))
    assert (cache.bytes, len(cache)) == (30, 1)
    assert not cache.put(key("big"), Blob(101))
    assert key("big") not in cache and cache.peek(key("a")) is not None  # nothing evicted for it
    assert not cache.put(key("a"), Blob(101))  # the old value of the key is gone either way
    assert key("a") not in cache
    s = cache.stats()
    assert (s.rejected, s.evictions, s.bytes, s.entries) == (2, 1, 0, 0)


def test_zero_budget_keeps_nothing_and_discard_clear():
    cache = EmbeddingCache(0)
    assert not cache.put(key("a"), Blob(1)) and cache.get(key("a")) is None
    cache = EmbeddingCache(10)
    cache.put(key("a"), Blob(4))
    cache.put(key("b"), Blob(4))
    assert cache.discard(key("a")) and not cache.discard(key("a"))
    assert (cache.bytes, cache.stats().evictions) == (4, 0)
    cache.clear()
    assert (cache.bytes, len(cache)) == (0, 0)
    with pytest.raises(ValueError, match="budget_bytes must be 0 or more"):
        EmbeddingCache(-1)


def test_budget_holds_under_threads():
    cache = CheckedCache(1000)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(400):
                k = key(str(int(rng.integers(0, 40))))
                op = rng.integers(0, 3)
                if op == 0:
                    cache.put(k, Blob(int(rng.integers(1, 300))))
                elif op == 1:
                    cache.get(k)
                else:
                    cache.discard(k)
        except BaseException as e:  # reported below, from the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    s = cache.stats()
    assert s.bytes <= 1000 and s.hits + s.misses > 0
    with cache._lock:
        assert sum(size for _, size in cache._entries.values()) == s.bytes


# --------------------------------------------------------------------- keys


def test_image_digest_is_of_pixels_and_shape():
    img = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert image_digest(img) == image_digest(img.copy()) == image_digest(np.asfortranarray(img))
    assert image_digest(img) != image_digest(img.reshape(30, 20, 3))  # same bytes, other shape
    changed = img.copy()
    changed[5, 5, 0] ^= 1
    assert image_digest(changed) != image_digest(img)


def test_model_key_is_one_per_model_object():
    a = torch.nn.Linear(2, 2)
    first = model_key(a)
    assert model_key(a) == first and first.endswith(f"#{first.rsplit('#', 1)[1]}")
    assert model_key(torch.nn.Linear(2, 2)) != first
    del a
    gc.collect()
    assert first not in {model_key(torch.nn.Linear(2, 2)) for _ in range(5)}  # never reused


# --------------------------------------------------- with the image segmenter


@pytest.fixture
def counted(model, monkeypatch):
    """The images each forward_image call got."""
    calls: list[int] = []
    orig = model.forward_image
    monkeypatch.setattr(model, "forward_image", lambda x: calls.append(len(x)) or orig(x))
    return calls


def png_bytes(image: np.ndarray, level: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def test_same_image_is_encoded_once(model, counted):
    seg = ImageSegmenter(model)
    cache: EmbeddingCache = CheckedCache(1 << 30)
    image = moving_shapes(1, 100, 140, seed=11)[0]
    data = png_bytes(image)
    (first,) = seg.embed([seg.prepare(decode_image(data).image_rgb)], cache)
    assert counted == [1] and not first.cached and first.encode_s > 0
    # the same bytes again (another client), and other bytes of the same pixels
    again = seg.embed([seg.prepare(decode_image(d).image_rgb) for d in (data, png_bytes(image, level=1))], cache)
    assert counted == [1]
    assert all(e.cached and e.embedding is first.embedding and e.encode_s == 0 for e in again)
    s = cache.stats()
    assert (s.hits, s.misses, s.entries, s.bytes) == (2, 1, 1, first.embedding.nbytes)


def test_duplicates_in_one_call_are_encoded_once_and_misses_batched(model, counted):
    seg = ImageSegmenter(model)
    cache: EmbeddingCache = EmbeddingCache(1 << 30)
    a, b, c = (seg.prepare(im) for im in moving_shapes(3, 60, 80, seed=12))
    seg.embed([a], cache)
    out = seg.embed([b, a, b, c], cache)
    assert counted == [1, 2]  # b and c in one batch; a from the cache, the second b a duplicate
    assert [e.cached for e in out] == [False, True, True, False]
    assert out[0].embedding is out[2].embedding
    seg.embed([seg.prepare(im) for im in moving_shapes(3, 61, 80, seed=13)], max_batch=2)  # no cache
    assert counted == [1, 2, 2, 1]


def test_budget_holds_with_many_images_and_evicted_images_come_back_the_same(model, counted):
    seg = ImageSegmenter(model)
    images = [seg.prepare(im) for im in moving_shapes(6, 64, 96, seed=14)]
    emb0 = seg.encode(images[0])
    cache = CheckedCache(2 * emb0.nbytes + emb0.nbytes // 2)  # room for two
    cache.put(seg.cache_key(images[0]), emb0)
    prompt = dict(points_xy=[[30.0, 20.0]], labels=[1], multimask=True)
    first = seg.predict(emb0, **prompt)
    for k in range(1, len(images), 2):
        seg.embed(images[k : k + 2], cache)
    s = cache.stats()
    assert (s.entries, s.inserts, s.evictions) == (2, 6, 4)
    assert s.bytes == 2 * emb0.nbytes <= cache.budget_bytes
    assert seg.cache_key(images[0]) not in cache
    calls = len(counted)
    (back,) = seg.embed([images[0]], cache)  # evicted: encoded again
    assert not back.cached and back.embedding is not emb0 and len(counted) == calls + 1
    again = seg.predict(back.embedding, **prompt)
    for x, y in zip(first.candidates, again.candidates):
        np.testing.assert_array_equal(x.mask_hw, y.mask_hw)
        assert x.score == y.score
    np.testing.assert_array_equal(first.low_res_logits, again.low_res_logits)
    assert cache.stats().bytes <= cache.budget_bytes
