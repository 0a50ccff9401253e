"""Disk IO overlapped with compute: a ``Stage`` is one background thread that runs jobs in order.

The lazy path reads block ``i+1`` in one stage and writes block ``i-1`` in another while block ``i`` is
pruned on the main thread. Reading (safetensors' memory map, page faults, the copy) and writing (safetensors'
``serialize_file``) release the GIL, as do torch's kernels, so plain threads overlap them. With
``threaded=False`` a stage runs each job inline when it is submitted: the same code path, without overlap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Stage:
    """One worker thread (or none): jobs run in submission order; ``future.result()`` re-raises a job's
    exception, the same object, in the caller. Each job's run time is added to ``timings[key]``."""

    def __init__(self, name: str, threaded: bool, timings: MutableMapping[str, float], key: str):
        self.threaded, self.timings, self.key = threaded, timings, key
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=name) if threaded else None
        timings.setdefault(key, 0.0)

    def submit(self, fn: Callable[..., T], *args: Any, key: str | None = None) -> Future:
        """The job's future; without a thread the job runs now and its error is raised here, at once. ``key``:
        where its time goes, when not the stage's own."""
        key = key or self.key
        if self.pool is not None:
            return self.pool.submit(self._timed, key, fn, *args)
        future: Future = Future()
        future.set_result(self._timed(key, fn, *args))
        return future

    def close(self) -> None:
        """Drop queued jobs and wait for the running one: after this no thread touches the output."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _timed(self, key: str, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:  # only this stage's thread writes its keys: no race
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start


def wait(future: Future | None, timings: MutableMapping[str, float], key: str) -> Any:
    """The future's result, adding the time spent blocked on it to ``timings[key]`` (compute waiting for IO)."""
    if future is None:
        return None
    start = time.perf_counter()
    try:
        return future.result()
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
