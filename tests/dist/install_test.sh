#!/usr/bin/env bash
# `cmake --install` of this build tree into a temporary prefix lays out the programs, the systemd
# units, the example confs and the docs; the installed units, instantiated (vhostkit-net@tap0,
# vhostkit-blk@disk0), pass `systemd-analyze verify` with ExecStart naming the installed
# programs. The check's own control: a copy with a bad Type= and a missing program must fail it.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/common.sh"

vk_require_cmd cmake systemd-analyze
build=${VHOSTKIT_BUILD_DIR:-$(vk_repo_root)/build/release}
for p in vhostkit-net vhostkit-blk vhostkit-bench vhostkit-probe; do
  [[ -x $build/src/tools/$p/$p ]] || vk_skip "$p not built in $build"
done
vk_tmpdir
prefix=$VK_TMP/prefix

vk_check "cmake --install lays out binaries, units, confs and docs"
cmake --install "$build" --prefix "$prefix" >"$VK_TMP/install.log" 2>&1 ||
  { cat "$VK_TMP/install.log"; vk_fail "cmake --install failed"; }
units=$prefix/lib/systemd/system
want=(bin/vhostkit-net bin/vhostkit-blk bin/vhostkit-bench bin/vhostkit-probe
  lib/systemd/system/vhostkit-net@.service lib/systemd/system/vhostkit-net@.socket
  lib/systemd/system/vhostkit-blk@.service lib/systemd/system/vhostkit-blk@.socket
  share/doc/vhostkit/examples/net-example.conf share/doc/vhostkit/examples/blk-example.conf
  share/doc/vhostkit/systemd.md share/doc/vhostkit/README.md)
for f in "${want[@]}"; do
  [[ -f $prefix/$f ]] || { find "$prefix" | sort; vk_fail "missing $f"; }
done
for p in vhostkit-net vhostkit-blk; do
  var=VHOSTKIT_$(tr a-z A-Z <<<"${p#vhostkit-}")_ARGS
  grep -qxF "ExecStart=$prefix/bin/$p \$$var" "$units/$p@.service" ||
    { grep ExecStart "$units/$p@.service"; vk_fail "$p@.service does not run $prefix/bin/$p"; }
done
"$prefix/bin/vhostkit-net" --print-capabilities | grep -q '"net"' || vk_fail "installed vhostkit-net does not run"
vk_pass "${#want[@]} files in place; ExecStart names the installed programs"

vk_check "systemd-analyze verify accepts the instantiated units"
out=$(cd "$units" && systemd-analyze verify ./vhostkit-net@tap0.socket ./vhostkit-net@tap0.service \
  ./vhostkit-blk@disk0.socket ./vhostkit-blk@disk0.service 2>&1)
rc=$?
((rc == 0)) && [[ -z $out ]] || { echo "$out"; vk_fail "verify: exit $rc or complaints"; }
vk_pass "four units verified, no complaints"

vk_check "control: verify rejects a broken copy"
mkdir -p "$VK_TMP/bad"
sed -e 's/^Type=notify/Type=notifyy/' -e "s#$prefix/bin/vhostkit-net#$VK_TMP/none/vhostkit-net#" \
  "$units/vhostkit-net@.service" >"$VK_TMP/bad/vhostkit-net@.service"
if (cd "$VK_TMP/bad" && systemd-analyze verify ./vhostkit-net@tap0.service >"$VK_TMP/bad.log" 2>&1); then
  cat "$VK_TMP/bad.log"
  vk_fail "verify accepted a unit with a bad Type= and a missing program"
fi
grep -q "notifyy" "$VK_TMP/bad.log" || { cat "$VK_TMP/bad.log"; vk_fail "verify did not name the bad Type="; }
vk_pass "install layout and units"
