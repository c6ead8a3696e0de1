#!/usr/bin/env bash
# Our vhost-user front-end against a real back-end: vhostkit-probe (NetDriver) connects to
# DPDK testpmd's vhost PMD (macswap forwarding), negotiates, sets up the rings, sends frames and
# counts them coming back. Both sides must agree: testpmd reports the device ready and counts
# the same traffic the probe does. Runs in event mode (kick/call eventfds) and in poll mode
# ("no fd" kicks and calls).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/dpdk.sh"

t_start=$(vk_now)
vk_require_cmd "$VK_TESTPMD" ss
build=${VHOSTKIT_BUILD_DIR:-$here/../../build}
probe=$build/src/tools/vhostkit-probe/vhostkit-probe
[[ -x $probe ]] || vk_skip "no vhostkit-probe in $build (build the vhostkit-probe target)"
vk_tmpdir
sock=$VK_TMP/vhost.sock
tlog=$VK_TMP/testpmd.log
frames=2000

vk_check "testpmd's vhost PMD listens on $sock"
vk_dpdk_start_backend "$sock" 0 "$tlog" --forward-mode=macswap
pmd=$VK_DPDK_PID
vk_dpdk_wait_listening "$sock" 60 || { tail -20 "$tlog"; vk_fail "testpmd did not listen"; }
vk_pass "listening"

# Runs the probe once; prints its JSON. $1: poll mode.
run_probe() {
  timeout 60 "$probe" --socket-path "$sock" --poll "$1" --frames "$frames" --frame-size 128 \
    --expect "$((frames * 9 / 10))" --wait 3000
}

json_field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" <<<"$2" | tr -d '"'; }

vk_check "probe (event mode) negotiates, sets up both rings and gets its frames back"
out=$(run_probe event); rc=$?
echo "$out"
((rc == 0)) || { tail -30 "$tlog"; vk_fail "vhostkit-probe exit $rc"; }
[[ $(json_field connected "$out") == true ]] || vk_fail "not connected"
feat=$(json_field features "$out")
(((feat >> 32) & 1)) || vk_fail "VERSION_1 not negotiated ($feat)"
(((feat >> 30) & 1)) || vk_fail "PROTOCOL_FEATURES not negotiated ($feat)"
proto=$(json_field protocol_features "$out")
(((proto >> 3) & 1)) || vk_fail "REPLY_ACK not negotiated ($proto)"
vk_dpdk_wait_ready "$tlog" 10 "$pmd" || { tail -30 "$tlog"; vk_fail "no 'virtio is now ready' from testpmd"; }
got=$(json_field received "$out")
vk_pass "features $feat protocol $proto; testpmd: virtio is now ready; $got/$frames frames came back"

vk_check "the probe's teardown left testpmd serving: a second probe in poll mode (no kick/call fds)"
out=$(run_probe poll); rc=$?
echo "$out"
((rc == 0)) || { tail -30 "$tlog"; vk_fail "vhostkit-probe (poll) exit $rc"; }
got2=$(json_field received "$out")
vk_pass "$got2/$frames frames came back in poll mode"

vk_check "testpmd counted the same traffic"
vk_dpdk_stop "$pmd"
rx=$(sed -n 's/.*RX-packets: *\([0-9]*\).*RX-dropped.*/\1/p' "$tlog" | tail -1)
tx=$(sed -n 's/.*TX-packets: *\([0-9]*\).*TX-dropped.*/\1/p' "$tlog" | tail -1)
((${rx:-0} == 2 * frames)) || vk_fail "testpmd received ${rx:-?} frames, the probes sent $((2 * frames))"
((${tx:-0} >= got + got2)) || vk_fail "testpmd sent ${tx:-?}, the probes received $((got + got2))"
vk_pass "testpmd rx=$rx tx=$tx"

echo "frontend_dpdk_vhost_test: all checks passed in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"
