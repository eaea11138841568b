"""The operator's signatures of model-store versions: made where the key is, never by serving.

A version is signed by whoever holds the operator's key -- the aggregator that commits it
(:func:`commit_signer`, passed to :meth:`ModelStore.commit <shoal.store.models.ModelStore.
commit>`), the canary launcher before it serves, or the operator by hand (``shoal models
sign VERSION --keys DIR``, :func:`sign_version`) -- and the signatures are kept beside the
version in the store's index. Serving (:mod:`shoal.transport.serving`) only reads them: a
version without a signature by the current key is not served.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from shoal.lifecycle.signing import Signer, version_signatures
from shoal.store import ModelStore
from shoal.store.model_versions import ModelVersion

__all__ = ["commit_signer", "sign_version"]


def commit_signer(signer: Signer, params: np.ndarray
                  ) -> Callable[[int, Mapping[str, Any] | None], dict[str, dict[str, str]]]:
    """The ``sign`` argument of :meth:`ModelStore.commit` for a model ``params``: signs its
    model and plan once the store has allocated the version id."""
    return lambda version, plan: version_signatures(signer, version, params, plan)


def sign_version(store: ModelStore, signer: Signer, version: int) -> ModelVersion:
    """Sign ``version``'s model (the bytes the store holds, checked against its digest) and
    its plan with ``signer``, and keep the signatures in the store (replacing those of
    another key).

    Raises:
        UnknownVersion: no such version.
        DataError: its model file is missing or corrupt (nothing is signed).
        ModelStoreError: the store is read-only.
    """
    v = store.get(version)
    params = np.asarray(store.load(version).state.params, np.float32)
    return store.sign(version, version_signatures(signer, version, params, v.plan))
