"""The asyncio store: the same rules, plus cancel safety, auto-renew and ``lost``."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, List, TypeVar

import pytest
import redis

import ticketlock as tl
from ticketlock import AsyncLockStore, LockOptions

T = TypeVar("T")


def run(make: Callable[[AsyncLockStore], Awaitable[T]], url: str, prefix: str, mode: str = "auto") -> T:
    async def main() -> T:
        store = AsyncLockStore.from_url(url, key_prefix=prefix, script_mode=mode)
        try:
            return await make(store)
        finally:
            leftovers = await store.client.keys(prefix + ":*")
            await store.close()
            assert leftovers == [], f"keys left behind: {leftovers}"

    return asyncio.run(main())


async def until(condition: Callable[[], Any], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("mode", ["eval", "functions"])
def test_every_method(url: str, prefix: str, mode: str) -> None:
    async def body(store: AsyncLockStore) -> None:
        cid = "a {b} é"
        async with store.lock(cid, lifetime=10) as guard:
            assert guard.ticket == 0 and guard.fencing_token > 0
            lock = await store.get_lock(cid)
            assert lock is not None and lock.now_serving == 0 and lock.tickets[0].is_renewing
            assert await store.is_someone_waiting(cid) and await guard.is_held()
            assert 19 < await guard.extend(20) <= 20
            await store.save_lock(lock)
            assert await guard.is_held()
        assert await store.get_lock(cid) is None
        empty = await store.get_or_create_lock(cid)
        assert empty.tickets == [] and AsyncLockStore.create_lock(cid).conversation_id == cid
        first = await store.issue_ticket(cid, 30)
        second = await store.issue_ticket(cid, 0.05)
        assert (first, second) == (0, 1)
        assert await store.finish_serving(cid, first)
        await asyncio.sleep(0.1)
        assert await store.update_lock(cid) == 1
        lock = await store.get_lock(cid)
        assert lock is not None and lock.tickets == [] and lock.last_issued == 1
        third = await store.issue_ticket(cid, 30)
        assert third == 2
        assert await store.cleanup(cid, third)
        assert await store.get_lock(cid) is None
        await store.issue_ticket(cid, 30)
        assert await store.delete_lock(cid)
        assert (await store.inspect(cid)).exists is False

    run(body, url, prefix, mode)


def test_pushed_wake_up_serves_an_idle_waiter_within_milliseconds(url: str, prefix: str) -> None:
    async def body(store: AsyncLockStore) -> float:
        holder = await store.acquire("push", LockOptions(lifetime=30))
        polls: List[int] = []
        options = LockOptions(lifetime=30, wait_time=30, dead_waiter_timeout=90)

        async def wait() -> float:
            async with store.lock_with("push", options, on_wait=lambda t, a: polls.append(t)) as g:
                assert g.ticket == 1
                return time.monotonic()

        waiter = asyncio.ensure_future(wait())
        await until(lambda: polls, "the waiter polled once")
        await asyncio.sleep(0.3)
        released = time.monotonic()
        await holder.release()
        served = await asyncio.wait_for(waiter, 10)
        assert polls == [1]
        return served - released

    took = run(body, url, prefix)
    assert took < 0.5, f"hand-over took {took * 1000:.1f} ms with a 30 s wait time"


def test_many_tasks_one_conversation_fifo(url: str, prefix: str) -> None:
    async def body(store: AsyncLockStore) -> None:
        other = AsyncLockStore.from_url(url, key_prefix=prefix)
        counter = {"value": 0}
        fences: List[int] = []

        async def worker(s: AsyncLockStore) -> None:
            for _ in range(20):
                async with s.lock("hot", lifetime=30, dead_waiter_timeout=30) as g:
                    value = counter["value"]
                    await asyncio.sleep(0)
                    counter["value"] = value + 1
                    fences.append(g.fencing_token)

        await asyncio.gather(*(worker(store if i % 2 else other) for i in range(6)))
        await other.close()
        assert counter["value"] == 120
        assert fences == sorted(fences)

    run(body, url, prefix)


def test_timeout_and_cancellation_give_the_ticket_back(url: str, prefix: str) -> None:
    async def body(store: AsyncLockStore) -> None:
        holder = await store.acquire("t")
        with pytest.raises(tl.Timeout):
            await store.acquire("t", LockOptions(timeout=0.2))
        lock = await store.get_lock("t")
        assert lock is not None and [t.number for t in lock.tickets] == [0]
        # Cancelled from outside while waiting.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.acquire("t", LockOptions(wait_time=30)), 0.2)
        await until(lambda: True, "")
        for _ in range(200):
            lock = await store.get_lock("t")
            if lock is not None and len(lock.tickets) == 1:
                break
            await asyncio.sleep(0.01)
        assert lock is not None and [t.number for t in lock.tickets] == [0]
        await holder.release()

    run(body, url, prefix)


def test_removed_waiter_and_holder_learn_at_once(url: str, prefix: str) -> None:
    async def body(store: AsyncLockStore) -> None:
        holder = await store.acquire("r", LockOptions(lifetime=30))
        lost = asyncio.ensure_future(holder.lost())
        polls: List[int] = []
        waiter = asyncio.ensure_future(
            store.acquire("r", LockOptions(wait_time=30, dead_waiter_timeout=90), on_wait=lambda t, a: polls.append(t))
        )
        await until(lambda: polls, "the waiter polled")
        await asyncio.sleep(0.2)
        started = time.monotonic()
        assert await store.delete_lock("r")
        with pytest.raises(tl.Expired):
            await asyncio.wait_for(waiter, 5)
        await asyncio.wait_for(lost, 5)
        assert time.monotonic() - started < 0.5
        assert holder.is_lost
        with pytest.raises(tl.Expired):
            await holder.release()

    run(body, url, prefix)


def test_lost_when_the_lease_runs_out_and_release_says_so(url: str, prefix: str) -> None:
    async def body(store: AsyncLockStore) -> None:
        with pytest.raises(tl.Expired):
            async with store.lock("lapse", lifetime=0.15) as guard:
                started = time.monotonic()
                await asyncio.wait_for(guard.lost(), 2)
                assert 0.1 < time.monotonic() - started < 1
                # The local deadline comes first (counted from when the issue was
                # sent); the server's follows within a round trip.
                await asyncio.sleep(0.1)
                await store.update_lock("lapse")

    run(body, url, prefix)


def test_auto_renew_keeps_the_lease(url: str, prefix: str) -> None:
    async def body(store: AsyncLockStore) -> None:
        async with store.lock("renew", lifetime=0.3, auto_renew=True) as guard:
            await asyncio.sleep(1.0)
            await store.update_lock("renew")
            assert not guard.is_lost and await guard.is_held()

    run(body, url, prefix)


def test_a_grant_from_a_wake_up_is_picked_up(url: str, prefix: str) -> None:
    async def body(store: AsyncLockStore) -> None:
        holder = await store.acquire("pick", LockOptions(lifetime=30))
        polls: List[int] = []
        waiter = asyncio.ensure_future(
            store.acquire(
                "pick",
                LockOptions(lifetime=5, wait_time=30, dead_waiter_timeout=90),
                on_wait=lambda t, a: polls.append(t),
            )
        )
        await until(lambda: polls, "the waiter polled")
        await holder.release()
        guard = await asyncio.wait_for(waiter, 5)
        # Picked up in the background: the lease now runs from the grant.
        await until(lambda: guard.remaining() > 4.5, "the pick-up moved the local deadline to the lease")
        found = await store.inspect("pick")
        assert found.granted_ms == -1, "the grant was not picked up"
        await guard.release()

    run(body, url, prefix)


def test_an_issue_whose_reply_is_lost_is_cancelled(url: str, prefix: str) -> None:
    async def body(store: AsyncLockStore) -> None:
        real = store._runner.run

        async def flaky(op: str, key: str, args: List[Any]) -> Any:
            result = await real(op, key, args)
            if op == "issue":
                raise redis.exceptions.ConnectionError("Connection reset by peer")
            return result

        store._runner.run = flaky  # type: ignore[method-assign]
        with pytest.raises(tl.Backend):
            await store.acquire("lost")
        store._runner.run = real  # type: ignore[method-assign]
        assert await store.get_lock("lost") is None

    run(body, url, prefix)


def test_foreign_data_is_corrupted(url: str, prefix: str) -> None:
    async def body(store: AsyncLockStore) -> None:
        key = store.key("foreign")
        await store.client.rpush(key, "x")
        with pytest.raises(tl.Corrupted):
            await store.acquire("foreign")
        await store.client.delete(key)

    run(body, url, prefix)
