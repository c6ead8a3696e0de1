#!/usr/bin/env bash
# Installs every Debian package vhostkit needs to build, test, fuzz, benchmark and run its demo.
# Idempotent: checks first and installs only what is missing, running `apt-get update` at most
# once. Needs root only when something is missing: as any other user it checks, says what is
# missing and how to install it, and exits 2.
#   scripts/deps.sh [--check]     --check: only report, never install (exit 1 when incomplete)
set -euo pipefail

packages=(
  # build
  cmake ninja-build g++ pkg-config git ca-certificates
  libgtest-dev libgmock-dev libbenchmark-dev
  libspdlog-dev libfmt-dev libcli11-dev nlohmann-json3-dev liburing-dev
  # --metrics: the HTTP server (a shared library; pulls libssl-dev, zlib1g-dev, libbrotli-dev)
  libcpp-httplib-dev
  # systemd: sd_notify/sd_listen_fds; systemd-analyze and systemd-socket-activate for the tests;
  # the .deb (cpack -G DEB: dpkg-shlibdeps from dpkg-dev, file to find the ELF binaries)
  libsystemd-dev systemd dpkg-dev file
  # fuzzing and sanitizers with clang
  clang-19 libclang-rt-19-dev llvm-19
  # the format check (.clang-format)
  clang-format-19
  # real peers: QEMU guests (qemu-system-common holds qemu-storage-daemon), DPDK
  qemu-system-x86 qemu-system-common qemu-utils dpdk dpdk-dev
  # guest image: kernel from Debian (zstd-compressed modules), busybox initramfs
  busybox-static cpio kmod zstd gzip
  # network namespaces, TAP, veth; process tools used by tests and scripts
  iproute2 iputils-ping procps ethtool psmisc util-linux coreutils findutils gawk
  python3 curl
  # libvirt e2e test (a private libvirtd); libvirt-daemon-system creates the libvirt-qemu user
  # libvirtd needs at start-up
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system libvirt-clients
  # benchmarks: plots and profiles (bench/profile.sh)
  gnuplot-nox linux-perf
)

check_only=0
case "${1:-}" in
  --check) check_only=1 ;;
  -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "deps.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
esac

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

if ((check_only)); then
  echo "deps: missing ${missing[*]}"
  exit 1
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "deps.sh: missing ${missing[*]}; installing them needs root: run 'sudo scripts/deps.sh'" >&2
  exit 2
fi

echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
