"""One peer of a gossip network, sans-I/O: messages and time in, messages out.

Each step ``t`` of decentralized SGD (D-PSGD, Lian et al., NeurIPS 2017, in the
adapt-then-combine order) a peer trains locally from its model ``x_i``, which gives ``y_i``,
exchanges ``y`` with its neighbours and mixes: ``x_i <- sum_j W_ij y_j`` (or a robust rule,
:mod:`shoal.gossip.rules`). Steps are synchronous: a peer mixes step ``t`` only with
neighbours' step-``t`` models, so a network of nodes computes exactly ``X <- W Y`` -- the
vectorized simulator's product -- whatever order the messages arrive in.

Push-pull: once trained, a peer pushes an :class:`Offer` (its ``y`` for step ``t``) to every
peer that mixes it; the :class:`Answer` carries the receiver's own step-``t`` model back when
the pusher mixes it and it is ready (the pull), so most edges cost one call per step. A peer
that receives an offer before it has trained keeps it and pushes its own model later.

Churn: a neighbour that cannot be reached (after ``max_attempts`` deliveries), that says it
leaves (:class:`Leave`), or whose model has not come by the step deadline is *down*: the peer
stops waiting for it and gives its weight to itself. Any message from it brings it back.
While waiting, :meth:`GossipNode.tick` re-pushes to the neighbours still missing every
``probe_s`` (a push is also a pull), which finds dead ones quickly. A peer that comes back
behind (a restart) learns from its neighbours' answers that they are ahead and jumps to their
step, keeping its own model; with a trimmed mean that tolerates ``trim`` Byzantine
neighbours, ``trim + 1`` neighbours must say so, and it jumps to the (``trim + 1``)-th
largest step reported, so liars alone cannot move it.

Nothing from the network is trusted: an offer from a peer that is not a neighbour at that
step, of the wrong shape, with a non-finite value, for a step long gone or too far ahead, or
contradicting an earlier offer for the same step, is refused with a reason in the answer and
changes nothing. Time is an argument (``now``, seconds); the node starts no thread and holds
no lock (a carrier that calls it from several threads serializes the calls).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from shoal.errors import ProtocolError
from shoal.gossip.mixing import Schedule
from shoal.gossip.rules import MixingRule, TrimmedMean, Weighted, trimmed_mean

__all__ = ["Offer", "Answer", "Leave", "Send", "MixResult", "NodeStats", "GossipNode",
           "REFUSALS"]

REFUSALS = ("stale", "ahead", "late", "not_neighbour", "wrong_shape", "non_finite",
            "conflict", "malformed", "identity", "too_large")
"""Reasons an offer is not used: ``late`` (the step was already mixed; the answer still
carries the model for it), ``stale`` (older than that), ``ahead`` (more than one step ahead),
``not_neighbour``, ``wrong_shape``, ``non_finite``, ``conflict`` (a different model for a step
the sender already offered); the carrier adds ``malformed`` (an undecodable payload),
``identity`` (the sender is not who its certificate says) and ``too_large``."""


# -- messages ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Offer:
    """Peer ``sender``'s model for gossip step ``step`` (after its local training).

    Attributes:
        wants: the sender still needs the receiver's model for this step (pull).
    """

    sender: int
    step: int
    params: np.ndarray
    wants: bool = True


@dataclass(frozen=True, eq=False)
class Answer:
    """The receiver's verdict on an :class:`Offer`.

    Attributes:
        sender: the answering peer.
        step: its current step.
        offered_step: the step of the offer answered.
        accepted: the offered model will be mixed.
        reason: one of :data:`REFUSALS` when not accepted.
        params: the answering peer's own model for ``offered_step``, when the offer wanted
            it and it has it.
    """

    sender: int
    step: int
    offered_step: int
    accepted: bool
    reason: str = ""
    detail: str = ""
    params: np.ndarray | None = None


@dataclass(frozen=True)
class Leave:
    """Peer ``sender`` leaves the network: do not wait for it."""

    sender: int


@dataclass(frozen=True, eq=False)
class Send:
    """A message for the carrier to deliver to peer ``to``."""

    to: int
    message: Offer | Leave


@dataclass(frozen=True, eq=False)
class MixResult:
    """What one mixing step did.

    Attributes:
        step: the step mixed (the node is now at ``step + 1``).
        params: the new model.
        used: neighbours whose models were mixed.
        absent: neighbours mixed without (down, left, timed out).
    """

    step: int
    params: np.ndarray
    used: tuple[int, ...]
    absent: tuple[int, ...]


@dataclass
class NodeStats:
    """Counts for reports: models sent and received, refusals both ways, jumps."""

    models_sent: int = 0
    models_received: int = 0
    refused: Counter[str] = field(default_factory=Counter)      # offers this node refused
    refused_by: Counter[str] = field(default_factory=Counter)   # our offers others refused
    jumps: int = 0
    mixed_alone: int = 0  # steps a trimmed mean had too few values and kept its own model


# -- the node ----------------------------------------------------------------------------

class GossipNode:
    """Peer ``peer`` of a network mixing with ``schedule``.

    Args:
        peer: this peer's index, ``0 <= peer < schedule.n``.
        schedule: the mixing matrix of every step.
        params: the starting model (flat float32; copied).
        rule: :class:`~shoal.gossip.rules.Weighted` (default) or
            :class:`~shoal.gossip.rules.TrimmedMean`.
        step: the step to start at (a peer restarted from a checkpoint).
        step_timeout_s: neighbours still missing this long after the peer offered its
            model are marked down.
        probe_s: while waiting, re-push to missing neighbours this often.
        max_attempts: failed deliveries to a neighbour in one step before it is down.

    Raises:
        ProtocolError: a bad peer index or model.
    """

    def __init__(self, peer: int, schedule: Schedule, params: np.ndarray, *,
                 rule: MixingRule = Weighted(), step: int = 0,
                 step_timeout_s: float = 30.0, probe_s: float = 1.0,
                 max_attempts: int = 3) -> None:
        if not 0 <= peer < schedule.n:
            raise ProtocolError(f"peer {peer} is not in a network of {schedule.n}")
        params = np.asarray(params)
        if params.dtype != np.float32 or params.ndim != 1 or not np.isfinite(params).all():
            raise ProtocolError("a node's model must be a finite float32 vector")
        self.peer = peer
        self.schedule = schedule
        self.rule = rule
        self.dim = len(params)
        self.params = params.copy()
        self.step = int(step)
        self.step_timeout_s = float(step_timeout_s)
        self.probe_s = float(probe_s)
        self.max_attempts = int(max_attempts)
        self.stats = NodeStats()
        self.down: set[int] = set()
        self._waiting = False              # offered this step's model, not mixed yet
        self._own: np.ndarray | None = None        # y of the current step, once offered
        self._prev: tuple[int, np.ndarray] | None = None  # (step, y) of the last step mixed
        self._inbox: dict[int, dict[int, np.ndarray]] = {}  # step -> sender -> y
        self._pulled: dict[int, set[int]] = {}  # step -> peers that got our y in an answer
        self._ahead: dict[int, int] = {}   # neighbour -> a step beyond ours + 1 it reported
        self._failures: Counter[int] = Counter()
        self._deadline = float("inf")
        self._next_probe = float("inf")

    # -- what the network looks like from here --------------------------------------------

    def senders(self, step: int | None = None) -> tuple[int, ...]:
        """Neighbours whose models this peer mixes at ``step`` (default: the current)."""
        return self.schedule.at(self.step if step is None else step).senders(self.peer)

    def receivers(self, step: int | None = None) -> tuple[int, ...]:
        """Neighbours that mix this peer's model at ``step`` (default: the current)."""
        return self.schedule.at(self.step if step is None else step).receivers(self.peer)

    @property
    def waiting(self) -> bool:
        """Offered this step's model and not mixed yet."""
        return self._waiting

    def missing(self) -> tuple[int, ...]:
        """Neighbours this step still waits for (not down, model not in)."""
        have = self._inbox.get(self.step, {})
        return tuple(j for j in self.senders() if j not in have and j not in self.down)

    @property
    def ready(self) -> bool:
        """Whether :meth:`mix` may run: offered, and every neighbour's model is in or the
        neighbour is down."""
        return self._waiting and not self.missing()

    # -- local side ------------------------------------------------------------------------

    def offer(self, step: int, trained: np.ndarray, now: float) -> list[Send]:
        """This peer's model after local training for ``step``: push it.

        If the node jumped to a later step meanwhile (:meth:`answered` or :meth:`handle`
        learnt it was behind), ``trained`` becomes its model and nothing is sent: train
        again at :attr:`step`.

        Raises:
            ProtocolError: already offered for this step, or ``trained`` is not a finite
                vector of the model's length.
        """
        self._check_own(trained)
        if step != self.step:
            self.params = np.array(trained, dtype=np.float32)
            return []
        if self._waiting:
            raise ProtocolError(f"peer {self.peer} already offered its model for step {step}")
        self._own = np.array(trained, dtype=np.float32)
        self._waiting = True
        self._deadline = now + self.step_timeout_s
        self._next_probe = now + self.probe_s
        return [self._push(j) for j in self.receivers() if self._should_push(j)]

    def _should_push(self, to: int) -> bool:
        """Push to ``to`` now? Not if it already pulled our model. On an edge both ways, the
        higher-numbered end waits for the lower one's push to pull its model (one call per
        edge), unless that push already came and found us untrained; if it never comes,
        :meth:`tick`'s probes push after ``probe_s``."""
        if to in self._pulled.get(self.step, set()):
            return False
        both_ways = to in self.senders()
        return not both_ways or self.peer < to or to in self._inbox.get(self.step, {})

    def _push(self, to: int, *, retry: bool = False) -> Send:
        assert self._own is not None
        wants = to in self.senders() and to not in self._inbox.get(self.step, {})
        if not retry:  # a retry resends a model that never arrived: counted once
            self.stats.models_sent += 1
        return Send(to, Offer(self.peer, self.step, self._own, wants))

    def mix(self) -> MixResult:
        """Mix this step's models; the node moves to the next step.

        Raises:
            ProtocolError: not :attr:`ready`.
        """
        if not self.ready:
            raise ProtocolError(f"peer {self.peer} cannot mix step {self.step}: waiting for "
                                f"{list(self.missing()) if self._waiting else 'its own model'}")
        assert self._own is not None
        step, own = self.step, self._own
        have = self._inbox.get(step, {})
        w = self.schedule.at(step)
        peers, weights = w.row(self.peer)
        used = tuple(int(j) for j in peers if j != self.peer and j in have)
        absent = tuple(int(j) for j in peers if j != self.peer and j not in have)
        if isinstance(self.rule, TrimmedMean):
            if 1 + len(used) < self.rule.least_values:
                self.stats.mixed_alone += 1
                new = own.copy()
            else:
                new = trimmed_mean(np.stack([own, *(have[j] for j in used)]), self.rule.trim)
        else:
            acc = np.zeros(self.dim, dtype=np.float64)
            self_weight = 0.0
            for j, wij in zip(peers, weights):
                j = int(j)
                if j in have:
                    acc += wij * have[j]
                else:  # itself, or a neighbour mixed without: its weight stays here
                    self_weight += wij
            acc += self_weight * own
            new = acc.astype(np.float32)
        self._prev = (step, own)
        self._advance(step + 1)
        self.params = new
        return MixResult(step, new, used, absent)

    def leave(self) -> list[Send]:
        """Tell every neighbour of the current step that this peer leaves."""
        peers = set(self.senders()) | set(self.receivers())
        return [Send(j, Leave(self.peer)) for j in sorted(peers)]

    def tick(self, now: float) -> list[Send]:
        """Time passes: re-push to missing neighbours every ``probe_s``; past the step
        deadline, mark them down."""
        if not self._waiting:
            return []
        missing = self.missing()
        if not missing:
            return []
        if now >= self._deadline:
            self.down.update(missing)
            return []
        if now >= self._next_probe:
            self._next_probe = now + self.probe_s
            return [self._push(j) for j in missing]
        return []

    def delivery_failed(self, to: int, step: int, now: float) -> list[Send]:
        """A push to ``to`` for ``step`` could not be delivered (no answer came): retry it,
        or after ``max_attempts`` failures in this step mark ``to`` down."""
        if step != self.step or not self._waiting:
            return []
        self._failures[to] += 1
        if self._failures[to] >= self.max_attempts:
            self.down.add(to)
            return []
        return [self._push(to, retry=True)]

    # -- network side ----------------------------------------------------------------------

    def handle(self, message: Offer | Leave, now: float) -> Answer | None:
        """A neighbour's offer (answered) or departure (no answer). Never raises for what
        the network sends: a refused offer changes nothing and says why."""
        sender = message.sender
        if not (isinstance(sender, int) and 0 <= sender < self.schedule.n) \
                or sender == self.peer:
            return self._refuse(message, "not_neighbour", f"peer {sender!r} is not in this "
                                                          f"network") \
                if isinstance(message, Offer) else None
        if isinstance(message, Leave):
            if sender in self.senders() or sender in self.receivers():
                self.down.add(sender)
            return None
        s = message.step
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            return self._refuse(message, "stale", f"step {s!r} is not a step")
        # a push comes from a peer we mix, a pull (a probe) from one that mixes us
        if sender not in self.senders(s) and sender not in self.receivers(s):
            return self._refuse(message, "not_neighbour",
                                f"peer {sender} is no neighbour of {self.peer} at step {s}")
        if s > self.step + 1:
            self._heard_from(sender, now)
            self._ahead_report(sender, s)
            return self._refuse(message, "ahead", f"this peer is at step {self.step}")
        if s < self.step - 1 or (s == self.step - 1 and self._prev is None):
            self._heard_from(sender, now)
            return self._refuse(message, "stale", f"this peer is at step {self.step}")
        problem = self._check_model(message.params)
        if problem:
            return self._refuse(message, *problem)
        self._heard_from(sender, now)
        reply = self._reply_params(message)
        if s == self.step - 1:
            return Answer(self.peer, self.step, s, False, "late",
                          f"step {s} is already mixed", reply)
        box = self._inbox.setdefault(s, {})
        if sender in self.senders(s):
            known = box.get(sender)
            if known is None:
                box[sender] = np.array(message.params, dtype=np.float32)
                self.stats.models_received += 1
            elif not np.array_equal(known, message.params):
                return self._refuse(message, "conflict", f"peer {sender} already offered a "
                                                         f"different model for step {s}")
        if reply is not None:
            self._pulled.setdefault(s, set()).add(sender)
        return Answer(self.peer, self.step, s, True, params=reply)

    def answered(self, answer: Answer, now: float) -> None:
        """The answer to one of this peer's pushes."""
        sender = answer.sender
        if not 0 <= sender < self.schedule.n or sender == self.peer:
            return
        self._heard_from(sender, now)
        self._failures.pop(sender, None)
        if not answer.accepted and answer.reason != "late":
            self.stats.refused_by[answer.reason or "unknown"] += 1
        if answer.step > self.step + 1:
            self._ahead_report(sender, answer.step)
        s = answer.offered_step
        if answer.params is None or s != self.step or sender not in self.senders(s):
            return
        if self._check_model(answer.params):
            self.stats.refused["bad_answer"] += 1
            return
        box = self._inbox.setdefault(s, {})
        if sender not in box:
            box[sender] = np.array(answer.params, dtype=np.float32)
            self.stats.models_received += 1

    # -- internals -------------------------------------------------------------------------

    def _reply_params(self, offer: Offer) -> np.ndarray | None:
        """Our model for the offer's step, if the sender wants it, mixes it, and we have it."""
        s = offer.step
        if not offer.wants or self.peer not in self.senders_of(offer.sender, s):
            return None
        if s == self.step and self._waiting:
            self.stats.models_sent += 1
            return self._own
        if self._prev is not None and s == self._prev[0]:
            self.stats.models_sent += 1
            return self._prev[1]
        return None

    def senders_of(self, peer: int, step: int) -> tuple[int, ...]:
        """The peers whose models ``peer`` mixes at ``step``."""
        return self.schedule.at(step).senders(peer)

    def _refuse(self, message: Offer, reason: str, detail: str) -> Answer:
        self.stats.refused[reason] += 1
        step = message.step if isinstance(message.step, int) else -1
        return Answer(self.peer, self.step, step, False, reason, detail)

    def _check_model(self, params: object) -> tuple[str, str] | None:
        if not isinstance(params, np.ndarray) or params.dtype != np.float32 \
                or params.shape != (self.dim,):
            shape = getattr(params, "shape", None)
            dtype = getattr(params, "dtype", type(params).__name__)
            return "wrong_shape", (f"expected a float32 vector of {self.dim}, got {dtype} "
                                   f"of shape {shape}")
        if not np.isfinite(params).all():
            return "non_finite", "the model holds NaN or infinity"
        return None

    def _check_own(self, trained: np.ndarray) -> None:
        problem = self._check_model(np.asarray(trained))
        if problem:
            raise ProtocolError(f"peer {self.peer}'s own model: {problem[1]}")

    def _heard_from(self, peer: int, now: float) -> None:
        if peer in self.down:
            self.down.discard(peer)
            if self._waiting:  # give a neighbour that is back the time to send its model
                self._deadline = max(self._deadline, now + self.step_timeout_s)

    def _ahead_report(self, peer: int, step: int) -> None:
        """Neighbour ``peer`` is at ``step`` > ours + 1: jump once enough of them say so."""
        self._ahead[peer] = max(step, self._ahead.get(peer, 0))
        need = self.rule.trim + 1
        if len(self._ahead) < need:
            return
        target = sorted(self._ahead.values(), reverse=True)[need - 1]
        if target <= self.step + 1:
            return
        if self._waiting and self._own is not None:
            self.params = self._own  # keep this step's training
        self.stats.jumps += 1
        self._prev = None
        self._advance(target)

    def _advance(self, step: int) -> None:
        self.step = step
        self._waiting = False
        self._own = None
        self._ahead.clear()
        self._failures.clear()
        self._deadline = self._next_probe = float("inf")
        for book in (self._inbox, self._pulled):
            for s in [s for s in book if s < step]:
                del book[s]
