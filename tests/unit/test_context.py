"""The context a worker process builds once for all its steps."""

from __future__ import annotations

from tests.support.settings import make_settings
from worker.runtime.context import build_context, process_context


def test_the_worker_process_context_gates_a_leased_event_in_its_finish() -> None:
    # The worker's tasks deliver a finish's single event at once (worker/runtime/tasks.py):
    # its context has the finish pass the endpoint's gate too. Nothing connects yet.
    context = process_context(make_settings())
    assert context.gate_on_finish
    assert process_context(make_settings()) is context
    assert not build_context(make_settings()).gate_on_finish
