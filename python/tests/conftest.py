from __future__ import annotations

import itertools
import os
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from redis_harness import RedisCluster, RedisServer

_counter = itertools.count()


@pytest.fixture(scope="session")
def server() -> Iterator[RedisServer]:
    """A redis-server shared by the session; tests keep apart by key prefix."""
    try:
        s = RedisServer()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield s
    s.close()


@pytest.fixture(scope="session")
def url(server: RedisServer) -> str:
    return server.url(1)


@pytest.fixture()
def prefix() -> str:
    return f"t{os.getpid()}n{next(_counter)}"


@pytest.fixture(scope="session")
def cluster() -> Iterator[RedisCluster]:
    try:
        c = RedisCluster(3)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield c
    c.close()
