#!/usr/bin/env bash
# Set-up shared by ./run.sh and ./test.sh: a virtual environment in .venv with shoal and its
# dependencies (PyTorch pinned to 2.13.0, the CPU build), and the Fashion-MNIST dataset.
# Safe to run repeatedly: it reinstalls only when pyproject.toml or this script changed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
python=${PYTHON:-python3}

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "shoal needs Python >= 3.11; set PYTHON=/path/to/python3.11 (found: $("$python" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv" >&2
    "$python" -m venv "$venv"
fi
stamp="$venv/.shoal-setup"
want=$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing shoal and its dependencies into $venv (first time takes a minute)" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    # torch is pinned here (the CPU build for this machine); pyproject.toml allows a range.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "torch==2.13.0" -e "$root[all]"
    echo "$want" > "$stamp"
fi

# The dataset: Debian's dataset-fashion-mnist, or another copy named by SHOAL_FASHION_MNIST.
data=${SHOAL_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
have_data() { [ -e "$data/train-images-idx3-ubyte.gz" ] || [ -e "$data/train-images-idx3-ubyte" ]; }
if ! have_data; then
    if [ -z "${SHOAL_FASHION_MNIST:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    fi
fi
if ! have_data; then
    cat >&2 <<MSG
setup: Fashion-MNIST was not found in $data.
  - On Debian or Ubuntu, as root:  apt-get install dataset-fashion-mnist
  - Or point shoal at another copy of the four IDX files (train-images-idx3-ubyte.gz, ...):
        export SHOAL_FASHION_MNIST=/path/to/fashion-mnist
MSG
    exit 1
fi

# The browser tests (tests/test_dashboard_browser.py) drive Debian's Chromium with its WebDriver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Chromium for the browser tests (apt-get install chromium chromium-driver)" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "setup: chromium and chromium-driver are missing: the browser tests will be skipped (as root: apt-get install chromium chromium-driver)" >&2
    fi
fi

# The Redis registry's tests (tests/test_registry.py) start Debian's redis-server on a free
# loopback port.
if ! command -v redis-server >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Redis for the registry tests (apt-get install redis-server)" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "setup: redis-server is missing: the Redis registry tests will be skipped (as root: apt-get install redis-server)" >&2
    fi
fi
