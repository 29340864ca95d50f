"""Forked helper processes for one case: start, receive one answer, stop.

A single-case run uses the second CPU for work whose result is small (the de-identification
context, the clipped structure set, the image cross-check of the eyes) or nothing (writing
CT slices, shared with the parent through claims in shared memory): the child
is forked, so it sees the parent's data without pickling, does its part and sends one
picklable answer through a pipe. pydicom, numpy, shapely and scipy hold the GIL for much of
this work, so threads would not overlap. :class:`Deferred` wraps a function call this way.

Forking is only used where it is safe and useful (:func:`can_fork`); callers fall back to
doing the work in their own process, with the same result.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

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
        except Exception:  # no answer, or one that cannot be unpickled here
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


DEFERRED_TIMEOUT_S = 300.0
"""Longest wait (s) for the child of a :class:`Deferred` before its call is rerun in this
process (a forked child could hang on a lock held by another thread)."""


class Deferred(Generic[T]):
    """``fn(*args)``, run in a forked child beside the caller's work when possible.

    :meth:`start` forks (where :func:`can_fork`); :meth:`result` waits for the child's value
    and re-raises the exception the call raised there. Where forking is not possible, or the
    child dies or its answer cannot be pickled, :meth:`result` makes the call in this process:
    the result (or the exception) is the same either way. A child started with ``nice`` runs
    at that lower priority, so it fills the CPU time the caller's own processes leave idle.
    """

    def __init__(self, fn: Callable[..., T], args: tuple[object, ...], child: Child | None):
        self._fn = fn
        self._args = args
        self._child = child
        # a call whose result is never asked for: its child is stopped with this object
        self._finalizer = weakref.finalize(self, child.stop) if child is not None else None

    def _take_child(self) -> Child | None:
        child, self._child = self._child, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        return child

    @classmethod
    def start(
        cls, fn: Callable[..., T], *args: object, parallel: bool = True, nice: int = 0
    ) -> Deferred[T]:
        """Start ``fn(*args)`` in a child when ``parallel`` and forking is possible."""
        child = Child.start(_deferred_child, fn, args, nice) if parallel else None
        return cls(fn, args, child)

    @property
    def forked(self) -> bool:
        """Whether the call runs in a child process (not yet joined)."""
        return self._child is not None

    @property
    def pid(self) -> int | None:
        """The child's process id (None when the call is not running in a child)."""
        return None if self._child is None else int(self._child.proc.pid)

    def result(self, timeout_s: float = DEFERRED_TIMEOUT_S) -> T:
        """The call's value; its exception is raised here."""
        child = self._take_child()
        if child is not None:
            answer = child.receive(timeout_s)
            if isinstance(answer, tuple) and answer[0] == "ok":
                return answer[1]  # type: ignore[no-any-return]
            if isinstance(answer, tuple) and answer[0] == "raise":
                raise answer[1]
            log.debug("child of %s failed; calling it in this process", self._fn.__name__)
        return self._fn(*self._args)

    def cancel(self) -> None:
        """Stop a running child (its result is no longer wanted)."""
        child = self._take_child()
        if child is not None:
            child.stop()


def _deferred_child(
    fn: Callable[..., object], args: tuple[object, ...], nice: int, conn: Any
) -> None:
    """Child of :meth:`Deferred.start`: send ("ok", value), ("raise", exception) or
    ("failed", None) when neither can be pickled (the parent then repeats the call)."""
    try:
        if nice:
            os.nice(nice)
        try:
            answer: tuple[str, object] = ("ok", fn(*args))
        except Exception as exc:
            answer = ("raise", exc)
        try:
            conn.send(answer)
        except Exception:
            conn.send(("failed", None))
    finally:
        conn.close()


__all__ = ["DEFERRED_TIMEOUT_S", "NO_ANSWER", "Child", "Deferred", "can_fork"]
