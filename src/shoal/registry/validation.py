"""What a registry accepts: the bounds and checks of every field a device record carries.

Every registry implementation (:mod:`shoal.registry.sqlite`, :mod:`shoal.registry.memory`,
:mod:`shoal.registry.redis`) and every caller that forwards device-supplied fields (the
transport's hello, the client CLI) validates with these functions, so all of them refuse
exactly the same inputs with the same messages: device ids, attributes, capabilities,
availability windows, outcomes, rounds, times, and the ``limit``/``batch_size`` of a query.
Each check returns the value in its stored form (a plain copy, numpy scalars converted) or
raises :class:`RegistryError` naming the device and the offending field, before anything is
changed. :func:`to_json` and :func:`enrolment_json` give the canonical JSON the stored
registries keep.

The records and the interface built on these checks are in :mod:`shoal.registry.base`.
"""

from __future__ import annotations

import builtins
import collections
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from shoal.errors import ShoalError

__all__ = [
    "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTE_STR",
    "MAX_CAPABILITIES_BYTES",
    "MAX_ID_LENGTH",
    "MAX_REASON_LENGTH",
    "MAX_WINDOWS",
    "MINUTES_PER_WEEK",
    "AttrValue",
    "RegistryError",
    "check_batch_size",
    "check_limit",
    "enrolment_json",
    "to_json",
    "validate_attributes",
    "validate_capabilities",
    "validate_device_id",
    "validate_device_ids",
    "validate_outcome",
    "validate_windows",
]


#: Minutes in a week; availability windows live in ``[0, MINUTES_PER_WEEK]``.
MINUTES_PER_WEEK = 7 * 24 * 60
#: Longest accepted device id (characters).
MAX_ID_LENGTH = 128
#: Most attributes one device may carry.
MAX_ATTRIBUTES = 64
#: Longest string attribute value (characters).
MAX_ATTRIBUTE_STR = 256
#: Most availability windows one device may declare.
MAX_WINDOWS = 64
#: Largest capabilities document, as compact JSON (bytes).
MAX_CAPABILITIES_BYTES = 16_384
#: Longest rejection reason in an outcome (characters).
MAX_REASON_LENGTH = 64

#: An attribute value: what selection can stratify and filter on.
AttrValue = Union[str, int, float]

# Attribute names double as JSON-path keys in the SQL store: keep them to a plain alphabet.
_ATTR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}\Z")
_OUTCOMES = ("accepted", "dropped", "late")
_REJECTED = "rejected:"


class RegistryError(ShoalError):
    """A registry input is invalid, or an operation cannot be applied; nothing was changed.

    Attributes:
        device_id: the device concerned, when known.
        field: the offending field (``"attributes.region"``, ``"windows[2]"``), when known.
    """

    def __init__(self, message: str, *, device_id: str | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.device_id = device_id
        self.field = field


def _check_time(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegistryError(f"{name} must be a finite number of seconds, got {value!r}",
                            field=name)
    return float(value)


def validate_device_id(device_id: object) -> str:
    """Return ``device_id`` if it is a non-empty printable string of at most 128 characters.

    Raises:
        RegistryError: it is not a string, is empty, too long, or has control characters.
    """
    if not isinstance(device_id, str):
        raise RegistryError(f"device_id must be a string, got {type(device_id).__name__}",
                            field="device_id")
    if not 1 <= len(device_id) <= MAX_ID_LENGTH:
        raise RegistryError(f"device_id must have 1 to {MAX_ID_LENGTH} characters, got "
                            f"{len(device_id)}", field="device_id")
    if not device_id.isprintable():
        raise RegistryError(f"device_id {device_id!r} contains non-printable characters",
                            field="device_id")
    return device_id


def validate_device_ids(device_ids: Sequence[str] | Sequence[bytes] | np.ndarray
                        ) -> builtins.list[str]:
    """The ids of a bulk call as strings (UTF-8 bytes and numpy arrays accepted), each
    checked by :func:`validate_device_id`.

    Raises:
        RegistryError: an id is invalid, or appears twice.
    """
    raw = device_ids.tolist() if isinstance(device_ids, np.ndarray) else device_ids
    ids = [validate_device_id(i.decode() if isinstance(i, bytes) else i) for i in raw]
    if len(set(ids)) != len(ids):
        twice = next(i for i, c in collections.Counter(ids).items() if c > 1)
        raise RegistryError(f"device {twice!r} appears twice among the ids",
                            field="device_ids")
    return ids


def check_batch_size(batch_size: object) -> int:
    """``batch_size`` of :meth:`Registry.scan`. Raises :class:`RegistryError` unless an
    int >= 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RegistryError(f"batch_size must be an int >= 1, got {batch_size!r}",
                            field="batch_size")
    return batch_size


def check_limit(limit: object) -> int | None:
    """``limit`` of :meth:`Registry.list`. Raises :class:`RegistryError` unless ``None`` or
    an int >= 0."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 0):
        raise RegistryError(f"limit must be an int >= 0 or None, got {limit!r}",
                            field="limit")
    return limit


def _attr_value(value: object, where: str, device_id: str | None) -> AttrValue:
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()  # numpy scalars are stored as the Python number they hold
    # bool is an int subclass but would come back from JSON as true/false and compare as 1/0.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RegistryError(f"{where} must be a str, int or float, got "
                            f"{type(value).__name__}", device_id=device_id, field=where)
    if isinstance(value, float) and not math.isfinite(value):
        raise RegistryError(f"{where} must be finite, got {value!r}", device_id=device_id,
                            field=where)
    if isinstance(value, str) and len(value) > MAX_ATTRIBUTE_STR:
        raise RegistryError(f"{where} is {len(value)} characters long, at most "
                            f"{MAX_ATTRIBUTE_STR} allowed", device_id=device_id, field=where)
    return value


def validate_attributes(attributes: Mapping[str, object] | None, *,
                        device_id: str | None = None) -> dict[str, AttrValue]:
    """Return a plain copy of ``attributes`` after checking names and values.

    Names match ``[A-Za-z_][A-Za-z0-9_-]{0,63}``; values are ``str`` (at most 256 characters),
    ``int`` or finite ``float`` (numpy scalars are converted), not ``bool``; at most 64
    attributes.

    Raises:
        RegistryError: naming the offending attribute.
    """
    if attributes is None:
        return {}
    if not isinstance(attributes, Mapping):
        raise RegistryError(f"attributes must be a mapping, got {type(attributes).__name__}",
                            device_id=device_id, field="attributes")
    if len(attributes) > MAX_ATTRIBUTES:
        raise RegistryError(f"a device may carry at most {MAX_ATTRIBUTES} attributes, got "
                            f"{len(attributes)}", device_id=device_id, field="attributes")
    out: dict[str, AttrValue] = {}
    for name, value in attributes.items():
        if not isinstance(name, str) or not _ATTR_NAME.match(name):
            raise RegistryError(f"attribute name {name!r} must match [A-Za-z_][A-Za-z0-9_-]* "
                                "and have at most 64 characters", device_id=device_id,
                                field="attributes")
        out[name] = _attr_value(value, f"attributes.{name}", device_id)
    return out


def validate_capabilities(capabilities: Mapping[str, Any] | None, *,
                          device_id: str | None = None) -> dict[str, Any]:
    """Return a deep copy of ``capabilities`` (a JSON object, at most 16 KiB as JSON).

    Raises:
        RegistryError: not a mapping with string keys, not JSON-serializable (or non-finite
            numbers), or too large.
    """
    if capabilities is None:
        return {}
    if not isinstance(capabilities, Mapping):
        raise RegistryError(f"capabilities must be a mapping, got "
                            f"{type(capabilities).__name__}", device_id=device_id,
                            field="capabilities")
    try:
        text = json.dumps(dict(capabilities), allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"capabilities must be plain JSON (str keys, finite numbers): {exc}",
                            device_id=device_id, field="capabilities") from None
    if len(text.encode()) > MAX_CAPABILITIES_BYTES:
        raise RegistryError(f"capabilities take {len(text.encode())} bytes as JSON, at most "
                            f"{MAX_CAPABILITIES_BYTES} allowed", device_id=device_id,
                            field="capabilities")
    copy = json.loads(text)
    if set(copy) != set(capabilities):  # json.dumps coerces int keys to str silently
        raise RegistryError("capabilities keys must be strings", device_id=device_id,
                            field="capabilities")
    return copy


def validate_windows(windows: Sequence[Sequence[int]] | None, *,
                     device_id: str | None = None) -> tuple[tuple[int, int], ...]:
    """Return the windows as a tuple of ``(start, end)`` int pairs after checking bounds.

    ``start`` must lie in ``[0, 10080)``, ``end`` in ``[0, 10080]`` and differ from ``start``;
    ``end < start`` wraps around the end of the week. At most 64 windows.

    Raises:
        RegistryError: naming the offending window and the bound it breaks.
    """
    if windows is None:
        return ()
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence):
        raise RegistryError(f"windows must be a sequence of (start, end) pairs, got "
                            f"{type(windows).__name__}", device_id=device_id, field="windows")
    if len(windows) > MAX_WINDOWS:
        raise RegistryError(f"a device may declare at most {MAX_WINDOWS} windows, got "
                            f"{len(windows)}", device_id=device_id, field="windows")
    out = []
    for i, window in enumerate(windows):
        where = f"windows[{i}]"
        if isinstance(window, (str, bytes)) or not isinstance(window, Sequence) \
                or len(window) != 2:
            raise RegistryError(f"{where} must be a (start, end) pair, got {window!r}",
                                device_id=device_id, field=where)
        start, end = window
        for name, v in (("start", start), ("end", end)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise RegistryError(f"{where}.{name} must be an int minute of the week, got "
                                    f"{v!r}", device_id=device_id, field=where)
        if not 0 <= start < MINUTES_PER_WEEK:
            raise RegistryError(f"{where}.start = {start} must be in [0, {MINUTES_PER_WEEK})",
                                device_id=device_id, field=where)
        if not 0 <= end <= MINUTES_PER_WEEK:
            raise RegistryError(f"{where}.end = {end} must be in [0, {MINUTES_PER_WEEK}]",
                                device_id=device_id, field=where)
        if start == end:
            raise RegistryError(f"{where} = ({start}, {end}) is empty; use (0, "
                                f"{MINUTES_PER_WEEK}) for 'always'", device_id=device_id,
                                field=where)
        out.append((int(start), int(end)))
    return tuple(out)


def to_json(value: object) -> str:
    """A field as a stored registry keeps it: canonical JSON (sorted keys, no spaces, no
    NaN)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


def enrolment_json(device_id: str, attributes: Mapping[str, Any] | None,
                   capabilities: Mapping[str, Any] | None,
                   windows: Sequence[Sequence[int]] | None
                   ) -> tuple[str | None, str | None, str | None]:
    """An enrolment's attributes, capabilities and windows, each validated and as stored
    JSON, ``None`` where not given (the stored value is then kept).

    Raises:
        RegistryError: a value out of bounds, naming the device and the field.
    """
    return (None if attributes is None
            else to_json(validate_attributes(attributes, device_id=device_id)),
            None if capabilities is None
            else to_json(validate_capabilities(capabilities, device_id=device_id)),
            None if windows is None
            else to_json(validate_windows(windows, device_id=device_id)))


def validate_outcome(outcome: object, *, device_id: str | None = None) -> str:
    """Return ``outcome`` if it is ``accepted``, ``dropped``, ``late`` or ``rejected:<reason>``.

    The reason is 1 to 64 printable characters, e.g. ``UpdateRejected.reason``
    (``"rejected:non_finite"``).

    Raises:
        RegistryError: any other value.
    """
    if isinstance(outcome, str):
        if outcome in _OUTCOMES:
            return outcome
        reason = outcome[len(_REJECTED):]
        if outcome.startswith(_REJECTED) and 1 <= len(reason) <= MAX_REASON_LENGTH \
                and reason.isprintable():
            return outcome
    raise RegistryError(f"outcome must be 'accepted', 'dropped', 'late' or "
                        f"'rejected:<reason>' (reason 1-{MAX_REASON_LENGTH} printable "
                        f"characters), got {outcome!r}", device_id=device_id, field="outcome")


def _validate_round(round: object) -> int:
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise RegistryError(f"round must be an int >= 0, got {round!r}", field="round")
    return round
