"""``ticketlock.rasa.TicketLockStore``: a drop-in Rasa 3.6 lock store.

.. code-block:: yaml

    lock_store:
      type: ticketlock.rasa.TicketLockStore
      url: redis.internal     # Rasa's key for the host (or a full redis:// URL)
      port: 6379
      db: 1
      key_prefix: mybot

Rasa constructs it as ``TicketLockStore(endpoint_config=<EndpointConfig>)``.
It keeps Rasa's method shapes (every method synchronous except ``lock``, an
async context manager, the only one Rasa calls at runtime), returns Rasa's own
``TicketLock``/``Ticket`` objects, raises Rasa's ``LockError`` and logs Rasa's
DEBUG lines verbatim on the ``rasa.core.lock_store`` logger. Underneath, every
change is one atomic script, waiters are served in FIFO order across
processes and woken by pub/sub, keys expire, and a waiter whose ticket is
gone gets ``LockError`` at once.

Lifetimes: ``lock(..., lock_lifetime)`` takes a lease counted from the grant
(Rasa counts from the issue, waiting included); the waiting ticket lives as
long as its waiter checks in (``dead_waiter_timeout``, default 5 s, an extra
key of this store). A holder whose lease ran out gets ``LockError`` when it
leaves the block. ``issue_ticket`` keeps Rasa's fixed lifetime from the issue.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Dict, Iterator, Optional

from rasa.core.lock import Ticket as RasaTicket
from rasa.core.lock import TicketLock as RasaTicketLock
from rasa.core.lock_store import LOCK_LIFETIME
from rasa.core.lock_store import LockError as RasaLockError
from rasa.core.lock_store import LockStore as RasaLockStore

from . import _protocol as p
from ._async import AsyncLockStore
from ._config import Target, parse_config
from ._errors import LockError
from ._sync import LockStore
from ._validate import MAX_LIFETIME, seconds

__all__ = ["HeldTicketLock", "StoredTicket", "StoredTicketLock", "TicketLockStore"]

# Rasa's own logger: its users grep for these lines.
logger = logging.getLogger("rasa.core.lock_store")


class StoredTicket(RasaTicket):  # type: ignore[misc]
    """Rasa's ``Ticket`` (``number``, ``expires`` as a Unix time) with the
    terms ``save_lock`` writes back: lease and liveness in ms, 0 for a fixed one."""

    def __init__(self, number: int, expires: float, lease_ms: int = 0, liveness_ms: int = 0) -> None:
        super().__init__(number, expires)
        self.lease_ms = lease_ms
        self.liveness_ms = liveness_ms


class StoredTicketLock(RasaTicketLock):  # type: ignore[misc]
    """Rasa's ``TicketLock`` as read from the store, with the number the next
    ticket gets (``next_number``) so ``save_lock`` never lowers it."""

    def __init__(self, conversation_id: str, tickets: deque[Any], next_number: int = 0) -> None:
        super().__init__(conversation_id, tickets)
        self.next_number = next_number


class HeldTicketLock(RasaTicketLock):  # type: ignore[misc]
    """What ``lock`` yields: Rasa's ``TicketLock`` showing the held ticket, and
    its ``ticket`` and ``fencing_token``."""

    def __init__(self, conversation_id: str, ticket: int, fencing_token: int, expires: float) -> None:
        super().__init__(conversation_id, deque([RasaTicket(ticket, expires)]))
        self.ticket = ticket
        self.fencing_token = fencing_token


@contextmanager
def _rasa_errors() -> Iterator[None]:
    try:
        yield
    except LockError as e:
        raise RasaLockError(str(e)) from e


class TicketLockStore(RasaLockStore):  # type: ignore[misc]
    """A Rasa lock store over ticketlock's Redis scripts (see the module doc)."""

    def __init__(self, endpoint_config: Optional[Any] = None, **config: Any) -> None:
        settings: Dict[str, Any] = {}
        if endpoint_config is not None:
            if getattr(endpoint_config, "url", None) is not None:
                settings["host"] = endpoint_config.url
            settings.update(getattr(endpoint_config, "kwargs", None) or {})
        settings.update(config)
        settings.pop("type", None)
        dead = settings.pop("dead_waiter_timeout", None)
        with _rasa_errors():
            self._dead_waiter_timeout = None if dead is None else seconds(dead, "dead_waiter_timeout")
            target = parse_config(settings)
        if target.key_prefix:
            logger.debug(f"Setting non-default redis key prefix: '{target.key_prefix}'.")
        self._target: Target = target
        self._default_lifetime = float(LOCK_LIFETIME)
        with _rasa_errors():
            self._store = LockStore._from_target(target, self._default_lifetime, target.script_mode)
        self._async: Optional[AsyncLockStore] = None
        self._async_loop: Optional[asyncio.AbstractEventLoop] = None
        #: Rasa's attribute: ``lock:`` or ``<key_prefix>:lock:``.
        self.key_prefix = self._store.key_prefix
        super().__init__()

    @property
    def store(self) -> LockStore:
        """The synchronous ticketlock store underneath."""
        return self._store

    def _async_store(self) -> AsyncLockStore:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async_loop is not loop:
            self._async = AsyncLockStore._from_target(self._target, self._default_lifetime, self._target.script_mode)
            self._async_loop = loop
        return self._async

    # -- Rasa's storage methods ------------------------------------------------------

    def get_lock(self, conversation_id: str) -> Optional[RasaTicketLock]:
        with _rasa_errors():
            snapshot = self._store.get_lock(conversation_id)
        if snapshot is None:
            return None
        now = time.time()
        tickets = deque(
            StoredTicket(t.number, now + t.remaining_ms / 1000.0, t.lease_ms, t.liveness_ms) for t in snapshot.tickets
        )
        return StoredTicketLock(conversation_id, tickets, snapshot.next_number)

    def delete_lock(self, conversation_id: str) -> None:
        with _rasa_errors():
            existed = self._store.delete_lock(conversation_id)
        self._log_deletion(conversation_id, existed)

    def save_lock(self, lock: RasaTicketLock) -> None:
        if not isinstance(lock, RasaTicketLock):
            raise RasaLockError(f"invalid lock: {type(lock).__name__} is not a rasa TicketLock")
        now = time.time()
        max_ms = int(MAX_LIFETIME * 1000)
        tickets = []
        for t in lock.tickets:
            left = (float(t.expires) - now) * 1000.0
            remaining = 0 if not math.isfinite(left) or left <= 0 else min(max_ms, math.ceil(left))
            tickets.append(
                p.Ticket(int(t.number), remaining, int(getattr(t, "lease_ms", 0)), int(getattr(t, "liveness_ms", 0)))
            )
        numbers = [t.number for t in tickets]
        next_number = max([int(getattr(lock, "next_number", 0)), *(n + 1 for n in numbers)], default=0)
        with _rasa_errors():
            self._store.save_lock(p.TicketLock(lock.conversation_id, tickets, next_number))

    def issue_ticket(self, conversation_id: str, lock_lifetime: float = LOCK_LIFETIME) -> int:
        logger.debug(f"Issuing ticket for conversation '{conversation_id}'.")
        try:
            return self._store.issue_ticket(conversation_id, lock_lifetime)
        except LockError as e:
            raise RasaLockError(f"Error while acquiring lock. Error:\n{e}") from e

    def update_lock(self, conversation_id: str) -> None:
        with _rasa_errors():
            self._store.update_lock(conversation_id)

    def get_or_create_lock(self, conversation_id: str) -> RasaTicketLock:
        existing = self.get_lock(conversation_id)
        if existing:
            return existing
        return self.create_lock(conversation_id)

    def is_someone_waiting(self, conversation_id: str) -> bool:
        with _rasa_errors():
            return self._store.is_someone_waiting(conversation_id)

    def finish_serving(self, conversation_id: str, ticket_number: int) -> None:
        with _rasa_errors():
            self._store.finish_serving(conversation_id, ticket_number)

    def cleanup(self, conversation_id: str, ticket_number: int) -> None:
        with _rasa_errors():
            self._store.cleanup(conversation_id, ticket_number)

    # -- the one method Rasa calls at runtime ------------------------------------------

    @asynccontextmanager
    async def lock(
        self,
        conversation_id: str,
        lock_lifetime: float = LOCK_LIFETIME,
        wait_time_in_seconds: float = 1,
    ) -> AsyncIterator[RasaTicketLock]:
        """Waits for the conversation's lock: FIFO across processes, woken by
        pub/sub (``wait_time_in_seconds`` is only the safety net's period), the
        lease ``lock_lifetime`` counted from the grant. Raises Rasa's
        ``LockError`` at once when the ticket is gone, and when leaving the
        block if the lease ran out meanwhile."""
        logger.debug(f"Issuing ticket for conversation '{conversation_id}'.")
        logger.debug(f"Acquiring lock for conversation '{conversation_id}'.")

        def on_wait(ticket: int, ahead: int) -> None:
            logger.debug(
                f"Failed to acquire lock for conversation ID '{conversation_id}' "
                f"because {ahead} other item(s) for this "
                f"conversation ID have to be finished processing first. "
                f"Retrying in {wait_time_in_seconds} seconds ..."
            )

        options = p.LockOptions(
            lifetime=lock_lifetime, wait_time=wait_time_in_seconds, dead_waiter_timeout=self._dead_waiter_timeout
        )
        with _rasa_errors():
            store = self._async_store()
            guard = await store.acquire(conversation_id, options, on_wait=on_wait)
        logger.debug(f"Acquired lock for conversation '{conversation_id}'.")
        held = HeldTicketLock(conversation_id, guard.ticket, guard.fencing_token, time.time() + guard.remaining())
        try:
            yield held
        except BaseException:
            try:
                await asyncio.shield(guard.release())
            except LockError as e:  # the block's own error matters more
                logging.getLogger("ticketlock").warning("releasing %s failed: %s", conversation_id, e)
            raise
        with _rasa_errors():
            await guard.release()

    def close(self) -> None:
        """Closes the synchronous store's connections."""
        self._store.close()
