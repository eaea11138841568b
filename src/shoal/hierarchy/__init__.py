"""Hierarchical federated learning: edge aggregators by composition (docs/hierarchy.md).

An edge is the same :class:`~shoal.coordinator.Coordinator` downstream (its group's devices,
with the run's policies and pipeline) and a client upstream (one upload to its parent).
"""
