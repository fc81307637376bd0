"""The Celery internals the message boundary relies on are the ones it was checked against."""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
from importlib.metadata import version
from typing import Any

import pytest

from worker.intake import boundary
from worker.intake.celery_internals import CHECKED_WITH, OVERRIDDEN


def _resolve(name: str) -> Any:
    module, qualified = name.split(":")
    obj: Any = importlib.import_module(module)
    for part in qualified.split("."):
        obj = inspect.getattr_static(obj, part)
    if isinstance(obj, functools.cached_property):
        return obj.func
    if isinstance(obj, property):
        return obj.fget
    return obj


def test_installed_releases_are_in_the_checked_minor_range() -> None:
    for package, checked in CHECKED_WITH.items():
        assert version(package).split(".")[:2] == checked.split(".")[:2], (
            f"{package} {version(package)} is installed; worker/intake/celery_internals.py was checked against "
            f"{checked}: read each function it names against the new release and record their digests"
        )


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_each_overridden_internal_is_unchanged(name: str) -> None:
    digest, why = OVERRIDDEN[name]
    source = inspect.getsource(_resolve(name))
    assert hashlib.sha256(source.encode()).hexdigest() == digest, (
        f"{name} changed in this release ({why}): check worker/intake/celery_internals.py against it"
    )


def test_every_celery_method_the_boundary_overrides_is_recorded() -> None:
    """A new override of a Celery method must be added to OVERRIDDEN (and so checked)."""
    recorded = set(OVERRIDDEN)
    for cls in (boundary.CheckedRequest, boundary.CheckedConsumer, boundary.CheckedTask):
        base = cls.__mro__[1]
        for attr in vars(cls):
            if attr.startswith("__") and attr != "__init__":
                continue
            if attr in ("Request",) or not callable(getattr(base, attr, None)):
                continue
            name = f"{base.__module__}:{base.__qualname__}.{attr}"
            assert name in recorded, f"{cls.__name__} overrides {name}, which OVERRIDDEN does not record"


def test_a_changed_internal_would_be_caught() -> None:
    """The check compares the source itself: another function's source gives another digest."""
    digest, _ = OVERRIDDEN["celery.worker.consumer.consumer:Consumer.on_decode_error"]
    other = inspect.getsource(_resolve("celery.worker.consumer.consumer:Consumer.on_unknown_task"))
    assert hashlib.sha256(other.encode()).hexdigest() != digest
