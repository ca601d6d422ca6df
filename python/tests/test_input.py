"""Hostile input: every bad value is a typed ``InvalidInput`` raised before
anything is sent (no server needed), never a crash; replies that break the
scripts' contract are ``Backend`` errors."""

from __future__ import annotations

import asyncio
import math
from typing import Any, Callable

import pytest

import ticketlock as tl
from ticketlock import AsyncLockStore, LockOptions, LockStore, TicketLock
from ticketlock import _protocol as p

# Nothing listens there: input checks must fail before any connection is tried.
NOWHERE = "redis://127.0.0.1:9/0"

BAD_IDS = ["", "x" * 1025, "é" * 513, "\ud800", None, 42, b"bytes"]
GOOD_IDS = ["* { } : ? [ ]", "a b\nc\0d", "é中文🙂", "x" * 1024, "}", "%7D"]
BAD_SECONDS = [0, -1, -0.001, math.nan, math.inf, -math.inf, 366 * 24 * 3600, True, "1", None]
BAD_PREFIXES = ["", "a:b", "a{b}", "é", "a b", "a*", "lock:", 5]
BAD_URLS = [
    "",
    "localhost",
    "http://localhost",
    "redis://",
    "redis://host:0",
    "redis://host:99999",
    "redis://host:port",
    "redis://host/abc",
    "redis://h1,h2",
    "redis+cluster://h1:1,h2:2/3",
    "redis://host#insecure",
    "redis://host?db=1",
    "redis+sentinel://s1:26379/mymaster",
    "redis://[::1",
    None,
]


def sync_store() -> LockStore:
    return LockStore.from_url(NOWHERE)


def calls(cid: Any) -> list[Callable[[], Any]]:
    s = sync_store()
    return [
        lambda: s.issue_ticket(cid, 1),
        lambda: s.get_lock(cid),
        lambda: s.delete_lock(cid),
        lambda: s.update_lock(cid),
        lambda: s.is_someone_waiting(cid),
        lambda: s.finish_serving(cid, 0),
        lambda: s.cleanup(cid, 0),
        lambda: s.acquire(cid),
        lambda: s.inspect(cid),
        lambda: s.key(cid),
        lambda: LockStore.create_lock(cid),
        lambda: tl.conversation_keys(None, cid),
    ]


@pytest.mark.parametrize("cid", BAD_IDS, ids=repr)
def test_bad_conversation_ids(cid: Any) -> None:
    for call in calls(cid):
        with pytest.raises(tl.InvalidInput):
            call()

    async def also_async() -> None:
        a = AsyncLockStore.from_url(NOWHERE)
        for call in (a.get_lock, a.delete_lock, a.acquire, a.is_someone_waiting):
            with pytest.raises(tl.InvalidInput):
                await call(cid)

    asyncio.run(also_async())


@pytest.mark.parametrize("cid", GOOD_IDS, ids=repr)
def test_ids_may_hold_anything_else(cid: str) -> None:
    key = sync_store().key(cid)
    assert key.startswith("lock:{") and key.endswith("}") and key.count("{") == 1 and key.count("}") == 1


@pytest.mark.parametrize("value", BAD_SECONDS, ids=repr)
def test_bad_lifetimes_and_wait_times(value: Any) -> None:
    s = sync_store()
    with pytest.raises(tl.InvalidInput):
        s.issue_ticket("c", value)
    if value is not None:
        for options in (
            LockOptions(lifetime=value),
            LockOptions(wait_time=value),
            LockOptions(timeout=value),
            LockOptions(dead_waiter_timeout=value),
        ):
            with pytest.raises(tl.InvalidInput):
                s.acquire("c", options)
        with pytest.raises(tl.InvalidInput):
            LockStore.from_url(NOWHERE, default_lifetime=value)
        with pytest.raises(tl.InvalidInput):
            TicketLock("c").issue_ticket(value)


@pytest.mark.parametrize("prefix", BAD_PREFIXES, ids=repr)
def test_bad_prefixes(prefix: Any) -> None:
    with pytest.raises(tl.InvalidInput):
        LockStore.from_url(NOWHERE, key_prefix=prefix)
    with pytest.raises(tl.InvalidInput):
        AsyncLockStore.from_url(NOWHERE, key_prefix=prefix)
    with pytest.raises(tl.InvalidInput):
        LockStore.create({"host": "localhost", "key_prefix": prefix})


@pytest.mark.parametrize("url", BAD_URLS, ids=repr)
def test_bad_urls(url: Any) -> None:
    with pytest.raises(tl.InvalidInput) as caught:
        LockStore.from_url(url)
    with pytest.raises(tl.InvalidInput):
        AsyncLockStore.from_url(url)
    assert "secret" not in str(caught.value)


def test_passwords_never_show() -> None:
    with pytest.raises(tl.InvalidInput) as caught:
        LockStore.from_url("redis://user:secret@host:bad/1")
    assert "secret" not in str(caught.value) and "<redacted>" in str(caught.value)
    assert "secret" not in repr(tl.parse_url("redis://user:secret@host/1"))


def test_urls_and_rasa_keys() -> None:
    t = tl.parse_url("rediss://bob:p%40ss@[::1]:6380/2#insecure")
    assert (t.nodes, t.username, t.password, t.db, t.tls, t.tls_insecure) == (
        (("::1", 6380),),
        "bob",
        "p@ss",
        2,
        True,
        True,
    )
    assert tl.parse_url("redis://host").db == 0
    c = tl.parse_url("redis+cluster://a:1,b:2")
    assert c.cluster and c.nodes == (("a", 1), ("b", 2))
    r = tl.parse_config(
        {"host": "redis.internal", "port": 6380, "password": "x", "use_ssl": True, "key_prefix": "bot1"}
    )
    assert (r.nodes, r.db, r.tls, r.socket_timeout, r.key_prefix) == (
        (("redis.internal", 6380),),
        1,
        True,
        10.0,
        "bot1",
    )
    assert tl.parse_config({"url": "redis://h:7/3", "db": 4}).db == 4
    k = tl.parse_config({"deployment_mode": "cluster", "endpoints": ["a:1", "b:2"]})
    assert k.cluster and k.db == 0 and k.nodes == (("a", 1), ("b", 2))
    for bad in (
        {"host": "h", "colour": "red"},
        {"host": "h", "port": 0},
        {"host": "h", "port": "x"},
        {"host": "h", "db": -1},
        {"host": "h", "use_ssl": "maybe"},
        {"host": "h", "socket_timeout": 0},
        {"host": "h", "socket_timeout": math.nan},
        {"host": "h", "script_mode": "magic"},
        {"host": "h", "deployment_mode": "sentinel"},
        {"host": "h", "endpoints": ["a:1"]},
        {"host": "h/x"},
        {"host": "h", "url": "h"},
        {"deployment_mode": "cluster", "db": 1},
        "redis://h",
    ):
        with pytest.raises(tl.InvalidInput):
            tl.parse_config(bad)  # type: ignore[arg-type]


def test_bad_snapshots_and_ticket_numbers() -> None:
    s = sync_store()
    for lock in (
        TicketLock("c", [tl.Ticket(-1, 10)]),
        TicketLock("c", [tl.Ticket(2**53, 10)]),
        TicketLock("c", [tl.Ticket(1, -5)]),
        TicketLock("c", [tl.Ticket(1, 10, 5, 0)]),
        TicketLock("c", [tl.Ticket(1, 10), tl.Ticket(1, 10)]),
        TicketLock("c", [tl.Ticket(1, 1.5)]),  # type: ignore[arg-type]
        TicketLock("c", next_number=-1),
        TicketLock("", []),
        "not a lock",
    ):
        with pytest.raises(tl.InvalidInput):
            s.save_lock(lock)  # type: ignore[arg-type]
    for ticket in (-1, 2**53, 1.0, True, "1"):
        with pytest.raises(tl.InvalidInput):
            s.cleanup("c", ticket)  # type: ignore[arg-type]


def test_replies_that_break_the_contract_are_errors_not_crashes() -> None:
    for bad in ([], [-1, 0, 0, 0, -1], [1, 0, 1, 0, -1], "x", [b"1", 0, 0, 0, 0], None, [1, 2, 3, 4, 5, 6]):
        with pytest.raises(tl.Backend):
            p.decode_issue(bad, "c")
    assert p.decode_issue([-1, -1, -1, -1, -1], "c") is None
    for bad in ([7, 0, 0, 0, 0, -1], [0, 0, -3, 0, 5, -1], [1, 0, 0, 0, 5, -1], [True, 0, 0, 0, 0, 0]):
        with pytest.raises(tl.Backend):
            p.decode_poll(bad, "c")
    for bad in ([2, 0], [1], [1, 0, 0]):
        with pytest.raises(tl.Backend):
            p.decode_release(bad, "c")
    with pytest.raises(tl.Backend):
        p.decode_extend([1, -1], "c")
    for bad in ([1, 0, 0, 0, 5], [1, 0, 0, 1, -5, 3, 0, 0], [2]):
        with pytest.raises(tl.Backend):
            p.decode_read(bad, "c")
    assert p.decode_read([0], "c") is None


def test_wake_ups_and_the_waiters_verdict() -> None:
    assert p.parse_notice(b"17 4 99 -1 50") == p.Notice(17, 4, 99, -1, 50)
    assert p.parse_notice("17 -1 -1 -1 -1") == p.Notice(17, -1, -1, -1, -1)
    for garbage in (b"17 4", b"17 4 9 1", b"17 4 9 1 1 1", b"17 4 x 1 1", b"-1 4 4 4 4", b"garbage", b"\xff\xfe", 5):
        assert p.parse_notice(garbage) is None
    me, epoch = 5, 17

    def verdict(text: str) -> str:
        return p.judge(p.parse_notice(text), me, epoch)

    assert verdict("17 5 99 -1 50") == p.SERVED
    assert verdict("17 4 99 -1 50") == p.WAIT
    assert verdict("17 4 99 5 50") == p.POLL  # we were removed
    assert verdict("17 4 99 -2 50") == p.POLL  # several were
    assert verdict("17 -1 -1 -1 -1") == p.POLL  # nobody served
    assert verdict("18 5 99 -1 50") == p.POLL  # another record
    assert verdict("17 6 99 -1 50") == p.POLL  # passed over
    assert verdict("garbage") == p.POLL
    assert p.lost_by(p.parse_notice("17 6 99 -1 50"), me, epoch)
    assert p.lost_by(p.parse_notice("17 -1 -1 -1 -1"), me, epoch)
    assert not p.lost_by(p.parse_notice("17 5 99 4 50"), me, epoch)
    assert not p.lost_by(p.parse_notice("18 6 99 -1 50"), me, epoch)


def test_lifetime_from_the_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("TICKET_LOCK_LIFETIME", "2.5")
    assert LockStore.from_url(NOWHERE).default_lifetime == 2.5
    for bad in ("0", "-1", "abc", "nan", "inf", ""):
        monkeypatch.setenv("TICKET_LOCK_LIFETIME", bad)
        with pytest.raises(tl.InvalidInput):
            LockStore.from_url(NOWHERE)


def test_scripts_match_the_lua_files() -> None:
    import hashlib

    scripts = tl.script_set()
    common = (tl.lua_dir() / "common.lua").read_bytes()
    for name in tl.OPERATIONS:
        code = common + (tl.lua_dir() / f"{name}.lua").read_bytes()
        assert scripts.scripts[name].sha == hashlib.sha1(code).hexdigest()
        assert scripts.library.count(f"'ticketlock_v2_{name}'") == 1
    assert "function_name = 'ticketlock_v2_read', flags = { 'no-writes' }" in scripts.library
    assert "function_name = 'ticketlock_v2_inspect', flags = { 'no-writes' }" in scripts.library
    sharded = tl.script_set(sharded=True)
    for name in tl.OPERATIONS:
        code = sharded.scripts[name].code
        assert "local PUBLISH = 'SPUBLISH'" in code
        assert code.replace("local PUBLISH = 'SPUBLISH'", "local PUBLISH = 'PUBLISH'", 1) == scripts.scripts[name].code
    assert sharded.library.startswith("#!lua name=ticketlock_v2s\n")


def test_import_does_not_need_rasa() -> None:
    import subprocess
    import sys

    code = "import sys, ticketlock; assert 'rasa' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
