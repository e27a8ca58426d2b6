#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh Debian machine (run as root): the RISC-V toolchain, QEMU,
# Prometheus, socat and Chromium (headless, for the report test) from Debian; edgefleet with its test extras from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf qemu-system-misc prometheus socat chromium"
missing=""
for pkg in $APT_PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq $missing >/dev/null
fi

# torch first, pinned: the CPU build is on disk; an unpinned spec would pull CUDA wheels.
python3 -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
echo "setup: done"
