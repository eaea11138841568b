"""An in-memory network of :class:`~shoal.gossip.node.GossipNode` objects.

The carrier the tests and the reference simulation use: every push is a function call to
the receiving node, every answer a call back, in an order drawn from a generator, with
optional message loss, duplicated deliveries and dead peers -- the same node code the gRPC
peers (:mod:`shoal.transport.gossip_peer`) run, with no sockets. Time is simulated: when no
message is in flight and some peer still waits, the clock jumps to the next probe.

It is the reference for the vectorized simulator (:mod:`shoal.gossip.simulator`): with
nothing lost, a step of the network equals ``X <- W Y``; it is also ``n`` Python objects
exchanging ``O(edges)`` messages per step, which is what the vectorized simulator avoids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from shoal.gossip.node import GossipNode, Leave, MixResult, Send

__all__ = ["InMemoryNetwork", "Delivery"]

Train = Callable[[int, int, np.ndarray], np.ndarray]
"""``train(peer, step, params) -> trained params`` (a peer's local training)."""


@dataclass
class Delivery:
    """What happened to messages in one step: delivered, lost, duplicated."""

    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    mixed: dict[int, MixResult] = field(default_factory=dict)


class InMemoryNetwork:
    """Peers that exchange messages by function call.

    Args:
        nodes: one node per peer, ``nodes[i].peer == i``.
        rng: draws the delivery order, the losses and the duplicates (default: a fixed
            order, nothing lost).
        loss: probability that a push, or its answer, is lost (the pusher sees a failed
            call).
        duplicate: probability that a delivered push is delivered a second time.
        dead: peers that are down: calls to them fail, they do nothing.
    """

    def __init__(self, nodes: Sequence[GossipNode], *, rng: np.random.Generator | None = None,
                 loss: float = 0.0, duplicate: float = 0.0, dead: Sequence[int] = ()) -> None:
        for i, node in enumerate(nodes):
            if node.peer != i:
                raise ValueError(f"nodes[{i}] is peer {node.peer}")
        self.nodes = list(nodes)
        self.rng = rng
        self.loss = float(loss)
        self.duplicate = float(duplicate)
        self.dead: set[int] = set(dead)
        self.now = 0.0

    def _chance(self, p: float) -> bool:
        return self.rng is not None and p > 0 and bool(self.rng.random() < p)

    def step(self, train: Train | None = None, max_events: int = 1_000_000) -> Delivery:
        """Every live peer trains (``train``, or keeps its model), offers, and mixes once.

        Returns:
            What was delivered and each live peer's :class:`MixResult`.

        Raises:
            RuntimeError: the step did not finish within ``max_events`` deliveries.
        """
        out = Delivery()
        live = [n for n in self.nodes if n.peer not in self.dead]
        order = self.rng.permutation(len(live)) if self.rng is not None else range(len(live))
        queue: list[tuple[int, Send]] = []  # (from, send)
        pending = {n.peer for n in live}
        for k in order:
            queue += self._train_and_offer(live[k], train)
        for _ in range(max_events):
            self._mix_ready(pending, out)
            if not pending:
                return out
            for p in sorted(pending):  # a peer that learnt it was behind trains again
                if not self.nodes[p].waiting:
                    queue += self._train_and_offer(self.nodes[p], train)
            if not queue:
                self.now += min(self.nodes[p].probe_s for p in pending)
                for p in sorted(pending):
                    queue += [(p, s) for s in self.nodes[p].tick(self.now)]
                continue
            k = int(self.rng.integers(len(queue))) if self.rng is not None else 0
            sender, send = queue.pop(k)
            queue += self._deliver(sender, send, out)
        raise RuntimeError(f"the step did not finish within {max_events} deliveries")

    def _train_and_offer(self, node: GossipNode, train: Train | None) -> list[tuple[int, Send]]:
        while True:  # a peer that jumps ahead while training trains again
            start = node.step
            trained = train(node.peer, start, node.params) if train else node.params
            sends = node.offer(start, trained, self.now)
            if node.waiting:
                return [(node.peer, s) for s in sends]

    def _mix_ready(self, pending: set[int], out: Delivery) -> None:
        for p in sorted(pending):
            if self.nodes[p].ready:
                out.mixed[p] = self.nodes[p].mix()
                pending.discard(p)

    def _deliver(self, sender: int, send: Send, out: Delivery) -> list[tuple[int, Send]]:
        src = self.nodes[sender]
        msg = send.message
        if isinstance(msg, Leave):
            if send.to not in self.dead:
                self.nodes[send.to].handle(msg, self.now)
            return []
        if send.to in self.dead or self._chance(self.loss):
            out.lost += 1
            return [(sender, s) for s in src.delivery_failed(send.to, msg.step, self.now)]
        dst = self.nodes[send.to]
        answer = dst.handle(msg, self.now)
        out.delivered += 1
        if self._chance(self.duplicate):
            out.duplicated += 1
            answer = dst.handle(msg, self.now)
        if answer is None:
            return []
        if self._chance(self.loss):
            out.lost += 1
            return [(sender, s) for s in src.delivery_failed(send.to, msg.step, self.now)]
        src.answered(answer, self.now)
        return []
