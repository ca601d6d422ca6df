"""The Lua scripts of ``lua/``, as every client sends them.

Each operation is ``common.lua`` followed by ``<op>.lua``, byte for byte, so
its SHA1 is the Rust crate's too. The same files make the Functions library
``ticketlock_v2`` (``ticketlock_v2s`` for the sharded variant): the helpers
once, then each operation's file as the body of ``ticketlock_v2_<op>``.

The files ship inside the package (the wheel build copies them from the
repository's ``lua/``, the only copy in git); a source checkout without them
reads the repository's ``lua/`` directly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

#: Every operation, as in ``lua/<name>.lua``.
OPERATIONS: Tuple[str, ...] = (
    "issue",
    "poll",
    "release",
    "extend",
    "read",
    "save",
    "delete",
    "update",
    "cancel",
    "inspect",
)
#: Operations that write nothing (``no-writes``, called with FCALL_RO).
READ_ONLY = frozenset({"read", "inspect"})
#: The Functions library; the version changes whenever a script's contract does.
LIBRARY_NAME = "ticketlock_v2"
#: The library of the sharded variant (Redis Cluster: SPUBLISH).
SHARDED_LIBRARY_NAME = "ticketlock_v2s"

_PUBLISH_LINE = "local PUBLISH = 'PUBLISH'"
_SHARDED_PUBLISH_LINE = "local PUBLISH = 'SPUBLISH'"


def lua_dir() -> Path:
    """Where the Lua files are: inside the package, else the checkout's ``lua/``."""
    here = Path(__file__).resolve().parent
    packaged = here / "lua"
    if (packaged / "common.lua").is_file():
        return packaged
    checkout = here.parent.parent.parent / "lua"
    if (checkout / "common.lua").is_file():
        return checkout
    raise FileNotFoundError(
        f"ticketlock: the Lua scripts are missing (looked in {packaged} and {checkout}); reinstall the package"
    )


@dataclass(frozen=True)
class Script:
    """One operation's code as sent to Redis, and that code's SHA1."""

    name: str
    code: str
    sha: str
    read_only: bool
    function: str


@dataclass(frozen=True)
class ScriptSet:
    """Every operation of one variant (classic or sharded) and its library."""

    sharded: bool
    scripts: Dict[str, Script]
    library: str
    library_name: str


def _read(path: Path) -> str:
    # Bytes, not text mode: the code must be byte-identical to the file.
    return path.read_bytes().decode("utf-8")


_CACHE: Dict[Tuple[str, bool], ScriptSet] = {}


def script_set(sharded: bool = False, directory: Optional[Path] = None) -> ScriptSet:
    base = directory if directory is not None else lua_dir()
    cache_key = (str(base), sharded)
    cached = _CACHE.get(cache_key)
    if cached is not None:
        return cached
    common = _read(base / "common.lua")
    if common.count(_PUBLISH_LINE) != 1:
        raise RuntimeError(f"{base / 'common.lua'} does not hold the line {_PUBLISH_LINE!r} exactly once")
    if sharded:
        common = common.replace(_PUBLISH_LINE, _SHARDED_PUBLISH_LINE, 1)
    library_name = SHARDED_LIBRARY_NAME if sharded else LIBRARY_NAME
    scripts: Dict[str, Script] = {}
    library = [f"#!lua name={library_name}\n{common}\n"]
    for name in OPERATIONS:
        body = _read(base / f"{name}.lua")
        code = common + body
        function = f"{library_name}_{name}"
        read_only = name in READ_ONLY
        scripts[name] = Script(
            name=name,
            code=code,
            sha=hashlib.sha1(code.encode("utf-8")).hexdigest(),
            read_only=read_only,
            function=function,
        )
        flags = "{ 'no-writes' }" if read_only else "{}"
        library.append(
            f"redis.register_function{{ function_name = '{function}', flags = {flags}, "
            f"callback = function(KEYS, ARGV)\n{body}\nend }}\n"
        )
    result = ScriptSet(sharded=sharded, scripts=scripts, library="".join(library), library_name=library_name)
    _CACHE[cache_key] = result
    return result
