"""The Redis scripts: ``.lua`` files in ``worker/state/lua``, loaded by name.

Each file's header names its KEYS and ARGV. A script that takes more than a few
arguments takes them as one JSON object (``ARGV[1]``, decoded with ``cjson``),
built here by ``spec``: named fields instead of positions to count.

Code that several scripts share lives in ``lua/lib/NAME.lua`` and is pasted where a
script says ``--@include NAME`` (Redis runs each script as one chunk: it has no modules).
``lib/protocol.lua`` holds every write of the durable-item protocol's fields.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

import orjson
import redis
from redis.exceptions import NoScriptError

from worker.state.connect import execute

_INCLUDE = re.compile(r"^--@include (\w+)$", re.MULTILINE)


def _read(*path: str) -> str:
    return files(__package__ or "worker.state").joinpath("lua", *path).read_text(encoding="utf-8")


@cache
def library(name: str) -> str:
    """The text of ``lua/lib/{name}.lua``."""
    return _read("lib", f"{name}.lua")


@cache
def source(name: str) -> str:
    """The text of ``lua/{name}.lua``, with the libraries it includes pasted in."""
    return _INCLUDE.sub(lambda m: library(m[1]), _read(f"{name}.lua"))


class Lua:
    """A script bound to a client, run by its SHA and loaded when Redis does not have it.

    redis-py's ``Script`` does the same with two imports and type checks per call, which
    showed in the worker's profile: every step runs three or four scripts.
    """

    def __init__(self, client: redis.Redis, text: str) -> None:
        self.client = client
        self.text = text
        self.sha = hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        command = _evalsha(self.sha, keys, args)
        (answer,) = execute(self.client, [command])
        if isinstance(answer, NoScriptError):
            # Redis restarted, or its scripts were flushed.
            self.client.script_load(self.text)
            (answer,) = execute(self.client, [command])
        if isinstance(answer, Exception):
            raise answer
        return answer


def _evalsha(sha: str, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
    # By SHA alone: the script is loaded only when Redis says it lacks it.
    return ("EVALSHA", sha, len(keys), *keys, *args)


def load(client: redis.Redis, name: str) -> Lua:
    """The script ``name`` bound to ``client`` (run by SHA, loaded on first use)."""
    return Lua(client, source(name))


def spec(**values: Any) -> bytes | str:
    """A script's structured argument. Numbers go as strings (in lists and maps
    too), so that Lua sees exactly the text Python wrote: cjson rounds them to 14 digits."""
    return _compact_json(values)


def compact(value: Any) -> str:
    """``value`` as compact JSON text, for a field stored as it is (written as ``spec`` writes)."""
    encoded = _compact_json(value)
    return encoded.decode() if isinstance(encoded, bytes) else encoded


def _compact_json(value: Any) -> bytes | str:
    try:
        # orjson: every step builds a few of these, and json.dumps was most of their cost.
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        # A lone surrogate (from a hostile answer) is not UTF-8: json keeps it, as it did.
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Call:
    """One script call, built but not yet run: alone (``run``) or with others (``run_together``)."""

    script: Lua
    keys: Sequence[str]
    args: Sequence[Any]

    def run(self) -> Any:
        return self.script(keys=self.keys, args=self.args)


def run_together(client: redis.Redis, calls: Sequence[Call]) -> list[Any]:
    """Run independent ``calls`` in one round trip, in order, and return their answers.

    Each script is atomic, the whole is not: no call may depend on another's effect. A
    call whose script Redis does not have (it restarted, or its scripts were flushed) is
    run again alone, which loads it.
    """
    answers = execute(client, [_evalsha(call.script.sha, call.keys, call.args) for call in calls])
    for i, call in enumerate(calls):
        if isinstance(answers[i], NoScriptError):
            answers[i] = call.run()
        if isinstance(answers[i], Exception):
            raise answers[i]
    return answers
