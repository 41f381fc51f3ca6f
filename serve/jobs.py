"""The bounded job queue: one generation at a time per engine, `--max-queue` waiting, no more.

A job is a function run on the single worker thread. `submit` refuses (QueueFull) when
`max_queue` jobs already wait, with a Retry-After estimate from the mean job time. Each job
carries its progress (step i of n over all its iterations) for /sdapi/v1/progress, and two flags
the Engine reads after every denoising step through `should_stop`: `interrupt` (A1111's: stop and
return what was reached) and `cancel` (its client went away: stop, return nothing). A job
cancelled while it still waits is dropped without running.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable


class QueueFull(Exception):
    def __init__(self, retry_after: int, waiting: int):
        super().__init__(f"the queue is full ({waiting} waiting); retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    id: str
    kind: str
    fn: Callable
    future: Future = field(default_factory=Future)
    created: float = field(default_factory=time.time)
    started: float | None = None
    step: int = 0  # denoising steps done, over all iterations
    steps: int = 0  # denoising steps in total
    interrupted: bool = False
    cancelled: bool = False

    def should_stop(self) -> str | None:
        return "cancel" if self.cancelled else "interrupt" if self.interrupted else None

    @property
    def fraction(self) -> float:
        return min(self.step / self.steps, 1.0) if self.steps else 0.0


class JobQueue:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.waiting = 0
        self.current: Job | None = None
        self.done = 0
        self.busy_seconds = 0.0
        self._worker = threading.Thread(target=self._work, name="sdc-serve-worker", daemon=True)
        self._worker.start()

    def submit(self, kind: str, fn: Callable[[Job], object]) -> Job:
        with self._lock:
            if self.waiting >= self.max_queue:
                raise QueueFull(self.retry_after(), self.waiting)
            self.waiting += 1
            job = Job(f"task({next(self._ids)})", kind, fn)
        self._queue.put(job)
        return job

    def retry_after(self) -> int:
        """Seconds until a place is likely free: one mean job time per job ahead, at least 1."""
        mean = self.busy_seconds / self.done if self.done else 5.0
        return max(1, math.ceil(mean * (self.waiting + 1)))

    def interrupt(self) -> bool:
        job = self.current
        if job is not None:
            job.interrupted = True
        return job is not None

    @property
    def depth(self) -> int:
        return self.waiting + (1 if self.current is not None else 0)

    def stop(self) -> None:
        self._queue.put(None)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self.waiting -= 1
            if job.cancelled:
                job.future.cancel()
                continue
            if not job.future.set_running_or_notify_cancel():
                continue
            self.current = job
            job.started = time.time()
            try:
                job.future.set_result(job.fn(job))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                job.future.set_exception(e)
            finally:
                self.current = None
                self.done += 1
                self.busy_seconds += time.time() - job.started
