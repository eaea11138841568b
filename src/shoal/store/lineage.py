"""Lineage of a model version: where it came from and how it differs from another.

Every version in the :class:`~shoal.store.models.ModelStore` records its parent, the rounds
that produced it, the hash of the configuration it was trained under and the *training
plan* -- what a device needs to train it: the model architecture, the local training
hyperparameters, the strategy, the codecs and the privacy settings. The store derives the hash
and the plan from the checkpoint's ``meta["config"]`` (what
:meth:`~shoal.experiment.Experiment.checkpoint` writes), so every path that commits a model
(``shoal run``, the deployed aggregator) records them without doing anything.

Both are computed over :func:`canonical_json`: sorted keys, no whitespace, no NaN, so the
same configuration hashes (and signs, :mod:`shoal.lifecycle.signing`) the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["PLAN_SECTIONS", "canonical_json", "config_hash", "diff_versions",
           "plan_from_config"]

#: The configuration sections a device needs to train (the training plan).
PLAN_SECTIONS = ("model", "client", "strategy", "compression", "privacy")


def canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON bytes: sorted keys, compact separators, no NaN.

    Raises:
        ValueError: ``value`` holds a non-finite float or something JSON cannot hold.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=True).encode()


def config_hash(config: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the configuration's canonical JSON."""
    return hashlib.sha256(canonical_json(dict(config))).hexdigest()


def plan_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The training plan within a resolved configuration: its :data:`PLAN_SECTIONS`
    (sections a configuration does not have are left out)."""
    return {k: config[k] for k in PLAN_SECTIONS if k in config}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _changed(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None
             ) -> dict[str, list[Any]]:
    fa, fb = _flatten(a or {}), _flatten(b or {})
    return {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k)}


def diff_versions(store: Any, a: int, b: int) -> dict[str, Any]:
    """How version ``b`` of ``store`` differs from version ``a``.

    Args:
        store: a :class:`~shoal.store.models.ModelStore` (read-only is enough).
        a, b: version ids.

    Returns:
        A JSON-ready dict: ``metrics`` name -> ``[a, b, b - a]`` (``None`` where one side has
        no value), ``plan`` changed key path -> ``[a, b]``, ``same_config``, ``params``
        (``l2`` distance, ``max_abs`` difference and ``cosine`` similarity, or ``None`` when
        the models have different sizes), and ``common_ancestor`` (the newest version both
        descend from, or ``None``).

    Raises:
        UnknownVersion: no such version.
        DataError: a model file is missing or corrupt.
    """
    va, vb = store.get(a), store.get(b)
    pa, pb = store.load(a).state.params, store.load(b).state.params
    metrics: dict[str, list[float | None]] = {}
    for name in sorted(set(va.metrics) | set(vb.metrics)):
        x, y = va.metrics.get(name), vb.metrics.get(name)
        metrics[name] = [x, y, None if x is None or y is None else y - x]
    params: dict[str, float | None] | None = None
    if pa.shape == pb.shape:
        xa, xb = pa.astype(np.float64), pb.astype(np.float64)
        d = xb - xa
        na, nb = float(np.linalg.norm(xa)), float(np.linalg.norm(xb))
        cosine = float(xa @ xb / (na * nb)) if na > 0 and nb > 0 else math.nan
        params = {"l2": float(np.linalg.norm(d)),
                  "max_abs": float(np.abs(d).max()) if d.size else 0.0,
                  "cosine": cosine if math.isfinite(cosine) else None}
    seen = {v.id for v in store.lineage(a)}
    common = next((v.id for v in store.lineage(b) if v.id in seen), None)
    return {"a": a, "b": b, "metrics": metrics, "plan": _changed(va.plan, vb.plan),
            "same_config": va.config_hash is not None and va.config_hash == vb.config_hash,
            "params": params, "common_ancestor": common}
