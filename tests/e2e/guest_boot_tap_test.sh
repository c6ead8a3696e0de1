#!/usr/bin/env bash
# Self-test of the test guest and harness, without vhostkit: QEMU's own tap backend on a TAP in a
# fresh namespace (192.0.2.1/24 host side, 192.0.2.2/24 guest). The guest boots, pings the host,
# sends 4 MiB to a listener in the namespace and receives 4 MiB from another; both ends' sha256
# must agree. Proves the image, the boot harness, the markers and the checksum method that the
# vhost-user tests rely on.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/qemu.sh"
source "$here/../../scripts/lib/tcp.sh"

MIB=${VK_TEST_MIB:-4}
PORT=5201
t_start=$(vk_now)

vk_require_root
vk_require_cmd ip ss busybox
[[ -c /dev/net/tun ]] || vk_skip "/dev/net/tun missing (no TAP support)"
vk_guest_ensure
vk_tmpdir
log=$VK_TMP/console.log

vk_check "a namespace with TAP vktap0 192.0.2.1/24 can be created"
vk_netns_create tap || vk_fail "creating the namespace"
vk_netns_add_tap vktap0 192.0.2.1/24 || vk_fail "creating the TAP"
vk_pass "namespace $VK_NETNS, vktap0 up"

# Host peers, before the guest boots: a sink for the guest's tcp-tx, a source for its tcp-rx.
vk_random_file "$VK_TMP/to_guest" "$MIB"
sent_sum=$(vk_sha256 "$VK_TMP/to_guest")
vk_tcp_sink_start "$PORT" "$VK_TMP/from_guest" || vk_fail "starting the TCP sink"
vk_tcp_source_start "$((PORT + 1))" "$VK_TMP/to_guest" || vk_fail "starting the TCP source"

net=()
vk_qemu_tap_net_args net vktap0
vk_qemu_start --log "$log" --netns "$VK_NETNS" --timeout 120 \
  --cmdline "vk.ip=192.0.2.2/24 vk.peer=192.0.2.1 vk.cmd=ping,tcp-tx,tcp-rx vk.count=3 vk.mb=$MIB vk.port=$PORT" \
  -- "${net[@]}"

vk_check "the guest boots and loads the virtio modules"
vk_qemu_wait_marker "$log" '^VK-MODULES' 60 || { vk_qemu_dump "$log"; vk_fail "no VK-MODULES marker"; }
grep -q '^VK-MODULES ok' "$log" || { vk_qemu_dump "$log"; vk_fail "module load failed"; }
vk_pass "booted ($(grep -a -m1 '^VK-BOOT' "$log" | tr -d '\r')) in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"

vk_check "the virtio NIC gets link and the address"
vk_qemu_wait_marker "$log" '^VK-LINK' 30 || { vk_qemu_dump "$log"; vk_fail "no VK-LINK marker"; }
grep -q '^VK-LINK up' "$log" || { vk_qemu_dump "$log"; vk_fail "link down"; }
vk_pass "$(grep -a -m1 '^VK-NET' "$log" | tr -d '\r')"

vk_check "the guest pings 192.0.2.1 three times, all answered"
vk_qemu_wait_marker "$log" '^VK-RESULT ping ' 30 || { vk_qemu_dump "$log"; vk_fail "no ping result"; }
res=$(vk_guest_result "$log" ping)
[[ $res == ok* ]] || { vk_qemu_dump "$log"; vk_fail "ping: $res"; }
vk_pass "ping: $res"

vk_check "guest -> host: $MIB MiB over TCP, sha256 equal on both ends"
vk_qemu_wait_marker "$log" '^VK-RESULT tcp-tx ' 60 || { vk_qemu_dump "$log"; vk_fail "no tcp-tx result"; }
vk_tcp_wait_done "$VK_TMP/from_guest" 10 || vk_fail "host sink nc failed (status $?)"
guest_tx_sum=$(vk_guest_field "$log" tcp-tx sha256)
host_rx_sum=$(vk_sha256 "$VK_TMP/from_guest")
host_rx_bytes=$(stat -c %s "$VK_TMP/from_guest")
[[ $(vk_guest_result "$log" tcp-tx) == ok* ]] || { vk_qemu_dump "$log"; vk_fail "guest reports tcp-tx failure"; }
[[ $host_rx_bytes == $((MIB * 1048576)) ]] || vk_fail "host received $host_rx_bytes bytes, want $((MIB * 1048576))"
[[ -n $guest_tx_sum && $guest_tx_sum == "$host_rx_sum" ]] ||
  vk_fail "sha256 mismatch: guest sent $guest_tx_sum, host got $host_rx_sum"
vk_pass "tcp-tx $host_rx_bytes bytes, sha256 $host_rx_sum ($(vk_guest_field "$log" tcp-tx seconds) s in guest)"

vk_check "host -> guest: $MIB MiB over TCP, sha256 equal on both ends"
vk_qemu_wait_marker "$log" '^VK-RESULT tcp-rx ' 60 || { vk_qemu_dump "$log"; vk_fail "no tcp-rx result"; }
vk_tcp_wait_done "$VK_TMP/to_guest" 10 || vk_fail "host source nc failed (status $?)"
guest_rx_sum=$(vk_guest_field "$log" tcp-rx sha256)
guest_rx_bytes=$(vk_guest_field "$log" tcp-rx bytes)
[[ $guest_rx_bytes == $((MIB * 1048576)) ]] || { vk_qemu_dump "$log"; vk_fail "guest received $guest_rx_bytes bytes"; }
[[ $guest_rx_sum == "$sent_sum" ]] || vk_fail "sha256 mismatch: host sent $sent_sum, guest got $guest_rx_sum"
vk_pass "tcp-rx $guest_rx_bytes bytes, sha256 $guest_rx_sum ($(vk_guest_field "$log" tcp-rx seconds) s in guest)"

vk_check "the guest reports no failed scenario and powers off"
vk_qemu_wait_exit "$VK_QEMU_PID" 30; rc=$?
grep -q '^VK-DONE failed=0' "$log" || { vk_qemu_dump "$log"; vk_fail "VK-DONE missing or failures reported"; }
((rc == 0)) || { vk_qemu_dump "$log"; vk_fail "QEMU exit status $rc"; }
vk_pass "clean power-off"

echo "guest_boot_tap_test: all checks passed in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"
