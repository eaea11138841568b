#!/usr/bin/env bash
# The main job: set up if needed, then a federated training run (config S by default).
# Arguments go to `shoal run`, e.g. ./run.sh --rounds 10 --clients 1000 --per-round 100
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/shoal" run "$@"
