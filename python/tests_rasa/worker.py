"""One OS process of the Rasa multi-process test: ``--tasks`` asyncio tasks,
each running ``async with store.lock(cid)`` around a deliberately non-atomic
GET / sleep / SET of a counter, ``--count`` times. The store is made the way
Rasa makes it: ``LockStore.create(EndpointConfig)``.

    python worker.py ours|rasa PORT PREFIX CONVERSATION COUNTER COUNT TASKS

Prints one JSON line: how many sections ran, and the errors met.
"""

import asyncio
import json
import sys
import time

import redis
from rasa.core.lock_store import LockStore
from rasa.utils.endpoints import EndpointConfig


async def main() -> None:
    kind, port, prefix, cid, counter, count, tasks = sys.argv[1:8]
    store_type = "ticketlock.rasa.TicketLockStore" if kind == "ours" else "redis"
    config = EndpointConfig(url="127.0.0.1", type=store_type, port=int(port), db=1, key_prefix=prefix)
    store = LockStore.create(config)
    client = redis.Redis(port=int(port), db=1)
    print(json.dumps({"event": "ready"}), flush=True)
    sys.stdin.readline()
    done, errors = 0, []
    started = time.monotonic()

    async def task() -> None:
        nonlocal done
        for _ in range(int(count)):
            try:
                async with store.lock(cid, lock_lifetime=10, wait_time_in_seconds=0.05):
                    value = int(client.get(counter) or 0)
                    await asyncio.sleep(0.002)
                    client.set(counter, value + 1)
                done += 1
                # Counted atomically, so a run that hangs and is killed still tells.
                client.incr(counter + ":done")
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}"[:200])

    await asyncio.gather(*(task() for _ in range(int(tasks))))
    print(json.dumps({"done": done, "errors": errors, "seconds": round(time.monotonic() - started, 3)}), flush=True)


asyncio.run(main())
