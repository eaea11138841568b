"""Training a whole cohort of virtual clients at once.

Simulating FL one small client after another spends most of its time in Python and in tiny
matrix products. Here the cohort's copies of the model are stacked along a leading client axis
and every local SGD step of every client becomes one batched matmul.

Clients of unequal sizes are handled exactly, without truncation:

* clients are ordered by their number of local steps, longest first, so at step ``s`` the
  clients still training are a *prefix* of the stack -- a view, not a copy -- and finished
  clients cost nothing;
* a short last batch is padded and masked: each padded row carries weight 0 and each real row
  ``1 / (real rows in that batch)``, which is exactly the gradient of the per-client mean loss.

Three engines share one batch plan (:func:`shoal.training.batch_plan`) and produce the same
updates up to float rounding:

* ``fused``      -- models that are a stack of Linear + ReLU (logistic regression, the 2NN):
  hand-written forward/backward in batched matmuls, with the SGD step fused into the weight
  gradient (``baddbmm_``), so each weight is read and written once per step;
* ``vmap``       -- any parameter-only model ``torch.func`` can batch (the CNN): ``vmap`` over
  ``grad`` of ``functional_call``;
* ``sequential`` -- anything else (models with buffers such as batch norm): the reference
  client loop of :func:`shoal.training.train_local`, one client at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shoal.errors import ConfigError
from shoal.frameworks.torch import FlatModule
from shoal.models import is_mlp
from shoal.training import LocalTrainConfig, batch_plan, train_local

__all__ = ["CohortResult", "CohortTrainer", "ENGINES", "choose_engine"]

ENGINES = ("auto", "fused", "vmap", "sequential")


@dataclass(frozen=True)
class CohortResult:
    """Updates of a cohort.

    Rows come in the engine's order (clients with the most local steps first), not
    necessarily the order the clients were given: row ``j`` belongs to the client at position
    ``positions[j]`` of the input. Reordering would cost a copy of the whole matrix.

    ``deltas`` lives in a buffer the trainer reuses on its next call: fold or copy the rows
    before training the next cohort.

    Attributes:
        deltas: float32 ``(k, D)``, row ``j`` is a client's ``trained - received``.
        num_examples: int64 ``(k,)``, per row.
        loss: float64 ``(k,)`` mean local training loss per row (NaN for a client with no
            data).
        positions: int64 ``(k,)``, per row the client's position in the input.
    """

    deltas: np.ndarray
    num_examples: np.ndarray
    loss: np.ndarray
    positions: np.ndarray


def choose_engine(module: nn.Module, requested: str = "auto") -> str:
    """The engine that will train ``module``: the fastest one that is exact for it.

    Raises:
        ConfigError: ``requested`` is unknown, or cannot train this model.
    """
    if requested not in ENGINES:
        raise ConfigError(f"sim.engine must be one of {list(ENGINES)}, got {requested!r}",
                          key="sim.engine")
    has_buffers = any(True for _ in module.buffers())
    mlp = is_mlp(module)
    if requested == "auto":
        return "fused" if mlp else ("sequential" if has_buffers else "vmap")
    if requested == "fused" and not mlp:
        raise ConfigError("sim.engine 'fused' needs a model made of Linear and ReLU layers; "
                          "use 'vmap' or 'auto'", key="sim.engine")
    if requested == "vmap" and has_buffers:
        raise ConfigError("sim.engine 'vmap' cannot train a model with buffers (e.g. batch "
                          "norm); use 'sequential' or 'auto'", key="sim.engine")
    return requested


@dataclass(frozen=True)
class _Plan:
    """The cohort's batch plan, clients sorted by steps (longest first)."""

    order: np.ndarray        # sorted position -> input position
    index: torch.Tensor      # (S_max, k, B) global example ids, padding clamped to 0
    valid: torch.Tensor      # (S_max, k, B) True for real examples, False for padding
    weight: torch.Tensor     # (S_max, k, B) 1 / (real examples in the batch), 0 on padding
    active: np.ndarray       # (S_max,) clients still training at each step
    sizes: np.ndarray        # (k,) examples per client, input order


def _plan(client_indices: Sequence[np.ndarray], config: LocalTrainConfig,
          rngs: Sequence[np.random.Generator]) -> _Plan:
    k = len(client_indices)
    sizes = np.array([len(ix) for ix in client_indices], dtype=np.int64)
    plans = []
    for ix, rng in zip(client_indices, rngs):
        local = batch_plan(len(ix), config, rng)
        plans.append(np.where(local >= 0, np.asarray(ix, dtype=np.int64)[local], -1)
                     if len(ix) else local)
    steps = np.array([p.shape[0] for p in plans], dtype=np.int64)
    order = np.argsort(-steps, kind="stable")
    s_max = int(steps.max()) if k else 0
    index = np.full((s_max, k, config.batch_size), -1, dtype=np.int64)
    for j, i in enumerate(order):
        index[: steps[i], j] = plans[i]
    active = (steps[order][None, :] > np.arange(s_max)[:, None]).sum(axis=1)
    valid = index >= 0
    counts = valid.sum(axis=2, keepdims=True)
    weight = np.divide(valid, counts, out=np.zeros(valid.shape, np.float32),
                       where=counts > 0, dtype=np.float32)
    return _Plan(order, torch.from_numpy(np.maximum(index, 0)), torch.from_numpy(valid),
                 torch.from_numpy(weight), active, sizes)


class CohortTrainer:
    """Trains cohorts of virtual clients of one model on one shared dataset.

    Args:
        module: the model; its current parameters are only used for shapes.
        x, y: the whole training set (clients are index arrays into it; never copied).
        engine: one of :data:`ENGINES`; ``auto`` picks the fastest exact engine.
    """

    def __init__(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 engine: str = "auto") -> None:
        self.engine = choose_engine(module, engine)
        self.flat_module = FlatModule(module)
        self.spec = self.flat_module.spec
        self.x = self._shaped(x)
        self.y = y
        self._buffers: dict[str, torch.Tensor] = {}

    def train(self, global_params: np.ndarray, client_indices: Sequence[np.ndarray],
              config: LocalTrainConfig, rngs: Sequence[np.random.Generator], *,
              source: tuple[torch.Tensor, torch.Tensor] | None = None) -> CohortResult:
        """Run local training for every client of the cohort from ``global_params``.

        Args:
            global_params: flat float32 global model (not modified).
            client_indices: per client, its example ids in the shared training set (or in
                ``source``).
            config: local training settings (FedProx ``mu`` included).
            rngs: per client, its generator for this round (drives its batch order).
            source: ``(x, y)`` the indices point into instead of the shared training set
                (clients whose data is generated for this call).
        """
        self.spec.check_vector(global_params, "global model")
        if len(rngs) != len(client_indices):
            raise ValueError("one generator per client is required")
        x, y = (self.x, self.y) if source is None else (self._shaped(source[0]), source[1])
        if self.engine == "sequential":
            return self._train_sequential(global_params, client_indices, config, rngs, x, y)
        plan = _plan(client_indices, config, rngs)
        k = len(client_indices)
        g = torch.tensor(global_params, dtype=torch.float32)  # a copy: the input may be read-only
        # Each tensor stacked contiguously, (k, *shape), row j = the j-th client in plan
        # order: batched matmuls need each client's matrix contiguous (strided views into one
        # (k, D) buffer halve their speed). The deltas are then written once into (k, D).
        stacked = {t.name: self._buffer(t.name, (k, *t.shape)) for t in self.spec.tensors}
        # The fused engine's first step reads the global model directly and writes its
        # result into the buffers, so only clients that never step need a copy of it.
        first = int(plan.active[0]) if self.engine == "fused" and len(plan.active) else 0
        for t in self.spec.tensors:
            stacked[t.name][first:].copy_(
                g[t.offset:t.stop].view(t.shape).expand(k - first, *t.shape))
        if self.engine == "fused":
            loss = self._run_fused(stacked, g, plan, config, x, y)
        else:
            loss = self._run_vmap(stacked, g, plan, config, x, y)
        flat = self._buffer("deltas", (k, self.spec.size))
        for t in self.spec.tensors:
            torch.sub(stacked[t.name].reshape(k, -1), g[t.offset:t.stop],
                      out=flat[:, t.offset:t.stop])
        sizes = plan.sizes[plan.order]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_loss = loss / np.where(sizes > 0, sizes * config.epochs, 0)
        return CohortResult(flat.numpy(), sizes, mean_loss, plan.order)

    def _shaped(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs as the engine reads them (the fused engine: one flat row per example)."""
        # the width spelt out: an empty pool (clients with their own data) has no -1 to infer
        return x.reshape(x.shape[0], int(np.prod(x.shape[1:]))) if self.engine == "fused" \
            else x

    def _buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A reusable float32 buffer of at least ``shape[0]`` rows, viewed as ``shape``.

        Fresh 100 MB allocations cost page faults on every round (about a third of config
        L's time); reused buffers are paid for once.
        """
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:]:
            buf = torch.empty(shape, dtype=torch.float32)
            self._buffers[name] = buf
        return buf[:shape[0]]

    def _global_views(self, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each named tensor of the flat global model as a view (no copy)."""
        return {t.name: g[t.offset:t.stop].view(t.shape) for t in self.spec.tensors}

    # -- engines ---------------------------------------------------------------------------

    @staticmethod
    def _batch_x(x: torch.Tensor, plan: _Plan, s: int, a: int) -> torch.Tensor:
        """The inputs of step ``s`` for its ``a`` active clients, ``(a, B, *features)``."""
        ids = plan.index[s, :a]
        return x.index_select(0, ids.reshape(-1)).reshape(a, ids.shape[1], *x.shape[1:])

    def _batch(self, x: torch.Tensor, y: torch.Tensor, plan: _Plan, s: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs, labels and loss weights of step ``s`` for its active clients."""
        a = int(plan.active[s])
        ids = plan.index[s, :a]
        return self._batch_x(x, plan, s, a), y[ids], plan.weight[s, :a]

    def _run_fused(self, stacked: dict[str, torch.Tensor], g: torch.Tensor, plan: _Plan,
                   config: LocalTrainConfig, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        names = [t.name for t in self.spec.tensors]
        layers = [(stacked[names[2 * i]], stacked[names[2 * i + 1]])
                  for i in range(len(names) // 2)]
        views = self._global_views(g)
        global_layers = [(views[names[2 * i]], views[names[2 * i + 1]])
                         for i in range(len(layers))]
        lr, mu = config.lr, config.mu
        s_max, k, b = plan.index.shape
        # Per step, the few elementwise ops between the matmuls cost as much dispatch time
        # as the small matmuls themselves, so everything that does not depend on the model
        # is prepared once per cohort: labels, the loss weights, and a buffer that collects
        # each example's log-likelihood (summed once at the end, in float64).
        labels = y[plan.index].unsqueeze(3)                         # (S, k, B, 1)
        weight = plan.weight.unsqueeze(3)                           # (S, k, B, 1)
        neg_weight = -weight
        picked = torch.zeros(s_max, k, b, 1, dtype=torch.float32)
        relu_grad = torch.ops.aten.threshold_backward.grad_input
        for s in range(s_max):
            a = int(plan.active[s])
            xb = self._batch_x(x, plan, s, a)
            # step 0: every stepping client still holds the global model; read it as a
            # broadcast view (no copy) and let the update write the buffers (see train())
            source = [(gw.expand(a, *gw.shape), gb.expand(a, *gb.shape))
                      for gw, gb in global_layers] if s == 0 else \
                [(wt[:a], bs[:a]) for wt, bs in layers]
            acts = [xb]
            h = xb
            for i, (wa, ba) in enumerate(source):
                z = torch.baddbmm(ba.unsqueeze(1), h, wa.transpose(1, 2))
                if i < len(layers) - 1:
                    # in place: relu(z) > 0 exactly where z > 0, so h also gives the mask
                    h = z.relu_()
                    acts.append(h)
            yb, w = labels[s, :a], weight[s, :a]
            logz = torch.log_softmax(z, dim=2)
            torch.gather(logz, 2, yb, out=picked[s, :a])
            # d(weighted mean loss)/dz = w * (softmax - onehot)
            dz = logz.exp_().mul_(w).scatter_add_(2, yb, neg_weight[s, :a])
            for i in range(len(layers) - 1, -1, -1):
                wa, ba = source[i]
                dh: torch.Tensor | None = None
                if i > 0:
                    dh = torch.bmm(dz, wa)
                    relu_grad(dh, acts[i], 0, grad_input=dh)
                if s == 0:
                    # w = w_global here, so the proximal term vanishes: w <- w_g - lr dz^T h
                    torch.baddbmm(wa, dz.transpose(1, 2), acts[i], alpha=-lr,
                                  out=layers[i][0][:a])
                    torch.sub(ba, dz.sum(dim=1), alpha=lr, out=layers[i][1][:a])
                elif mu > 0:
                    # SGD step fused into the weight gradient, with the proximal pull
                    # mu (w - w_global): w <- (1 - lr mu) w + lr mu w_global - lr dz^T h
                    gw, gb = global_layers[i]
                    wa.baddbmm_(dz.transpose(1, 2), acts[i], beta=1.0 - lr * mu, alpha=-lr)
                    wa.add_(gw, alpha=lr * mu)
                    ba.mul_(1.0 - lr * mu).sub_(dz.sum(dim=1), alpha=lr).add_(gb,
                                                                             alpha=lr * mu)
                else:
                    # SGD step fused into the weight gradient: w <- w - lr dz^T h
                    wa.baddbmm_(dz.transpose(1, 2), acts[i], alpha=-lr)
                    ba.sub_(dz.sum(dim=1), alpha=lr)
                if dh is not None:  # None after the first layer, the loop's last
                    dz = dh
        # finished clients picked 0 (the buffer starts zeroed); padded rows hold example 0's
        # value, which may be -inf for a diverged model: select, don't multiply by 0
        nll = -torch.where(plan.valid, picked.squeeze(3), 0.0).sum(dim=(0, 2),
                                                                  dtype=torch.float64)
        return nll.numpy()

    def _run_vmap(self, stacked: dict[str, torch.Tensor], g: torch.Tensor, plan: _Plan,
                  config: LocalTrainConfig, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        from torch.func import functional_call, grad, vmap

        module = self.flat_module.module

        def client_loss(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                        w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = functional_call(module, params, (xb,))
            nll = nn.functional.cross_entropy(logits, yb, reduction="none")
            weighted = (nll * w).sum()
            return weighted, (nll * (w > 0)).sum()

        step = vmap(grad(client_loss, has_aux=True))
        names = list(stacked)
        views = self._global_views(g)
        global_views = [views[n] for n in names]
        k = stacked[names[0]].shape[0]
        loss_sum = torch.zeros(k, dtype=torch.float64)
        lr, mu = config.lr, config.mu
        for s in range(len(plan.active)):
            a = int(plan.active[s])
            xb, yb, w = self._batch(x, y, plan, s)
            prefix = {n: stacked[n][:a] for n in names}
            grads, nll_sum = step(prefix, xb, yb, w)
            loss_sum[:a] += nll_sum.to(torch.float64)
            ps = [prefix[n] for n in names]
            if mu > 0:
                # proximal gradient mu (w - w_global), added before the step
                torch._foreach_mul_(ps, 1.0 - lr * mu)
                torch._foreach_add_(ps, global_views, alpha=lr * mu)
            torch._foreach_add_(ps, [grads[n] for n in names], alpha=-lr)
        return loss_sum.numpy()

    def _train_sequential(self, global_params: np.ndarray,
                          client_indices: Sequence[np.ndarray], config: LocalTrainConfig,
                          rngs: Sequence[np.random.Generator], x: torch.Tensor,
                          y: torch.Tensor) -> CohortResult:
        k = len(client_indices)
        deltas = np.empty((k, self.spec.size), dtype=np.float32)
        sizes = np.empty(k, dtype=np.int64)
        loss = np.empty(k)
        for i, (ix, rng) in enumerate(zip(client_indices, rngs)):
            idx = torch.from_numpy(np.asarray(ix, dtype=np.int64))
            res = train_local(self.flat_module, global_params, x[idx], y[idx],
                              config, rng)
            deltas[i] = res.delta
            sizes[i] = res.num_examples
            loss[i] = res.metrics["loss"]
        return CohortResult(deltas, sizes, loss, np.arange(k))
