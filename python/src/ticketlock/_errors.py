"""The one error family of the package, and the one place Redis errors are classified.

Every public call raises a subclass of :class:`LockError` and never a
``redis`` exception: the Redis error, when there is one, is the ``__cause__``.
Messages are lowercase, name the conversation (and the ticket where there is
one), and show ids escaped and bounded, so a hostile id cannot forge a log line.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Optional

import redis.exceptions as rex

__all__ = [
    "Backend",
    "Corrupted",
    "Expired",
    "InvalidInput",
    "LockError",
    "Timeout",
]

_SHOWN = 64


def shown(conversation_id: str) -> str:
    """A bounded, escaped form of an id for messages."""
    text = conversation_id[:_SHOWN].encode("unicode_escape", "backslashreplace").decode("ascii")
    if len(conversation_id) > _SHOWN:
        size = len(conversation_id.encode("utf-8", "surrogatepass"))
        text += f"... ({size} bytes)"
    return text


class LockError(Exception):
    """Base of every error this package raises."""

    #: True when repeating the same call later may succeed.
    retryable: bool = False


class Timeout(LockError):
    """The lock was not acquired within the timeout; the ticket was given back."""

    retryable = True

    def __init__(self, conversation_id: str, ticket: int, waited: float) -> None:
        super().__init__(
            f"timed out after {waited:.3f}s waiting for conversation {shown(conversation_id)} (ticket {ticket})"
        )
        self.conversation_id = conversation_id
        self.ticket = ticket
        #: Seconds waited.
        self.waited = waited


class Expired(LockError):
    """The ticket expired or was removed (by ``finish_serving``, ``delete_lock``,
    ``save_lock``): a waiting ticket will never be served; a held one lost its lease."""

    def __init__(self, conversation_id: str, ticket: int) -> None:
        super().__init__(f"ticket {ticket} of conversation {shown(conversation_id)} expired or was removed")
        self.conversation_id = conversation_id
        self.ticket = ticket


class InvalidInput(LockError, ValueError):
    """An argument or configuration value was refused before anything was sent."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"invalid {what}: {reason}")
        self.what = what
        self.reason = reason


class Corrupted(LockError):
    """The conversation's key holds data ticketlock did not write (WRONGTYPE);
    nothing was changed."""

    def __init__(self, conversation_id: str, detail: str) -> None:
        super().__init__(f"conversation {shown(conversation_id)} holds foreign data: {detail}")
        self.conversation_id = conversation_id
        self.detail = detail


class Backend(LockError):
    """Redis failed: connection, timeout, server error, or a reply that breaks
    the scripts' contract. ``retryable`` says whether trying again may help."""

    def __init__(self, conversation_id: Optional[str], retryable: bool, detail: str) -> None:
        where = f" for conversation {shown(conversation_id)}" if conversation_id is not None else ""
        super().__init__(f"backend failed{where}: {detail}")
        self.conversation_id = conversation_id
        self.retryable = retryable
        self.detail = detail


# Server error codes after which the same call may succeed: a script still
# running, a server loading or failing over, a cluster resharding.
_RETRYABLE_CODES = frozenset({"BUSY", "LOADING", "TRYAGAIN", "READONLY", "MASTERDOWN", "NOREPLICAS", "CLUSTERDOWN"})


def _tls_failure(error: BaseException) -> bool:
    """A certificate or handshake failure arrives as a connection error, but
    retrying cannot fix it."""
    seen = 0
    current: Optional[BaseException] = error
    while current is not None and seen < 10:
        if isinstance(current, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(current):
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def classify(error: BaseException, conversation_id: Optional[str]) -> LockError:
    """The package's error for ``error`` (a redis-py or socket error)."""
    if isinstance(error, LockError):
        return error
    text = str(error).strip() or type(error).__name__
    if isinstance(error, rex.ResponseError):
        code = text.split(" ", 1)[0]
        if code == "WRONGTYPE":
            return Corrupted(conversation_id or "", text)
        retryable = code in _RETRYABLE_CODES or isinstance(
            error, (rex.ReadOnlyError, rex.TryAgainError, rex.ClusterDownError)
        )
        return Backend(conversation_id, retryable, text)
    if isinstance(error, (rex.AuthenticationError, rex.AuthorizationError)):
        return Backend(conversation_id, False, text)
    if isinstance(error, rex.BusyLoadingError):
        return Backend(conversation_id, True, text)
    if isinstance(error, (rex.ConnectionError, rex.TimeoutError, socket.timeout, asyncio.TimeoutError, OSError)):
        return Backend(conversation_id, not _tls_failure(error), f"{type(error).__name__}: {text}")
    if isinstance(error, rex.ClusterError):
        return Backend(conversation_id, True, text)
    return Backend(conversation_id, False, f"{type(error).__name__}: {text}")
