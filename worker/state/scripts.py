"""The Redis scripts: ``.lua`` files in ``worker/state/lua``, loaded by name.

Each file's header names its KEYS and ARGV. A script that takes more than a few
arguments takes them as one JSON object (``ARGV[1]``, decoded with ``cjson``),
built here by ``spec``: named fields instead of positions to count.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

import redis
from redis.commands.core import Script


@cache
def source(name: str) -> str:
    """The text of ``lua/{name}.lua``."""
    return files(__package__ or "worker.state").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def load(client: redis.Redis, name: str) -> Script:
    """The script ``name`` bound to ``client`` (run by SHA, loaded on first use)."""
    return client.register_script(source(name))


def spec(**values: Any) -> str:
    """A script's structured argument. Numbers go as strings (in lists and maps
    too), so that Lua sees exactly the text Python wrote: cjson rounds them to 14 digits."""
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False)
