"""The client registry: who the devices are, when they are available, how they did.

:class:`Registry` is the interface; :class:`SQLiteRegistry` the embedded default. See
``docs/operations.md`` for the schema.
"""

from shoal.registry.base import (
    MINUTES_PER_WEEK,
    AttrValue,
    Device,
    Outcome,
    Registry,
    RegistryError,
    UnknownDevice,
    minute_of_week,
    outcome_kind,
    validate_attributes,
    validate_capabilities,
    validate_device_id,
    validate_outcome,
    validate_windows,
)
from shoal.registry.sqlite import SCHEMA_VERSION, SQLiteRegistry

__all__ = [
    "MINUTES_PER_WEEK",
    "SCHEMA_VERSION",
    "AttrValue",
    "Device",
    "Outcome",
    "Registry",
    "RegistryError",
    "SQLiteRegistry",
    "UnknownDevice",
    "minute_of_week",
    "outcome_kind",
    "validate_attributes",
    "validate_capabilities",
    "validate_device_id",
    "validate_outcome",
    "validate_windows",
]
