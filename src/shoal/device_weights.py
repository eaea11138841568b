"""How much weight one device's update may carry in the mean: :class:`WeightCap`.

FedAvg weighs an update by the example count its device claims, which the server cannot
check; the cap bounds what one device's claim can buy (``deploy.max_weight``,
``deploy.weight_cap_multiple``; see ``docs/security.md``). The gateway refreshes it as each
task opens and weighs every accepted update with it.
"""

from __future__ import annotations

import math

import numpy as np

from shoal.errors import ConfigError

__all__ = ["WeightCap"]


class WeightCap:
    """How much weight one device's update may carry: ``min(claimed examples, cap)``.

    FedAvg weighs each update by the example count its device claims, which the server
    cannot check: one device claiming 10^7 examples would take nearly all of the mean. The
    cap bounds every device's share:

    * ``max_weight > 0``: that, for everyone;
    * otherwise ``multiple`` x the median of the devices' sizes -- each device counted once,
      with what it declared when it said Hello (``capabilities["examples"]``) or, once it
      had an update accepted, the example count it claimed last -- when at least
      ``min_devices`` devices have a size; with fewer, no cap (only the validation's bound).

    A lying minority cannot move the median (half the devices would have to lie), so it
    cannot raise the cap; each liar's weight is at most ``multiple`` x a typical device's.
    The price is paid by honest devices above the cap, which count as if they had that many
    examples (see ``docs/security.md``). Devices without examples do not count towards the
    median. The cap changes only at :meth:`refresh` (the gateway calls it as a task opens),
    so every update of a task faces the same one.

    Sans-I/O and not thread-safe (the gateway calls it under its lock). Memory: one int per
    device with a size.

    Raises:
        ConfigError: ``max_weight`` < 0, ``multiple`` < 1 or not finite, ``min_devices`` < 1.
    """

    def __init__(self, max_weight: int = 0, multiple: float = 4.0, *,
                 min_devices: int = 3) -> None:
        if isinstance(max_weight, bool) or not isinstance(max_weight, int | np.integer) \
                or max_weight < 0:
            raise ConfigError(f"deploy.max_weight must be an int >= 0, got {max_weight!r}",
                              key="deploy.max_weight")
        self.max_weight = int(max_weight)
        if isinstance(multiple, bool) \
                or not isinstance(multiple, int | float | np.integer | np.floating) \
                or not (math.isfinite(multiple) and multiple >= 1):
            raise ConfigError(f"deploy.weight_cap_multiple must be a finite number >= 1, got "
                              f"{multiple!r}", key="deploy.weight_cap_multiple")
        self.multiple = float(multiple)
        if isinstance(min_devices, bool) or not isinstance(min_devices, int) or min_devices < 1:
            raise ConfigError(f"min_devices must be an int >= 1, got {min_devices!r}",
                              key="min_devices")
        self.min_devices = min_devices
        self._sizes: dict[str, int] = {}
        self._cap: int | None = self.max_weight or None

    @property
    def cap(self) -> int | None:
        """The weight no update exceeds now (``None``: not capped yet)."""
        return self._cap

    def note(self, device_id: str, examples: int) -> None:
        """Record ``device_id``'s size (declared, or claimed by an accepted update); it
        counts from the next :meth:`refresh`."""
        self._sizes[device_id] = int(examples)

    def refresh(self) -> int | None:
        """Recompute the derived cap from the sizes noted so far; returns :attr:`cap`."""
        if not self.max_weight:
            sizes = [n for n in self._sizes.values() if n > 0]
            self._cap = None if len(sizes) < self.min_devices else \
                max(1, math.floor(self.multiple * float(np.median(sizes))))
        return self._cap

    def weigh(self, claimed: int) -> int:
        """The weight an update claiming ``claimed`` examples carries."""
        return claimed if self._cap is None else min(int(claimed), self._cap)
