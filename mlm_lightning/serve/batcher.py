"""Dynamic batching for the server: requests that arrive together share one forward pass.

Hand-written because FastAPI/uvicorn have no batching, and LitServe's (the library that has it) runs the model in
other processes and fails a whole batch when one request in it is bad (README "Serve" says more). This is the
whole of it: an asyncio queue, one worker thread for the model, a future per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Job:
    item: Any
    size: int
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Collects submitted items into batches of about `max_batch_size` and runs `work` on them in one thread.

    `work(items) -> outcomes` runs in a single worker thread, so the event loop never waits on the model; it
    returns one outcome per item, in order: a result, or an exception to raise in that item's request only.
    A batch starts as soon as the worker is free; it waits up to `max_wait_s` for more items only while it is
    smaller than `max_batch_size` (under load, requests queue up while the previous batch runs anyway).
    """

    def __init__(self, work: Callable[[list[Any]], list[Any]], max_batch_size: int, max_wait_s: float):
        self.work, self.max_batch_size, self.max_wait_s = work, max_batch_size, max_wait_s
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mlm-lightning-model")
        self.queue: asyncio.Queue[_Job] | None = None
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}
        self._task: asyncio.Task | None = None

    async def submit(self, item: Any, size: int = 1) -> Any:
        """Queue `item` (`size`: how many sentences it counts for) and wait for its outcome."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Job(item, size, future))
        return await future

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def _collect(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        jobs = [await self.queue.get()]
        size, deadline = jobs[0].size, loop.time() + self.max_wait_s
        while size < self.max_batch_size:
            if self.queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                job = self.queue.get_nowait()
            jobs.append(job)
            size += job.size
        return [j for j in jobs if not j.future.done()]  # a request whose client went away is dropped

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            if not jobs:
                continue
            self.stats["batches"] += 1
            self.stats["requests"] += len(jobs)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], sum(j.size for j in jobs))
            try:
                outcomes = await loop.run_in_executor(self.executor, self.work, [j.item for j in jobs])
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, never the server
                outcomes = [e] * len(jobs)
            for job, outcome in zip(jobs, outcomes, strict=True):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)
