"""Claim tokens: random, never repeated, within a thread, across threads or across a fork."""

from __future__ import annotations

import os
import threading

import pytest

from worker.state.store import new_token, random_bytes


def test_tokens_are_distinct_across_threads_and_reserve_refills() -> None:
    made: list[str] = []

    def make() -> None:
        made.extend(new_token() for _ in range(2000))  # several pages of reserve per thread

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == len(made) == 8000
    assert all(len(t) == 16 and int(t, 16) >= 0 for t in made)
    assert len(random_bytes(5000)) == 5000  # more than a page at once


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_draws_its_own_bytes() -> None:
    new_token()  # the parent has a reserve the child inherits
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, new_token().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert child != new_token()
