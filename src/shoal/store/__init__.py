"""Durable storage of models and run state: checkpoints and the versioned model store."""

from shoal.store.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shoal.store.model_versions import ModelVersion
from shoal.store.models import ModelStore

__all__ = ["Checkpoint", "ModelStore", "ModelVersion", "load_checkpoint", "save_checkpoint"]
