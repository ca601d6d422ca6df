"""The synchronous store against a real redis-server: every method, the
acquire loop's rules, pushed wake-ups and failures."""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List

import pytest
import redis

import ticketlock as tl
from ticketlock import LockOptions, LockStore


@pytest.fixture(params=["eval", "functions"])
def store(request: Any, url: str, prefix: str) -> LockStore:
    s = LockStore.from_url(url, key_prefix=prefix, script_mode=request.param)
    yield s
    leftovers = s.client.keys(prefix + ":*")
    s.close()
    assert leftovers == [], f"keys left behind: {leftovers}"


def until(condition: Any, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.002)


def subscribers(store: LockStore, cid: str) -> int:
    return int(store.client.pubsub_numsub(store.key(cid))[0][1])


def test_lock_served_at_once_then_released(store: LockStore) -> None:
    cid = "c {1} * : é"
    with store.lock(cid, lifetime=10) as guard:
        assert guard.ticket == 0 and guard.fencing_token > 0
        snapshot = store.get_lock(cid)
        assert snapshot is not None
        assert snapshot.now_serving == 0 and snapshot.last_issued == 0 and snapshot.next_number == 1
        assert not snapshot.is_locked(0) and snapshot.is_locked(1) and snapshot.is_someone_waiting()
        (ticket,) = snapshot.tickets
        assert ticket.is_renewing and ticket.lease_ms == 10_000 and ticket.liveness_ms == 5000
        assert 9.0 < guard.remaining() <= 10.0
        assert store.is_someone_waiting(cid) and guard.is_held()
        assert 19 < guard.extend(20) <= 20 and guard.remaining() > 19
    assert store.get_lock(cid) is None and not store.is_someone_waiting(cid)
    assert not guard.is_held()


def test_fencing_tokens_grow_across_records(store: LockStore) -> None:
    tokens = []
    for _ in range(5):
        with store.lock("fence") as guard:
            tokens.append(guard.fencing_token)
    assert tokens == sorted(set(tokens))


def test_rasa_methods(store: LockStore) -> None:
    cid = "rasa-methods"
    assert store.get_lock(cid) is None
    empty = store.get_or_create_lock(cid)
    assert empty.tickets == [] and empty.now_serving is None and empty.last_issued is None
    assert LockStore.create_lock(cid).conversation_id == cid
    first = store.issue_ticket(cid, 30)
    second = store.issue_ticket(cid, 30)
    assert (first, second) == (0, 1)
    lock = store.get_or_create_lock(cid)
    assert [t.number for t in lock.tickets] == [0, 1] and lock.now_serving == 0
    assert all(not t.is_renewing and 29_000 < t.remaining_ms <= 30_000 for t in lock.tickets)
    # finish keeps the record (and its numbering), cleanup ends it once empty.
    assert store.finish_serving(cid, first)
    assert not store.finish_serving(cid, first)
    lock = store.get_lock(cid)
    assert lock is not None and lock.now_serving == 1 and lock.last_issued == 1
    assert store.cleanup(cid, second)
    assert store.get_lock(cid) is None
    # delete_lock
    store.issue_ticket(cid, 30)
    assert store.delete_lock(cid) and not store.delete_lock(cid)
    # update_lock prunes expired tickets and serves the next
    store.issue_ticket(cid, 0.05)
    store.issue_ticket(cid, 30)
    time.sleep(0.1)
    assert store.update_lock(cid) == 1
    lock = store.get_lock(cid)
    assert lock is not None and lock.now_serving == 1
    assert store.delete_lock(cid)


def test_save_lock_keeps_every_tickets_kind_and_terms(store: LockStore) -> None:
    cid = "save"
    holder = store.acquire(cid, LockOptions(lifetime=30, dead_waiter_timeout=20))
    store.issue_ticket(cid, 40)
    before = store.get_lock(cid)
    assert before is not None
    store.save_lock(before)
    after = store.get_lock(cid)
    assert after is not None
    assert [(t.number, t.lease_ms, t.liveness_ms) for t in after.tickets] == [(0, 30_000, 20_000), (1, 0, 0)]
    assert after.next_number == 2
    # The grant survives a save of the same snapshot: the holder still holds.
    assert holder.is_held()
    # A snapshot edited locally: numbers never go down, a new ticket is fixed.
    after.remove_ticket_for(1)
    number = after.issue_ticket(5)
    assert number == 2
    store.save_lock(after)
    saved = store.get_lock(cid)
    assert saved is not None and [t.number for t in saved.tickets] == [0, 2]
    holder.release()
    assert store.cleanup(cid, 2)
    assert store.get_lock(cid) is None


def test_save_lock_of_nothing_leaves_no_keys(store: LockStore) -> None:
    store.save_lock(tl.TicketLock("nothing"))
    assert store.get_lock("nothing") is None


def test_pushed_wake_up_serves_an_idle_waiter_within_milliseconds(store: LockStore) -> None:
    cid = "push"
    holder = store.acquire(cid, LockOptions(lifetime=30))
    served: Dict[str, Any] = {}
    waiting: List[int] = []

    def wait() -> None:
        try:
            options = LockOptions(lifetime=30, wait_time=30, dead_waiter_timeout=90)
            with store.lock_with(cid, options, on_wait=lambda t, a: waiting.append(a)) as g:
                served["ticket"], served["at"] = g.ticket, time.monotonic()
        except BaseException as e:  # noqa: BLE001 - reported below
            served["error"] = e

    thread = threading.Thread(target=wait)
    thread.start()
    until(lambda: waiting, "the waiter polled once and sleeps")
    time.sleep(0.3)
    released = time.monotonic()
    holder.release()
    thread.join(10)
    assert "error" not in served, served
    took = served["at"] - released
    assert served["ticket"] == 1 and waiting == [1]
    assert took < 0.5, f"hand-over took {took * 1000:.1f} ms with a 30 s wait time"


def test_timeout_gives_the_ticket_back(store: LockStore) -> None:
    cid = "timeout"
    holder = store.acquire(cid)
    started = time.monotonic()
    with pytest.raises(tl.Timeout) as caught:
        store.acquire(cid, LockOptions(timeout=0.2))
    assert 0.2 <= time.monotonic() - started < 2
    assert caught.value.ticket == 1 and caught.value.retryable
    lock = store.get_lock(cid)
    assert lock is not None and [t.number for t in lock.tickets] == [0]
    holder.release()


def test_an_expired_fixed_head_is_passed_over(store: LockStore) -> None:
    cid = "stale"
    stale = store.issue_ticket(cid, 0.3)
    began = time.monotonic()
    with store.lock(cid, wait_time=30, dead_waiter_timeout=90) as guard:
        assert guard.ticket == stale + 1
        assert 0.2 < time.monotonic() - began < 3


@pytest.mark.parametrize("how", ["finish_serving", "delete_lock", "save_lock"])
def test_a_removed_waiter_learns_it_at_once(store: LockStore, how: str) -> None:
    cid = "removed-" + how
    holder = store.acquire(cid, LockOptions(lifetime=30))
    outcome: Dict[str, Any] = {}
    waiting: List[int] = []

    def wait() -> None:
        try:
            store.acquire(
                cid, LockOptions(wait_time=30, dead_waiter_timeout=90), on_wait=lambda t, a: waiting.append(t)
            )
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001
            outcome["error"], outcome["at"] = e, time.monotonic()

    thread = threading.Thread(target=wait)
    thread.start()
    until(lambda: waiting, "the waiter polled")
    time.sleep(0.2)
    removed_at = time.monotonic()
    if how == "finish_serving":
        assert store.finish_serving(cid, waiting[0])
    elif how == "delete_lock":
        assert store.delete_lock(cid)
    else:
        lock = store.get_lock(cid)
        assert lock is not None
        lock.remove_ticket_for(waiting[0])
        store.save_lock(lock)
    thread.join(10)
    assert isinstance(outcome.get("error"), tl.Expired), outcome
    assert outcome["at"] - removed_at < 0.5
    if how == "delete_lock":
        with pytest.raises(tl.Expired):
            holder.release()
    else:
        holder.release()


def test_a_lapsed_lease_is_reported_on_leaving_the_block(store: LockStore) -> None:
    cid = "lapsed"
    with pytest.raises(tl.Expired), store.lock(cid, lifetime=0.1) as guard:
        time.sleep(0.25)
        assert guard.remaining() == 0
        store.update_lock(cid)  # any client's call drops the expired lease
    # The block's own error is not hidden by the release's.
    with pytest.raises(KeyError), store.lock(cid, lifetime=0.05):
        time.sleep(0.15)
        store.update_lock(cid)
        raise KeyError("mine")
    store.delete_lock(cid)


def test_extend_after_the_lease_was_lost_raises(store: LockStore) -> None:
    guard = store.acquire("gone")
    assert store.delete_lock("gone")
    with pytest.raises(tl.Expired):
        guard.extend(10)
    with pytest.raises(tl.Expired):
        guard.release()


def test_fifo_across_threads_without_lost_updates(url: str, prefix: str) -> None:
    cid = "fifo"
    stores = [LockStore.from_url(url, key_prefix=prefix) for _ in range(2)]
    counter = {"value": 0}
    grants: List[int] = []

    def worker(s: LockStore) -> None:
        for _ in range(25):
            with s.lock(cid, lifetime=30, dead_waiter_timeout=30) as g:
                value = counter["value"]
                time.sleep(0.0005)
                counter["value"] = value + 1
                grants.append(g.fencing_token)

    threads = [threading.Thread(target=worker, args=(stores[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert counter["value"] == 100
    assert grants == sorted(grants)
    assert stores[0].client.keys(prefix + ":*") == []


def test_cancel_before_and_after_the_issue(store: LockStore) -> None:
    cid = "cancel"
    key = store.key(cid)
    # After: the ticket the issue took is given back.
    reply = store._run("issue", cid, key, [30000, 5000, "req1"])
    assert reply[0] == 0
    assert store.cancel(cid, "req1") == 0
    assert store.get_lock(cid) is None
    # Before: the issue, arriving late, takes nothing.
    assert store.cancel(cid, "req2") is None
    assert store._run("issue", cid, key, [30000, 5000, "req2"]) == [-1, -1, -1, -1, -1]
    # The remembered request id lives in the key until it expires; the test cleans up.
    store.client.delete(key)


def test_an_issue_whose_reply_is_lost_is_cancelled(store: LockStore, monkeypatch: Any) -> None:
    cid = "lost-reply"
    real = store._runner.run

    def run(op: str, key: str, args: List[Any]) -> Any:
        result = real(op, key, args)
        if op == "issue":
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return result

    monkeypatch.setattr(store._runner, "run", run)
    with pytest.raises(tl.Backend) as caught:
        store.acquire(cid)
    assert caught.value.retryable
    monkeypatch.undo()
    assert store.get_lock(cid) is None, "the ticket of the lost reply was not given back"


def test_scripts_are_reloaded_after_a_flush(store: LockStore) -> None:
    store.client.script_flush()
    store.client.function_flush()
    with store.lock("flushed") as guard:
        assert guard.ticket == 0


def test_foreign_data_is_corrupted_not_a_crash(store: LockStore) -> None:
    key = store.key("foreign")
    store.client.set(key, "hello")
    with pytest.raises(tl.Corrupted):
        store.get_lock("foreign")
    with pytest.raises(tl.Corrupted):
        store.acquire("foreign")
    store.client.hset(key + "x", "next", "7")
    store.client.delete(key, key + "x")


def test_inspect(store: LockStore) -> None:
    cid = "inspect"
    with store.lock(cid) as guard:
        found = store.inspect(cid)
        assert found.exists and found.head == 0 and found.served == 0 and found.fence == guard.fencing_token
        assert found.live == 1 and found.expired == 0 and found.cancelled == 0
        (ticket,) = found.tickets
        assert ticket.number == 0 and len(ticket.request) == 32
    assert not store.inspect(cid).exists
