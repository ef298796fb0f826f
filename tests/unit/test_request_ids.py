"""Request ids are drawn without a system call: they must still differ between forked workers."""

from __future__ import annotations

import os
import re

from service.middleware import new_request_id


def test_request_ids_are_32_hex_digits_and_do_not_repeat() -> None:
    # Many draws' worth: ids are drawn in batches.
    ids = [new_request_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids)
    assert len(set(ids)) == len(ids)


def test_forked_workers_draw_different_request_ids() -> None:
    # Gunicorn forks every worker from one master: a generator state (or ids
    # drawn ahead) shared across the fork would hand two workers the same ids.
    new_request_id()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(writer, " ".join(new_request_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(writer)
    parent_ids = {new_request_id() for _ in range(100)}
    os.waitpid(pid, 0)
    with os.fdopen(reader, "rb") as pipe:
        child_ids = set(pipe.read().decode().split())
    assert len(child_ids) == 100
    assert not parent_ids & child_ids
