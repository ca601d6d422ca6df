"""The Rasa adapter's tests run in a Rasa 3.6.21 environment (scripts/test.sh
builds it). Without Rasa they fail and say so; they never skip."""

from __future__ import annotations

import itertools
import os
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from redis_harness import RedisServer

try:
    import rasa.core.lock_store  # noqa: F401
except ImportError as e:  # pragma: no cover - the environment is wrong
    raise RuntimeError(f"tests_rasa needs Rasa 3.6 ({e}): run scripts/test.sh, which builds target/py-rasa") from e

_counter = itertools.count()


@pytest.fixture(scope="session")
def server() -> Iterator[RedisServer]:
    try:
        s = RedisServer()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield s
    s.close()


@pytest.fixture()
def prefix() -> str:
    return f"r{os.getpid()}n{next(_counter)}"
