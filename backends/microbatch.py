"""One micro-batcher: callers submit one item each and get its result; items that arrive together run through
one batched function call.

A batch leaves when it holds ``max_batch`` items or when its oldest item has waited ``window_s`` (0: at once,
with whatever queued while the previous batch ran). Collecting is one caller's job at a time: the first caller
to find nobody collecting becomes the leader, waits (with the ``limiter``, when one is given, held: batches of a
shared model one at a time) for the window, takes its own item and the oldest others, and runs the batch in its
own task; nothing runs in the background, so a batcher needs no task group and no closing.

Each caller gets its own item's result, or the exception the batch function put in its item's place, or the
batch's exception when the whole call failed. Cancellation: a cancelled caller whose item is queued leaves the
queue; a cancelled leader hands the collecting to the next caller; a leader cancelled while its batch runs
either finishes the batch first (``shield``: for work that cannot be interrupted anyway, a worker thread) or
puts the other callers' items back at the head of the queue, where the next leader takes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

__all__ = ["MicroBatcher"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Batch:
    finished: anyio.Event = field(default_factory=anyio.Event)
    """Set when the batch's results are in (or its items went back to the queue)."""


@dataclass(eq=False)
class _Slot(Generic[T, R]):
    item: T
    arrived: float
    batch: _Batch | None = None
    """The batch running this item; None while it is queued."""
    done: bool = False
    abandoned: bool = False
    """Its caller was cancelled while a batch held it: not to be queued again."""
    value: R | None = None
    error: BaseException | None = None


class MicroBatcher(Generic[T, R]):
    """Gathers concurrent :meth:`submit` calls into calls of ``run_batch`` (items in, one result per item out,
    in order; an exception instance in an item's place is raised to that item's caller).

    ``max_batch``: the most items a batch holds; ``window_s``: how long the oldest queued item waits for company
    (0: no wait); ``limiter``: held while a batch is collected and run (``anyio.CapacityLimiter(1)``: one batch
    at a time, possibly shared with other batchers); None: batches run concurrently. ``shield``: a batch whose
    leader is cancelled runs to its end.

    Counters: ``batches`` run, ``items`` answered in them, ``largest`` batch.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int,
        window_s: float = 0.0,
        limiter: anyio.CapacityLimiter | None = None,
        shield: bool = False,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.window_s = max(0.0, window_s)
        self._limiter = limiter
        self._shield = shield
        self._queue: list[_Slot[T, R]] = []
        self._lock = anyio.Lock()
        self._full: anyio.Event | None = None
        self.batches = self.items = self.largest = 0

    @property
    def queued(self) -> int:
        """Items waiting for a batch."""
        return len(self._queue)

    async def submit(self, item: T) -> R:
        """``item``'s result, from a batch shared with the items submitted around the same time."""
        slot: _Slot[T, R] = _Slot(item, anyio.current_time())
        self._queue.append(slot)
        if self._full is not None and len(self._queue) >= self.max_batch:
            self._full.set()
        try:
            while not slot.done:
                if slot.batch is None:
                    await self._lead(slot)
                elif not slot.batch.finished.is_set():
                    await slot.batch.finished.wait()
        finally:
            if not slot.done:  # cancelled: nobody is to run its item again
                if slot.batch is None:
                    self._queue.remove(slot)
                else:
                    slot.abandoned = True
        if slot.error is not None:
            raise slot.error
        return slot.value  # type: ignore[return-value]  # R may itself allow None

    async def _lead(self, slot: _Slot[T, R]) -> None:
        """Collect and run a batch holding ``slot``, unless another leader takes it first."""
        async with self._lock:
            if slot.batch is not None:  # taken by the leader before us
                return
            if self._limiter is not None:
                await self._limiter.acquire()
            try:
                await self._wait_for_company()
                members = self._take(slot)
            except BaseException:
                if self._limiter is not None:
                    self._limiter.release()
                raise
        try:
            await self._run(members)
        finally:
            if self._limiter is not None:
                self._limiter.release()

    async def _wait_for_company(self) -> None:
        """Until the queue holds a full batch or its oldest item has waited ``window_s``."""
        while len(self._queue) < self.max_batch:
            left = self._queue[0].arrived + self.window_s - anyio.current_time()
            if left <= 0:
                return
            self._full = anyio.Event()
            try:
                with anyio.move_on_after(left):
                    await self._full.wait()
            finally:
                self._full = None

    def _take(self, slot: _Slot[T, R]) -> list[_Slot[T, R]]:
        """``slot`` and the oldest other queued items (``max_batch`` in all), out of the queue, as one batch."""
        batch = _Batch()
        members = [slot, *(s for s in self._queue if s is not slot)][: self.max_batch]
        for member in members:
            member.batch = batch
        self._queue = [s for s in self._queue if s.batch is None]
        return members

    async def _run(self, members: list[_Slot[T, R]]) -> None:
        batch = members[0].batch
        assert batch is not None
        delivered = False
        try:
            try:
                with anyio.CancelScope(shield=self._shield):
                    results = await self._run_batch([s.item for s in members])
                if len(results) != len(members):
                    raise ValueError(f"the batch function returned {len(results)} results for {len(members)} items")
            except Exception as exc:
                for member in members:
                    member.error = exc
            else:
                for member, result in zip(members, results, strict=True):
                    if isinstance(result, BaseException):
                        member.error = result
                    else:
                        member.value = result
            for member in members:
                member.done = True
            delivered = True
            self.batches += 1
            self.items += len(members)
            self.largest = max(self.largest, len(members))
        finally:
            if not delivered:  # the leader was cancelled mid-batch: the others go back to the head of the queue
                for member in members:
                    member.batch = None
                self._queue[:0] = [m for m in members if not m.abandoned]
            batch.finished.set()
