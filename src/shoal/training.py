"""Local training on one client, and evaluation.

This is the reference client: plain PyTorch, one client at a time, autograd and an explicit SGD
step. The simulator's vectorized cohort engine (:mod:`shoal.sim.cohort`) must produce the same
updates from the same batch plan; a test holds them to it. The deployed client runtime uses
this module directly.

FedProx (Li et al., MLSys 2020, "Federated Optimization in Heterogeneous Networks") adds the
proximal term (mu/2)·||w - w_global||² to the local objective; its gradient mu·(w - w_global)
is added to each SGD step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from shoal.errors import ConfigError
from shoal.frameworks.torch import FlatModule

__all__ = ["LocalTrainConfig", "LocalResult", "batch_plan", "train_local", "evaluate"]


@dataclass(frozen=True)
class LocalTrainConfig:
    """How a client trains locally each round.

    Attributes:
        epochs: passes over the client's data (>= 1).
        batch_size: examples per SGD step; the last partial batch of an epoch is kept.
        lr: SGD learning rate (no momentum).
        mu: FedProx proximal coefficient (0 disables it).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    mu: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"client.epochs must be an integer >= 1, got {self.epochs!r}",
                              key="client.epochs")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"client.batch_size must be an integer >= 1, got "
                              f"{self.batch_size!r}", key="client.batch_size")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"client.lr must be a finite number > 0, got {self.lr!r}",
                              key="client.lr")
        if not (np.isfinite(self.mu) and self.mu >= 0):
            raise ConfigError(f"FedProx mu must be a finite number >= 0, got {self.mu!r}",
                              key="strategy.mu")

    def with_overrides(self, overrides: Mapping[str, float]) -> LocalTrainConfig:
        """This config with server-sent settings (e.g. FedProx's ``mu``) applied."""
        known = {"epochs", "batch_size", "lr", "mu"}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown client settings {sorted(unknown)}; known: "
                              f"{sorted(known)}")
        if not overrides:
            return self
        values = {k: getattr(self, k) for k in known} | dict(overrides)
        return LocalTrainConfig(**values)


@dataclass(frozen=True)
class LocalResult:
    """What one client sends back after local training.

    Attributes:
        delta: flat float32 update, ``trained - received``.
        num_examples: examples the client trained on (its FedAvg weight).
        metrics: at least ``loss``, the mean training loss over all local steps' examples.
    """

    delta: np.ndarray
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def batch_plan(num_examples: int, config: LocalTrainConfig, rng: np.random.Generator
               ) -> np.ndarray:
    """The local SGD schedule of one client: which local examples each step uses.

    Each epoch is a fresh permutation of the client's examples cut into batches of
    ``batch_size``; the last batch of an epoch may be shorter and is kept.

    Returns:
        int64 array of shape ``(steps, batch_size)`` of local example positions, padded with
        ``-1`` where a batch is short. ``steps = epochs * ceil(num_examples / batch_size)``.
    """
    b = config.batch_size
    per_epoch = -(-num_examples // b)
    plan = np.full((config.epochs, per_epoch * b), -1, dtype=np.int64)
    for e in range(config.epochs):
        plan[e, :num_examples] = rng.permutation(num_examples)
    return plan.reshape(config.epochs * per_epoch, b)


def train_local(
    model: FlatModule,
    global_params: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    config: LocalTrainConfig,
    rng: np.random.Generator,
    *,
    frozen: frozenset[str] = frozenset(),
    anchor: np.ndarray | None = None,
) -> LocalResult:
    """Train ``model`` from ``global_params`` on one client's data with plain SGD.

    Args:
        model: the client's model; its parameters are overwritten.
        global_params: the received global model as a flat vector (not modified).
        x, y: the client's examples and integer labels.
        config: local training settings.
        rng: the client's generator for this round (drives the batch order).
        frozen: names of tensors that do not move (personalization trains a head or a body
            alone: FedRep); their delta is zero.
        anchor: the centre of the proximal term ``(mu/2)||w - anchor||²`` when it is not the
            starting point (Ditto pulls a personal model towards the global one); default
            ``global_params``.

    Returns:
        The update ``trained - received``, the example count and the mean training loss.

    Raises:
        ConfigError: ``frozen`` names a tensor the model does not have.
    """
    n = int(y.shape[0])
    unknown = set(frozen) - {t.name for t in model.spec.tensors}
    if unknown:
        raise ConfigError(f"frozen names unknown tensors {sorted(unknown)}", key="frozen")
    model.set(global_params)
    if n == 0:
        return LocalResult(np.zeros_like(global_params), 0, {"loss": float("nan")})
    start = model.flat.detach().clone()
    centre = start if anchor is None else torch.from_numpy(
        np.array(anchor, dtype=np.float32))  # a copy: the anchor may be read-only
    moving = [i for i, t in enumerate(model.spec.tensors) if t.name not in frozen]
    every = list(model.module.parameters())
    params: list[torch.Tensor] = [every[i] for i in moving]
    anchors = [centre[t.offset:t.stop].view(t.shape)
               for i, t in enumerate(model.spec.tensors) if i in moving]
    loss_fn = nn.CrossEntropyLoss()
    total_loss = 0.0
    seen = 0
    model.module.train()
    for batch in batch_plan(n, config, rng):
        idx = torch.from_numpy(batch[batch >= 0])
        xb, yb = x[idx], y[idx]
        for p in every:
            p.grad = None
        loss = loss_fn(model.module(xb), yb)
        loss.backward()
        with torch.no_grad():
            if config.mu > 0:
                grads = [_grad(p) + config.mu * (p - a) for p, a in zip(params, anchors)]
            else:
                grads = [_grad(p) for p in params]
            torch._foreach_add_(params, grads, alpha=-config.lr)
        total_loss += float(loss.detach()) * len(idx)
        seen += len(idx)
    delta = (model.flat.detach() - start).numpy()
    return LocalResult(delta, n, {"loss": total_loss / seen})


@torch.no_grad()
def _grad(p: torch.Tensor) -> torch.Tensor:
    """``p``'s gradient of the batch; zero for a parameter the loss did not reach (its
    ``grad`` stays ``None``): no step for it but FedProx's pull to the anchor."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


def evaluate(model: FlatModule, params: np.ndarray, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1000) -> dict[str, float]:
    """Mean cross-entropy loss and accuracy of ``params`` on ``(x, y)``.

    Batches of about a thousand examples keep each activation under a few MB, which the
    allocator recycles; whole-test-set batches (10,000) take fresh pages from the kernel on
    every call (about 4,000 page faults and an unmap that interrupts the other threads),
    which made central evaluation 15 % slower and the training running beside it slower too.
    """
    model.set(params)
    model.module.eval()
    n = int(y.shape[0])
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    loss_sum = 0.0
    correct = 0
    with torch.no_grad():  # whoever calls: evaluation never needs the autograd graph
        for start in range(0, n, batch_size):
            logits = model.module(x[start:start + batch_size])
            yb = y[start:start + batch_size]
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    return {"loss": loss_sum / n, "accuracy": correct / n}
