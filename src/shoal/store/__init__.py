"""Durable storage of models and run state: checkpoints and the versioned model store
(:class:`Store`, implemented by :class:`ModelStore`: immutable versions, several writers, a
compare-and-set production pointer)."""

from shoal.store.base import Store
from shoal.store.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shoal.store.model_versions import ModelVersion, PointerMoved
from shoal.store.models import ModelStore

__all__ = ["Checkpoint", "ModelStore", "ModelVersion", "PointerMoved", "Store",
           "load_checkpoint", "save_checkpoint"]
