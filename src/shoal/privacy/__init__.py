"""Privacy mechanisms: differential privacy (:mod:`.dp`), its accountant (:mod:`.accountant`)
and budget planning (:mod:`.planning`)."""

from __future__ import annotations

from shoal.privacy.accountant import (
    ACCOUNTANTS,
    SAMPLINGS,
    PrivacyLedger,
    RoundEvent,
    epsilon,
    event_epsilon,
)
from shoal.privacy.central import CentralDP, CentralDPState, RoundAccumulator, RoundResult
from shoal.privacy.dp import (
    DEFAULT_INITIAL_CLIP_NORM,
    AdaptiveClipping,
    ClipResult,
    LocalDP,
    Placement,
    add_gaussian_noise,
    clip_to_norm,
    gaussian_noise,
    next_clip_norm,
    noised_unclipped_fraction,
    secure_generator,
    update_noise_multiplier,
)
from shoal.privacy.planning import max_rounds, noise_multiplier_for, plan_check, privacy_report

__all__ = [
    # dp
    "DEFAULT_INITIAL_CLIP_NORM",
    "AdaptiveClipping",
    "CentralDP",
    "CentralDPState",
    "ClipResult",
    "LocalDP",
    "Placement",
    "RoundAccumulator",
    "RoundResult",
    "add_gaussian_noise",
    "clip_to_norm",
    "gaussian_noise",
    "next_clip_norm",
    "noised_unclipped_fraction",
    "secure_generator",
    "update_noise_multiplier",
    # accountant
    "ACCOUNTANTS",
    "SAMPLINGS",
    "PrivacyLedger",
    "RoundEvent",
    "epsilon",
    "event_epsilon",
    # planning
    "max_rounds",
    "noise_multiplier_for",
    "plan_check",
    "privacy_report",
]
