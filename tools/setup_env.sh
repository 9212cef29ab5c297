#!/usr/bin/env bash
# Creates the project's virtual environment (default: .venv) on a fresh Debian machine.
#   1. apt packages that ffcv's C++ extension builds against (only when root and missing);
#   2. a pkg-config shim for OpenCV: ffcv uses only cv::Mat and cv::resize, so the small
#      libopencv-core/imgproc packages suffice (~49 MB instead of ~640 MB for libopencv-dev);
#   3. the venv and the pinned requirements.txt, ffcv built last.
# Idempotent: re-running it on a complete venv does nothing. Used by the Makefile and the Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# libgl1 + libglib2.0-0: the opencv-python wheel (imported by ffcv) loads libGL and glib at import.
APT_PACKAGES="build-essential pkg-config libturbojpeg0-dev libopencv-core-dev libopencv-imgproc-dev libgl1 libglib2.0-0"

# The venv is complete for these pins, this package list (pyproject.toml's packages are installed editable) and this script.
if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.complete" ] && cat requirements.txt pyproject.toml tools/setup_env.sh | cmp -s - "$VENV/.complete"; then
    exit 0
fi

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "[setup] apt-get install$missing"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
        echo "[setup] missing system packages:$missing" >&2
        echo "[setup] install them with: sudo apt-get install --no-install-recommends$missing" >&2
        exit 1
    fi
fi

# pkg-config shim: only -I/-L/-l flags (ffcv's setup.py understands nothing else).
SHIM="$VENV/opencv4-shim"
LIBDIR=$(dirname "$(dpkg -L libopencv-core-dev | grep '/libopencv_core\.so$' | head -n1)")
mkdir -p "$SHIM/include/opencv2"
cat > "$SHIM/opencv4.pc" <<PC
Name: opencv4
Description: OpenCV core and imgproc only (shim for building ffcv)
Version: 4
Libs: -L$LIBDIR -lopencv_core -lopencv_imgproc
Cflags: -I$(cd "$SHIM" && pwd)/include -I/usr/include/opencv4
PC
cat > "$SHIM/include/opencv2/opencv.hpp" <<'HPP'
#pragma once
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
HPP

# pip's output minus the notes about index locations that do not apply to a package.
pip_install() {
    "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install --upgrade pip setuptools wheel
grep -v '^ffcv' requirements.txt > "$VENV/requirements-noffcv.txt"
echo "[setup] pip install -r requirements.txt (torch is large: a few minutes)"
pip_install -r "$VENV/requirements-noffcv.txt"
PKG_CONFIG_PATH="$(cd "$SHIM" && pwd)${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}" pip_install --no-build-isolation -r requirements.txt
pip_install --no-deps --no-build-isolation -e .
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
import ffcv, fastargs, kornia, timm, torch  # noqa: F401 - the imports are the check
print("[setup] ok:", ", ".join(f"{name} {version(name)}" for name in ("torch", "ffcv", "kornia", "timm")))
PY
cat requirements.txt pyproject.toml tools/setup_env.sh > "$VENV/.complete"
