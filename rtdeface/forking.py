"""Forked helper processes for one case: start, receive one answer, stop.

A single-case run uses the second CPU for work whose result is small (the image cross-check
of the eyes) or nothing (writing half of the CT slices): the child is forked, so it sees the
parent's data without pickling, does its part and sends one picklable answer through a pipe.
pydicom, numpy and scipy hold the GIL for much of this work, so threads would not overlap.

Forking is only used where it is safe and useful (:func:`can_fork`); callers fall back to
doing the work in their own process, with the same result.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

NO_ANSWER = object()
"""What :meth:`Child.receive` returns when the child sent nothing (it died or timed out)."""


def can_fork() -> bool:
    """Fork only on Linux with two or more CPUs, outside daemonic processes, and only from a
    process with no other thread (a forked child could deadlock on a lock one holds)."""
    if not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2:
        return False
    if threading.active_count() > 1:
        return False
    return not multiprocessing.current_process().daemon


@dataclass
class Child:
    """A forked child process and the read end of its answer pipe."""

    proc: Any
    conn: Any

    @classmethod
    def start(cls, target: Callable[..., None], *args: object) -> Child | None:
        """Fork ``target(*args, conn)``; None when forking is not possible here.

        ``target`` must send exactly one picklable answer on ``conn`` and close it.
        """
        if not can_fork():
            return None
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(*args, child), daemon=True)
        try:
            proc.start()
        except (OSError, AssertionError) as exc:  # e.g. no resources, a daemonic process
            log.debug("cannot fork (%s); the work runs in this process", exc)
            parent.close()
            child.close()
            return None
        child.close()
        return cls(proc, parent)

    def receive(self, timeout_s: float) -> object:
        """The child's answer (or :data:`NO_ANSWER`); the child is reaped either way."""
        answer: object = NO_ANSWER
        try:
            if self.conn.poll(timeout_s):
                answer = self.conn.recv()
        except (EOFError, OSError):
            answer = NO_ANSWER
        finally:
            self.conn.close()
            if answer is NO_ANSWER and self.proc.is_alive():
                self.proc.kill()
            self.proc.join()
        return answer

    def stop(self) -> None:
        """Kill and reap the child (its answer is no longer wanted)."""
        self.conn.close()
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()


__all__ = ["NO_ANSWER", "Child", "can_fork"]
