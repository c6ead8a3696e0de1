#!/usr/bin/env bash
# `cpack -G DEB` from this build tree builds vhostkit_VERSION_ARCH.deb: its files are the
# programs under /usr/bin and the units under /usr/lib/systemd/system (ExecStart naming
# /usr/bin, not the staging directory), and its Depends, computed by dpkg-shlibdeps, name the
# shared libraries the programs link (liburing, spdlog, fmt, libsystemd).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/common.sh"

vk_require_cmd cpack dpkg-deb dpkg-shlibdeps
build=${VHOSTKIT_BUILD_DIR:-$(vk_repo_root)/build/release}
for p in vhostkit-net vhostkit-blk vhostkit-bench vhostkit-probe; do
  [[ -x $build/src/tools/$p/$p ]] || vk_skip "$p not built in $build"
done
vk_tmpdir

vk_check "cpack -G DEB builds the package"
(cd "$VK_TMP" && cpack -G DEB --config "$build/CPackConfig.cmake" -B "$VK_TMP/out") >"$VK_TMP/cpack.log" 2>&1 ||
  { cat "$VK_TMP/cpack.log"; vk_fail "cpack failed"; }
debs=("$VK_TMP"/out/vhostkit_*.deb)
[[ -f ${debs[0]} ]] || { cat "$VK_TMP/cpack.log"; vk_fail "no vhostkit_*.deb"; }
deb=${debs[0]}
vk_pass "$(basename "$deb")"

vk_check "the package holds the programs and the units"
dpkg-deb -c "$deb" | awk '{print $NF}' >"$VK_TMP/files"
for f in ./usr/bin/vhostkit-net ./usr/bin/vhostkit-blk ./usr/bin/vhostkit-bench ./usr/bin/vhostkit-probe \
  ./usr/lib/systemd/system/vhostkit-net@.service ./usr/lib/systemd/system/vhostkit-net@.socket \
  ./usr/lib/systemd/system/vhostkit-blk@.service ./usr/lib/systemd/system/vhostkit-blk@.socket \
  ./usr/share/doc/vhostkit/systemd.md ./usr/share/doc/vhostkit/examples/net-example.conf; do
  grep -qxF "$f" "$VK_TMP/files" || { cat "$VK_TMP/files"; vk_fail "the package lacks $f"; }
done
exec_start=$(dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/lib/systemd/system/vhostkit-net@.service | grep '^ExecStart=')
[[ $exec_start == 'ExecStart=/usr/bin/vhostkit-net $VHOSTKIT_NET_ARGS' ]] ||
  vk_fail "packaged unit: '$exec_start', want /usr/bin/vhostkit-net"
vk_pass "programs, units and docs under /usr; the unit runs /usr/bin/vhostkit-net"

vk_check "Depends name the shared libraries"
depends=$(dpkg-deb -f "$deb" Depends)
for lib in liburing2 libspdlog libfmt libsystemd0 libc6; do
  [[ $depends == *"$lib"* ]] || vk_fail "Depends lacks $lib: $depends"
done
vk_pass "Depends: $depends"
