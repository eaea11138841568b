"""The run's model, in a process of its own, for the processes that serve devices.

An aggregator needs three things from the model: its parameter layout (the update length
every upload is checked against, and the fingerprint devices compare), its initial
parameters, and central evaluation of each committed version on the test set. All three
need the model's framework (PyTorch), and the test set; none needs them *in* the process
that ingests updates. :class:`ModelHost` starts a child process that loads the data, builds
the model (:func:`~shoal.models.build_model`, seeded as the simulator builds it, so the
initial parameters are the same), sends back the layout and the initial parameters and then
evaluates versions on request. With it (``deploy.model_process``) the serving process never
imports PyTorch nor opens the training set: PyTorch's ~190 MB of resident memory and its
import move to the child (the two processes together hold about as much as one would, plus
an interpreter: ~80 MB), and an evaluation runs on the child's interpreter, not beside the
gRPC event loop under one GIL. A cluster's ingest node asks one for the layout only
(``evaluates=False``: the child exits at once).

Evaluations are serialized (one pipe); :meth:`ModelHost.evaluate` may be called from any
thread. The child exits when the host is closed or its parent goes away (the pipe closes).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import numpy as np

from shoal.child_process import ChildGone, ChildProcess, answer_requests
from shoal.config import Config
from shoal.errors import ConfigError, DataError, ShoalError, SpecError
from shoal.params import ParamSpec

__all__ = ["ModelHost"]

# the errors without extra fields the child may raise, sent back by name, raised again here
_ERRORS: dict[str, type[ShoalError]] = {e.__name__: e for e in (SpecError, ShoalError)}


def _error(exc: BaseException) -> tuple[str, str, str, str | None]:
    """A child's error as a message: its class name, text and key (or path); an error that
    is not shoal's own comes back as a :class:`~shoal.errors.ShoalError` naming its type."""
    if isinstance(exc, ShoalError):
        return ("error", type(exc).__name__, str(exc),
                getattr(exc, "key", None) or getattr(exc, "path", None))
    return ("error", "ShoalError", f"the model process failed: {type(exc).__name__}: {exc}",
            None)


#: (input features, classes) of the datasets whose shapes are known without loading them
_KNOWN_SHAPES = {"fashion-mnist": (784, 10)}


def _serve(conn: Any, cfg: Config, threads: int, evaluates: bool) -> None:
    """The child: build the model (and with ``evaluates`` load the test set), send
    ``("ready", spec, initial parameters)``, then answer ``("evaluate", params)`` with
    ``("metrics", dict)`` until told to stop or the parent goes away."""
    # Ctrl-C reaches the whole process group: the parent stops, then closes this process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        from shoal.build import load_data
        from shoal.frameworks.torch import FlatModule
        from shoal.models import build_model
        from shoal.training import evaluate

        torch.set_num_threads(threads)
        shape = None if evaluates else _KNOWN_SHAPES.get(cfg["data"]["dataset"])
        test = None
        if shape is None:  # the data says (a synthetic task), or it is needed
            data = load_data(cfg)
            shape = (int(np.prod(data.train.x.shape[1:])), data.train.num_classes)
            test = data.test if evaluates else None
            del data  # the test set is all an evaluation needs
        model = FlatModule(build_model(cfg["model"]["name"], shape[0], shape[1], cfg.seed))
        conn.send(("ready", model.spec, model.get()))
        if test is None:
            return
        x, y = torch.from_numpy(test.x), torch.from_numpy(test.y)
    except Exception as exc:  # sent to the parent, which raises it
        conn.send(_error(exc))
        return

    def evaluated(message: tuple) -> tuple:
        try:
            return ("metrics", evaluate(model, message[1], x, y))
        except Exception as exc:  # the parent raises it; the process answers on
            return _error(exc)

    answer_requests(conn, "evaluate", evaluated)


class ModelHost:
    """The model's child process (see the module docstring).

    Args:
        cfg: the run's configuration (``model``, ``data``, ``seed``).
        threads: PyTorch threads the child evaluates with.
        evaluates: ``False``: the layout and initial parameters only; the child then exits
            at once, and needs no data for a dataset whose shapes are known (Fashion-MNIST):
            what a cluster's ingest node asks.

    Attributes:
        spec: the model's parameter layout.
        initial_params: its initial parameters (float32, read-only).

    Raises:
        ShoalError: the child could not build the model or load the data (its
            :class:`~shoal.errors.ConfigError` or :class:`~shoal.errors.DataError` raised
            again here, any other error as a ``ShoalError`` naming its type), or it died
            before it was ready.
    """

    def __init__(self, cfg: Config, *, threads: int = 1, evaluates: bool = True) -> None:
        self._child = ChildProcess(_serve, (cfg, int(threads), bool(evaluates)),
                                   "shoal-model")
        try:
            reply = self._answer(self._child.receive)
        except ShoalError:
            self.close()
            raise
        if not evaluates:
            self.close()
        self.spec: ParamSpec = reply[1]
        self.initial_params: np.ndarray = reply[2]
        self.initial_params.flags.writeable = False

    @property
    def exitcode(self) -> int | None:
        """The child's exit code, ``None`` while it runs."""
        return self._child.exitcode

    def evaluate(self, params: np.ndarray) -> dict[str, float]:
        """Central evaluation of ``params`` on the test set (accuracy, loss, ...).

        Raises:
            ShoalError: the child refused them (e.g. a wrong length) or is gone.
        """
        reply = self._answer(lambda: self._child.request(("evaluate", np.asarray(params))))
        return dict(reply[1])

    @staticmethod
    def _answer(call: Callable[[], tuple]) -> tuple:
        """The child's answer to ``call``, its error raised as the child's type."""
        try:
            reply = call()
        except ChildGone as exc:
            raise ShoalError(f"the model process is gone: {exc}") from None
        if reply[0] == "error":
            _, name, message, where = reply
            if name == "ConfigError":
                raise ConfigError(message, key=where)
            if name == "DataError":
                raise DataError(message, path=where)
            raise _ERRORS.get(name, ShoalError)(message)
        return reply

    def close(self) -> None:
        """Stop the child (idempotent)."""
        self._child.close()

    def __enter__(self) -> ModelHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
