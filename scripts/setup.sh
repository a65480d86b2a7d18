#!/usr/bin/env bash
# Install slimnet and everything it needs on a fresh Debian/Ubuntu machine (root or sudo for apt).
#   bash scripts/setup.sh
# TORCH_SPEC overrides the PyTorch pins (these two are the pair this project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

# Fashion-MNIST, the offline default data set, from Debian's package.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

# PyTorch first, pinned, so that slimnet's looser requirement does not pull another build.
python -m pip install -q $TORCH_SPEC
# editable_mode=compat puts the clone on sys.path, so that a folder named slimnet in the working
# directory (the clone itself, seen from its parent) cannot shadow the package as an empty namespace.
python -m pip install -q -e ".[dev]" --config-settings editable_mode=compat
python -c "import slimnet, torch; print(f'slimnet {slimnet.__version__} with torch {torch.__version__} ready')"
