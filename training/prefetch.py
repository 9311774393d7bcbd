"""Run an iterator in a background thread, a few items ahead of its consumer."""

from __future__ import annotations

import queue
import threading
from typing import Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")
_ITEM, _END, _ERROR = range(3)


class Prefetch(Generic[T]):
    """Iterate `items` in a background thread, at most `depth` items ahead; errors re-raise in the consumer.

    Use as a context manager: leaving it (a break, an error) stops the thread.
    """

    def __init__(self, items: Iterable[T], depth: int = 2):
        self.items, self.queue = items, queue.Queue(maxsize=max(1, depth))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._produce, daemon=True, name="prefetch")

    def __enter__(self) -> Prefetch[T]:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()

    def __iter__(self) -> Iterator[T]:
        while True:
            kind, value = self.queue.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise value
            yield value

    def _put(self, kind: int, value: object) -> bool:
        """Queue one entry unless the consumer has stopped; whether it was queued."""
        while not self.stopped.is_set():
            try:
                self.queue.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self.items:
                if not self._put(_ITEM, item):
                    return
            self._put(_END, None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(_ERROR, e)
