"""Revoked device tokens: the list an aggregator refuses, and the file it re-reads live.

A :class:`RevocationList` holds revoked token ids (the ``jti`` of
:class:`~shoal.transport.tokens.Claims`), each until the token it names has expired;
:func:`~shoal.transport.tokens.verify_token` refuses them with reason ``"revoked"``. A running
aggregator enforces a :class:`RevocationFile` that ``shoal revoke`` changes without a restart.
See ``docs/security.md``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from shoal.errors import ConfigError
from shoal.transport.auth import CredentialFileError
from shoal.transport.tokens import is_int, is_token_id, strict_json

__all__ = ["RevocationList", "RevocationFile"]

_log = logging.getLogger("shoal.auth")


@dataclass(frozen=True)
class RevocationList:
    """Revoked token ids, each kept until the token it names has expired.

    Immutable: :meth:`revoke` and :meth:`prune` return new lists. Serialises to JSON
    (:meth:`to_json` / :meth:`from_json`) for the store.
    """

    entries: Mapping[str, int] = field(default_factory=dict)
    """jti → the token's ``exp``."""

    def __post_init__(self) -> None:
        for jti, exp in self.entries.items():
            if not is_token_id(jti) or not is_int(exp):
                raise ConfigError(f"revocation entry {jti!r}: {exp!r} is not a token id "
                                  f"with an integer expiry", key="entries")
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))

    def __contains__(self, jti: object) -> bool:
        return jti in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def revoke(self, jti: str, exp: int) -> RevocationList:
        """A new list that also revokes token ``jti`` (expiring at ``exp``; from its claims)."""
        return RevocationList({**self.entries, jti: exp})

    def prune(self, now: float, leeway_seconds: float = 60.0) -> RevocationList:
        """A new list without the entries whose tokens fail as expired at ``now`` anyway (use
        the same leeway as :func:`verify_token`)."""
        return RevocationList({j: e for j, e in self.entries.items()
                               if now < e + leeway_seconds})

    def to_json(self) -> str:
        return json.dumps({"v": 1, "revoked": dict(sorted(self.entries.items()))},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RevocationList:
        """Parse :meth:`to_json` output.

        Raises:
            ConfigError: the text is not a version-1 revocation list.
        """
        try:
            obj = strict_json(text)
        except ValueError as exc:
            raise ConfigError(f"revocation list is not valid JSON: {exc}") from None
        if (not isinstance(obj, dict) or obj.keys() != {"v", "revoked"} or obj["v"] != 1
                or not isinstance(obj["revoked"], dict)):
            raise ConfigError('revocation list must be {"v": 1, "revoked": {jti: exp}}')
        return cls(obj["revoked"])


class RevocationFile:
    """The revocation list a running aggregator enforces, kept in a JSON file that the
    operator changes (``shoal revoke``) without restarting it.

    :meth:`current` re-reads the file at most every ``check_every_s`` seconds (timed with a
    monotonic clock) and takes the new list when its bytes changed. A file that does not
    exist at start is an empty list. Afterwards nothing un-revokes a token by accident: a
    missing, unreadable or malformed file keeps the last good list, with ``last_error``
    saying why (and a warning in the log); to clear the list, write an empty one.

    Raises:
        CredentialFileError: the file exists at construction but is not a revocation list.
    """

    def __init__(self, path: str | os.PathLike[str], *, check_every_s: float = 1.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.check_every_s = check_every_s
        self.last_error: str | None = None
        self._monotonic = monotonic
        self._bytes: bytes | None = None
        self._list = RevocationList()
        self._checked = monotonic()
        try:
            self._bytes = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise CredentialFileError(f"cannot read revocation list {self.path}: {exc}",
                                      self.path) from None
        try:
            self._list = self._parse(self._bytes)
        except ConfigError as exc:
            raise CredentialFileError(f"revocation list {self.path}: {exc}",
                                      self.path) from None

    @staticmethod
    def _parse(data: bytes) -> RevocationList:
        try:
            return RevocationList.from_json(data.decode("utf-8"))
        except (UnicodeDecodeError, RecursionError) as exc:
            raise ConfigError(f"not a revocation list ({type(exc).__name__})") from None

    def _refresh(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            self._failed("missing" if isinstance(exc, FileNotFoundError) else str(exc))
            return
        if data == self._bytes:
            return
        try:
            self._list = self._parse(data)
        except ConfigError as exc:
            self._failed(str(exc))
            return
        self._bytes, self.last_error = data, None

    def _failed(self, why: str) -> None:
        if self._bytes is None and why == "missing":
            return  # never existed: nothing revoked yet
        if why != self.last_error:
            _log.warning("revocation list %s: %s; keeping the last good list (%d tokens)",
                         self.path, why, len(self._list))
        self.last_error = why

    def current(self) -> RevocationList:
        """The list in force. Reloads are paced by a monotonic clock, so a wall clock
        stepped backwards cannot stall them."""
        t = self._monotonic()
        if t - self._checked >= self.check_every_s:
            self._checked = t
            self._refresh()
        return self._list
