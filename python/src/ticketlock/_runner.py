"""Running one script: EVALSHA (SCRIPT LOAD and one retry on NOSCRIPT) or
FCALL (FUNCTION LOAD and one retry when the library is missing), in both
forms. Every other error passes through to the caller's classification."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, List, Optional

import redis.exceptions as rex

from ._scripts import ScriptSet


def _function_missing(error: BaseException) -> bool:
    return isinstance(error, rex.ResponseError) and "function not found" in str(error).lower()


def _library_refused(error: BaseException) -> bool:
    """FUNCTION LOAD refused by the server (Redis < 7, an ACL without it): run by EVALSHA then."""
    return isinstance(error, rex.ResponseError) and not isinstance(error, rex.NoScriptError)


class SyncRunner:
    def __init__(self, client: Any, scripts: ScriptSet, mode: str, cluster: bool) -> None:
        self._client = client
        self._scripts = scripts
        # A cluster's every primary would need the library; EVALSHA loads where needed.
        self._mode = "eval" if cluster and mode == "auto" else mode
        self._cluster = cluster
        self._lock = threading.Lock()

    def _all(self) -> Any:
        if self._cluster:
            from redis.cluster import RedisCluster

            return {"target_nodes": RedisCluster.PRIMARIES}
        return {}

    def load_library(self) -> None:
        self._client.execute_command("FUNCTION LOAD", "REPLACE", self._scripts.library, **self._all())

    def mode(self) -> str:
        if self._mode != "auto":
            return self._mode
        with self._lock:
            if self._mode == "auto":
                try:
                    self.load_library()
                    self._mode = "functions"
                except rex.ResponseError as e:
                    if not _library_refused(e):
                        raise
                    self._mode = "eval"
        return self._mode

    def run(self, op: str, key: str, args: List[Any]) -> Any:
        script = self._scripts.scripts[op]
        if self.mode() == "functions":
            command = "FCALL_RO" if script.read_only else "FCALL"
            try:
                return self._client.execute_command(command, script.function, 1, key, *args)
            except rex.ResponseError as e:
                if not _function_missing(e):
                    raise
                self.load_library()
                return self._client.execute_command(command, script.function, 1, key, *args)
        try:
            return self._client.execute_command("EVALSHA", script.sha, 1, key, *args)
        except rex.NoScriptError:
            self._client.execute_command("SCRIPT LOAD", script.code, **self._all())
            return self._client.execute_command("EVALSHA", script.sha, 1, key, *args)


class AsyncRunner:
    def __init__(self, client: Any, scripts: ScriptSet, mode: str, cluster: bool) -> None:
        self._client = client
        self._scripts = scripts
        self._mode = "eval" if cluster and mode == "auto" else mode
        self._cluster = cluster
        self._lock: Optional[asyncio.Lock] = None

    def _all(self) -> Any:
        if self._cluster:
            from redis.asyncio.cluster import RedisCluster

            return {"target_nodes": RedisCluster.PRIMARIES}
        return {}

    async def load_library(self) -> None:
        await self._client.execute_command("FUNCTION LOAD", "REPLACE", self._scripts.library, **self._all())

    async def mode(self) -> str:
        if self._mode != "auto":
            return self._mode
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._mode == "auto":
                try:
                    await self.load_library()
                    self._mode = "functions"
                except rex.ResponseError as e:
                    if not _library_refused(e):
                        raise
                    self._mode = "eval"
        return self._mode

    async def run(self, op: str, key: str, args: List[Any]) -> Any:
        script = self._scripts.scripts[op]
        if await self.mode() == "functions":
            command = "FCALL_RO" if script.read_only else "FCALL"
            try:
                return await self._client.execute_command(command, script.function, 1, key, *args)
            except rex.ResponseError as e:
                if not _function_missing(e):
                    raise
                await self.load_library()
                return await self._client.execute_command(command, script.function, 1, key, *args)
        try:
            return await self._client.execute_command("EVALSHA", script.sha, 1, key, *args)
        except rex.NoScriptError:
            await self._client.execute_command("SCRIPT LOAD", script.code, **self._all())
            return await self._client.execute_command("EVALSHA", script.sha, 1, key, *args)
