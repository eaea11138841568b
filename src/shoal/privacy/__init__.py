"""Privacy mechanisms: differential privacy (:mod:`.dp`) and its accountant (:mod:`.accountant`)."""

from __future__ import annotations

from shoal.privacy.accountant import (
    ACCOUNTANTS,
    SAMPLINGS,
    PrivacyLedger,
    RoundEvent,
    epsilon,
    event_epsilon,
    max_rounds,
    noise_multiplier_for,
    plan_check,
    privacy_report,
)
from shoal.privacy.dp import (
    DEFAULT_INITIAL_CLIP_NORM,
    AdaptiveClipping,
    CentralDP,
    CentralDPState,
    ClipResult,
    DistributedDP,
    LocalDP,
    Placement,
    RoundAccumulator,
    RoundResult,
    add_gaussian_noise,
    clip_to_norm,
    gaussian_noise,
    next_clip_norm,
    noised_unclipped_fraction,
    secure_generator,
    update_noise_multiplier,
)

__all__ = [
    # dp
    "DEFAULT_INITIAL_CLIP_NORM",
    "AdaptiveClipping",
    "CentralDP",
    "CentralDPState",
    "ClipResult",
    "DistributedDP",
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
    "max_rounds",
    "noise_multiplier_for",
    "plan_check",
    "privacy_report",
]
