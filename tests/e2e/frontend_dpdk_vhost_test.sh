#!/usr/bin/env bash
# Our vhost-user front-end against a real back-end: vhostkit-probe (NetDriver) connects to
# DPDK testpmd's vhost PMD (macswap forwarding), negotiates, sets up the rings, sends frames and
# counts them coming back. Both sides must agree: testpmd reports the device ready and counts
# the same traffic the probe does. Runs in event mode (kick/call eventfds) and in poll mode
# ("no fd" kicks and calls). Then vhostkit-bench loop on the packed ring, without and with
# IN_ORDER (the vhost PMD offers both), and vhostkit-bench fwd (frames sent back out of their rx
# buffers) on the split ring and on packed with IN_ORDER: its JSON must name what was
# negotiated, fwd must get back every frame it sent, and testpmd must count every frame the
# bench sent and at least every one it got back.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/dpdk.sh"

t_start=$(vk_now)
vk_require_cmd "$VK_TESTPMD" ss
build=${VHOSTKIT_BUILD_DIR:-$here/../../build}
probe=$build/src/tools/vhostkit-probe/vhostkit-probe
bench=$build/src/tools/vhostkit-bench/vhostkit-bench
[[ -x $probe ]] || vk_skip "no vhostkit-probe in $build (build the vhostkit-probe target)"
[[ -x $bench ]] || vk_skip "no vhostkit-bench in $build (build the vhostkit-bench target)"
vk_require_cmd jq
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

# vhostkit-bench MODE for a second on the given ring options; checks its JSON and adds its
# frames to bench_tx / bench_rx.
bench_tx=0 bench_rx=0
run_bench() {  # MODE RING IN_ORDER(0|1)
  local mode=$1 ring=$2 io=$3 args out rc tx rx
  args=("$mode" --socket-path="$sock" --ring="$ring" --strict --size=128 --duration=1 --warmup=0.3
        --poll=busy --json)
  ((io)) && args+=(--in-order)
  vk_check "vhostkit-bench $mode --ring=$ring$( ((io)) && echo " --in-order") --strict: frames go round, the JSON names the layout"
  out=$(timeout 60 "$bench" "${args[@]}" 2>"$VK_TMP/bench.err"); rc=$?
  echo "$out"
  ((rc == 0)) || { cat "$VK_TMP/bench.err"; tail -30 "$tlog"; vk_fail "vhostkit-bench exit $rc"; }
  [[ $(jq -r .ring <<<"$out") == "$ring" ]] || vk_fail "the JSON says ring $(jq -r .ring <<<"$out")"
  [[ $(jq -r .in_order <<<"$out") == "$( ((io)) && echo true || echo false)" ]] ||
    vk_fail "the JSON says in_order $(jq -r .in_order <<<"$out")"
  [[ $(jq -r '.results[0].ring' <<<"$out") == "$ring" ]] || vk_fail "the result names another ring"
  feat=$(($(jq -r .features <<<"$out")))
  local packed=0
  [[ $ring == packed ]] && packed=1
  ((((feat >> 34) & 1) == packed)) || vk_fail "VIRTIO_F_RING_PACKED is $(((feat >> 34) & 1)) on ring $ring ($feat)"
  ((((feat >> 35) & 1) == io)) || vk_fail "VIRTIO_F_IN_ORDER is $(((feat >> 35) & 1)), wanted $io"
  tx=$(jq -r '.results[0].tx' <<<"$out")
  rx=$(jq -r '.results[0].rx' <<<"$out")
  ((tx > 1000)) || vk_fail "only $tx frames sent"
  ((rx * 10 >= tx * 9)) || vk_fail "$rx of $tx frames came back"
  # fwd: the same frames go round and round; the drain waits for every one.
  [[ $mode != fwd ]] || ((rx == tx)) || vk_fail "fwd: $rx of $tx frames came back"
  bench_tx=$((bench_tx + tx)) bench_rx=$((bench_rx + rx))
  vk_pass "features $feat: $rx of $tx frames came back"
}
run_bench loop packed 0
run_bench loop packed 1
run_bench fwd split 0
run_bench fwd packed 1

vk_check "testpmd counted the same traffic"
vk_dpdk_stop "$pmd"
rx=$(sed -n 's/.*RX-packets: *\([0-9]*\).*RX-dropped.*/\1/p' "$tlog" | tail -1)
tx=$(sed -n 's/.*TX-packets: *\([0-9]*\).*TX-dropped.*/\1/p' "$tlog" | tail -1)
sent=$((2 * frames + bench_tx)) came=$((got + got2 + bench_rx))
((${rx:-0} == sent)) || vk_fail "testpmd received ${rx:-?} frames, the probes and the bench sent $sent"
((${tx:-0} >= came)) || vk_fail "testpmd sent ${tx:-?}, the probes and the bench received $came"
vk_pass "testpmd rx=$rx tx=$tx"

echo "frontend_dpdk_vhost_test: all checks passed in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"
