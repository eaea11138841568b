#!/usr/bin/env bash
# Regenerate the Python modules for src/shoal/transport/proto/*.proto (needs grpcio-tools:
# .venv/bin/pip install grpcio-tools). The generated files are committed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root/src"
"$root/.venv/bin/python" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
    --grpc_python_out=. shoal/transport/proto/shoal.proto shoal/transport/proto/gossip.proto
