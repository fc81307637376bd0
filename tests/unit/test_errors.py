"""The exception trees drawn in worker/errors.py and check365_client/errors.py are the code's."""

from __future__ import annotations

import inspect
import re
from types import ModuleType

import pytest

from check365_client import errors as client_errors
from worker import errors


def _drawn_tree(module: ModuleType) -> dict[str, str | None]:
    """Each class named in the docstring's first tree, with the class drawn as its parent."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    lines = (module.__doc__ or "").splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^\s+[A-Z]\w+\s", line + " "))
    for line in lines[start:]:
        if not line.strip():
            break  # the tree ends at the first blank line
        match = re.match(r"^(\s*(?:[│ ]   )*)(?:[├└]── )?([A-Z]\w+)\s", line + " ")
        if match is None:
            continue  # a continuation line of a class's description
        depth = len(match.group(1)) + (4 if re.search(r"[├└]── ", line) else 0)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[match.group(2)] = stack[-1][1] if stack else None
        stack.append((depth, match.group(2)))
    return parents


@pytest.mark.parametrize("module", [errors, client_errors], ids=["worker", "check365_client"])
def test_the_drawn_tree_names_every_error_under_its_own_base(module: ModuleType) -> None:
    defined = {
        name: cls
        for name, cls in vars(module).items()
        if inspect.isclass(cls) and issubclass(cls, Exception) and cls.__module__ == module.__name__
    }
    drawn = _drawn_tree(module)
    assert set(drawn) == set(defined), "a class drawn but not defined, or defined but not drawn"
    for name, parent in drawn.items():
        bases = [b.__name__ for b in defined[name].__bases__ if b.__module__ == module.__name__]
        if parent is None:
            assert bases == [], f"{name} is drawn at the root"
        else:
            assert bases[:1] == [parent], f"{name} is drawn under {parent} but derives from {bases}"


def test_what_the_worker_shares_with_the_client_is_said_in_words() -> None:
    doc = errors.__doc__ or ""
    assert errors.InvalidWatchRequest is client_errors.InvalidWatchRequest
    assert "InvalidWatchRequest" in doc and "re-exported" in doc
    assert issubclass(errors.UnsafeCallbackURL, client_errors.UnsafeCallbackURL)
    assert "also the client's UnsafeCallbackURL" in doc
