"""Input rules, checked before anything is sent, and the key layout of lua/common.lua."""

from __future__ import annotations

import math
import os
from typing import Optional

from ._errors import InvalidInput, shown

#: Longest conversation id accepted, in UTF-8 bytes (the crate's bound).
MAX_CONVERSATION_ID_LEN = 1024
#: Longest lifetime accepted, in seconds (365 days); the scripts hold the same bound.
MAX_LIFETIME = 365 * 24 * 3600.0
#: Prefix of every key when none is configured (Rasa's ``lock:``).
DEFAULT_KEY_PREFIX = "lock:"
#: A lease when nothing else is configured, in seconds (Rasa's default).
DEFAULT_LIFETIME = 60.0
#: Longest pause between two checks of the queue when no wake-up arrives.
DEFAULT_WAIT_TIME = 1.0
#: A waiting ticket lapses this long after its waiter's last check-in.
DEFAULT_DEAD_WAITER_TIMEOUT = 5.0
#: Environment variable overriding :data:`DEFAULT_LIFETIME`, in seconds.
LIFETIME_ENV = "TICKET_LOCK_LIFETIME"
# Lua numbers are doubles: integers are exact up to 2^53.
MAX_TICKET = 9007199254740991

_ENCODE = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})


def conversation_id(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInput("conversation id", f"{value!r} is not a str")
    if not value:
        raise InvalidInput("conversation id", "it is empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput("conversation id", f"{shown(value)} is not encodable as UTF-8") from None
    if size > MAX_CONVERSATION_ID_LEN:
        raise InvalidInput(
            "conversation id",
            f"{shown(value)} is {size} bytes, more than the {MAX_CONVERSATION_ID_LEN} allowed",
        )
    return value


def seconds(value: object, what: str) -> float:
    """A positive, finite number of seconds, at most :data:`MAX_LIFETIME`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(what, f"{value!r} is not a number of seconds")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidInput(what, f"{value} seconds is not a finite number")
    if number <= 0:
        raise InvalidInput(what, f"{value} seconds is not greater than zero")
    if number > MAX_LIFETIME:
        raise InvalidInput(what, f"{value} seconds is longer than the maximum of {int(MAX_LIFETIME)} seconds")
    return number


def milliseconds(value: object, what: str) -> int:
    """Seconds as whole ms, rounded up (so a tiny positive value never becomes zero)."""
    micros = round(seconds(value, what) * 1_000_000)
    return max(1, -(-micros // 1000))


def seconds_text(text: str, what: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise InvalidInput(what, f"{text!r} is not a number of seconds") from None
    return seconds(value, what)


def lifetime_from_env() -> float:
    """``TICKET_LOCK_LIFETIME`` when set, else :data:`DEFAULT_LIFETIME`; a bad
    value is an error, never a silent default."""
    text = os.environ.get(LIFETIME_ENV)
    if text is None:
        return DEFAULT_LIFETIME
    return seconds_text(text, LIFETIME_ENV)


def key_prefix(prefix: Optional[str]) -> str:
    """``lock:``, or ``<prefix>:lock:`` for an ASCII-alphanumeric prefix."""
    if prefix is None:
        return DEFAULT_KEY_PREFIX
    if not isinstance(prefix, str) or not prefix or not (prefix.isascii() and prefix.isalnum()):
        raise InvalidInput("key prefix", f"{prefix!r} must be non-empty and ASCII alphanumeric")
    return f"{prefix}:{DEFAULT_KEY_PREFIX}"


def conversation_key(full_prefix: str, cid: str) -> str:
    """``<prefix>{<id>}``: the conversation's hash and its wake-up channel.

    ``%``, ``{`` and ``}`` are percent-encoded, so the id is always exactly one
    Redis Cluster hash tag and two ids never share a key."""
    return full_prefix + "{" + cid.translate(_ENCODE) + "}"


def conversation_keys(key_prefix_: Optional[str], cid: str) -> str:
    """The key (and channel) of conversation ``cid`` under ``key_prefix_``."""
    return conversation_key(key_prefix(key_prefix_), conversation_id(cid))
