"""The typed sections that protect a run: secure aggregation, differential privacy, Byzantine
robustness, and the simulated attacks that test them.

Holds ``[secure_aggregation]``, ``[privacy]``, ``[robust]`` and ``[attack]``, declared like
the training sections in :mod:`shoal.config.sections` (one frozen dataclass per TOML table,
each field one key with its type, default, bounds and one-line doc). Key names and defaults
are part of the on-disk format, so renaming one breaks old configs.
"""

from __future__ import annotations

from shoal.config.schema import Section, option, section
from shoal.errors import ConfigError

__all__ = ["SecureAggregationConfig", "PrivacyConfig", "RobustConfig", "AttackConfig"]


@section("secure_aggregation")
class SecureAggregationConfig(Section):
    """SecAgg+, so the server sees only the sum of the updates."""

    enabled: bool = option(False, "aggregate securely: the server sees only the sum")
    protocol: str = option("secagg", "'secagg': SecAgg+ (pairwise masks from X25519, Shamir "
                           "shares, dropout recovery); 'ckks': homomorphic encryption "
                           "(TenSEAL CKKS; a key holder decrypts only the sum; in "
                           "simulation and over gRPC, there without DP)",
                           choices=("secagg", "ckks"))
    ckks_degree: int = option(4096, "protocol 'ckks': ring degree N, 4096 (128-bit security) "
                              "or 8192 (256-bit, twice the bytes)", min=4096, max=8192)
    clip: float = option(0.5, "per-coordinate range [-clip, clip] of the fixed-point encoding "
                         "(larger values are clipped)", min=0.0, min_exclusive=True)
    value_bits: int = option(20, "quantization bits per coordinate (stochastic rounding)",
                             min=2, max=40)
    max_weight: int = option(4096, "largest per-client weight (example count) that is masked; "
                             "larger counts are capped", min=1, max=1_000_000)
    encoding: str = option("fixed_point", "protocol 'secagg': how updates enter the ring: "
                           "'fixed_point' (clip, value_bits, example weights) or 'rotated' "
                           "(L2 clip to norm_clip, a random rotation shared per round, a "
                           "ring of ring_bits, every client weighing 1: ~5x fewer bytes at 8 "
                           "bits; needed by privacy.placement = 'distributed'; in "
                           "simulation and over gRPC)", choices=("fixed_point", "rotated"))
    ring_bits: int = option(0, "encoding 'rotated': bits per ring element (8: one byte per "
                            "parameter); 0 = 8, or 16 with privacy.placement = 'distributed'",
                            min=0, max=32)
    norm_clip: float = option(1.0, "encoding 'rotated' without distributed DP: the L2 norm "
                              "every client clips its update to (distributed DP clips to "
                              "privacy.clip_norm)", min=0.0, min_exclusive=True)
    neighbours: int = option(0, "SecAgg+ neighbours k; 0 = automatic (complete graph with a "
                             "majority threshold below 100 clients, else the SecAgg+ "
                             "parameter search from dropout and corrupt_rate); -1 = complete "
                             "graph (SecAgg)", min=-1)
    threshold: int = option(0, "Shamir threshold t; 0 = with k", min=0)
    dropout: float = option(0.0, "expected dropout rate (sets k and t for cohorts of 100 or "
                            "more); in simulation also the fraction of each cohort that "
                            "vanishes after sharing keys (their masks are recovered)", min=0.0,
                            max=0.5)
    post_quantum: bool = option(False, "protocol 'secagg': hybrid X25519 + ML-KEM-768 "
                                "pairwise keys, so masks stay secret if either holds "
                                "(in simulation and over gRPC)")
    dropout_stage: str = option("share_keys", "simulation: the last stage the dropouts "
                                "complete ('setup': they never advertise keys; "
                                "'advertise_keys'; 'share_keys'; 'masked_input': their input "
                                "counts but they never help unmask), or 'any' (each at a "
                                "random one)",
                                choices=("setup", "advertise_keys", "share_keys",
                                         "masked_input", "any"))
    corrupt_rate: float = option(0.05, "assumed fraction of clients colluding with the server "
                                 "(sets k and t)", min=0.0, max=0.45)
    roster_wait_s: float = option(15.0, "deployments: longest wait for the selected devices "
                                  "to check in before the round's roster closes", min=0.0,
                                  min_exclusive=True)
    stage_timeout_s: float = option(10.0, "deployments: length of the key-exchange and "
                                    "unmasking stages (devices that miss one are dropouts; "
                                    "input collection runs to deploy.deadline_s)", min=0.0,
                                    min_exclusive=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ring_bits and self.ring_bits < 4:
            raise ConfigError(f"secure_aggregation.ring_bits = {self.ring_bits} is not "
                              f"allowed: use 0 (automatic) or 4 to 32",
                              key="secure_aggregation.ring_bits")


@section("privacy")
class PrivacyConfig(Section):
    """Differential privacy and its accounting."""

    placement: str = option("none", "differential privacy: 'central' (server clips and adds "
                            "noise), 'local' (each client does), 'distributed' (each client "
                            "adds a discrete Gaussian share inside secure aggregation, so "
                            "the server never sees a noiseless sum; needs "
                            "secure_aggregation.encoding = 'rotated'), or 'none'",
                            choices=("none", "central", "local", "distributed"))
    noise_multiplier: float = option(1.0, "z: noise std = z * clip_norm", min=0.0,
                                     min_exclusive=True)
    clip_norm: float = option(1.0, "C: L2 bound on each client update (the initial value with "
                              "adaptive clipping)", min=0.0, min_exclusive=True)
    adaptive_clipping: bool = option(False, "learn C as a quantile of update norms (central "
                                     "placement; Andrew et al. 2021)")
    target_quantile: float = option(0.5, "adaptive clipping: fraction of updates to leave "
                                    "unclipped", min=0.0, max=1.0, min_exclusive=True,
                                    max_exclusive=True)
    clip_learning_rate: float = option(0.2, "adaptive clipping: geometric step size", min=0.0,
                                       min_exclusive=True)
    count_noise_std: float = option(0.0, "adaptive clipping: noise std on the unclipped "
                                    "count, in clients; 0 = expected clients / 20", min=0.0)
    delta: float = option(1e-05, "delta at which epsilon is reported (keep it well below 1 / "
                          "number of clients)", min=0.0, max=0.1, min_exclusive=True)
    epsilon_budget: float = option(0.0, "largest epsilon the run may spend; 0 = no budget "
                                   "(epsilon is still reported)", min=0.0)
    on_budget: str = option("refuse", "when the planned rounds would exceed the budget: "
                            "'refuse' to start, or 'stop' cleanly before the round that "
                            "would exceed it", choices=("refuse", "stop"))
    accountant: str = option("rdp", "privacy accountant from dp-accounting",
                             choices=("rdp", "pld"))
    honest_clients: int = option(0, "placement 'distributed': h, the fewest honest clients "
                                 "whose noise must be in a released sum; each client adds "
                                 "1/h of the noise variance, and a round with fewer than h + "
                                 "colluding_clients masked inputs releases nothing (dropouts "
                                 "count against h); 0 = sampling.per_round", min=0)
    colluding_clients: int = option(0, "placement 'distributed': f, included clients that "
                                    "may collude with the server (their noise does not "
                                    "count)", min=0)


@section("robust")
class RobustConfig(Section):
    """Byzantine-robust aggregation (docs/robustness.md)."""

    rule: str = option("none", "robust aggregation rule: 'none' (the weighted mean), "
                       "'median' (coordinate-wise), 'trimmed_mean', 'krum', 'multi_krum', "
                       "'bulyan' (these hold the round's updates: memory O(updates x model)), "
                       "'centered_clip' (streams)",
                       choices=("none", "median", "trimmed_mean", "krum", "multi_krum",
                                "bulyan", "centered_clip"))
    byzantine_fraction: float = option(0.2, "at most this fraction of a round's updates is "
                                       "assumed Byzantine: f = ceil(fraction x n); a round "
                                       "that breaks the rule's assumption is refused",
                                       min=0.0, max=0.5, max_exclusive=True)
    trim: float = option(0.0, "trimmed_mean: fraction trimmed at each end of a coordinate; "
                         "0 = byzantine_fraction", min=0.0, max=0.5, max_exclusive=True)
    krum_m: int = option(0, "multi_krum: updates averaged; 0 = n - f", min=0)
    cc_tau: float = option(1.0, "centered_clip: clipping radius around the previous "
                           "aggregate", min=0.0, min_exclusive=True)
    norm_bound: float = option(0.0, "clip every update to this L2 norm before the rule (the "
                               "first round's bound with norm_adaptive); 0 = off", min=0.0)
    norm_adaptive: bool = option(False, "norm bound = norm_factor x the median norm of the "
                                 "previous round's updates")
    norm_factor: float = option(1.0, "norm_adaptive: the multiple of the median norm", min=0.0,
                                min_exclusive=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm_adaptive and self.norm_bound <= 0:
            raise ConfigError("robust.norm_adaptive needs robust.norm_bound > 0 (the first "
                              "round's bound)", key="robust.norm_adaptive")
        if self.trim and self.trim < self.byzantine_fraction:
            raise ConfigError(f"robust.trim = {self.trim:g} trims fewer values than the "
                              f"robust.byzantine_fraction = {self.byzantine_fraction:g} "
                              f"attackers send; use at least that (or 0)", key="robust.trim")


@section("attack")
class AttackConfig(Section):
    """Simulated attackers: some clients misbehave (simulation only; docs/robustness.md)."""

    kind: str = option("none", "what the malicious clients do: 'none', 'label_flip', "
                       "'sign_flip', 'gaussian', 'backdoor' (pixel pattern + model "
                       "replacement), 'alie' (a little is enough), 'ipm' (inner-product "
                       "manipulation), 'min_max', 'min_sum', 'sybil'",
                       choices=("none", "label_flip", "sign_flip", "gaussian", "backdoor",
                                "alie", "ipm", "min_max", "min_sum", "sybil"))
    fraction: float = option(0.1, "fraction of the population that is malicious (a fixed "
                             "set drawn from attack.seed)", min=0.0, max=1.0,
                             max_exclusive=True)
    knowledge: str = option("omniscient", "alie, ipm, min_max, min_sum: statistics from every "
                            "honest update of the cohort ('omniscient') or from the attackers' "
                            "own honest updates ('own')", choices=("omniscient", "own"))
    scale: float = option(0.0, "backdoor: boost of the malicious update (model "
                          "replacement); 0 = clients per round / server_lr; sign_flip: "
                          "multiple of the flipped update (0 = 1)", min=0.0)
    noise_std: float = option(1.0, "gaussian: standard deviation of the noise sent", min=0.0,
                              min_exclusive=True)
    ipm_epsilon: float = option(0.5, "ipm: the update sent is -epsilon x the honest mean",
                                min=0.0, min_exclusive=True)
    target_label: int = option(0, "backdoor: the label the pixel pattern maps to", min=0)
    poison_fraction: float = option(0.5, "backdoor: fraction of an attacker's examples that "
                                    "carry the pattern", min=0.0, max=1.0,
                                    min_exclusive=True)
    seed: int = option(0, "which clients are malicious (independent of the run seed)", min=0)
