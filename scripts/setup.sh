#!/usr/bin/env bash
# One-shot set-up on a fresh machine: system packages the tests' real servers need,
# a virtual environment in .venv with torch, SAM 2 and this project.
# Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

# iproute2 and util-linux: the Ray tests run in a loopback-only network namespace (unshare -n, ip link)
apt_pkgs=(ffmpeg openssl iproute2 util-linux chromium fonts-dejavu-core gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-base
          gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav)
if [ "${SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1; then
    missing=()
    for p in "${apt_pkgs[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing system packages: ${missing[*]}"
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    echo "setup: installing torch"
    pip install -q torch==2.14.1 torchvision==0.29.1
fi
if ! "$VENV/bin/python" -c "import sam2" 2>/dev/null; then
    echo "setup: installing sam2==1.1.0 (sdist, no CUDA extension)"
    pip install -q "setuptools>=61" wheel
    SAM2_BUILD_CUDA=0 pip install -q --no-build-isolation sam2==1.1.0
fi
echo "setup: installing sam2-stream, its dependencies and the optional extras (models, ray) the tests cover"
pip install -q --no-build-isolation -e ".[dev,models,ray]"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, sam2, av; print("torch", torch.__version__, "av", av.__version__)'))"
