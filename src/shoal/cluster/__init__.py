"""The aggregator cluster: several ingest processes (gRPC servers folding devices' updates
into partial aggregates) and one committer (the run's coordinator), sharing the device
registry and the round state through Redis (docs/scaling.md, "Aggregator cluster")."""
