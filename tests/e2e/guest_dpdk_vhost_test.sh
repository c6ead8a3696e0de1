#!/usr/bin/env bash
# The vhost-user harness against a real backend, before vhostkit-net exists: the test guest's NIC
# is a vhost-user virtio-net device served by DPDK testpmd's vhost PMD in 5tswap mode (swaps MAC,
# IP and L4 addresses, so the guest's own echo request comes back as a request from 192.0.2.1,
# the guest answers it, and that answer comes back as the reply to its ping). Checks that the
# QEMU arguments (memfd shared memory, vectors=0 under TCG) bring up a working device, and that
# packets cross the rings both ways. No namespace needed: no address exists on the host.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/qemu.sh"
source "$here/../../scripts/lib/dpdk.sh"

t_start=$(vk_now)
vk_require_root
vk_require_cmd "$VK_TESTPMD" ss
vk_guest_ensure
vk_tmpdir
log=$VK_TMP/console.log
sock=$VK_TMP/vhost.sock
peer_mac=02:00:00:00:00:01

vk_check "testpmd's vhost PMD listens on $sock"
vk_dpdk_start_backend "$sock" 0 "$VK_TMP/testpmd.log" --forward-mode=5tswap
pmd=$VK_DPDK_PID
vk_dpdk_wait_listening "$sock" 60 || { tail -20 "$VK_TMP/testpmd.log"; vk_fail "testpmd did not listen"; }
vk_pass "listening"

net=()
vk_qemu_vhost_user_net_args net "$sock"
vk_qemu_start --log "$log" --timeout 150 \
  --cmdline "vk.ip=192.0.2.2/24 vk.peer=192.0.2.1 vk.peer_mac=$peer_mac vk.cmd=ping vk.count=5" \
  -- "${net[@]}"

vk_check "QEMU connects and the backend sees every ring set up"
vk_dpdk_wait_ready "$VK_TMP/testpmd.log" 90 "$pmd" ||
  { vk_qemu_dump "$log"; tail -30 "$VK_TMP/testpmd.log"; vk_fail "no 'virtio is now ready' from testpmd"; }
vk_pass "testpmd: virtio is now ready for processing"

vk_check "the guest NIC gets link"
vk_qemu_wait_marker "$log" '^VK-LINK' 60 || { vk_qemu_dump "$log"; vk_fail "no VK-LINK marker"; }
grep -q '^VK-LINK up' "$log" || { vk_qemu_dump "$log"; vk_fail "link down"; }
vk_pass "$(grep -a -m1 '^VK-NET' "$log" | tr -d '\r'), $(grep -a -m1 '^VK-FEATURES' "$log" | tr -d '\r')"

vk_check "5 pings reflected by testpmd are all answered (guest tx ring -> testpmd -> guest rx ring)"
vk_qemu_wait_marker "$log" '^VK-RESULT ping ' 60 || { vk_qemu_dump "$log"; vk_fail "no ping result"; }
res=$(vk_guest_result "$log" ping)
[[ $res == ok* ]] || { vk_qemu_dump "$log"; vk_fail "ping: $res"; }
vk_pass "ping: $res"

vk_check "the guest powers off cleanly and testpmd counted the traffic"
vk_qemu_wait_exit "$VK_QEMU_PID" 30; rc=$?
((rc == 0)) || { vk_qemu_dump "$log"; vk_fail "QEMU exit status $rc"; }
vk_dpdk_stop "$pmd"
rx=$(sed -n 's/.*RX-packets: *\([0-9]*\).*RX-dropped.*/\1/p' "$VK_TMP/testpmd.log" | tail -1)
tx=$(sed -n 's/.*TX-packets: *\([0-9]*\).*TX-dropped.*/\1/p' "$VK_TMP/testpmd.log" | tail -1)
((${rx:-0} >= 10 && ${tx:-0} >= 10)) || vk_fail "testpmd forwarded rx=${rx:-?} tx=${tx:-?}, want >= 10 each"
vk_pass "testpmd rx=$rx tx=$tx"

echo "guest_dpdk_vhost_test: all checks passed in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"
