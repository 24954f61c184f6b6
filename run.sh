#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs a job.
#   bash run.sh demo   -> the main job on its embedded default (Fashion-MNIST ViT pruned to 50% MACs)
#   bash run.sh test   -> the test suite
# Set-up is idempotent: a .venv in the repository is created once and reused.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${HIAP_VENV:-.venv}"
PY="$VENV/bin/python"

install_fashion_mnist() {
    # Fashion-MNIST from the Debian package (no download at run time); skipped where apt-get is
    # unavailable or we are not root: the loader then falls back to torchvision's download.
    [ -d /usr/share/datasets/fashion-mnist ] && return 0
    command -v apt-get >/dev/null 2>&1 || return 0
    local sudo=""
    if [ "$(id -u)" != "0" ]; then
        command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || return 0
        sudo="sudo -n"
    fi
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
        || echo "note: could not install dataset-fashion-mnist; torchvision's download is the fallback" >&2
}

setup() {
    install_fashion_mnist
    if [ ! -x "$PY" ]; then
        python3 -m venv "$VENV"
    fi
    if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
        # The pinned pair is what this project is tested with (a local wheel on our machines);
        # anywhere else, fall back to the newest pair pip can find. No wheel cache: where the
        # wheels are downloaded (a CUDA build, several GB) a cached copy doubles the disk needed.
        "$PY" -m pip install -q --no-cache-dir "torch==2.14.1" "torchvision==0.29.1" \
            || "$PY" -m pip install -q --no-cache-dir torch torchvision
    fi
    if ! "$PY" -c "import hiap_fx, pytest, hypothesis, transformers, timm" 2>/dev/null \
        || [ pyproject.toml -nt "$VENV/.hiap_installed" ]; then
        "$PY" -m pip install -q --no-cache-dir -e ".[dev]"
        touch "$VENV/.hiap_installed"
    fi
}

job="${1:-demo}"
shift || true
case "$job" in
    setup) setup ;;
    demo)
        setup
        "$VENV/bin/hiap-fx" demo "$@"
        ;;
    test)
        setup
        "$PY" -m ruff check hiap_fx tests examples benchmarks  # pyflakes + import order (pyproject)
        "$PY" -m mypy  # type check of hiap_fx/ (settings in pyproject)
        "$PY" -m pytest -q -n 2 "$@"
        ;;
    *)
        echo "usage: bash run.sh [demo|test|setup] [extra args]" >&2
        exit 2
        ;;
esac
