#!/usr/bin/env bash
# Install what the test suite needs into .venv: the package with its test extras, Debian's
# VLFeat 0.9.21 (the numerical reference for HOG and DSIFT) and cyvlfeat built against it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! [ -f /usr/include/vl/hog.h ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libvlfeat-dev >/dev/null
fi
.venv/bin/pip install -q "torch==2.13.0" -e ".[test]"
.venv/bin/python -c "import cyvlfeat" 2>/dev/null || .venv/bin/pip install -q --no-build-isolation cyvlfeat
