"""What both forms of the store share and that does no I/O: the scripts'
replies decoded, the wake-up format, the waiter's verdict on a wake-up, the
options of ``lock`` and the ``TicketLock`` snapshot."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, NamedTuple, Optional, Sequence

from ._errors import Backend, InvalidInput
from ._validate import (
    DEFAULT_DEAD_WAITER_TIMEOUT,
    DEFAULT_WAIT_TIME,
    MAX_LIFETIME,
    MAX_TICKET,
    conversation_id,
    milliseconds,
    seconds,
)

# Slack past an expiry the server announced, so the check after it finds it expired.
PAST = 0.002
# How long a cancel remembers a request id whose issue may still arrive (ms):
# far longer than any socket timeout or retry.
CANCEL_REMEMBER_MS = 60_000
# How often a cancel is tried before the caller gets the issue's error.
CANCEL_ATTEMPTS = 3


def _ints(name: str, reply: Any, cid: str) -> List[int]:
    if not isinstance(reply, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in reply):
        raise Backend(cid, False, f"{name}.lua replied {reply!r:.200}, expected a list of integers")
    return reply


def _broken(name: str, reply: Any, cid: str) -> Backend:
    return Backend(cid, False, f"{name}.lua replied {reply!r:.200}, which does not match its contract")


class Issued(NamedTuple):
    ticket: int
    epoch: int
    now_serving: int
    head_remaining_ms: int
    fence: int


def decode_issue(reply: Any, cid: str) -> Optional[Issued]:
    """None when a cancel for this request id ran first (nothing was issued)."""
    r = _ints("issue", reply, cid)
    if r == [-1, -1, -1, -1, -1]:
        return None
    if len(r) != 5 or r[0] < 0 or r[1] < 0 or r[2] < 0 or (r[4] >= 0) != (r[0] == r[2]):
        raise _broken("issue", reply, cid)
    return Issued(*r)


class Polled(NamedTuple):
    status: int  # 1 served, 0 waiting, -1 gone
    now_serving: int
    ahead: int
    head_remaining_ms: int
    own_remaining_ms: int
    fence: int


def decode_poll(reply: Any, cid: str) -> Polled:
    r = _ints("poll", reply, cid)
    if len(r) != 6 or r[0] not in (1, 0, -1):
        raise _broken("poll", reply, cid)
    p = Polled(*r)
    if p.status == 1 and (p.fence < 0 or p.own_remaining_ms < 0):
        raise _broken("poll", reply, cid)
    if p.status == 0 and (p.ahead < 0 or p.own_remaining_ms < 0):
        raise _broken("poll", reply, cid)
    return p


def decode_pair(name: str, reply: Any, cid: str) -> List[int]:
    r = _ints(name, reply, cid)
    if len(r) != 2:
        raise _broken(name, reply, cid)
    return r


def decode_release(reply: Any, cid: str) -> bool:
    """Whether the ticket was live and is gone now."""
    r = decode_pair("release", reply, cid)
    if r[0] not in (0, 1):
        raise _broken("release", reply, cid)
    return r[0] == 1


def decode_extend(reply: Any, cid: str) -> Optional[int]:
    """Remaining ms of the renewed lease, or None when it was lost."""
    r = decode_pair("extend", reply, cid)
    if r[0] == 1 and r[1] >= 0:
        return r[1]
    if r[0] == 0:
        return None
    raise _broken("extend", reply, cid)


def decode_single(name: str, reply: Any, cid: str) -> int:
    r = _ints(name, reply, cid)
    if len(r) != 1:
        raise _broken(name, reply, cid)
    return r[0]


@dataclass(frozen=True)
class Ticket:
    """One live place in a conversation's queue, with its terms.

    ``lease_ms`` and ``liveness_ms`` are 0 for a fixed ticket (Rasa's
    ``issue_ticket``: it expires ``remaining_ms`` from the snapshot, waiting
    included); for a renewing one (what ``lock`` takes) the lease runs from
    the grant and a waiting ticket lives ``liveness_ms`` past its waiter's
    last check-in. ``save_lock`` writes every ticket back with its terms."""

    number: int
    remaining_ms: int
    lease_ms: int = 0
    liveness_ms: int = 0

    @property
    def expires_in(self) -> float:
        """Seconds of life left when the snapshot was taken."""
        return self.remaining_ms / 1000.0

    @property
    def is_renewing(self) -> bool:
        return self.lease_ms > 0


@dataclass
class TicketLock:
    """A snapshot of one conversation's queue, live tickets in serving order.
    Mirrors Rasa's ``TicketLock``; it does not change when the store does."""

    conversation_id: str
    tickets: List[Ticket] = field(default_factory=list)
    #: The number the next issued ticket gets.
    next_number: int = 0

    @property
    def now_serving(self) -> Optional[int]:
        """The ticket served (the head of the queue), None when empty."""
        return self.tickets[0].number if self.tickets else None

    @property
    def last_issued(self) -> Optional[int]:
        """The last number handed out, also if that ticket is gone already
        (numbers never repeat within a record), None when none was."""
        return self.next_number - 1 if self.next_number > 0 else None

    def is_locked(self, ticket: int) -> bool:
        """Rasa's ``is_locked``: true unless ``ticket`` is the one served."""
        return self.now_serving != ticket

    def is_someone_waiting(self) -> bool:
        """True when the queue holds any live ticket (held or waiting)."""
        return bool(self.tickets)

    def issue_ticket(self, lifetime: float) -> int:
        """Appends a fixed ticket to this snapshot (persist it with ``save_lock``)."""
        ms = milliseconds(lifetime, "lifetime")
        number = self.next_number
        self.next_number += 1
        self.tickets.append(Ticket(number, ms))
        return number

    def remove_ticket_for(self, ticket: int) -> None:
        """Removes ticket ``ticket`` from this snapshot, if present."""
        self.tickets = [t for t in self.tickets if t.number != ticket]


def decode_read(reply: Any, cid: str) -> Optional[TicketLock]:
    r = _ints("read", reply, cid)
    if r == [0]:
        return None
    if len(r) < 4 or r[0] != 1 or min(r[1:4]) < 0 or (len(r) - 4) % 4:
        raise _broken("read", reply, cid)
    tickets = []
    for i in range(4, len(r), 4):
        number, remaining, lease, liveness = r[i : i + 4]
        if min(number, remaining, lease, liveness) < 0:
            raise _broken("read", reply, cid)
        tickets.append(Ticket(number, remaining, lease, liveness))
    return TicketLock(cid, tickets, r[1])


def read_live(reply: Any, cid: str) -> bool:
    """read.lua with limit 0: whether any ticket is live."""
    r = _ints("read", reply, cid)
    if r == [0]:
        return False
    if len(r) != 4 or r[0] != 1 or r[3] not in (0, 1):
        raise _broken("read", reply, cid)
    return r[3] == 1


def save_args(lock: TicketLock) -> List[int]:
    """save.lua's ARGV for a snapshot (checked first: nothing is sent on bad input)."""
    if not isinstance(lock, TicketLock):
        raise InvalidInput("lock", f"{type(lock).__name__} is not a ticketlock.TicketLock")
    conversation_id(lock.conversation_id)
    max_ms = int(MAX_LIFETIME * 1000)
    if not isinstance(lock.next_number, int) or not 0 <= lock.next_number <= MAX_TICKET + 1:
        raise InvalidInput("lock", f"next_number {lock.next_number!r} is not in 0..2^53")
    args: List[int] = [lock.next_number]
    seen = set()
    for t in lock.tickets:
        values = (t.number, t.remaining_ms, t.lease_ms, t.liveness_ms)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise InvalidInput("ticket", f"{t!r} holds a value that is not an integer")
        if not 0 <= t.number <= MAX_TICKET:
            raise InvalidInput("ticket", f"number {t.number} is not in 0..2^53-1")
        if not (0 <= t.remaining_ms <= max_ms and 0 <= t.lease_ms <= max_ms and 0 <= t.liveness_ms <= max_ms):
            raise InvalidInput("ticket", f"ticket {t.number}: times must be 0..{max_ms} ms")
        if (t.lease_ms == 0) != (t.liveness_ms == 0):
            raise InvalidInput("ticket", f"ticket {t.number} needs both lease_ms and liveness_ms, or neither")
        if t.remaining_ms > 0:
            if t.number in seen:
                raise InvalidInput("ticket", f"ticket {t.number} appears twice")
            seen.add(t.number)
        args.extend(values)
    return args


class Inspected(NamedTuple):
    """lua/inspect.lua's reply, for operators."""

    exists: bool
    next: int
    epoch: int
    head: int
    served: int
    fence: int
    granted_ms: int
    ttl_ms: int
    live: int
    expired: int
    cancelled: int
    tickets: Sequence[InspectedTicket]


class InspectedTicket(NamedTuple):
    number: int
    remaining_ms: int
    lease_ms: int
    liveness_ms: int
    request: str


def decode_inspect(reply: Any, cid: str) -> Inspected:
    if not isinstance(reply, list) or len(reply) < 11 or (len(reply) - 11) % 5:
        raise _broken("inspect", reply, cid)
    head = reply[:11]
    if not all(isinstance(v, int) for v in head):
        raise _broken("inspect", reply, cid)
    tickets = []
    for i in range(11, len(reply), 5):
        number, remaining, lease, liveness, request = reply[i : i + 5]
        if isinstance(request, bytes):
            request = request.decode("utf-8", "replace")
        if not all(isinstance(v, int) for v in (number, remaining, lease, liveness)) or not isinstance(request, str):
            raise _broken("inspect", reply, cid)
        tickets.append(InspectedTicket(number, remaining, lease, liveness, request))
    return Inspected(head[0] == 1, *head[1:], tickets=tickets)  # type: ignore[misc]


# --- wake-ups ---------------------------------------------------------------------


class Notice(NamedTuple):
    """A wake-up: ``"<epoch> <serving> <fence> <removed> <serving_ms>"``, -1 for none."""

    epoch: int
    serving: int
    fence: int
    removed: int
    serving_ms: int


def parse_notice(data: Any) -> Optional[Notice]:
    """The wake-up in a pub/sub payload, or None for anything else."""
    if isinstance(data, bytes):
        try:
            data = data.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(data, str):
        return None
    parts = data.split(" ")
    if len(parts) != 5:
        return None
    try:
        values = [int(p) for p in parts]
    except ValueError:
        return None
    if values[0] < 0:
        return None
    return Notice(*values)


SERVED, WAIT, POLL = "served", "wait", "poll"


def judge(notice: Optional[Notice], ticket: int, epoch: int) -> str:
    """What a waiter holding ``ticket`` of record ``epoch`` makes of a wake-up.

    SERVED: the script that sent it granted us the lock (pick it up soon);
    WAIT: a lower ticket is served, keep waiting; POLL: anything else (our
    ticket removed, several removed, nobody served, another record, garbage,
    or we were passed over) means ask the store now."""
    if notice is None or notice.epoch != epoch:
        return POLL
    if notice.removed in (ticket, -2) or notice.serving < 0:
        return POLL
    if notice.serving == ticket:
        return SERVED if notice.fence >= 0 else POLL
    if notice.serving < ticket:
        return WAIT
    return POLL


def lost_by(notice: Optional[Notice], ticket: int, epoch: int) -> bool:
    """Whether a wake-up tells the holder of ``ticket`` that its lock is gone:
    in its own record, another ticket (or nobody) is served now."""
    return notice is not None and notice.epoch == epoch and notice.serving != ticket


# --- options ----------------------------------------------------------------------


@dataclass(frozen=True)
class LockOptions:
    """How ``lock_with`` takes a lock; unset values fall back to the store's defaults.

    ``LockOptions().with_lifetime(30).with_timeout(5)`` reads as a sentence;
    all times are seconds (fractions allowed, millisecond precision)."""

    #: The lease, counted from the grant (default: the store's, 60 s or TICKET_LOCK_LIFETIME).
    lifetime: Optional[float] = None
    #: Longest pause between two checks when no wake-up comes (default 1 s): only a safety net.
    wait_time: Optional[float] = None
    #: Give up after this long, give the ticket back, raise ``Timeout`` (default: never).
    timeout: Optional[float] = None
    #: A waiting ticket lives this long past its waiter's last check-in (default 5 s).
    dead_waiter_timeout: Optional[float] = None
    #: Renew the lease every third of the lifetime while held (async form only).
    auto_renew: bool = False

    def with_lifetime(self, lifetime: float) -> LockOptions:
        return dataclasses.replace(self, lifetime=lifetime)

    def with_wait_time(self, wait_time: float) -> LockOptions:
        return dataclasses.replace(self, wait_time=wait_time)

    def with_timeout(self, timeout: Optional[float]) -> LockOptions:
        return dataclasses.replace(self, timeout=timeout)

    def with_dead_waiter_timeout(self, timeout: float) -> LockOptions:
        return dataclasses.replace(self, dead_waiter_timeout=timeout)

    def with_auto_renew(self, auto_renew: bool = True) -> LockOptions:
        return dataclasses.replace(self, auto_renew=auto_renew)

    def resolve(self, default_lifetime: float) -> Resolved:
        if not isinstance(self, LockOptions):
            raise InvalidInput("options", f"{self!r} is not a LockOptions")
        lifetime = self.lifetime if self.lifetime is not None else default_lifetime
        wait_time = seconds(self.wait_time if self.wait_time is not None else DEFAULT_WAIT_TIME, "wait time")
        dead = self.dead_waiter_timeout if self.dead_waiter_timeout is not None else DEFAULT_DEAD_WAITER_TIMEOUT
        timeout = None if self.timeout is None else seconds(self.timeout, "timeout")
        if not isinstance(self.auto_renew, bool):
            raise InvalidInput("auto_renew", f"{self.auto_renew!r} is not a bool")
        return Resolved(
            lifetime_ms=milliseconds(lifetime, "lifetime"),
            liveness_ms=milliseconds(dead, "dead-waiter timeout"),
            wait_time=wait_time,
            timeout=timeout,
            auto_renew=self.auto_renew,
        )


class Resolved(NamedTuple):
    lifetime_ms: int
    liveness_ms: int
    wait_time: float
    timeout: Optional[float]
    auto_renew: bool

    @property
    def lifetime(self) -> float:
        return self.lifetime_ms / 1000.0

    @property
    def check_in(self) -> float:
        """Longest pause between two polls of a waiter: the wait time, and at
        most a third of the dead-waiter timeout (one lost check-in never costs
        the ticket its place)."""
        return max(0.001, min(self.wait_time, self.liveness_ms / 3000.0))

    @property
    def before_pick_up(self) -> float:
        """How long a grant learnt from a wake-up lasts at most, counted from
        the last check-in's poll being sent: until the waiting ticket's own
        expiry, and never past the lease counted from the grant."""
        return min(self.liveness_ms, self.lifetime_ms) / 1000.0
