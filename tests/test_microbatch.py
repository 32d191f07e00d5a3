"""backends.microbatch: batching up to the size, the window, errors to every caller, cancelled callers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import pytest

from backends.microbatch import MicroBatcher


class Recorder:
    """A batch function that records its batches and, for the batches whose number is in ``hold``, waits on
    that batch's gate before answering (``item * 10``; an item that is an exception is answered with itself)."""

    def __init__(self, *hold: int) -> None:
        self.batches: list[list[Any]] = []
        self.gates = {n: anyio.Event() for n in hold}
        self.started = {n: anyio.Event() for n in hold}

    async def __call__(self, items: list[Any]) -> Sequence[Any]:
        self.batches.append(list(items))
        number = len(self.batches)
        if number in self.gates:
            self.started[number].set()
            await self.gates[number].wait()
        return [item if isinstance(item, BaseException) else item * 10 for item in items]


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        with anyio.fail_after(10):
            return await main()

    return anyio.run(bounded)


def held_first_batch() -> tuple[Recorder, MicroBatcher[Any, Any], dict[Any, Any]]:
    """Batches of at most 4, one at a time, the first held at its gate; and the results by item."""
    fn = Recorder(1)
    return fn, MicroBatcher(fn, max_batch=4, limiter=anyio.CapacityLimiter(1)), {}


async def collect(batcher: MicroBatcher[Any, Any], results: dict[Any, Any], item: Any) -> None:
    try:
        results[item] = await batcher.submit(item)
    except Exception as exc:
        results[item] = exc


def test_batches_hold_at_most_max_batch_items_and_each_caller_gets_its_own() -> None:
    fn, batcher, results = held_first_batch()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, batcher, results, 0)
            await fn.started[1].wait()  # the first batch runs: the rest queue behind it
            for item in range(1, 10):
                tg.start_soon(collect, batcher, results, item)
            await anyio.wait_all_tasks_blocked()
            assert batcher.queued == 9
            fn.gates[1].set()

    run(main)
    assert results == {i: i * 10 for i in range(10)}
    assert [len(b) for b in fn.batches] == [1, 4, 4, 1]
    assert sorted(i for b in fn.batches for i in b) == list(range(10))  # every item once
    assert (batcher.batches, batcher.items, batcher.largest) == (4, 10, 4)


def test_a_full_batch_leaves_before_its_window_and_a_lone_item_after_it() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=3, window_s=3600)  # an hour: only a full batch can leave
    results: dict[int, int] = {}

    async def main() -> float:
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, batcher, results, 1)
            tg.start_soon(collect, batcher, results, 2)
            await anyio.wait_all_tasks_blocked()
            assert fn.batches == [] and batcher.queued == 2  # waiting for company
            tg.start_soon(collect, batcher, results, 3)
        short = MicroBatcher(fn, max_batch=3, window_s=0.05)
        start = anyio.current_time()
        assert await short.submit(4) == 40
        return anyio.current_time() - start

    waited = run(main)
    assert results == {1: 10, 2: 20, 3: 30}
    assert fn.batches == [[1, 2, 3], [4]]
    assert waited >= 0.05  # a lone item waits out the window


def test_items_arriving_within_the_window_share_a_batch() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=8, window_s=0.2)
    results: dict[int, int] = {}

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for item in range(5):
                tg.start_soon(collect, batcher, results, item)

    run(main)
    assert results == {i: i * 10 for i in range(5)}
    assert fn.batches == [[0, 1, 2, 3, 4]]


def test_a_failed_batch_reaches_every_caller_and_an_items_own_error_only_its_caller() -> None:
    async def broken(items: list[int]) -> list[int]:
        raise ValueError(f"a broken batch of {len(items)}")

    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    results: dict[Any, Any] = {}

    async def together(batcher: MicroBatcher[Any, Any], items: list[Any]) -> None:
        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(collect, batcher, results, item)

    async def main() -> None:
        await together(MicroBatcher(broken, max_batch=3, window_s=3600), [1, 2, 3])
        assert all(isinstance(results[i], ValueError) and "batch of 3" in str(results[i]) for i in (1, 2, 3))
        await together(MicroBatcher(short, max_batch=2, window_s=3600), [4, 5])
        assert all("returned 1 results for 2 items" in str(results[i]) for i in (4, 5))
        own = KeyError("this item's own")
        await together(MicroBatcher(Recorder(), max_batch=3, window_s=3600), [6, own, 7])
        assert results[6] == 60 and results[7] == 70 and results[own] is own

    run(main)


def test_a_caller_cancelled_while_queued_leaves_the_queue() -> None:
    fn, batcher, results = held_first_batch()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, batcher, results, 0)
            await fn.started[1].wait()
            first = cancellable(tg, batcher, results, 1)  # waits to lead the next batch
            second = cancellable(tg, batcher, results, 2)
            tg.start_soon(collect, batcher, results, 3)
            await anyio.wait_all_tasks_blocked()
            first.cancel()
            second.cancel()
            await anyio.wait_all_tasks_blocked()
            assert batcher.queued == 1
            fn.gates[1].set()

    run(main)
    assert results == {0: 0, 3: 30}
    assert fn.batches == [[0], [3]]


@pytest.mark.parametrize("shield", [False, True])
def test_a_leader_cancelled_mid_batch_leaves_the_others_answered(shield: bool) -> None:
    fn = Recorder(1, 2)
    batcher = MicroBatcher(fn, max_batch=4, limiter=anyio.CapacityLimiter(1), shield=shield)
    results: dict[int, int] = {}

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, batcher, results, 0)
            await fn.started[1].wait()
            leader = cancellable(tg, batcher, results, 1)  # first in line: leads the next batch
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(collect, batcher, results, 2)
            tg.start_soon(collect, batcher, results, 3)
            await anyio.wait_all_tasks_blocked()
            fn.gates[1].set()
            await fn.started[2].wait()  # [1, 2, 3] runs, led by 1's caller
            leader.cancel()
            await anyio.wait_all_tasks_blocked()
            fn.gates[2].set()

    run(main)
    assert fn.batches[:2] == [[0], [1, 2, 3]]
    if shield:  # the batch ran to its end (1's caller too has its answer; the cancellation waits for its next await)
        assert fn.batches == [[0], [1, 2, 3]]
        assert results == {0: 0, 1: 10, 2: 20, 3: 30}
    else:  # the batch was dropped: 2 and 3 went back to the queue and ran again without 1
        assert fn.batches == [[0], [1, 2, 3], [2, 3]]
        assert results == {0: 0, 2: 20, 3: 30}


def test_a_cancelled_follower_is_not_queued_again() -> None:
    fn = Recorder(1)
    batcher = MicroBatcher(fn, max_batch=3, window_s=3600)  # only full batches leave
    results: dict[int, int] = {}

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            leader = cancellable(tg, batcher, results, 1)
            await anyio.wait_all_tasks_blocked()
            follower = cancellable(tg, batcher, results, 2)
            tg.start_soon(collect, batcher, results, 3)
            await fn.started[1].wait()  # [1, 2, 3] runs
            follower.cancel()  # 2's caller leaves while its item is in the batch
            await anyio.wait_all_tasks_blocked()
            leader.cancel()  # then the leader: the batch is dropped, 3 goes back to the queue, 2 does not
            await anyio.wait_all_tasks_blocked()
            assert batcher.queued == 1
            tg.start_soon(collect, batcher, results, 4)
            tg.start_soon(collect, batcher, results, 5)

    run(main)
    assert fn.batches[0] == [1, 2, 3]
    assert sorted(fn.batches[1]) == [3, 4, 5] and len(fn.batches) == 2
    assert results == {3: 30, 4: 40, 5: 50}


def cancellable(tg: Any, batcher: MicroBatcher[Any, Any], results: dict[Any, Any], item: Any) -> anyio.CancelScope:
    """Submit ``item`` in a task of ``tg`` under a cancel scope of its own, returned."""
    scope = anyio.CancelScope()

    async def one() -> None:
        with scope:
            await collect(batcher, results, item)

    tg.start_soon(one)
    return scope
