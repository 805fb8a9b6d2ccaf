"""The newest-item mailbox that keeps WebRTC media from queueing.

aiortc's receive queues are unbounded and its sender pulls frames as fast as
it can encode them. Between a producer and a slower consumer on the event loop
sits one :class:`NewestSlot`: a new item replaces an untaken one, so lag never
grows, and the replacements are counted so tests and metrics can see them.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class NewestSlot(Generic[T]):
    """A one-item mailbox for one consumer; every method runs on the event loop thread."""

    def __init__(self) -> None:
        self._item: T | None = None
        self._full = False
        self._closed = False
        self._changed = asyncio.Event()
        self.put_count = 0
        self.replaced = 0  # items dropped because a newer one came before get()

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> bool:
        """Leave ``item`` for the consumer; True if it replaced an untaken item."""
        if self._closed:
            return False
        replaced = self._full
        self._item, self._full = item, True
        self.put_count += 1
        self.replaced += replaced
        self._changed.set()
        return replaced

    def close(self) -> None:
        """No more items; the consumer still gets the one waiting, then None."""
        self._closed = True
        self._changed.set()

    async def get(self) -> T | None:
        """The newest item, waiting for one; None once closed and empty."""
        while True:
            if self._full:
                item, self._item, self._full = self._item, None, False
                return item
            if self._closed:
                return None
            self._changed.clear()
            await self._changed.wait()
