#!/usr/bin/env bash
# Installs every Debian package vhostkit needs to build, test, fuzz, benchmark and run its demo.
# Idempotent: installs only what is missing, runs `apt-get update` at most once.
set -euo pipefail

packages=(
  # build
  cmake ninja-build g++ pkg-config
  libgtest-dev libgmock-dev libbenchmark-dev
  libspdlog-dev libfmt-dev libcli11-dev nlohmann-json3-dev liburing-dev
  # fuzzing and sanitizers with clang
  clang-19 libclang-rt-19-dev
  # real peers: QEMU guests and DPDK
  qemu-system-x86 dpdk dpdk-dev
  # guest image: kernel from Debian, busybox initramfs
  busybox-static cpio kmod
  # network namespaces, TAP, veth; process tools used by tests
  iproute2 iputils-ping procps ethtool psmisc
  # benchmark plots
  gnuplot-nox
)

if [[ $(id -u) -ne 0 ]]; then
  echo "deps.sh: needs root to install packages (run as root or with sudo)" >&2
  exit 2
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
