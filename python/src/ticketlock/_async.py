"""The asyncio store (``redis.asyncio``): the same API as :class:`LockStore`,
plus auto-renew and ``lost`` on the guard. One pub/sub connection per store
(per shard on a cluster) carries every waiter's wake-ups.

Over 700 lines on purpose: the store, its guard, the shared pub/sub reader and
the acquire loop belong together, as src/store.rs and src/guard.rs do."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from types import TracebackType
from typing import Any, Dict, List, Mapping, Optional, Set, Type

import redis.asyncio as aredis
import redis.exceptions as rex

from . import _protocol as p
from ._config import Target, parse_config, parse_url
from ._errors import Backend, Expired, InvalidInput, LockError, Timeout, classify
from ._runner import AsyncRunner
from ._scripts import script_set
from ._sync import OnWait, _cluster_pubsub_check, _ticket_number
from ._validate import conversation_id, conversation_key, lifetime_from_env, milliseconds, seconds
from ._validate import key_prefix as check_key_prefix

log = logging.getLogger("ticketlock")

# What the reader hands every listener when messages may have been lost (a
# reconnect): ask the store now.
RECHECK = None

# Keyword arguments of a node's own client (cluster pub/sub), taken from the cluster's.
_NODE_KWARGS = (
    "username",
    "password",
    "socket_timeout",
    "socket_connect_timeout",
    "ssl",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)


class _Channel:
    def __init__(self) -> None:
        self.queues: Set[asyncio.Queue[Any]] = set()
        self.lock = asyncio.Lock()
        self.confirmed = asyncio.Event()
        self.subscribed = False
        self.conn: Optional[_Conn] = None


class _Conn:
    """One pub/sub connection and the task that reads it."""

    def __init__(self, pubsub: Any) -> None:
        self.pubsub = pubsub
        self.reader: Optional[asyncio.Task[None]] = None


class _Wakeups:
    """Per-conversation listeners over shared pub/sub connections. A channel is
    subscribed exactly while someone listens; a SUBSCRIBE counts only once
    the server confirmed it, so a poll sent after ``join`` returns can never
    miss a wake-up published after it."""

    def __init__(self, store: AsyncLockStore) -> None:
        self._store = store
        self._channels: Dict[str, _Channel] = {}
        self._conns: Dict[str, _Conn] = {}

    async def _conn_for(self, key: str) -> _Conn:
        store = self._store
        if not store._cluster:
            name = ""
            if name not in self._conns:
                self._conns[name] = _Conn(store._client.pubsub())
            return self._conns[name]
        client = store._client
        await client.initialize()
        node = client.get_node_from_key(key)
        name = node.name
        if name not in self._conns:
            own = aredis.Redis(host=node.host, port=node.port, **store._node_kwargs())
            self._conns[name] = _Conn(own.pubsub())
        return self._conns[name]

    async def join(self, key: str, cid: str) -> asyncio.Queue[Any]:
        channel = self._channels.setdefault(key, _Channel())
        queue: asyncio.Queue[Any] = asyncio.Queue()
        channel.queues.add(queue)
        try:
            async with channel.lock:
                if not channel.subscribed:
                    conn = await self._conn_for(key)
                    channel.confirmed.clear()
                    if self._store._cluster:
                        await conn.pubsub.ssubscribe(key)
                    else:
                        await conn.pubsub.subscribe(key)
                    channel.conn = conn
                    if conn.reader is None or conn.reader.done():
                        conn.reader = asyncio.ensure_future(self._read(conn))
                    try:
                        await asyncio.wait_for(channel.confirmed.wait(), self._store._socket_timeout)
                    except asyncio.TimeoutError:
                        raise Backend(
                            cid, True, "the wake-up channel's subscription was not confirmed in time"
                        ) from None
                    channel.subscribed = True
        except BaseException as e:
            self.leave(key, queue)
            if isinstance(e, (rex.RedisError, OSError)):
                raise classify(e, cid) from e
            raise
        return queue

    def leave(self, key: str, queue: asyncio.Queue[Any]) -> None:
        channel = self._channels.get(key)
        if channel is None:
            return
        channel.queues.discard(queue)
        if not channel.queues:
            self._store._spawn(self._unsubscribe_if_idle(key, channel))

    async def _unsubscribe_if_idle(self, key: str, channel: _Channel) -> None:
        async with channel.lock:
            if channel.queues:
                return
            if channel.subscribed and channel.conn is not None:
                channel.subscribed = False
                try:
                    if self._store._cluster:
                        await channel.conn.pubsub.sunsubscribe(key)
                    else:
                        await channel.conn.pubsub.unsubscribe(key)
                except Exception:  # noqa: BLE001 - a stray subscription costs a few bytes
                    pass
            if self._channels.get(key) is channel and not channel.queues:
                del self._channels[key]

    async def _read(self, conn: _Conn) -> None:
        while True:
            try:
                message = await conn.pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - reconnects and resubscribes on the next read
                for channel in list(self._channels.values()):
                    if channel.conn is conn:
                        for queue in channel.queues:
                            queue.put_nowait(RECHECK)
                await asyncio.sleep(0.1)
                continue
            if message is None:
                continue
            kind = _text(message.get("type"))
            name = _text(message.get("channel"))
            target = self._channels.get(name) if isinstance(name, str) else None
            if target is None:
                continue
            if kind in ("subscribe", "ssubscribe"):
                target.confirmed.set()
            elif kind in ("message", "smessage"):
                for queue in target.queues:
                    queue.put_nowait(message.get("data"))

    async def close(self) -> None:
        for conn in self._conns.values():
            if conn.reader is not None:
                conn.reader.cancel()
            try:
                closer = getattr(conn.pubsub, "aclose", None) or conn.pubsub.reset
                await closer()
            except Exception:  # noqa: BLE001
                pass
        self._conns.clear()
        self._channels.clear()


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class AsyncLockStore:
    """A handle on the ticket locks in one Redis under one key prefix (asyncio).

    The same methods as :class:`ticketlock.LockStore`, each a coroutine;
    ``lock``/``lock_with`` are async context managers. Use one store per event
    loop (redis-py's asyncio connections belong to the loop that made them).
    """

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: Optional[str] = None,
        default_lifetime: Optional[float] = None,
        script_mode: str = "auto",
        node_kwargs: Optional[Mapping[str, Any]] = None,
    ) -> None:
        from redis.asyncio.cluster import RedisCluster

        self._cluster = isinstance(client, RedisCluster)
        if self._cluster:
            _cluster_pubsub_check(asynchronous=True)
        elif not isinstance(client, aredis.Redis):
            raise InvalidInput(
                "client", f"{type(client).__name__} is not a redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster"
            )
        self._client = client
        self._prefix = check_key_prefix(key_prefix)
        self._default_lifetime = (
            lifetime_from_env() if default_lifetime is None else seconds(default_lifetime, "default lifetime")
        )
        if script_mode not in ("auto", "eval", "functions"):
            raise InvalidInput("script_mode", f"{script_mode!r} is not auto, eval or functions")
        self._runner = AsyncRunner(client, script_set(sharded=self._cluster), script_mode, self._cluster)
        self._explicit_node_kwargs = dict(node_kwargs) if node_kwargs is not None else None
        self._socket_timeout = _socket_timeout(client)
        self._wakeups = _Wakeups(self)
        self._tasks: Set[asyncio.Future[Any]] = set()
        self._owns_client = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: Optional[str] = None,
        socket_timeout: Optional[float] = None,
        default_lifetime: Optional[float] = None,
        script_mode: str = "auto",
    ) -> AsyncLockStore:
        """As :meth:`ticketlock.LockStore.from_url`; connects at the first call."""
        target = parse_url(url, socket_timeout=socket_timeout, key_prefix=key_prefix)
        return cls._from_target(target, default_lifetime, script_mode)

    @classmethod
    def create(cls, config: Mapping[str, Any], *, default_lifetime: Optional[float] = None) -> AsyncLockStore:
        """From Rasa's ``lock_store:`` keys (see :func:`ticketlock.parse_config`)."""
        target = parse_config(config)
        return cls._from_target(target, default_lifetime, target.script_mode)

    @classmethod
    def _from_target(cls, target: Target, default_lifetime: Optional[float], script_mode: str) -> AsyncLockStore:
        kwargs = target.connection_kwargs()
        if target.cluster:
            _cluster_pubsub_check(asynchronous=True)
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            client: Any = RedisCluster(startup_nodes=[ClusterNode(h, p_) for h, p_ in target.nodes], **kwargs)
        else:
            host, port = target.nodes[0]
            client = aredis.Redis(host=host, port=port, **kwargs)
        store = cls(
            client,
            key_prefix=target.key_prefix,
            default_lifetime=default_lifetime,
            script_mode=script_mode,
            node_kwargs=kwargs,
        )
        store._owns_client = True
        return store

    async def close(self) -> None:
        """Stops listening and closes the connections of a client this store made."""
        await self._wakeups.close()
        for task in list(self._tasks):
            task.cancel()
        if self._owns_client:
            closer = getattr(self._client, "aclose", None) or self._client.close
            await closer()

    async def __aenter__(self) -> AsyncLockStore:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncLockStore(prefix={self._prefix!r}, cluster={self._cluster})"

    @property
    def key_prefix(self) -> str:
        return self._prefix

    @property
    def default_lifetime(self) -> float:
        return self._default_lifetime

    @property
    def client(self) -> Any:
        return self._client

    def key(self, conversation_id_: str) -> str:
        return conversation_key(self._prefix, conversation_id(conversation_id_))

    def _node_kwargs(self) -> Dict[str, Any]:
        if self._explicit_node_kwargs is not None:
            return dict(self._explicit_node_kwargs)
        kwargs = self._client.get_connection_kwargs()
        own = {k: v for k, v in kwargs.items() if k in _NODE_KWARGS}
        connection_class = kwargs.get("connection_class")
        if connection_class is not None and "SSL" in getattr(connection_class, "__name__", ""):
            own["ssl"] = True
        return own

    def _spawn(self, coro: Any) -> None:
        """Runs ``coro`` in the background, keeping a reference until it ends."""
        try:
            task = asyncio.ensure_future(coro)
        except RuntimeError:  # no running loop: nothing can run
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, op: str, cid: str, key: str, args: List[Any]) -> Any:
        try:
            return await self._runner.run(op, key, args)
        except (rex.RedisError, rex.RedisClusterException, OSError, asyncio.TimeoutError) as e:
            raise classify(e, cid) from e

    # -- Rasa's methods -----------------------------------------------------------------

    @staticmethod
    def create_lock(conversation_id_: str) -> p.TicketLock:
        return p.TicketLock(conversation_id(conversation_id_))

    async def issue_ticket(self, conversation_id_: str, lifetime: float) -> int:
        cid = conversation_id(conversation_id_)
        ms = milliseconds(lifetime, "lifetime")
        issued = p.decode_issue(await self._run("issue", cid, self.key(cid), [ms, "", ""]), cid)
        if issued is None:
            raise Backend(cid, False, "issue.lua replied that it was cancelled, but no request id was sent")
        return issued.ticket

    async def get_lock(self, conversation_id_: str) -> Optional[p.TicketLock]:
        cid = conversation_id(conversation_id_)
        return p.decode_read(await self._run("read", cid, self.key(cid), [-1]), cid)

    async def get_or_create_lock(self, conversation_id_: str) -> p.TicketLock:
        return await self.get_lock(conversation_id_) or self.create_lock(conversation_id_)

    async def save_lock(self, lock: p.TicketLock) -> None:
        args = p.save_args(lock)
        cid = lock.conversation_id
        p.decode_single("save", await self._run("save", cid, self.key(cid), args), cid)

    async def delete_lock(self, conversation_id_: str) -> bool:
        cid = conversation_id(conversation_id_)
        return p.decode_single("delete", await self._run("delete", cid, self.key(cid), []), cid) == 1

    async def update_lock(self, conversation_id_: str) -> int:
        cid = conversation_id(conversation_id_)
        return p.decode_pair("update", await self._run("update", cid, self.key(cid), []), cid)[0]

    async def is_someone_waiting(self, conversation_id_: str) -> bool:
        cid = conversation_id(conversation_id_)
        return p.read_live(await self._run("read", cid, self.key(cid), [0]), cid)

    async def finish_serving(self, conversation_id_: str, ticket: int) -> bool:
        return await self._release(conversation_id_, ticket, "finish")

    async def cleanup(self, conversation_id_: str, ticket: int) -> bool:
        return await self._release(conversation_id_, ticket, "cleanup")

    async def _release(self, conversation_id_: str, ticket: int, mode: str) -> bool:
        cid = conversation_id(conversation_id_)
        number = _ticket_number(ticket)
        return p.decode_release(await self._run("release", cid, self.key(cid), [number, mode, "", ""]), cid)

    async def cancel(self, conversation_id_: str, request_id: str) -> Optional[int]:
        cid = conversation_id(conversation_id_)
        found, ticket = p.decode_pair(
            "cancel", await self._run("cancel", cid, self.key(cid), [request_id, p.CANCEL_REMEMBER_MS]), cid
        )
        return ticket if found == 1 else None

    async def inspect(self, conversation_id_: str, limit: int = -1) -> p.Inspected:
        cid = conversation_id(conversation_id_)
        return p.decode_inspect(await self._run("inspect", cid, self.key(cid), [int(limit)]), cid)

    # -- lock -------------------------------------------------------------------------------

    def lock(
        self,
        conversation_id_: str,
        *,
        lifetime: Optional[float] = None,
        wait_time: Optional[float] = None,
        timeout: Optional[float] = None,
        dead_waiter_timeout: Optional[float] = None,
        auto_renew: bool = False,
        on_wait: Optional[OnWait] = None,
    ) -> AsyncLockContext:
        """``async with store.lock(cid) as guard:`` — see :meth:`acquire`."""
        options = p.LockOptions(lifetime, wait_time, timeout, dead_waiter_timeout, auto_renew)
        return self.lock_with(conversation_id_, options, on_wait=on_wait)

    def lock_with(
        self, conversation_id_: str, options: Optional[p.LockOptions] = None, *, on_wait: Optional[OnWait] = None
    ) -> AsyncLockContext:
        return AsyncLockContext(self, conversation_id_, options or p.LockOptions(), on_wait)

    async def acquire(
        self, conversation_id_: str, options: Optional[p.LockOptions] = None, *, on_wait: Optional[OnWait] = None
    ) -> AsyncLockGuard:
        """Takes a renewing ticket and waits until it is served (see
        :meth:`ticketlock.LockStore.acquire`).

        Cancel safety: cancelling this coroutine gives the ticket back in the
        background, also while the ticket is being issued (by request id), so
        the waiters behind it are not held up."""
        cid = conversation_id(conversation_id_)
        o = (options if options is not None else p.LockOptions()).resolve(self._default_lifetime)
        key = self.key(cid)
        started = time.monotonic()
        deadline = None if o.timeout is None else started + o.timeout
        request = uuid.uuid4().hex
        sent = time.monotonic()
        try:
            issued = p.decode_issue(await self._run("issue", cid, key, [o.lifetime_ms, o.liveness_ms, request]), cid)
        except BaseException as e:
            if not isinstance(e, LockError) or e.retryable:
                if isinstance(e, LockError):
                    await self._cancel_issue(cid, key, request)
                else:  # cancelled: finish in the background
                    self._spawn(self._cancel_issue(cid, key, request))
            raise
        if issued is None:
            raise Backend(cid, False, "issue.lua replied that a fresh request id was cancelled")
        log.debug("ticket issued: conversation %s ticket %d", cid, issued.ticket)
        if issued.now_serving == issued.ticket:
            guard = AsyncLockGuard(
                self,
                cid,
                key,
                issued,
                issued.fence,
                sent + issued.head_remaining_ms / 1000.0,
                time.monotonic() - started,
                o,
                picked_up=True,
                queue=None,
            )
        else:
            guard = await self._wait(cid, key, issued, o, deadline, sent, started, on_wait)
        log.debug("lock acquired: conversation %s ticket %d fence %d", cid, issued.ticket, guard.fencing_token)
        return guard

    async def _cancel_issue(self, cid: str, key: str, request: str) -> None:
        for attempt in range(p.CANCEL_ATTEMPTS):
            try:
                await self._run("cancel", cid, key, [request, p.CANCEL_REMEMBER_MS])
                return
            except LockError as e:
                if not e.retryable:
                    return
                await asyncio.sleep(0.05 * (attempt + 1))

    async def _give_back(self, cid: str, key: str, ticket: int, epoch: int) -> None:
        try:
            await self._run("release", cid, key, [ticket, "cleanup", epoch, "owner"])
        except LockError:
            pass  # it expires within the dead-waiter timeout

    async def _wait(
        self,
        cid: str,
        key: str,
        issued: p.Issued,
        o: p.Resolved,
        deadline: Optional[float],
        issue_sent: float,
        started: float,
        on_wait: Optional[OnWait],
    ) -> AsyncLockGuard:
        ticket, epoch = issued.ticket, issued.epoch
        queue: Optional[asyncio.Queue[Any]] = None
        handed = False
        try:
            queue = await self._wakeups.join(key, cid)
            check_in_sent = issue_sent
            poll_now = True
            next_poll = head_at = math.inf
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise Timeout(cid, ticket, now - started)
                if poll_now:
                    sent = time.monotonic()
                    polled = p.decode_poll(await self._run("poll", cid, key, [ticket, epoch]), cid)
                    if polled.status == 1:
                        handed = True
                        return AsyncLockGuard(
                            self,
                            cid,
                            key,
                            issued,
                            polled.fence,
                            sent + polled.own_remaining_ms / 1000.0,
                            time.monotonic() - started,
                            o,
                            picked_up=True,
                            queue=queue,
                        )
                    if polled.status == -1:
                        log.debug("ticket expired while waiting: conversation %s ticket %d", cid, ticket)
                        raise Expired(cid, ticket)
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
                    payload = await asyncio.wait_for(queue.get(), until - now)
                except asyncio.TimeoutError:
                    continue
                notice = p.parse_notice(payload)
                verdict = p.judge(notice, ticket, epoch)
                if verdict == p.SERVED:
                    assert notice is not None
                    # Served: start at once; the guard picks the grant up in
                    # the background before the waiting ticket would lapse.
                    handed = True
                    return AsyncLockGuard(
                        self,
                        cid,
                        key,
                        issued,
                        notice.fence,
                        check_in_sent + o.before_pick_up,
                        time.monotonic() - started,
                        o,
                        picked_up=False,
                        queue=queue,
                    )
                if verdict == p.WAIT:
                    assert notice is not None
                    if notice.serving_ms >= 0:
                        head_at = time.monotonic() + notice.serving_ms / 1000.0 + p.PAST
                else:
                    poll_now = True
        except Expired:
            raise
        except asyncio.CancelledError:
            self._spawn(self._give_back(cid, key, ticket, epoch))
            raise
        except BaseException:
            await self._give_back(cid, key, ticket, epoch)
            raise
        finally:
            if queue is not None and not handed:
                self._wakeups.leave(key, queue)


def _socket_timeout(client: Any) -> float:
    try:
        value = client.get_connection_kwargs().get("socket_timeout")
    except Exception:  # noqa: BLE001
        value = None
    return float(value) if isinstance(value, (int, float)) and value > 0 else 10.0


class AsyncLockGuard:
    """Proof that this task holds a conversation's lock (asyncio).

    Behavior:
    - ``await release()`` (or leaving ``async with``) removes the ticket and
      wakes the next waiter; it raises ``Expired`` if the lease had lapsed.
    - A grant learnt from a wake-up is picked up in the background (retried
      until the waiting ticket would lapse); with ``auto_renew`` the lease is
      renewed every third of the lifetime while the guard lives.
    - ``await lost()`` returns when the lease is gone: its deadline passed by
      this process's clock (counted conservatively from when the request that
      set it was sent), a renewal or the pick-up found it gone, or a wake-up
      says another ticket (or none) is served in this record.
    - A guard never released holds the queue for at most its lease.
    """

    def __init__(
        self,
        store: AsyncLockStore,
        cid: str,
        key: str,
        issued: p.Issued,
        fence: int,
        until: float,
        waited: float,
        options: p.Resolved,
        *,
        picked_up: bool,
        queue: Optional[asyncio.Queue[Any]],
    ) -> None:
        self._store = store
        self._key = key
        self.conversation_id = cid
        self.ticket = issued.ticket
        self.epoch = issued.epoch
        self.fencing_token = fence
        self.waited = waited
        self._until = until
        self._lifetime_ms = options.lifetime_ms
        self._released = False
        self._lost = asyncio.Event()
        self._queue = queue
        self._tasks: List[asyncio.Task[None]] = []
        if not picked_up or options.auto_renew:
            self._tasks.append(asyncio.ensure_future(self._keep(not picked_up, options.auto_renew)))
        self._monitor: Optional[asyncio.Task[None]] = None
        if queue is not None:
            self._start_monitor()

    # -- state -------------------------------------------------------------------------

    def remaining(self) -> float:
        """Seconds of lease left by this process's clock (a conservative estimate)."""
        return 0.0 if self._lost.is_set() else max(0.0, self._until - time.monotonic())

    @property
    def is_lost(self) -> bool:
        """True once the lease is known to be gone (see :meth:`lost`)."""
        if not self._lost.is_set() and time.monotonic() >= self._until:
            self._mark_lost()
        return self._lost.is_set()

    def _mark_lost(self) -> None:
        if not self._lost.is_set():
            log.debug("lease lost: conversation %s ticket %d", self.conversation_id, self.ticket)
            self._lost.set()

    async def lost(self) -> None:
        """Returns when the lease is lost; meant for ``asyncio.wait`` around the work."""
        self._start_monitor()
        await self._lost.wait()

    def _start_monitor(self) -> None:
        if self._monitor is None and not self._released:
            self._monitor = asyncio.ensure_future(self._watch())
            self._tasks.append(self._monitor)

    async def _watch(self) -> None:
        if self._queue is None:
            try:
                self._queue = await self._store._wakeups.join(self._key, self.conversation_id)
            except LockError:
                pass  # the deadline still tells
        while not self._lost.is_set():
            left = self._until - time.monotonic()
            if left <= 0:
                self._mark_lost()
                return
            if self._queue is None:
                await asyncio.sleep(left)
                continue
            try:
                payload = await asyncio.wait_for(self._queue.get(), left)
            except asyncio.TimeoutError:
                continue
            if p.lost_by(p.parse_notice(payload), self.ticket, self.epoch):
                self._mark_lost()

    async def _keep(self, pick_up: bool, renew: bool) -> None:
        cid = self.conversation_id
        if pick_up:
            limit = self._until
            while True:
                sent = time.monotonic()
                try:
                    polled = p.decode_poll(
                        await self._store._run("poll", cid, self._key, [self.ticket, self.epoch]), cid
                    )
                except LockError as e:
                    if e.retryable and time.monotonic() < limit:
                        await asyncio.sleep(0.01)
                        continue
                    break  # the local deadline still stands
                if polled.status == 1 and polled.fence == self.fencing_token:
                    self._until = sent + polled.own_remaining_ms / 1000.0
                else:
                    self._mark_lost()
                    return
                break
        if not renew:
            return
        lifetime = self._lifetime_ms / 1000.0
        while not self._lost.is_set():
            await asyncio.sleep(lifetime / 3)
            try:
                await self.extend(lifetime)
            except Expired:
                return
            except LockError:
                continue  # retried next round; the local deadline says when it is too late

    # -- operations --------------------------------------------------------------------

    async def is_held(self) -> bool:
        """Asks the store whether this guard still holds the lock."""
        if self._released or self._lost.is_set():
            return False
        cid = self.conversation_id
        polled = p.decode_poll(await self._store._run("poll", cid, self._key, [self.ticket, self.epoch]), cid)
        held = polled.status == 1 and polled.fence == self.fencing_token
        if not held:
            self._mark_lost()
        return held

    async def extend(self, lease: float) -> float:
        """Renews the lease to ``lease`` seconds from now; returns the seconds left.
        Raises ``Expired`` if it was lost already (it is never revived)."""
        ms = milliseconds(lease, "lease")
        cid = self.conversation_id
        sent = time.monotonic()
        left = p.decode_extend(
            await self._store._run("extend", cid, self._key, [self.ticket, self.fencing_token, ms]), cid
        )
        if left is None:
            self._mark_lost()
            raise Expired(cid, self.ticket)
        self._until = sent + left / 1000.0
        log.debug("lease renewed: conversation %s ticket %d left %d ms", cid, self.ticket, left)
        return left / 1000.0

    def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self._queue is not None:
            self._store._wakeups.leave(self._key, self._queue)
            self._queue = None

    async def release(self) -> None:
        """Gives the lock to the next waiter. Raises ``Expired`` when the lease
        had lapsed (or the ticket was removed) before."""
        if self._released:
            return
        self._released = True
        self._stop()
        cid = self.conversation_id
        removed = p.decode_release(
            await self._store._run("release", cid, self._key, [self.ticket, "cleanup", self.epoch, "owner"]), cid
        )
        log.debug("ticket released: conversation %s ticket %d removed %s", cid, self.ticket, removed)
        if not removed:
            self._mark_lost()
            raise Expired(cid, self.ticket)

    async def __aenter__(self) -> AsyncLockGuard:
        return self

    async def __aexit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        await _exit(self, exc_type)

    def __repr__(self) -> str:
        return (
            f"AsyncLockGuard(conversation_id={self.conversation_id!r}, ticket={self.ticket}, "
            f"fencing_token={self.fencing_token}, released={self._released})"
        )


async def _exit(guard: AsyncLockGuard, exc_type: Optional[Type[BaseException]]) -> None:
    if exc_type is None:
        await guard.release()
        return
    if issubclass(exc_type, asyncio.CancelledError):
        # Cancelled inside the block: release without awaiting in the cancelled task.
        guard._store._spawn(_quiet_release(guard))
        return
    try:
        await guard.release()
    except LockError as e:  # the block's own error matters more
        log.warning("releasing ticket %d of %s failed: %s", guard.ticket, guard.conversation_id, e)


async def _quiet_release(guard: AsyncLockGuard) -> None:
    try:
        await guard.release()
    except LockError:
        pass


class AsyncLockContext:
    """What ``AsyncLockStore.lock`` returns: ``async with`` acquires, leaving releases."""

    def __init__(self, store: AsyncLockStore, cid: str, options: p.LockOptions, on_wait: Optional[OnWait]) -> None:
        self._store, self._cid, self._options, self._on_wait = store, cid, options, on_wait
        self._guard: Optional[AsyncLockGuard] = None

    async def __aenter__(self) -> AsyncLockGuard:
        self._guard = await self._store.acquire(self._cid, self._options, on_wait=self._on_wait)
        return self._guard

    async def __aexit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            await _exit(guard, exc_type)


__all__ = ["AsyncLockContext", "AsyncLockGuard", "AsyncLockStore"]
