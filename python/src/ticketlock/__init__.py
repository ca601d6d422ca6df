"""ticketlock: strictly FIFO, expiring per-conversation ticket locks over Redis.

Every state change is one of the Lua scripts in the repository's ``lua/``
(shipped inside this package), the same ones the Rust crate runs, so Python
and Rust processes share one queue per conversation. Rasa's names and
semantics, without its bugs; ``ticketlock.rasa`` is a drop-in Rasa lock store.

    from ticketlock import LockStore

    store = LockStore.from_url("redis://127.0.0.1:6379/1")
    with store.lock("conv-42", lifetime=30) as guard:
        ...  # guard.ticket, guard.fencing_token

    # asyncio
    from ticketlock import AsyncLockStore

    store = AsyncLockStore.from_url("redis://127.0.0.1:6379/1")
    async with store.lock("conv-42", auto_renew=True) as guard:
        ...  # await guard.lost() resolves if the lease goes
"""

from ._async import AsyncLockContext, AsyncLockGuard, AsyncLockStore
from ._config import (
    DEFAULT_DB,
    DEFAULT_PORT,
    DEFAULT_SOCKET_TIMEOUT,
    Target,
    parse_config,
    parse_url,
    redact_url,
)
from ._errors import Backend, Corrupted, Expired, InvalidInput, LockError, Timeout
from ._protocol import Inspected, InspectedTicket, LockOptions, Notice, Ticket, TicketLock, parse_notice
from ._scripts import LIBRARY_NAME, OPERATIONS, SHARDED_LIBRARY_NAME, lua_dir, script_set
from ._sync import LockContext, LockGuard, LockStore
from ._validate import (
    DEFAULT_DEAD_WAITER_TIMEOUT,
    DEFAULT_KEY_PREFIX,
    DEFAULT_LIFETIME,
    DEFAULT_WAIT_TIME,
    LIFETIME_ENV,
    MAX_CONVERSATION_ID_LEN,
    MAX_LIFETIME,
    conversation_keys,
)

__version__ = "0.2.0"

__all__ = [
    "DEFAULT_DB",
    "DEFAULT_DEAD_WAITER_TIMEOUT",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_LIFETIME",
    "DEFAULT_PORT",
    "DEFAULT_SOCKET_TIMEOUT",
    "DEFAULT_WAIT_TIME",
    "LIBRARY_NAME",
    "LIFETIME_ENV",
    "MAX_CONVERSATION_ID_LEN",
    "MAX_LIFETIME",
    "OPERATIONS",
    "SHARDED_LIBRARY_NAME",
    "AsyncLockContext",
    "AsyncLockGuard",
    "AsyncLockStore",
    "Backend",
    "Corrupted",
    "Expired",
    "Inspected",
    "InspectedTicket",
    "InvalidInput",
    "LockContext",
    "LockError",
    "LockGuard",
    "LockOptions",
    "LockStore",
    "Notice",
    "Target",
    "Ticket",
    "TicketLock",
    "Timeout",
    "conversation_keys",
    "lua_dir",
    "parse_config",
    "parse_notice",
    "parse_url",
    "redact_url",
    "script_set",
]
