"""Puts the repository's Lua scripts into the sdist and the wheel.

``lua/`` at the repository's root is the only copy in git. Built from a
checkout, the scripts are taken from ``../lua``; built from an unpacked sdist
(``python -m build`` builds the wheel that way), from the ``lua/`` the sdist
carries. Either way the build fails if any script is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

OPERATIONS = ("common", "issue", "poll", "release", "extend", "read", "save", "delete", "update", "cancel", "inspect")


def _lua_dir(root: Path) -> Path:
    for candidate in (root / "lua", root.parent / "lua"):
        if all((candidate / f"{name}.lua").is_file() for name in OPERATIONS):
            return candidate
    raise FileNotFoundError(
        f"ticketlock build: the Lua scripts are missing (looked in {root / 'lua'} and {root.parent / 'lua'})"
    )


class LuaHook(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: Dict[str, Any]) -> None:
        source = _lua_dir(Path(self.root))
        where = "ticketlock/lua" if self.target_name == "wheel" else "lua"
        for name in OPERATIONS:
            build_data["force_include"][str(source / f"{name}.lua")] = f"{where}/{name}.lua"
