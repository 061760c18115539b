"""Dynamic batching: concurrent requests gathered into one onnxruntime call, within a bounded queue."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from autoft.deploy.serving.config import RETRY_AFTER_SECONDS, Overloaded


@dataclass
class Batcher:
    """Gathers concurrent requests into one call of ``run`` (rows in, rows out).

    ``admit`` bounds the rows in flight, so that memory stays bounded however many requests
    arrive: a caller reserves its rows before decoding them and releases them with the answer.
    """

    run: Callable[[np.ndarray], np.ndarray]
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256
    batch_sizes: list[int] = field(default_factory=list)  # one entry per call, for tests and benchmarks

    def __post_init__(self) -> None:
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._carry: tuple[np.ndarray, asyncio.Future] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="autoft-infer")
        self.admitted = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False)

    def check_room(self, rows: int) -> None:
        """Raise :class:`Overloaded` unless ``rows`` more would fit the queue; a request checks
        for one before its body is parsed, so that shedding load costs next to nothing."""
        if self.admitted + rows > self.max_queue:
            raise Overloaded(f"the server is busy ({self.admitted} images queued, --max-queue {self.max_queue}); retry in {RETRY_AFTER_SECONDS} s")

    @contextmanager
    def admit(self, rows: int) -> Iterator[None]:
        """Reserve ``rows`` of the queue, or raise :class:`Overloaded` when it is full."""
        self.check_room(rows)
        self.admitted += rows  # only the event loop's thread counts, so no lock is needed
        try:
            yield
        finally:
            self.admitted -= rows

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        if self._queue is None:
            raise RuntimeError("the batcher has not been started")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((rows, future))
        return await future

    async def _next(self, timeout: float | None) -> tuple[np.ndarray, asyncio.Future]:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _gather(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        items = [await self._next(None)]
        rows = len(items[0][0])
        deadline = loop.time() + self.max_delay_ms / 1000
        while rows < self.max_batch:
            remaining = deadline - loop.time()
            try:
                # Whatever is queued already joins without waiting, even once the delay is spent.
                item = self._queue.get_nowait() if remaining <= 0 else await self._next(remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if rows + len(item[0]) > self.max_batch:
                self._carry = item  # would overflow the batch: it starts the next one
                break
            items.append(item)
            rows += len(item[0])
        return items

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather()
            items = [(rows, future) for rows, future in items if not future.cancelled()]
            if not items:
                continue
            batch = np.concatenate([rows for rows, _ in items]) if len(items) > 1 else items[0][0]
            self.batch_sizes.append(len(batch))
            try:
                outputs = await loop.run_in_executor(self._executor, self.run, batch)
            except Exception as exc:  # the requests fail; the server keeps serving
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for rows, future in items:
                if not future.done():
                    future.set_result(outputs[start : start + len(rows)])
                start += len(rows)


