"""The synchronous store (redis-py): Rasa's methods, and ``lock`` as a context manager."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from types import TracebackType
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Type

import redis
import redis.exceptions as rex

from . import _protocol as p
from ._config import Target, parse_config, parse_url
from ._errors import Backend, Expired, InvalidInput, LockError, Timeout, classify
from ._runner import SyncRunner
from ._scripts import script_set
from ._validate import MAX_TICKET, conversation_id, conversation_key, lifetime_from_env, milliseconds, seconds
from ._validate import key_prefix as check_key_prefix

log = logging.getLogger("ticketlock")

#: ``on_wait(ticket, ahead)``: called each time a waiter finds itself still waiting.
OnWait = Callable[[int, int], None]


def _cluster_pubsub_check(asynchronous: bool) -> None:
    """Wake-ups on a cluster need sharded pub/sub; refuse at construction, never fail silently."""
    if asynchronous:
        import redis.asyncio.client as aclient

        ok = hasattr(aclient.PubSub, "ssubscribe")
        form = "asyncio "
    else:
        import redis.client as sclient

        ok = hasattr(sclient.PubSub, "ssubscribe")
        form = ""
    if not ok:
        raise InvalidInput(
            "deployment mode",
            f"Redis Cluster needs sharded pub/sub (SSUBSCRIBE) for wake-ups, which the {form}client of "
            f"redis-py {redis.__version__} lacks: upgrade redis-py "
            f"({'8.x' if asynchronous else '5.0 or later'}), or use one Redis server",
        )


class _Grant(NamedTuple):
    fence: int
    #: Local monotonic deadline of the lease (never later than the server's).
    until: float


class LockStore:
    """A handle on the ticket locks in one Redis under one key prefix (synchronous).

    Every conversation has a strictly first-in-first-out queue of tickets;
    every change is one atomic Lua script. Thread-safe as far as the redis-py
    client is. Build it from a URL (:meth:`from_url`), from Rasa's
    ``lock_store:`` keys (:meth:`create`), or around a client of your own.
    """

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: Optional[str] = None,
        default_lifetime: Optional[float] = None,
        script_mode: str = "auto",
    ) -> None:
        from redis.cluster import RedisCluster

        self._cluster = isinstance(client, RedisCluster)
        if self._cluster:
            _cluster_pubsub_check(asynchronous=False)
        elif not isinstance(client, redis.Redis):
            raise InvalidInput("client", f"{type(client).__name__} is not a redis.Redis or redis.cluster.RedisCluster")
        self._client = client
        self._prefix = check_key_prefix(key_prefix)
        self._socket_timeout = _socket_timeout(client)
        self._default_lifetime = (
            lifetime_from_env() if default_lifetime is None else seconds(default_lifetime, "default lifetime")
        )
        if script_mode not in ("auto", "eval", "functions"):
            raise InvalidInput("script_mode", f"{script_mode!r} is not auto, eval or functions")
        self._runner = SyncRunner(client, script_set(sharded=self._cluster), script_mode, self._cluster)
        self._owns_client = False

    # -- construction --------------------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: Optional[str] = None,
        socket_timeout: Optional[float] = None,
        default_lifetime: Optional[float] = None,
        script_mode: str = "auto",
    ) -> LockStore:
        """``redis://[user:password@]host[:port][/db]``, ``rediss://...[#insecure]``,
        ``redis+cluster://[user:password@]h1:p1,h2:p2``; a malformed URL raises ``InvalidInput``."""
        target = parse_url(url, socket_timeout=socket_timeout, key_prefix=key_prefix)
        return cls._from_target(target, default_lifetime, script_mode)

    @classmethod
    def create(cls, config: Mapping[str, Any], *, default_lifetime: Optional[float] = None) -> LockStore:
        """From Rasa's ``lock_store:`` keys (``type`` left out): see :func:`ticketlock.parse_config`."""
        target = parse_config(config)
        return cls._from_target(target, default_lifetime, target.script_mode)

    @classmethod
    def _from_target(cls, target: Target, default_lifetime: Optional[float], script_mode: str) -> LockStore:
        kwargs = target.connection_kwargs()
        if target.cluster:
            _cluster_pubsub_check(asynchronous=False)
            from redis.cluster import ClusterNode, RedisCluster

            try:
                nodes = [ClusterNode(h, p_) for h, p_ in target.nodes]  # type: ignore[no-untyped-call]
                client: Any = RedisCluster(startup_nodes=nodes, **kwargs)
            except (rex.RedisError, rex.RedisClusterException, OSError) as e:
                raise classify(e, None) from e
        else:
            host, port = target.nodes[0]
            client = redis.Redis(host=host, port=port, **kwargs)
        store = cls(client, key_prefix=target.key_prefix, default_lifetime=default_lifetime, script_mode=script_mode)
        store._owns_client = True
        return store

    def close(self) -> None:
        """Closes the connections of a client this store made itself."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> LockStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LockStore(prefix={self._prefix!r}, cluster={self._cluster})"

    # -- plumbing --------------------------------------------------------------------

    @property
    def key_prefix(self) -> str:
        """The full prefix of every key: ``lock:`` or ``<prefix>:lock:``."""
        return self._prefix

    @property
    def default_lifetime(self) -> float:
        """Seconds: the lease ``lock`` takes when none is given."""
        return self._default_lifetime

    @property
    def client(self) -> Any:
        """The redis-py client this store uses."""
        return self._client

    def key(self, conversation_id_: str) -> str:
        """The conversation's key, also its wake-up channel."""
        return conversation_key(self._prefix, conversation_id(conversation_id_))

    def _run(self, op: str, cid: str, key: str, args: List[Any]) -> Any:
        try:
            return self._runner.run(op, key, args)
        except (rex.RedisError, rex.RedisClusterException, OSError) as e:
            raise classify(e, cid) from e

    # -- Rasa's methods ---------------------------------------------------------------

    @staticmethod
    def create_lock(conversation_id_: str) -> p.TicketLock:
        """A new, empty lock for the conversation (not stored)."""
        return p.TicketLock(conversation_id(conversation_id_))

    def issue_ticket(self, conversation_id_: str, lifetime: float) -> int:
        """Appends a fixed ticket (Rasa's: it expires ``lifetime`` seconds from now,
        waiting included) and returns its number. The caller owns it: end it with
        :meth:`finish_serving` or :meth:`cleanup`, or let it expire."""
        cid = conversation_id(conversation_id_)
        ms = milliseconds(lifetime, "lifetime")
        issued = p.decode_issue(self._run("issue", cid, self.key(cid), [ms, "", ""]), cid)
        if issued is None:
            raise Backend(cid, False, "issue.lua replied that it was cancelled, but no request id was sent")
        log.debug("ticket issued: conversation %s ticket %d", cid, issued.ticket)
        return issued.ticket

    def get_lock(self, conversation_id_: str) -> Optional[p.TicketLock]:
        """A snapshot of the conversation's queue, or None when it has no record."""
        cid = conversation_id(conversation_id_)
        return p.decode_read(self._run("read", cid, self.key(cid), [-1]), cid)

    def get_or_create_lock(self, conversation_id_: str) -> p.TicketLock:
        """The stored lock, or a new empty one (which needs no storage)."""
        return self.get_lock(conversation_id_) or self.create_lock(conversation_id_)

    def save_lock(self, lock: p.TicketLock) -> None:
        """Replaces the conversation's queue with ``lock``'s tickets, atomically,
        each with its kind and terms; numbers never go down. Waiters whose
        tickets are left out are told at once (they get ``Expired``)."""
        args = p.save_args(lock)
        cid = lock.conversation_id
        p.decode_single("save", self._run("save", cid, self.key(cid), args), cid)

    def delete_lock(self, conversation_id_: str) -> bool:
        """Deletes the record and every ticket in it; returns whether there was one."""
        cid = conversation_id(conversation_id_)
        return p.decode_single("delete", self._run("delete", cid, self.key(cid), []), cid) == 1

    def update_lock(self, conversation_id_: str) -> int:
        """Drops expired tickets (handing the lock on if the served one expired); returns how many."""
        cid = conversation_id(conversation_id_)
        return p.decode_pair("update", self._run("update", cid, self.key(cid), []), cid)[0]

    def is_someone_waiting(self, conversation_id_: str) -> bool:
        """True when the queue holds any live ticket (held or waiting)."""
        cid = conversation_id(conversation_id_)
        return p.read_live(self._run("read", cid, self.key(cid), [0]), cid)

    def finish_serving(self, conversation_id_: str, ticket: int) -> bool:
        """Removes ``ticket`` (served or not) and serves the next; the record stays.
        Returns whether the ticket was live. Its waiter, or holder, is told at once."""
        return self._release(conversation_id_, ticket, "finish")

    def cleanup(self, conversation_id_: str, ticket: int) -> bool:
        """Like :meth:`finish_serving`, and deletes the record when no live ticket is left."""
        return self._release(conversation_id_, ticket, "cleanup")

    def _release(self, conversation_id_: str, ticket: int, mode: str) -> bool:
        cid = conversation_id(conversation_id_)
        number = _ticket_number(ticket)
        return p.decode_release(self._run("release", cid, self.key(cid), [number, mode, "", ""]), cid)

    def cancel(self, conversation_id_: str, request_id: str) -> Optional[int]:
        """Gives back the ticket an issue with ``request_id`` took, whether it ran
        already or not (see lua/cancel.lua); returns the ticket removed, if any."""
        cid = conversation_id(conversation_id_)
        found, ticket = p.decode_pair(
            "cancel", self._run("cancel", cid, self.key(cid), [request_id, p.CANCEL_REMEMBER_MS]), cid
        )
        return ticket if found == 1 else None

    def inspect(self, conversation_id_: str, limit: int = -1) -> p.Inspected:
        """Everything about one conversation, for operators (read-only)."""
        cid = conversation_id(conversation_id_)
        return p.decode_inspect(self._run("inspect", cid, self.key(cid), [int(limit)]), cid)

    # -- lock ----------------------------------------------------------------------------

    def lock(
        self,
        conversation_id_: str,
        *,
        lifetime: Optional[float] = None,
        wait_time: Optional[float] = None,
        timeout: Optional[float] = None,
        dead_waiter_timeout: Optional[float] = None,
        on_wait: Optional[OnWait] = None,
    ) -> LockContext:
        """``with store.lock(cid) as guard:`` — waits for the conversation's lock
        (see :meth:`acquire`) and releases it when the block ends."""
        options = p.LockOptions(lifetime, wait_time, timeout, dead_waiter_timeout)
        return self.lock_with(conversation_id_, options, on_wait=on_wait)

    def lock_with(
        self, conversation_id_: str, options: Optional[p.LockOptions] = None, *, on_wait: Optional[OnWait] = None
    ) -> LockContext:
        """:meth:`lock` with a :class:`LockOptions`."""
        return LockContext(self, conversation_id_, options or p.LockOptions(), on_wait)

    def acquire(
        self, conversation_id_: str, options: Optional[p.LockOptions] = None, *, on_wait: Optional[OnWait] = None
    ) -> LockGuard:
        """Takes a renewing ticket and waits until it is served; returns the guard.

        The waiting ticket keeps its place as long as this waiter checks in (at
        least every third of the dead-waiter timeout); the lease runs from the
        grant. Raises ``Expired`` as soon as the ticket is found expired or
        removed, and ``Timeout`` (ticket given back) when the options' timeout
        passes first. Hand-over is pushed by pub/sub; polling every
        ``wait_time`` is only a safety net."""
        cid = conversation_id(conversation_id_)
        o = (options if options is not None else p.LockOptions()).resolve(self._default_lifetime)
        key = self.key(cid)
        started = time.monotonic()
        deadline = None if o.timeout is None else started + o.timeout
        request = uuid.uuid4().hex
        sent = time.monotonic()
        try:
            issued = p.decode_issue(self._run("issue", cid, key, [o.lifetime_ms, o.liveness_ms, request]), cid)
        except BaseException as e:
            # The issue may have run: give its ticket back by request id.
            if not isinstance(e, LockError) or e.retryable:
                self._cancel_issue(cid, key, request)
            raise
        if issued is None:
            raise Backend(cid, False, "issue.lua replied that a fresh request id was cancelled")
        log.debug("ticket issued: conversation %s ticket %d", cid, issued.ticket)
        if issued.now_serving == issued.ticket:
            grant = _Grant(issued.fence, sent + issued.head_remaining_ms / 1000.0)
        else:
            try:
                grant = self._wait(cid, key, issued, o, deadline, sent, on_wait)
            except Expired:
                log.debug("ticket expired while waiting: conversation %s ticket %d", cid, issued.ticket)
                raise
            except BaseException:
                self._give_back(cid, key, issued.ticket, issued.epoch)
                raise
        waited = time.monotonic() - started
        log.debug("lock acquired: conversation %s ticket %d fence %d", cid, issued.ticket, grant.fence)
        return LockGuard(self, cid, key, issued.ticket, issued.epoch, grant, waited)

    def _cancel_issue(self, cid: str, key: str, request: str) -> None:
        for attempt in range(p.CANCEL_ATTEMPTS):
            try:
                self._run("cancel", cid, key, [request, p.CANCEL_REMEMBER_MS])
                return
            except LockError as e:
                if not e.retryable:
                    return
                time.sleep(0.05 * (attempt + 1))

    def _give_back(self, cid: str, key: str, ticket: int, epoch: int) -> None:
        try:
            self._run("release", cid, key, [ticket, "cleanup", epoch, "owner"])
        except LockError:
            pass  # it expires within the dead-waiter timeout

    def _wait(
        self,
        cid: str,
        key: str,
        issued: p.Issued,
        o: p.Resolved,
        deadline: Optional[float],
        issue_sent: float,
        on_wait: Optional[OnWait],
    ) -> _Grant:
        ticket, epoch = issued.ticket, issued.epoch
        sub = _Subscription(self, cid, key)
        try:
            check_in_sent = issue_sent
            poll_now = True
            granted = False  # a wake-up said so: the next poll picks it up
            next_poll = head_at = math.inf
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise Timeout(cid, ticket, now - issue_sent)
                if poll_now:
                    sent = time.monotonic()
                    try:
                        polled = p.decode_poll(self._run("poll", cid, key, [ticket, epoch]), cid)
                    except LockError as e:
                        # A grant must be picked up before it lapses; keep trying until then.
                        if granted and e.retryable and time.monotonic() < check_in_sent + o.before_pick_up:
                            time.sleep(0.01)
                            continue
                        raise
                    if polled.status == 1:
                        return _Grant(polled.fence, sent + polled.own_remaining_ms / 1000.0)
                    if polled.status == -1:
                        raise Expired(cid, ticket)
                    granted = False
                    check_in_sent = sent
                    if on_wait is not None:
                        on_wait(ticket, polled.ahead)
                    next_poll = sent + max(0.001, min(o.check_in, polled.own_remaining_ms / 2000.0))
                    head_at = math.inf
                    if polled.head_remaining_ms >= 0:
                        head_at = time.monotonic() + polled.head_remaining_ms / 1000.0 + p.PAST
                    poll_now = False
                    continue
                until = min(next_poll, head_at, math.inf if deadline is None else deadline)
                if now >= until:
                    poll_now = True
                    continue
                try:
                    payload = sub.get(until - now)
                except LockError:
                    poll_now = True  # the poll tells whether Redis is really gone
                    time.sleep(min(0.05, max(0.0, until - now)))
                    continue
                if payload is _NOTHING:
                    continue
                notice = p.parse_notice(payload)
                verdict = p.judge(notice, ticket, epoch)
                if verdict == p.SERVED:
                    granted = poll_now = True
                elif verdict == p.WAIT:
                    assert notice is not None
                    if notice.serving_ms >= 0:
                        head_at = time.monotonic() + notice.serving_ms / 1000.0 + p.PAST
                else:
                    poll_now = True
        finally:
            sub.close()


_NOTHING = object()


class _Subscription:
    """One waiter's own subscription to its conversation's channel (SUBSCRIBE,
    or SSUBSCRIBE on the owning shard of a cluster), confirmed before use."""

    def __init__(self, store: LockStore, cid: str, key: str) -> None:
        self._cid = cid
        try:
            if store._cluster:
                node = store._client.get_node_from_key(key)
                self._pubsub = node.redis_connection.pubsub()
                self._pubsub.ssubscribe(key)
                confirm = "ssubscribe"
            else:
                self._pubsub = store._client.pubsub()
                self._pubsub.subscribe(key)
                confirm = "subscribe"
            limit = time.monotonic() + store._socket_timeout
            while True:
                left = limit - time.monotonic()
                if left <= 0:
                    raise Backend(cid, True, f"{confirm} to the wake-up channel was not confirmed in time")
                message = self._pubsub.get_message(timeout=left)
                if message is not None and _text(message.get("type")) == confirm:
                    break
        except (rex.RedisError, rex.RedisClusterException, OSError) as e:
            self.close()
            raise classify(e, cid) from e

    def get(self, timeout: float) -> Any:
        """The next wake-up's payload within ``timeout`` seconds, else ``_NOTHING``."""
        try:
            message = self._pubsub.get_message(timeout=max(0.0, timeout))
        except (rex.RedisError, OSError) as e:
            raise classify(e, self._cid) from e
        if message is None or _text(message.get("type")) not in ("message", "smessage"):
            return _NOTHING
        return message.get("data")

    def close(self) -> None:
        pubsub = getattr(self, "_pubsub", None)
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001 - closing must not hide the caller's error
                pass


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _ticket_number(ticket: object) -> int:
    if isinstance(ticket, bool) or not isinstance(ticket, int) or not 0 <= ticket <= MAX_TICKET:
        raise InvalidInput("ticket", f"{ticket!r} is not a ticket number (0..2^53-1)")
    return ticket


class LockGuard:
    """Proof that this process holds a conversation's lock (synchronous).

    Behavior:
    - ``release()`` (or leaving the ``with`` block) removes the ticket and wakes
      the next waiter; it raises ``Expired`` if the lease had lapsed meanwhile.
    - The lease runs ``lifetime`` from the grant; ``extend`` renews it. When it
      ends the store serves the next waiter, whether or not this guard exists:
      pass :attr:`fencing_token` with writes to the protected resource.
    - A guard never released (a crashed process) holds the queue for at most its lease.
    """

    def __init__(
        self, store: LockStore, cid: str, key: str, ticket: int, epoch: int, grant: _Grant, waited: float
    ) -> None:
        self._store = store
        self._key = key
        self.conversation_id = cid
        #: The ticket number held.
        self.ticket = ticket
        #: The record's epoch (tickets of another record never match).
        self.epoch = epoch
        #: Strictly greater than every earlier grant's of this conversation.
        self.fencing_token = grant.fence
        #: Seconds spent waiting for the lock.
        self.waited = waited
        self._until = grant.until
        self._released = False
        self._lock = threading.Lock()

    def remaining(self) -> float:
        """Seconds of lease left by this process's clock (a conservative estimate)."""
        return max(0.0, self._until - time.monotonic())

    def is_held(self) -> bool:
        """Asks the store whether this guard still holds the lock."""
        if self._released:
            return False
        cid = self.conversation_id
        polled = p.decode_poll(self._store._run("poll", cid, self._key, [self.ticket, self.epoch]), cid)
        return polled.status == 1 and polled.fence == self.fencing_token

    def extend(self, lease: float) -> float:
        """Renews the lease to ``lease`` seconds from now; returns the seconds left.
        Raises ``Expired`` if it was lost already (a lost lease is never revived)."""
        ms = milliseconds(lease, "lease")
        cid = self.conversation_id
        sent = time.monotonic()
        left = p.decode_extend(self._store._run("extend", cid, self._key, [self.ticket, self.fencing_token, ms]), cid)
        if left is None:
            self._until = 0.0
            raise Expired(cid, self.ticket)
        self._until = sent + left / 1000.0
        return left / 1000.0

    def release(self) -> None:
        """Gives the lock to the next waiter. Raises ``Expired`` when the lease
        had lapsed (or the ticket was removed) before."""
        with self._lock:
            if self._released:
                return
            self._released = True
        cid = self.conversation_id
        removed = p.decode_release(
            self._store._run("release", cid, self._key, [self.ticket, "cleanup", self.epoch, "owner"]), cid
        )
        log.debug("ticket released: conversation %s ticket %d removed %s", cid, self.ticket, removed)
        if not removed:
            raise Expired(cid, self.ticket)

    def __enter__(self) -> LockGuard:
        return self

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        if exc_type is None:
            self.release()
            return
        try:
            self.release()
        except LockError as e:  # the block's own error matters more
            log.warning("releasing ticket %d of %s failed: %s", self.ticket, self.conversation_id, e)

    def __repr__(self) -> str:
        return (
            f"LockGuard(conversation_id={self.conversation_id!r}, ticket={self.ticket}, "
            f"fencing_token={self.fencing_token}, released={self._released})"
        )


class LockContext:
    """What ``LockStore.lock`` returns: ``with`` acquires, leaving releases."""

    def __init__(self, store: LockStore, cid: str, options: p.LockOptions, on_wait: Optional[OnWait]) -> None:
        self._store, self._cid, self._options, self._on_wait = store, cid, options, on_wait
        self._guard: Optional[LockGuard] = None

    def __enter__(self) -> LockGuard:
        self._guard = self._store.acquire(self._cid, self._options, on_wait=self._on_wait)
        return self._guard

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.__exit__(exc_type, exc, tb)


def _socket_timeout(client: Any) -> float:
    """The client's bound on a call, which also bounds waiting for a SUBSCRIBE's confirmation."""
    try:
        value = client.get_connection_kwargs().get("socket_timeout")
    except Exception:  # noqa: BLE001 - a client without it gets the default
        value = None
    return float(value) if isinstance(value, (int, float)) and value > 0 else 10.0


__all__ = ["LockContext", "LockGuard", "LockStore", "OnWait"]
