"""Connections: refused and stalled servers, an ACL user limited to its
prefix, TLS, and Redis Cluster with sharded pub/sub."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from typing import Any, Dict, List

import pytest

import ticketlock as tl
from redis_harness import RedisCluster, RedisServer
from ticketlock import AsyncLockStore, LockOptions, LockStore


def test_refused_is_retryable() -> None:
    store = LockStore.from_url("redis://127.0.0.1:9/0", socket_timeout=1)
    with pytest.raises(tl.Backend) as caught:
        store.get_lock("c")
    assert caught.value.retryable and isinstance(caught.value.__cause__, Exception)


def test_a_stalled_server_times_out_retryably() -> None:
    stalled = RedisServer()
    try:
        stalled.pause()
        store = LockStore.from_url(stalled.url(1), socket_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(tl.Backend) as caught:
            store.acquire("c")
        assert caught.value.retryable and time.monotonic() - started < 10

        async def also_async() -> None:
            a = AsyncLockStore.from_url(stalled.url(1), socket_timeout=0.3)
            with pytest.raises(tl.Backend) as caught:
                await a.acquire("c")
            assert caught.value.retryable

        asyncio.run(also_async())
    finally:
        stalled.close()


def test_an_acl_user_limited_to_its_prefix(prefix: str) -> None:
    rules = (
        f"on >secret resetkeys ~{prefix}:lock:* resetchannels &{prefix}:lock:* -@all "
        "+fcall +fcall_ro +function|load +evalsha +script|load +subscribe +unsubscribe +ping "
        # What the v2 scripts call (inspect.lua adds PTTL).
        "+time +hmget +hset +hdel +hgetall +del +pexpireat +pttl +publish"
    )
    server = RedisServer()
    try:
        import redis

        admin = redis.Redis(port=server.port)
        admin.execute_command("ACL", "SETUSER", "bot", *rules.split())
        url = f"redis://bot:secret@127.0.0.1:{server.port}/0"
        for mode in ("auto", "eval", "functions"):
            store = LockStore.from_url(url, key_prefix=prefix, script_mode=mode)
            with store.lock("acl") as guard:
                assert guard.ticket == 0
                assert store.get_lock("acl") is not None
            with pytest.raises(tl.Backend) as caught:
                LockStore.from_url(url, key_prefix="other").get_lock("acl")
            assert not caught.value.retryable
        with pytest.raises(tl.Backend) as caught:
            LockStore.from_url(f"redis://bot:wrong@127.0.0.1:{server.port}/0").get_lock("acl")
        assert not caught.value.retryable
    finally:
        server.close()


def _certificates(directory: str) -> Dict[str, str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the TLS test needs the openssl CLI: apt-get install -y openssl (scripts/test.sh installs it)")
    files = {
        name: os.path.join(directory, name) for name in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
    }

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        files["ca.key"],
        "-out",
        files["ca.crt"],
        "-days",
        "2",
        "-subj",
        "/CN=ticketlock test CA",
        # What strict verifiers (Python 3.13's VERIFY_X509_STRICT) require of a CA.
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-addext",
        "subjectKeyIdentifier=hash",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        files["server.key"],
        "-out",
        files["server.csr"],
        "-subj",
        "/CN=127.0.0.1",
    )
    ext = os.path.join(directory, "ext.cnf")
    with open(ext, "w") as f:
        f.write(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "authorityKeyIdentifier=keyid,issuer\n"
            "subjectKeyIdentifier=hash\n"
        )
    run(
        "x509",
        "-req",
        "-in",
        files["server.csr"],
        "-CA",
        files["ca.crt"],
        "-CAkey",
        files["ca.key"],
        "-CAcreateserial",
        "-out",
        files["server.crt"],
        "-days",
        "2",
        "-extfile",
        ext,
    )
    return files


def test_tls_with_a_private_ca(tmp_path: Any) -> None:
    files = _certificates(str(tmp_path))
    from redis_harness import free_port

    port = free_port()
    server = RedisServer(
        "--tls-port",
        str(port),
        "--tls-cert-file",
        files["server.crt"],
        "--tls-key-file",
        files["server.key"],
        "--tls-ca-cert-file",
        files["ca.crt"],
        "--tls-auth-clients",
        "no",
    )
    try:
        config = {"host": "127.0.0.1", "port": port, "use_ssl": True, "ssl_ca_certs": files["ca.crt"], "db": 0}
        store = LockStore.create(config)
        with store.lock("tls") as guard:
            assert guard.ticket == 0

        async def also_async() -> None:
            a = AsyncLockStore.create(config)
            async with a.lock("tls") as g:
                assert g.ticket == 0
            await a.close()

        asyncio.run(also_async())
        insecure = LockStore.from_url(f"rediss://127.0.0.1:{port}/0#insecure")
        assert insecure.get_lock("tls") is None
        # Without the CA, the certificate is refused, and retrying cannot help.
        with pytest.raises(tl.Backend) as caught:
            LockStore.from_url(f"rediss://127.0.0.1:{port}/0").get_lock("tls")
        assert not caught.value.retryable
    finally:
        server.close()


def _has_sharded_pub_sub(asynchronous: bool) -> bool:
    import redis.asyncio.client
    import redis.client

    return hasattr((redis.asyncio.client if asynchronous else redis.client).PubSub, "ssubscribe")


def test_cluster_sync_and_async_with_sharded_wake_ups(cluster: RedisCluster) -> None:
    """Where the installed redis-py lacks sharded pub/sub, construction must
    refuse clearly instead (redis-py 4 for both forms, before 8 for asyncio)."""
    url = cluster.url()
    if not _has_sharded_pub_sub(asynchronous=False):
        with pytest.raises(tl.InvalidInput, match="sharded pub/sub"):
            LockStore.from_url(url)
    else:
        _cluster_sync(url)
    if not _has_sharded_pub_sub(asynchronous=True):
        with pytest.raises(tl.InvalidInput, match="sharded pub/sub"):
            AsyncLockStore.from_url(url)
    else:
        _cluster_async(url)


def _cluster_sync(url: str) -> None:
    store = LockStore.from_url(url, key_prefix="cl")
    ids = [f"conv-{i}" for i in range(6)]  # spread over the shards
    for cid in ids:
        holder = store.acquire(cid, LockOptions(lifetime=30))
        served: Dict[str, Any] = {}
        polls: List[int] = []

        def wait(cid: str = cid, served: Dict[str, Any] = served, polls: List[int] = polls) -> None:
            with store.lock(cid, wait_time=30, on_wait=lambda t, a: polls.append(t)) as g:
                served["at"], served["ticket"] = time.monotonic(), g.ticket

        thread = threading.Thread(target=wait)
        thread.start()
        deadline = time.monotonic() + 10
        while not polls:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(0.05)
        released = time.monotonic()
        holder.release()
        thread.join(10)
        assert served["ticket"] == 1 and served["at"] - released < 0.5
        assert store.get_lock(cid) is None


def _cluster_async(url: str) -> None:
    ids = [f"conv-{i}" for i in range(6)]

    async def also_async() -> None:
        a = AsyncLockStore.from_url(url, key_prefix="cl")
        for cid in ids:
            holder = await a.acquire(cid)
            polls: List[int] = []
            waiter = asyncio.ensure_future(
                a.acquire(cid, LockOptions(wait_time=30), on_wait=lambda t, x, p=polls: p.append(t))
            )
            while not polls:
                await asyncio.sleep(0.002)
            released = time.monotonic()
            await holder.release()
            guard = await asyncio.wait_for(waiter, 10)
            assert guard.ticket == 1 and time.monotonic() - released < 0.5
            await guard.release()
        await a.close()

    asyncio.run(also_async())
