"""One thread runs every llama.cpp call that computes, for the whole process.

llama.cpp's CPU backend runs each graph as an OpenMP parallel region (libgomp). Every thread that opens a
region gets a team of threads of its own, and once the teams' threads together outnumber the cores, libgomp
stops spinning between regions and puts its threads to sleep instead (its "throttled" wait) — for the rest of
the process. Measured on this 2-core machine (SmolLM2-135M, 96 tokens, ``n_threads=2``): 1.2 s a generation
from one thread; once a second thread had generated, 2.7–5.5 s from either thread, the first one included.
anyio's worker threads come and go, so a call that computes (loading a model, a decode step, prompt
evaluation, scoring) never runs in one: it is queued to this thread and its caller awaits it. Tokenizing and
chat templates do not compute and stay in worker threads.

One thread also means one computation at a time across all loaded models, which on a CPU is what the cores
allow anyway. The decode loops of :mod:`backends.llamacpp_batch` run here as work that re-queues itself after
a step when other work waits, so two batched models take turns step by step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

__all__ = ["ComputeThread", "Waiter", "compute_thread"]

T = TypeVar("T")


@dataclass(eq=False)
class Waiter:
    """An ``anyio.Event`` that the compute thread sets without blocking (``call_soon_threadsafe`` on asyncio)."""

    event: anyio.Event = field(default_factory=anyio.Event)
    abandoned: bool = False
    """The awaiting task was cancelled: queued work for it is skipped."""
    _loop: asyncio.AbstractEventLoop = field(init=False)

    def __post_init__(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("the llamacpp backend runs under asyncio (anyio's default backend)") from None

    def wake(self) -> None:
        """Set the event from the compute thread (returns at once)."""
        try:
            self._loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:
            pass  # the loop is closed: nobody waits

    async def wait(self) -> None:
        """Wait for :meth:`wake`; a cancelled wait marks the waiter abandoned."""
        try:
            await self.event.wait()
        except BaseException:
            self.abandoned = True
            raise


class ComputeThread:
    """A long-lived daemon thread that runs queued work one item at a time, in order."""

    def __init__(self, name: str = "llama.cpp compute") -> None:
        self._name = name
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def ident(self) -> int | None:
        """The thread's id once started (tests check where llama.cpp ran)."""
        return self._thread.ident if self._thread else None

    def post(self, work: Callable[[], None]) -> None:
        """Queue ``work`` (it must not raise: exceptions are its own to hand over)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put(work)

    def busy(self) -> bool:
        """Whether other work waits in the queue (a decode loop yields to it between steps)."""
        return not self._queue.empty()

    def _serve(self) -> None:
        while True:
            work = self._queue.get()
            try:
                work()
            except BaseException:  # work hands its own errors over; the thread must live on
                pass

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the thread and return its result (or raise its exception).

        Cancelling the caller does not interrupt a call that has started (llama.cpp cannot be interrupted);
        one still queued is skipped.
        """
        waiter = Waiter()
        outcome: list[Any] = []

        def work() -> None:
            if waiter.abandoned:
                return
            try:
                outcome.append((True, fn(*args)))
            except BaseException as exc:  # handed to the caller
                outcome.append((False, exc))
            finally:
                waiter.wake()

        self.post(work)
        await waiter.wait()
        ok, value = outcome[0]
        if not ok:
            raise value
        result: T = value
        return result


compute_thread = ComputeThread()
"""The process's one compute thread for llama.cpp."""
