"""The client registry: who the devices are, when they are available, how they did.

:class:`Registry` is the interface; :class:`SQLiteRegistry` the embedded default (see
``docs/operations.md`` for the schema), :class:`MemoryRegistry` the columnar one for
simulation, and :class:`shoal.registry.redis.RedisRegistry` one shared by several processes
(imported from its module: it needs the ``redis`` extra). All hand selection a
:class:`Columns` view.
"""

from shoal.registry.base import (
    Device,
    Outcome,
    Registry,
    UnknownDevice,
    minute_of_week,
    outcome_kind,
)
from shoal.registry.validation import (
    MINUTES_PER_WEEK,
    AttrValue,
    RegistryError,
    validate_attributes,
    validate_capabilities,
    validate_device_id,
    validate_outcome,
    validate_windows,
)
from shoal.registry.columns import Attribute, Columns, encode_ids, sequential_ids
from shoal.registry.memory import MemoryRegistry
from shoal.registry.sqlite import SCHEMA_VERSION, SQLiteRegistry

__all__ = [
    "MINUTES_PER_WEEK",
    "SCHEMA_VERSION",
    "AttrValue",
    "Attribute",
    "Columns",
    "Device",
    "MemoryRegistry",
    "Outcome",
    "Registry",
    "RegistryError",
    "SQLiteRegistry",
    "UnknownDevice",
    "encode_ids",
    "minute_of_week",
    "outcome_kind",
    "sequential_ids",
    "validate_attributes",
    "validate_capabilities",
    "validate_device_id",
    "validate_outcome",
    "validate_windows",
]
