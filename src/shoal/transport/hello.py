"""What a device declares when it says Hello, checked before anything is stored.

A ``HelloRequest`` carries the device's attributes (for stratified selection), capabilities,
availability windows and runtime version. :func:`read_hello` checks every field with the
registry's own validators (:mod:`shoal.registry.validation`) and the two the aggregator reads
itself:

* ``runtime_version``: empty (unknown) or ``NAME/MAJOR`` (``shoal-client/3``). Only a
  runtime known to clip its update to ``Task.clip_norm`` (:func:`clips_updates`:
  ``shoal-client/3`` or later) is given a task that asks for it (central differential
  privacy); an older one is refused with ``runtime_too_old``.
* ``capabilities["examples"]``: the device's number of training examples (a decimal
  integer), the size the per-device weight cap is derived from
  (:class:`~shoal.device_weights.WeightCap`).
* ``capabilities["tasks"]``: the task kinds the device does (``"train,evaluate"``). Only a
  runtime that fetches the served model, verifies it and reports with the task's id and key
  (:func:`evaluates`: ``shoal-client/4`` or later, declaring ``evaluate``) is given
  evaluation tasks. Only a runtime that calls ``Heartbeat`` while it carries out a task
  (:func:`heartbeats`: ``shoal-client/5`` or later) is asked to (``Task.heartbeat_s``) and
  judged absent when it falls silent.

An invalid field raises :class:`InvalidHello` naming it; the server answers
``INVALID_ARGUMENT`` with ``"<field>: <what is wrong>"`` and stores nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.errors import ShoalError
from shoal.registry.validation import (AttrValue, RegistryError, validate_attributes,
                                       validate_capabilities, validate_windows)

__all__ = ["CLIPPING_RUNTIME", "EVALUATING_RUNTIME", "HEARTBEATING_RUNTIME", "Hello",
           "InvalidHello", "clips_updates", "evaluates", "heartbeats", "read_hello"]

CLIPPING_RUNTIME = ("shoal-client", 3)
"""The first runtime that clips to ``Task.clip_norm`` and weighs the update 1."""
EVALUATING_RUNTIME = ("shoal-client", 4)
"""The first runtime that answers evaluation tasks of the served model (``ReportEvaluation``
with the task's id and key) and verifies signed models."""
HEARTBEATING_RUNTIME = ("shoal-client", 5)
"""The first runtime that calls ``Heartbeat`` every ``Task.heartbeat_s`` during a task."""

_RUNTIME = re.compile(r"([A-Za-z0-9._-]{1,64})/([0-9]{1,9})")
_MAX_EXAMPLES = 10**12


class InvalidHello(ShoalError):
    """A Hello field is invalid; nothing was stored.

    Attributes:
        field: the offending field (``"attributes.os"``, ``"windows[2]"``,
            ``"runtime_version"``, ``"capabilities.examples"``).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Hello:
    """A checked Hello: what the registry stores and what the aggregator reads."""

    attributes: dict[str, AttrValue]
    capabilities: dict[str, Any]
    windows: tuple[tuple[int, int], ...]
    runtime_version: str
    examples: int | None


def read_hello(device_id: str, attributes: Mapping[str, str],
               capabilities: Mapping[str, str], windows: Sequence[tuple[int, int]],
               runtime_version: str) -> Hello:
    """Check a Hello's fields.

    Returns:
        The :class:`Hello`; its capabilities include ``runtime_version`` when one was sent
        (so the registry remembers it across aggregator restarts).

    Raises:
        InvalidHello: naming the first invalid field.
    """
    if runtime_version and not _RUNTIME.fullmatch(runtime_version):
        raise InvalidHello("runtime_version", f"{runtime_version[:80]!r} is not NAME/MAJOR "
                           f"(e.g. 'shoal-client/3')")
    examples = None
    if "examples" in capabilities:
        text = capabilities["examples"]
        if not (text.isascii() and text.isdigit() and int(text) <= _MAX_EXAMPLES):
            raise InvalidHello("capabilities.examples", f"{text[:80]!r} is not a whole number "
                               f"of training examples in [0, {_MAX_EXAMPLES}]")
        examples = int(text)
    caps = dict(capabilities)
    if runtime_version:
        caps["runtime_version"] = runtime_version
    try:
        return Hello(validate_attributes(attributes, device_id=device_id),
                     validate_capabilities(caps, device_id=device_id),
                     validate_windows(list(windows), device_id=device_id),
                     runtime_version, examples)
    except RegistryError as exc:
        raise InvalidHello(exc.field or "request", str(exc)) from None


def _at_least(runtime_version: str | None, first: tuple[str, int]) -> bool:
    match = _RUNTIME.fullmatch(runtime_version or "")
    if match is None:
        return False
    name, major = match.group(1), int(match.group(2))
    return name == first[0] and major >= first[1]


def clips_updates(runtime_version: str | None) -> bool:
    """Whether a device running ``runtime_version`` clips its update to ``Task.clip_norm``
    (``None`` or ``""``: unknown, so no)."""
    return _at_least(runtime_version, CLIPPING_RUNTIME)


def heartbeats(runtime_version: str | None) -> bool:
    """Whether a device running ``runtime_version`` calls ``Heartbeat`` as
    ``Task.heartbeat_s`` asks (``None`` or ``""``: unknown, so no)."""
    return _at_least(runtime_version, HEARTBEATING_RUNTIME)


def evaluates(capabilities: Mapping[str, Any]) -> bool:
    """Whether a device with these (stored) capabilities answers evaluation tasks: its
    runtime is :data:`EVALUATING_RUNTIME` or later and its ``tasks`` include ``evaluate``."""
    tasks = str(capabilities.get("tasks", "")).split(",")
    return "evaluate" in tasks and _at_least(str(capabilities.get("runtime_version", "")),
                                              EVALUATING_RUNTIME)
