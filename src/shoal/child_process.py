"""A helper process of the aggregator's, and the one pipe to it.

The CKKS key holder (:mod:`shoal.key_service`) and the model host (:mod:`shoal.model_host`)
each run in a child process: a fresh interpreter (the ``spawn`` start method: nothing of the
aggregator's state is copied into it), started with one end of a pipe. Requests are
serialized (one in flight at a time, from any thread); the child exits when it is told to
stop or when the aggregator goes away (its end of the pipe closes, even after a SIGKILL).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Callable
from typing import Any

from shoal.errors import ShoalError

__all__ = ["ChildGone", "ChildProcess", "answer_requests"]


def answer_requests(conn: Any, kind: str, answer: Callable[[tuple], tuple]) -> None:
    """The child's side: answer each ``(kind, ...)`` request with ``answer(request)`` until
    a request of another kind (``("stop",)``) or the end of the pipe."""
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] != kind:
            return
        conn.send(answer(message))


class ChildGone(ShoalError):
    """The child process exited (or its pipe broke) before it answered."""


class ChildProcess:
    """``target(conn, *args)`` in a child process named ``name`` (see the module docstring).

    The child reads requests from ``conn`` and answers each with one message; a ``("stop",)``
    message or the end of the pipe tells it to return.
    """

    def __init__(self, target: Callable[..., None], args: tuple, name: str) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=target, args=(child, *args), name=name,
                                    daemon=True)
        self._process.start()
        child.close()  # the child's end lives in the child only: its exit closes the pipe
        self._lock = threading.Lock()

    @property
    def exitcode(self) -> int | None:
        """The child's exit code, ``None`` while it runs."""
        return self._process.exitcode

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._process.pid

    @property
    def alive(self) -> bool:
        """Whether the child still runs."""
        return self._process.is_alive()

    def receive(self) -> Any:
        """The child's next message.

        Raises:
            ChildGone: the child exited first.
        """
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise ChildGone(f"the process exited (code {self._process.exitcode})") from None

    def request(self, message: tuple) -> Any:
        """Send ``message`` and return the child's answer (one request at a time).

        Raises:
            ChildGone: the child is gone, or went before it answered.
        """
        with self._lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # a broken or closed pipe
                raise ChildGone("the process is gone") from None
            return self.receive()

    def close(self, timeout: float = 10.0) -> None:
        """Tell the child to stop and wait for it (killed after ``timeout``); idempotent."""
        with self._lock:
            try:
                self._conn.send(("stop",))
            except (OSError, ValueError):
                pass
            self._conn.close()
        self._process.join(timeout=timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=timeout)
