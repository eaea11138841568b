"""The machinery under the typed sections: options, the :class:`Section` base, key lookup.

A section is a frozen dataclass whose fields are declared with :func:`option` (type from the
annotation; default, bounds, choices and a one-line doc in the field). The base class checks
every field when an instance is made, so a section built in code is as valid as one read from
a file, and offers the mapping interface (``section["key"]``) the rest of shoal reads.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

from shoal.errors import ConfigError

__all__ = ["Option", "Section", "option", "section", "options_of", "sections_of"]

S = TypeVar("S", bound="Section")
_MISSING = object()
#: every section class by name ("" is the top level), in the order they were declared
_SECTIONS: dict[str, type[Section]] = {}


@dataclasses.dataclass(frozen=True)
class Option:
    """One configuration key, as declared by :func:`option` on a section's field.

    Attributes:
        type: ``int``, ``float``, ``bool`` or ``str`` (the field's annotation).
        default: the value used when the key is absent.
        help: one line for the docs.
        choices: allowed values for a string option.
        min, max: inclusive bounds for numbers (``None`` = unbounded).
        min_exclusive: the lower bound itself is not allowed.
        max_exclusive: the upper bound itself is not allowed.
    """

    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False

    def allowed(self) -> str:
        """What the key accepts, in words: ``"an integer >= 1"``, ``"one of 'a', 'b'"``."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.type is bool:
            return "true or false"
        if self.type is str:
            return "a string"
        kind = "an integer" if self.type is int else "a number"
        lo = "" if self.min is None else (f"> {self.min}" if self.min_exclusive
                                          else f">= {self.min}")
        hi = "" if self.max is None else (f"< {self.max}" if self.max_exclusive
                                          else f"<= {self.max}")
        bounds = " and ".join(b for b in (lo, hi) if b)
        return f"{kind} {bounds}".strip()

    def check(self, key: str, value: Any) -> Any:
        """``value`` as stored (an int is accepted for a float).

        Raises:
            ConfigError: ``value`` has the wrong type, is not one of the choices or breaks a
                bound; the message names ``key`` and what :meth:`allowed` says.
        """
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                value = float(value)
                ok = math.isfinite(value)
        else:
            ok = isinstance(value, str)
        if ok and self.choices is not None:
            ok = value in self.choices
        if ok and self.min is not None:
            ok = value > self.min if self.min_exclusive else value >= self.min
        if ok and self.max is not None:
            ok = value < self.max if self.max_exclusive else value <= self.max
        if not ok:
            raise ConfigError(f"{key} = {value!r} is not allowed: it must be {self.allowed()}",
                              key=key)
        return value


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
           min: float | None = None, max: float | None = None, min_exclusive: bool = False,
           max_exclusive: bool = False) -> Any:
    """A section field: its default, one-line doc and what it allows (see :class:`Option`)."""
    return dataclasses.field(default=default, metadata={"option": {
        "help": help, "choices": choices, "min": min, "max": max,
        "min_exclusive": min_exclusive, "max_exclusive": max_exclusive}})


def section(name: str) -> Callable[[type[S]], type[S]]:
    """Class decorator: a frozen :class:`Section` dataclass read from the TOML table ``[name]``
    (``""``: the top level)."""
    def wrap(cls: type[S]) -> type[S]:
        # eq=False: equality is the Mapping's, so a section still equals the dict it replaced
        cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
        fields = dataclasses.fields(cls)
        clash = [f.name for f in fields if hasattr(Section, f.name)]
        if clash:
            raise TypeError(f"{cls.__name__}: field names {clash} hide Section methods")
        loose = [f.name for f in fields if f.name not in options_of(cls)
                 and f.name not in sections_of(cls)]
        if loose:
            raise TypeError(f"{cls.__name__}: fields {loose} are neither option() nor a section")
        cls._table = name
        _SECTIONS[name] = cls
        return cls
    return wrap


@functools.cache
def options_of(cls: type[Section]) -> dict[str, Option]:
    """The options (scalar fields) of a section class, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: Option(type=hints[f.name], default=f.default, **f.metadata["option"])
            for f in dataclasses.fields(cls) if "option" in f.metadata}


@functools.cache
def sections_of(cls: type[Section]) -> dict[str, type[Section]]:
    """The nested sections (fields typed with a :class:`Section` class) of a section class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], Section)}


def _dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _closest(word: str, candidates: list[str]) -> str | None:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


class Section(Mapping[str, Any]):
    """Base of the typed config sections: validation on construction, read as a mapping.

    ``section["key"]``, ``"key" in section``, ``dict(section)`` and ``section.items()`` work
    as they did on the plain dicts this replaces, and so does equality with a dict.
    """

    #: the TOML table it is read from ("" = the top level); set by :func:`section`
    _table: ClassVar[str]
    #: every subclass is a dataclass (:func:`section` makes it one); declared (not set) so
    #: type checkers accept sections wherever ``dataclasses`` functions take a dataclass
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        for key, opt in options_of(type(self)).items():
            value = opt.check(_dotted(self._table, key), getattr(self, key))
            object.__setattr__(self, key, value)
        for key, cls in sections_of(type(self)).items():
            if not isinstance(getattr(self, key), cls):
                raise ConfigError(f"[{key}] must be a {cls.__name__}, got "
                                  f"{type(getattr(self, key)).__name__}", key=key)

    # -- the mapping interface ------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key in options_of(type(self)) or key in sections_of(type(self)):
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(f.name for f in dataclasses.fields(self))

    def __len__(self) -> int:
        return len(dataclasses.fields(self))

    def __hash__(self) -> int:
        return hash(tuple(self.items()))

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value at a dotted key (``"lr"``, ``"client.lr"``, ``"client"``), or
        ``default`` if one is given and the key does not exist.

        Raises:
            ConfigError: the key does not exist and no default was given; the message
                suggests the closest existing key.
        """
        try:
            type(self).check_key(key, section_ok=True)
        except ConfigError:
            if default is _MISSING:
                raise
            return default
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts, as in the TOML file (top-level keys first)."""
        return {k: v.to_dict() if isinstance(v, Section) else v for k, v in self.items()}

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls: type[S], raw: Mapping[str, Any],
                     overrides: Mapping[str, Any] | None = None) -> S:
        """Validate a nested mapping (as read from TOML), apply dotted-key overrides
        (``{"client.lr": 0.1}``, as from ``--set``) and fill in defaults.

        The overrides are merged before anything is checked, so they may repair a
        combination the mapping alone would break.

        Raises:
            ConfigError: an unknown key or section, a wrong type or a value out of range; the
                message names the key and what is allowed, or the closest existing key.
        """
        merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
        for dotted, value in (overrides or {}).items():
            cls.check_key(dotted)
            *path, last = dotted.split(".")
            node = merged
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    break  # the mapping sets a section to a scalar: reported below
            else:
                node[last] = value
        values: dict[str, Any] = {}
        for key, value in merged.items():
            cls._resolve(key, nested=isinstance(value, Mapping))
            sub = sections_of(cls).get(key)
            values[key] = sub.from_mapping(value) if sub else value
        return cls(**values)

    def with_overrides(self: S, overrides: Mapping[str, Any]) -> S:
        """A copy with dotted-key overrides (``{"client.lr": 0.1}``) applied, re-validated.

        Raises:
            ConfigError: as :meth:`from_mapping`.
        """
        return type(self).from_mapping(self.to_dict(), overrides)

    @classmethod
    def check_key(cls, dotted: str, *, section_ok: bool = False) -> None:
        """Check that a dotted key names an option (or, with ``section_ok``, a section).

        Raises:
            ConfigError: it does not; an unknown name comes with the closest existing one.
        """
        node: type[Section] = cls
        *path, last = dotted.split(".")
        for part in path:
            node._resolve(part, nested=True)
            node = sections_of(node)[part]
        node._resolve(last, nested=False, allow_section=section_ok)

    @classmethod
    def _resolve(cls, key: str, *, nested: bool, allow_section: bool = False) -> None:
        """Check that ``key`` names an option (``nested`` False) or a section (True).

        Raises:
            ConfigError: it names neither, or the other kind; an unknown name comes with the
                closest existing one.
        """
        where = _dotted(cls._table, key)
        options, sections = options_of(cls), sections_of(cls)
        if key in options:
            if nested:
                raise ConfigError(f"{where} is a key, not a section", key=where)
            return
        if key in sections:
            if not nested and not allow_section:
                example = next(iter(options_of(sections[key])))
                raise ConfigError(f"[{where}] is a section: set its keys, e.g. "
                                  f"{where}.{example}", key=where)
            return
        if nested and sections:
            guess = _closest(key, list(sections))
            hint = f" — did you mean [{_dotted(cls._table, guess)}]?" if guess else ""
            raise ConfigError(f"unknown config section [{where}]{hint} (sections: "
                              f"{', '.join(sections)})", key=where)
        raise ConfigError(f"unknown config key {where!r}{_suggest(cls, key)} "
                          f"({_listing(cls)})", key=where)


#: Keys that moved, old -> new: a config using the old name is told where it went.
MOVED = {"deploy.selection": "sampling.selection",
         "deploy.stratify_by": "sampling.stratify_by"}


def _suggest(cls: type[Section], key: str) -> str:
    """`` — did you mean 'x.y'?``: where a moved key went, else the closest key in the same
    section, else in any (every section that has it, in alphabetical order: ``name`` is
    ``model.name``, ``output.name`` and ``strategy.name``, whichever section was declared
    first)."""
    moved = MOVED.get(_dotted(cls._table, key))
    if moved is not None:
        return f" — it moved to {moved!r}"
    guess = _closest(key, list(options_of(cls)))
    if guess is not None:
        return f" — did you mean {_dotted(cls._table, guess)!r}?"
    keys = sorted({k for sec in _SECTIONS.values() for k in options_of(sec)})
    guess = _closest(key, keys)
    if guess is None:
        return ""
    where = sorted(_dotted(name, guess) for name, sec in _SECTIONS.items()
                   if guess in options_of(sec))
    return f" — did you mean {' or '.join(repr(w) for w in where)}?"


def _listing(cls: type[Section]) -> str:
    keys = ", ".join(options_of(cls))
    if cls._table:
        return f"[{cls._table}] has: {keys}"
    return f"top-level keys: {keys}; the others belong in a [section]"
