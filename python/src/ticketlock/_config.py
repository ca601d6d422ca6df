"""Where the store's Redis is: one parser for URLs and one for Rasa's
``lock_store:`` keys, both ending in a checked :class:`Target`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import unquote

from ._errors import InvalidInput
from ._validate import key_prefix as check_prefix

#: Redis port when none is configured.
DEFAULT_PORT = 6379
#: Redis database when a configuration names a host without one (Rasa's default).
DEFAULT_DB = 1
#: Seconds bounding every Redis call and connecting, when none is configured (Rasa's).
DEFAULT_SOCKET_TIMEOUT = 10.0
#: How scripts run: ``auto`` (Functions where the server allows, else EVALSHA),
#: ``eval`` (EVALSHA, SCRIPT LOAD on NOSCRIPT) or ``functions`` (FCALL).
SCRIPT_MODES = ("auto", "eval", "functions")

URL_FORMS = (
    "expected redis://[user:password@]host[:port][/db], rediss://...[#insecure], "
    "redis+cluster://[user:password@]host:port,host:port[/0] or rediss+cluster://..."
)

#: The keys of Rasa's ``lock_store:`` section this package reads.
CONFIG_KEYS = frozenset(
    {
        "host",
        "url",
        "port",
        "db",
        "username",
        "password",
        "use_ssl",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_ca_certs",
        "key_prefix",
        "socket_timeout",
        "script_mode",
        "deployment_mode",
        "endpoints",
    }
)


def redact_url(url: str) -> str:
    """``user:password@`` becomes ``user:<redacted>@``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    auth, _, hosts = rest.rpartition("@")
    user = auth.split(":", 1)[0] if ":" in auth else ""
    return f"{scheme}://{user}:<redacted>@{hosts}"


@dataclass(frozen=True)
class Target:
    """A checked Redis target: one server or a cluster's startup nodes."""

    nodes: Tuple[Tuple[str, int], ...]
    cluster: bool = False
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    tls: bool = False
    tls_insecure: bool = False
    ssl_ca_certs: Optional[str] = None
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT
    key_prefix: Optional[str] = None
    script_mode: str = "auto"

    def connection_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``redis.Redis`` (and of each cluster node)."""
        kwargs: Dict[str, Any] = {
            "username": self.username,
            "password": self.password,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_timeout,
        }
        if not self.cluster:
            kwargs["db"] = self.db
            # The socket timeout bounds every call: redis-py's own retries
            # (three by default in redis-py 6 and later) would multiply it,
            # and the store decides itself what is worth repeating.
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            kwargs["retry"] = Retry(NoBackoff(), 0)
        if self.tls:
            kwargs["ssl"] = True
            kwargs["ssl_ca_certs"] = self.ssl_ca_certs
            kwargs["ssl_certfile"] = self.ssl_certfile
            kwargs["ssl_keyfile"] = self.ssl_keyfile
            if self.tls_insecure:
                kwargs["ssl_cert_reqs"] = "none"
                kwargs["ssl_check_hostname"] = False
        return kwargs


def _bad_url(url: str, why: str) -> InvalidInput:
    return InvalidInput("url", f"{redact_url(url)}: {why} ({URL_FORMS})")


def _endpoint(text: str, url: str, default_port: int = DEFAULT_PORT) -> Tuple[str, int]:
    t = text.strip()
    if not t or any(c in t for c in "/@?# ,"):
        raise _bad_url(url, f"{t!r} is not a host[:port]")
    if t.startswith("["):
        host, sep, after = t[1:].partition("]")
        if not sep or not host:
            raise _bad_url(url, f"{t!r} lacks its closing ]")
        port_text: Optional[str] = after[1:] if after.startswith(":") else (after or None)
    elif t.count(":") > 1:
        host, port_text = t, None  # a bare IPv6 address
    else:
        host, _, port_text = t.partition(":")
        port_text = port_text if ":" in t else None
        if not host:
            raise _bad_url(url, f"{t!r} has no host")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad_url(url, f"{t!r} does not end in a usable port")
    return host, int(port_text)


def parse_url(url: object, *, socket_timeout: Optional[float] = None, key_prefix: Optional[str] = None) -> Target:
    """A URL of any supported form; malformed ones raise ``InvalidInput``."""
    if not isinstance(url, str):
        raise InvalidInput("url", f"{url!r} is not a str")
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise _bad_url(text, "no scheme")
    scheme = scheme.lower()
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        raise _bad_url(text, "Sentinel is not supported by the Python package; name the master's address")
    if scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        raise _bad_url(text, f"unsupported scheme {scheme!r}")
    cluster = scheme.endswith("+cluster")
    tls = scheme.startswith("rediss")
    rest, _, fragment = rest.partition("#")
    if fragment not in ("", "insecure"):
        raise _bad_url(text, f"unknown fragment #{fragment}")
    if fragment and not tls:
        raise _bad_url(text, "#insecure is for rediss:// URLs")
    if "?" in rest:
        raise _bad_url(text, "query parameters are not supported")
    auth, at, hosts_path = rest.rpartition("@")
    if not at:
        auth, hosts_path = "", rest
    username: Optional[str] = None
    password: Optional[str] = None
    if at:
        user, colon, secret = auth.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if not colon and user:
            # redis://secret@host: a password alone, as redis-py reads it.
            username, password = None, unquote(user)
    hosts, _, path = hosts_path.partition("/")
    if not hosts:
        raise _bad_url(text, "no host")
    nodes = tuple(_endpoint(h, text) for h in hosts.split(","))
    if not cluster and len(nodes) != 1:
        raise _bad_url(text, "several hosts need redis+cluster://")
    path = path.strip("/")
    if path and not path.isdigit():
        raise _bad_url(text, f"database {path!r} is not a number")
    db = int(path) if path else 0
    if cluster and db != 0:
        raise _bad_url(text, "a Redis Cluster has database 0 only")
    target = Target(
        nodes=nodes,
        cluster=cluster,
        db=db,
        username=username,
        password=password,
        tls=tls,
        tls_insecure=fragment == "insecure",
        socket_timeout=_timeout(socket_timeout),
        key_prefix=key_prefix,
    )
    check_prefix(key_prefix)
    return target


def _timeout(value: object) -> float:
    if value is None:
        return DEFAULT_SOCKET_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidInput("socket_timeout", f"{value!r} is not a positive number of seconds")
    return float(value)


def _optional_str(config: Mapping[str, Any], key: str) -> Optional[str]:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(key, f"{value!r} is not a string")
    return value


def _int(config: Mapping[str, Any], key: str, low: int, high: int) -> Optional[int]:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(key, f"{value!r} is not an integer in {low}..{high}")
    return value


def _bool(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInput(key, f"{value!r} is not true or false")
    return value


def parse_config(config: Mapping[str, Any]) -> Target:
    """Rasa's ``lock_store:`` keys (``type`` aside): ``host`` (or ``url``; a
    host name or a full URL), ``port``, ``db`` (default 1), ``username``,
    ``password``, ``use_ssl``, ``ssl_certfile``, ``ssl_keyfile``,
    ``ssl_ca_certs``, ``key_prefix``, ``socket_timeout`` (default 10), and
    ``script_mode``, ``deployment_mode`` (``standard`` or ``cluster``) with
    ``endpoints`` (the cluster's ``host:port`` startup nodes)."""
    if not isinstance(config, Mapping):
        raise InvalidInput("config", f"{config!r} is not a mapping")
    unknown = sorted(str(k) for k in config if k not in CONFIG_KEYS)
    if unknown:
        raise InvalidInput("config", f"unknown keys {', '.join(unknown)} (known: {', '.join(sorted(CONFIG_KEYS))})")
    if config.get("host") is not None and config.get("url") is not None:
        raise InvalidInput("config", "give host or url, not both")
    host = _optional_str(config, "host") or _optional_str(config, "url") or "localhost"
    host = host.strip()
    port = _int(config, "port", 1, 65535)
    db = _int(config, "db", 0, 1 << 31)
    username = _optional_str(config, "username")
    password = _optional_str(config, "password")
    use_ssl = _bool(config, "use_ssl")
    mode = _optional_str(config, "deployment_mode") or "standard"
    if mode not in ("standard", "cluster"):
        raise InvalidInput(
            "deployment_mode",
            f"{mode!r}: the Python package supports standard and cluster (Sentinel: name the master)",
        )
    script_mode = _optional_str(config, "script_mode") or "auto"
    if script_mode not in SCRIPT_MODES:
        raise InvalidInput("script_mode", f"{script_mode!r} is not one of {', '.join(SCRIPT_MODES)}")
    endpoints = config.get("endpoints") or []
    if not isinstance(endpoints, (list, tuple)) or not all(isinstance(e, str) for e in endpoints):
        raise InvalidInput("endpoints", f"{endpoints!r} is not a list of host:port strings")
    if endpoints and mode != "cluster":
        raise InvalidInput("endpoints", "endpoints are for deployment_mode cluster")
    prefix = _optional_str(config, "key_prefix")
    check_prefix(prefix)
    timeout = _timeout(config.get("socket_timeout"))
    if "://" in host:
        base = parse_url(host, socket_timeout=timeout, key_prefix=prefix)
        if port is not None:
            raise InvalidInput("port", "the url names the port already")
        if base.cluster != (mode == "cluster") and mode == "cluster" and not endpoints and len(base.nodes) == 1:
            base = _replace(base, cluster=True, db=0)
        elif mode == "cluster" and not base.cluster and not endpoints:
            raise InvalidInput("deployment_mode", "cluster, but the url is not a redis+cluster:// url")
        nodes = base.nodes
        if endpoints:
            nodes = tuple(_endpoint(e, e) for e in endpoints)
        tls = base.tls or use_ssl
        chosen_db = db if db is not None else base.db
        username = username if username is not None else base.username
        password = password if password is not None else base.password
        cluster = base.cluster or mode == "cluster"
        insecure = base.tls_insecure
    else:
        if not host or any(c in host for c in "/@?# "):
            raise InvalidInput("host", f"{host!r} is not a host name or address")
        own = (host.strip("[]"), port or DEFAULT_PORT)
        cluster = mode == "cluster"
        nodes = tuple(_endpoint(e, e) for e in endpoints) if endpoints else (own,)
        tls = use_ssl
        chosen_db = db if db is not None else (0 if cluster else DEFAULT_DB)
        insecure = False
    if cluster and chosen_db != 0:
        raise InvalidInput("db", f"a Redis Cluster has database 0 only, not {chosen_db}")
    return Target(
        nodes=nodes,
        cluster=cluster,
        db=chosen_db,
        username=username,
        password=password,
        tls=tls,
        tls_insecure=insecure,
        ssl_ca_certs=_optional_str(config, "ssl_ca_certs"),
        ssl_certfile=_optional_str(config, "ssl_certfile"),
        ssl_keyfile=_optional_str(config, "ssl_keyfile"),
        socket_timeout=timeout,
        key_prefix=prefix,
        script_mode=script_mode,
    )


def _replace(target: Target, **changes: Any) -> Target:
    import dataclasses

    return dataclasses.replace(target, **changes)


def endpoint_list(target: Target) -> List[str]:
    return [f"{h}:{p}" for h, p in target.nodes]
