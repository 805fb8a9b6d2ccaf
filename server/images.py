"""Image mode of the server: images clients opened, their embeddings, and prompts on them.

One :class:`ImageService` per server. It holds

* one :class:`tracker.embedding_cache.EmbeddingCache` for every client
  (``[images] cache_bytes``): the same pixels opened by two clients are encoded
  once; an evicted embedding is encoded again on the next prompt;
* the table of open images (``image_id`` → the file's bytes, the pixel
  digest, the last answer's low-res logits), per connection and bounded
  (``max_open_per_client``): the bytes, not the embedding, are what keeps an
  image answerable once the cache has let it go;
* the limits on what a client may send (``max_bytes``, ``max_pixels``), with the
  typed errors of ``docs/protocol.md`` (``invalid_image``, ``image_too_large``,
  ``image_not_found``, ``unknown_image``, ``prompt_error``).

Model work goes to the default model's :class:`tracker.session.InferenceWorker`
(``submit_image_embed``: pending uploads share one encoder call;
``submit_image_prompt``: decoder only, ahead of encoder work). Decoding and
hashing run on a thread pool, never on the event loop. With ``cpu_fallback``,
an image whose encoding runs out of CUDA memory is encoded and answered by a
CPU copy of the model on a worker of its own.

No sockets here: :mod:`server.connection` turns requests into these calls.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av.error
import numpy as np
import torch

from server.config import ImagesSection, ServerConfig
from server.protocol import ProtocolError
from tracker.embedding_cache import CacheStats, EmbeddingCache
from tracker.errors import SourceError
from tracker.families.hf_image import make_segmenter
from tracker.image_input import DecodedImage, ImageInputError, ImageLimits, decode_image
from tracker.segment import Embedded, ImageEmbedding, ImagePromptError, ImageSegmenter, PreparedImage, SegmentResult
from tracker.session import InferenceWorker
from tracker.sources.policed_io import open_file_checked
from tracker.sources.policy import SourcePolicy
from tracker.sources.spec import canonical_path

logger = logging.getLogger("sam2-stream.images")

#: ImageInputError codes (tracker.image_input) → protocol error codes
_INPUT_CODES = {"too_large": "image_too_large", "too_many_bytes": "image_too_large", "not_found": "image_not_found"}


def max_image_message_bytes(images: ImagesSection) -> int:
    """The largest ``image_open`` message: the file's base64 and room for the rest."""
    return 4 * ((images.max_bytes + 2) // 3) + 4096


def input_error(exc: ImageInputError, field: str) -> ProtocolError:
    """An image that cannot be used, as the protocol's typed error naming ``field``."""
    return ProtocolError(_INPUT_CODES.get(exc.code, "invalid_image"), str(exc), field=field)


@dataclass
class OpenImage:
    """One image a connection opened."""

    image_id: str
    client_id: int
    data: bytes  # the file as sent (or read): decoded again when its embedding was evicted
    field: str  # "data" or "name": how it came, for errors when it is decoded again
    digest: str
    size_hw: tuple[int, int]
    segmenter: ImageSegmenter  # the one whose embedding answers it (a CPU copy after a fallback)
    worker: InferenceWorker
    previous_logits: np.ndarray | None = None  # (C, S/4, S/4) of the last answer, best first
    answers: int = 0


@dataclass(frozen=True)
class Opened:
    image: OpenImage
    decoded: DecodedImage
    embed_s: float
    cached: bool


@dataclass(frozen=True)
class Answer:
    image: OpenImage
    result: SegmentResult
    decode_s: float
    embed_s: float  # > 0 when the embedding had been evicted and was encoded again


@dataclass
class ImageCounters:
    opens: int = 0
    segments: int = 0
    recomputed: int = 0  # prompts that found their embedding evicted and encoded it again
    cpu_fallbacks: int = 0


@dataclass(frozen=True)
class ImageStats:
    cache: CacheStats
    open_images: int
    counters: ImageCounters
    encoder_batches: int
    images_encoded: int


class ImageService:
    """Open images, the shared embedding cache and image prompts (see the module doc).

    Args:
        config: the server's config (``[images]``, ``[model] cpu_fallback``).
        segmenter: an :class:`ImageSegmenter` on the default model.
        worker: the inference worker of that model's device.
        run_blocking: runs a blocking call off the event loop (decoding, hashing).
    """

    def __init__(
        self,
        config: ServerConfig,
        segmenter: ImageSegmenter,
        worker: InferenceWorker,
        run_blocking: Callable[..., Awaitable[Any]],
    ) -> None:
        self.config = config
        self.settings = config.images
        self.limits = ImageLimits(max_pixels=self.settings.max_pixels, max_bytes=self.settings.max_bytes)
        self.segmenter = segmenter
        self.worker = worker
        self.cache: EmbeddingCache[ImageEmbedding] = EmbeddingCache(self.settings.cache_bytes)
        self.counters = ImageCounters()
        self._run_blocking = run_blocking
        self._images: dict[str, OpenImage] = {}
        self._reserved = 0  # bytes of images being decoded and embedded (open_bytes)
        self._dirs = [Path(config.resolve(d)).resolve() for d in self.settings.dirs]
        #: the image folders as a source policy: one set of path rules for sources and images
        self._policy = SourcePolicy(schemes=frozenset({"file"}), directories=tuple(self._dirs))
        self._fallback: tuple[ImageSegmenter, InferenceWorker] | None = None
        self._fallback_lock = threading.Lock()

    # ---------------------------------------------------------------- open / close

    def count_open(self, client_id: int) -> int:
        return sum(1 for im in self._images.values() if im.client_id == client_id)

    async def open(
        self,
        client_id: int,
        *,
        data: str | None = None,
        name: str | None = None,
        raw: bytes | None = None,
        field: str = "data",
    ) -> Opened:
        """Decode, embed (or find in the cache) and keep one image for ``client_id``:
        ``data`` in base64, a ``name`` in the image folders, or the file's ``raw`` bytes."""
        limit = self.settings.max_open_per_client
        if client_id >= 0 and self.count_open(client_id) >= limit:
            raise ProtocolError(
                "limit_exceeded",
                f"this connection already has {limit} images open (max_open_per_client); image_close one first",
            )
        if raw is not None:
            field_name = field
        elif data is not None:
            field_name, raw = "data", await self._run_blocking(self._from_base64, data)
        else:
            assert name is not None
            field_name, raw = "name", await self._run_blocking(self._read_named, name)
        budget = self.settings.open_bytes
        held = self._reserved + sum(len(im.data) for im in self._images.values())
        if held + len(raw) > budget:
            raise ProtocolError(
                "limit_exceeded",
                f"the server already holds {held / 2**20:.1f} MiB of open images (the limit is "
                f"[images] open_bytes = {budget / 2**20:.0f} MiB); image_close some, or retry later",
                field=field_name,
            )
        self._reserved += len(raw)  # held while it decodes and embeds, then by the open image
        try:
            decoded, prepared = await self._run_blocking(self._decode_prepare, raw, field_name)
            embedded, segmenter, worker = await self._embed(prepared)
        finally:
            self._reserved -= len(raw)
        image = OpenImage(
            image_id=f"im{secrets.token_hex(6)}",
            client_id=client_id,
            data=raw,
            field=field_name,
            digest=prepared.digest,
            size_hw=prepared.size_hw,
            segmenter=segmenter,
            worker=worker,
        )
        self._images[image.image_id] = image
        self.counters.opens += 1
        return Opened(image, decoded, embedded.encode_s, embedded.cached)

    def close(self, client_id: int, image_id: str) -> None:
        self._get(client_id, image_id)
        del self._images[image_id]

    def oldest(self, client_id: int) -> str | None:
        """The image ``client_id`` opened first and still has open."""
        return next((k for k, im in self._images.items() if im.client_id == client_id), None)

    def close_client(self, client_id: int) -> None:
        """Forget every image of a connection that ended (the cache keeps their embeddings)."""
        for image_id in [k for k, im in self._images.items() if im.client_id == client_id]:
            del self._images[image_id]

    def _get(self, client_id: int, image_id: str) -> OpenImage:
        image = self._images.get(image_id)
        if image is None or image.client_id != client_id:
            raise ProtocolError(
                "unknown_image",
                f"unknown image {image_id!r}: not opened on this connection, or closed; image_open it first",
                field="image_id",
            )
        return image

    # ---------------------------------------------------------------- prompts

    async def segment(
        self,
        client_id: int,
        image_id: str,
        *,
        points_xy: list[list[float]] | None = None,
        labels: list[int] | None = None,
        box_xyxy: list[float] | None = None,
        multimask: bool = False,
        previous: int | None = None,
    ) -> Answer:
        """Masks for one prompt on an open image, best first (decoder only, unless
        the embedding was evicted: then it is encoded again first)."""
        image = self._get(client_id, image_id)
        mask_input = None
        if previous is not None:
            logits = image.previous_logits
            if logits is None:
                raise ProtocolError(
                    "prompt_error", f"previous: image {image_id} has no answer to refine yet", field="previous"
                )
            if previous >= len(logits):
                raise ProtocolError(
                    "prompt_error",
                    f"previous: the last answer has {len(logits)} mask(s), so previous must be below {len(logits)}",
                    field="previous",
                )
            mask_input = logits[previous]
        embed_s = 0.0
        embedding = self.cache.peek(image.segmenter.cache_key(_Digest(image.digest)))  # type: ignore[arg-type]
        recomputed = embedding is None
        if embedding is None:  # evicted: encode the image again from its bytes
            _, prepared = await self._run_blocking(self._decode_prepare, image.data, image.field)
            embedded, image.segmenter, image.worker = await self._embed(prepared)
            embedding, embed_s = embedded.embedding, embedded.encode_s
            self.counters.recomputed += 1
        segmenter, cache = image.segmenter, self.cache
        key = segmenter.cache_key(_Digest(image.digest))  # type: ignore[arg-type]

        def run() -> tuple[SegmentResult, float]:
            if not recomputed:
                cache.get(key)  # counts the hit and makes it the most recently used
            t0 = time.perf_counter()
            result = segmenter.predict(
                embedding,
                points_xy=points_xy,
                labels=labels,
                box_xyxy=box_xyxy,
                mask_input=mask_input,
                multimask=multimask,
            )
            return result, time.perf_counter() - t0

        try:
            result, decode_s = await self._wait(image.worker.submit_image_prompt(run))
        except ImagePromptError as exc:
            raise ProtocolError("prompt_error", str(exc), field=exc.field) from None
        image.previous_logits = result.low_res_logits
        image.answers += 1
        self.counters.segments += 1
        return Answer(image, result, decode_s, embed_s)

    # ---------------------------------------------------------------- internals

    async def _wait(self, future: Any) -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(future), self.config.limits.prompt_timeout_s)

    async def _embed(self, prepared: PreparedImage) -> tuple[Embedded, ImageSegmenter, InferenceWorker]:
        """The embedding on the default model's worker; out of CUDA memory for this
        image alone, on the CPU copy's (``cpu_fallback``)."""
        try:
            embedded = await self._wait(self.worker.submit_image_embed(self.segmenter, prepared, self.cache))
            return embedded, self.segmenter, self.worker
        except torch.cuda.OutOfMemoryError:
            if not self.config.model.cpu_fallback:
                raise ProtocolError(
                    "error",
                    "out of CUDA memory while encoding the image; retry later, send a smaller image, "
                    "or run the server with cpu_fallback",
                ) from None
        segmenter, worker = await self._run_blocking(self._cpu_fallback)
        prepared_cpu = await self._run_blocking(_same_pixels, prepared)
        embedded = await self._wait(worker.submit_image_embed(segmenter, prepared_cpu, self.cache))
        self.counters.cpu_fallbacks += 1
        logger.warning("image %s: out of CUDA memory; encoded on the CPU copy of the model", prepared.digest[:12])
        return embedded, segmenter, worker

    def _cpu_fallback(self) -> tuple[ImageSegmenter, InferenceWorker]:
        """An ImageSegmenter on a float32 CPU copy of the model, on a worker of its own (made once)."""
        from tracker.session import _cpu_copy

        with self._fallback_lock:
            if self._fallback is None:
                model = _cpu_copy(self.segmenter.model)
                worker = InferenceWorker(model, name="inference-cpu-images", max_image_batch=self.settings.max_batch)
                self._fallback = (make_segmenter(model), worker)
            return self._fallback

    def _from_base64(self, data: str) -> bytes:
        if len(data) > max_image_message_bytes(self.settings):
            raise ProtocolError(
                "image_too_large",
                f"data is about {len(data) * 3 // 4} bytes, the limit is {self.settings.max_bytes} bytes",
                field="data",
            )
        try:
            return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(
                "invalid_image", "data must be the image file's bytes in base64 (RFC 4648, standard alphabet)", field="data"
            ) from None

    def _read_named(self, name: str) -> bytes:
        """A file of the image folders, under the source policy's rules
        (``tracker.sources.policy``): its canonical path checked, the file actually
        opened checked again, regular files only (a FIFO cannot hang the thread);
        one answer for a missing file and a path outside the folders."""
        missing = ProtocolError("image_not_found", f"no image {name!r} in this server's image folders", field="name")
        if not self._dirs or "\x00" in name:
            raise missing
        for folder in self._dirs:
            candidate = str(folder / name)
            if not self._policy.allows_path(candidate):
                continue
            try:
                with open_file_checked(canonical_path(candidate), self._policy, f"image {name!r}") as fp:
                    raw = fp.read(self.settings.max_bytes + 1)
            except (OSError, av.error.FFmpegError, SourceError):
                continue
            if len(raw) > self.settings.max_bytes:
                raise ProtocolError(
                    "image_too_large",
                    f"name: {name!r} is more than {self.settings.max_bytes} bytes, the limit",
                    field="name",
                )
            return raw
        raise missing

    def _decode_prepare(self, raw: bytes, field_name: str) -> tuple[DecodedImage, PreparedImage]:
        try:
            decoded = decode_image(raw, self.limits, field=field_name)
        except ImageInputError as exc:
            raise input_error(exc, field_name) from None
        return decoded, self.segmenter.prepare(decoded.image_rgb)

    # ---------------------------------------------------------------- reports

    def stats(self) -> ImageStats:
        workers = [self.worker] + ([self._fallback[1]] if self._fallback else [])
        return ImageStats(
            cache=self.cache.stats(),
            open_images=len(self._images),
            counters=self.counters,
            encoder_batches=sum(w.image_batches for w in workers),
            images_encoded=sum(w.images_embedded for w in workers),
        )

    def stop(self) -> None:
        if self._fallback is not None:
            self._fallback[1].stop()
        self._images.clear()
        self.cache.clear()


@dataclass(frozen=True)
class _Digest:
    """What ``ImageSegmenter.cache_key`` reads of a prepared image: its digest."""

    digest: str


def _same_pixels(prepared: PreparedImage) -> PreparedImage:
    return PreparedImage(prepared.pixels.detach().cpu(), prepared.size_hw, prepared.digest)
