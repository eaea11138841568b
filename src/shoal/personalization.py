"""Personalization: what one client computes when part of its model is its own.

* **FedPer** (Arivazhagan et al., "Federated Learning with Personalization Layers", 2019):
  the body (all layers but the last) is trained federatedly, the head (the last layer) is
  each client's own; locally both are trained together for the round's epochs.
* **FedRep** (Collins et al., "Exploiting Shared Representations for Personalized Federated
  Learning", ICML 2021): locally the head is trained first with the body frozen
  (``head_epochs``), then the body with the new head frozen (``body_epochs``); only the body
  is aggregated.
* **Ditto** (Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization",
  ICML 2021): the global model is trained by FedAvg as usual; each client also keeps a whole
  personal model ``v``, trained on its data with the proximal pull ``(λ/2)||v - w||²``
  towards the global model ``w`` it received.
* **Fine-tuned FedAvg** (the baseline): FedAvg, then each client fine-tunes the global model
  on its own data before use.

The head never leaves the client, by construction: with FedPer and FedRep the server's model
*is* the body -- :class:`HeadSplit` cuts the flat vector, a task carries the body, and a
client's update is a body delta -- so no aggregated vector, and in deployment no message,
has room for a head. Each function here takes and returns plain vectors; the state a client
keeps (its head, its personal model) is returned, never stored here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from shoal.errors import ConfigError
from shoal.frameworks.torch import FlatModule
from shoal.params import ParamSpec
from shoal.training import LocalTrainConfig, train_local

__all__ = ["METHODS", "HeadSplit", "LocalStep", "PersonalSettings", "adapt", "local_step"]

#: the personalization methods, and "fedavg" (no personal state) for the baselines
METHODS = ("fedavg", "fedper", "fedrep", "ditto")


@dataclass(frozen=True)
class PersonalSettings:
    """A method and its local settings.

    Attributes:
        method: one of :data:`METHODS`.
        head_epochs: FedRep's head epochs (and every method's final head adaptation).
        body_epochs: FedRep's body epochs.
        lam: Ditto's ``λ``.
    """

    method: str = "fedrep"
    head_epochs: int = 10
    body_epochs: int = 1
    lam: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}",
                              key="personalization.method")
        for name in ("head_epochs", "body_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}",
                                  key=f"personalization.{name}")
        if not (np.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"lam must be a finite number >= 0, got {self.lam!r}",
                              key="personalization.lam")


class HeadSplit:
    """A model's flat vector cut into the shared body and the client's head.

    Args:
        spec: the whole model's spec.
        head: names of the head's tensors (default: the last layer's, i.e. the last two
            tensors -- weight and bias of the final Linear).

    Raises:
        ConfigError: a head name the spec does not have, or a head that is the whole model.
    """

    def __init__(self, spec: ParamSpec, head: tuple[str, ...] | None = None) -> None:
        names = [t.name for t in spec.tensors]
        head = tuple(names[-2:]) if head is None else tuple(head)
        unknown = set(head) - set(names)
        if unknown or not head:
            raise ConfigError(f"head tensors {sorted(unknown) or '(none)'} are not in the "
                              f"model ({names})", key="personalization.head")
        mask = np.zeros(spec.size, bool)
        for t in spec.tensors:
            if t.name in head:
                mask[t.offset:t.stop] = True
        if mask.all():
            raise ConfigError("the head cannot be the whole model", key="personalization.head")
        self.spec = spec
        self.head_names = frozenset(head)
        self.body_names = frozenset(names) - self.head_names
        self.head_index = np.flatnonzero(mask)
        self.body_index = np.flatnonzero(~mask)

    @property
    def body_size(self) -> int:
        return len(self.body_index)

    @property
    def head_size(self) -> int:
        return len(self.head_index)

    def body(self, full: np.ndarray) -> np.ndarray:
        return full[self.body_index]

    def head(self, full: np.ndarray) -> np.ndarray:
        return full[self.head_index]

    def join(self, body: np.ndarray, head: np.ndarray) -> np.ndarray:
        """The whole model of a body and a head."""
        full = np.empty(self.spec.size, np.float32)
        full[self.body_index] = body
        full[self.head_index] = head
        return full


@dataclass(frozen=True)
class LocalStep:
    """What a client computed in one round.

    Attributes:
        delta: what it uploads: a body delta (FedPer, FedRep) or a whole-model delta
            (FedAvg, Ditto's global update).
        own: its new private state: its head (FedPer, FedRep), its personal model (Ditto),
            or ``None``.
        loss: mean training loss of the shared model's update.
    """

    delta: np.ndarray
    own: np.ndarray | None
    loss: float


def local_step(settings: PersonalSettings, model: FlatModule, split: HeadSplit,
               received: np.ndarray, own: np.ndarray | None, x: torch.Tensor,
               y: torch.Tensor, config: LocalTrainConfig, rng: np.random.Generator
               ) -> LocalStep:
    """One client's round of ``settings.method``.

    Args:
        received: what the server sent: the body (FedPer, FedRep) or the whole global model.
        own: the client's private state from its last round (head or personal model).
        config: the local training settings (``epochs`` for the shared model's update).
        rng: the client's generator for this round.
    """
    m = settings.method
    if m == "fedavg":
        res = train_local(model, received, x, y, config, rng)
        return LocalStep(res.delta, None, res.metrics["loss"])
    if m == "ditto":
        res = train_local(model, received, x, y, config, rng)
        assert own is not None
        pers = train_local(model, own, x, y, replace(config, mu=settings.lam), rng,
                           anchor=received)
        return LocalStep(res.delta, own + pers.delta, res.metrics["loss"])
    assert own is not None
    full = split.join(received, own)
    if m == "fedper":
        res = train_local(model, full, x, y, config, rng)
        trained = full + res.delta
        return LocalStep(split.body(res.delta), split.head(trained), res.metrics["loss"])
    # FedRep: the head with the body frozen, then the body with the new head frozen
    head = train_local(model, full, x, y, replace(config, epochs=settings.head_epochs), rng,
                       frozen=split.body_names)
    full = full + head.delta
    body = train_local(model, full, x, y, replace(config, epochs=settings.body_epochs), rng,
                       frozen=split.head_names)
    return LocalStep(split.body(body.delta), split.head(full), body.metrics["loss"])


def adapt(settings: PersonalSettings, model: FlatModule, split: HeadSplit,
          final: np.ndarray, own: np.ndarray | None, x: torch.Tensor, y: torch.Tensor,
          config: LocalTrainConfig, rng: np.random.Generator, finetune_epochs: int
          ) -> np.ndarray:
    """The model a client uses after training: its local adaptation to the final shared
    model ``final`` (the body, or the global model).

    FedAvg fine-tunes the whole global model for ``finetune_epochs`` (0: the global model as
    is); FedPer and FedRep train their head on the final body for ``head_epochs``; Ditto runs
    one more personal update towards the final global model.
    """
    m = settings.method
    if m == "fedavg":
        if finetune_epochs == 0:
            return final
        res = train_local(model, final, x, y, replace(config, epochs=finetune_epochs), rng)
        return final + res.delta
    if m == "ditto":
        assert own is not None
        pers = train_local(model, own, x, y, replace(config, mu=settings.lam), rng,
                           anchor=final)
        return own + pers.delta
    assert own is not None
    full = split.join(final, own)
    head = train_local(model, full, x, y, replace(config, epochs=settings.head_epochs), rng,
                       frozen=split.body_names)
    return full + head.delta
