"""The model lifecycle after training: federated evaluation, canary rollout with automatic
promotion or rollback, drift detection, and signed models and plans.

Everything here is sans-I/O: decisions take reports and time and return verdicts; the model
store (:mod:`shoal.store`) is the only state that persists. Carriers (the simulator today, the
gRPC transport later) feed these objects; see ``docs/lifecycle.md``.
"""
