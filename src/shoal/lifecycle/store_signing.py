"""The operator's signatures of model-store versions: made where the key is, never by serving.

A version is signed by whoever holds the operator's key -- the aggregator that commits it
(:func:`commit_signer`, passed to :meth:`ModelStore.commit <shoal.store.models.ModelStore.
commit>`), the canary launcher before it serves, or the operator by hand (``shoal models
sign VERSION --keys DIR``, :func:`sign_version`) -- and the signatures are kept beside the
version in the store's index. Serving (:mod:`shoal.transport.serving`) only reads them: a
version without a signature by the current key is not served.

Every signature names the store's series, ``served:<store id>``
(:func:`~shoal.lifecycle.signing.served_namespace`): the store id is a random 128-bit id
made the first time the store's versions are signed and kept in ``<store>/models/store_id``
(the store ignores files of other names), so two stores signed by the same operator -- or a
training run's versions, ``train:<run id>`` -- never vouch for each other's numbers.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from shoal.errors import DataError
from shoal.lifecycle.signing import Signer, served_namespace, version_signatures
from shoal.store import ModelStore
from shoal.store.atomic import fsync_dir
from shoal.store.model_versions import ModelVersion

__all__ = ["STORE_ID_FILE", "commit_signer", "sign_version", "store_id"]

STORE_ID_FILE = "store_id"
_ID = re.compile(r"^[0-9a-f]{32}$")


def store_id(store: ModelStore) -> str:
    """The store's random id (32 hex digits), made and kept the first time a writer asks.

    Raises:
        DataError: the id file is malformed, or a read-only store has none yet.
    """
    path = store.dir / STORE_ID_FILE
    if not path.exists():
        if store.readonly:
            raise DataError(f"the model store {store.dir} has no {STORE_ID_FILE} yet (none "
                            f"of its versions was signed)", path=str(path))
        temp = store.dir / f".{STORE_ID_FILE}.{secrets.token_hex(4)}"
        temp.write_text(secrets.token_hex(16) + "\n")
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(temp, path)  # atomic, and never replaces another writer's id
        except FileExistsError:
            pass
        finally:
            temp.unlink()
        fsync_dir(store.dir)
    text = path.read_text().strip()
    if not _ID.match(text):
        raise DataError(f"{path} is not a store id (32 hex digits)", path=str(path))
    return text


def commit_signer(signer: Signer, params: np.ndarray, store: ModelStore
                  ) -> Callable[[int, Mapping[str, Any] | None], dict[str, dict[str, str]]]:
    """The ``sign`` argument of ``store``'s :meth:`ModelStore.commit` for a model
    ``params``: signs its model and plan as the store's version once the id is
    allocated."""
    namespace = served_namespace(store_id(store))
    return lambda version, plan: version_signatures(signer, version, params, plan, namespace)


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
    return store.sign(version, version_signatures(signer, version, params, v.plan,
                                                  served_namespace(store_id(store))))
