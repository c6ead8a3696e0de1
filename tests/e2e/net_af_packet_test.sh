#!/usr/bin/env bash
# vhostkit-net on AF_PACKET: a veth pair in a fresh namespace, vhostkit-net bound to veth-a
# (--af-packet, mapped rings), the host stack on veth-b (192.0.2.1/24). A QEMU guest
# (192.0.2.2/24) pings 192.0.2.1, sends 5 MiB and receives 5 MiB over TCP (sha256 equal on both
# ends).
# Offloads: by default veth-b's TSO/GSO are turned off, so the host sends MTU-sized frames. With
# them on (VK_AFP_GSO=1) the port receives 64 KiB GSO super-frames that no MTU-sized guest
# buffer takes: vhostkit-net counts them as rx drops, logs once which offloads to turn off, and
# host -> guest TCP stalls (AfPacketPort does not use PACKET_VNET_HDR / segment, like DPDK's
# af_packet PMD).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/qemu.sh"
source "$here/../../scripts/lib/tcp.sh"
source "$here/../../scripts/lib/vhostkit.sh"

MIB=${VK_TEST_MIB:-5}
PORT=5201
t_start=$(vk_now)

vk_require_root
vk_require_cmd ip ss busybox
vk_net_find_bin
vk_guest_ensure
vk_tmpdir
log=$VK_TMP/console.log
nlog=$VK_TMP/vhostkit-net.log
sock=$VK_TMP/vhost.sock

vk_check "veth-b (192.0.2.1/24) <-> veth-a in a namespace; vhostkit-net --af-packet=veth-a listens"
vk_netns_create afp || vk_fail "creating the namespace"
vk_netns_add_veth veth-b veth-a 192.0.2.1/24 || vk_fail "creating the veth pair"
if [[ ${VK_AFP_GSO:-0} != 1 ]]; then
  vk_require_cmd ethtool
  vk_netns_exec ethtool -K veth-b tso off gso off >/dev/null 2>&1 || vk_fail "ethtool -K veth-b tso off gso off"
fi
vk_net_start "$nlog" --netns "$VK_NETNS" -- --socket-path="$sock" --af-packet=veth-a --stats=1
net_pid=$VK_NET_PID
vk_net_wait_listening "$sock" 10 || { cat "$nlog"; vk_fail "did not listen"; }
vk_pass "$(grep -m1 'vhostkit-net: listening' "$nlog" | sed 's/^.*\] //')"

vk_random_file "$VK_TMP/to_guest" "$MIB"
vk_tcp_sink_start "$PORT" "$VK_TMP/from_guest" || vk_fail "starting the TCP sink"
vk_tcp_source_start "$((PORT + 1))" "$VK_TMP/to_guest" || vk_fail "starting the TCP source"

net=()
vk_qemu_vhost_user_net_args net "$sock"
vk_qemu_start --log "$log" --timeout 120 \
  --cmdline "vk.ip=192.0.2.2/24 vk.peer=192.0.2.1 vk.cmd=ping,tcp-tx,tcp-rx vk.count=3 vk.mb=$MIB vk.port=$PORT" \
  -- "${net[@]}"

vk_check "QEMU connects and the guest NIC gets link"
vk_net_wait_connected "$nlog" 30 || { cat "$nlog"; vk_qemu_dump "$log"; vk_fail "no front-end connected"; }
vk_qemu_wait_marker "$log" '^VK-LINK' 60 || { vk_qemu_dump "$log"; vk_fail "no VK-LINK marker"; }
grep -q '^VK-LINK up' "$log" || { vk_qemu_dump "$log"; vk_fail "link down"; }
vk_pass "$(grep -a -m1 '^VK-NET' "$log" | tr -d '\r')"

vk_check "the guest pings 192.0.2.1 (through AF_PACKET on veth-a) three times, all answered"
vk_guest_check_ping "$log" 30
vk_check "guest -> host: $MIB MiB over TCP, sha256 equal on both ends"
vk_guest_check_tcp_tx "$log" "$VK_TMP/from_guest" "$MIB" 60
vk_check "host -> guest: $MIB MiB over TCP, sha256 equal on both ends"
vk_guest_check_tcp_rx "$log" "$VK_TMP/to_guest" "$MIB" 60

vk_check "the guest reports no failed scenario and powers off"
vk_qemu_wait_exit "$VK_QEMU_PID" 30; rc=$?
grep -q '^VK-DONE failed=0' "$log" || { vk_qemu_dump "$log"; vk_fail "VK-DONE missing or failures reported"; }
((rc == 0)) || { vk_qemu_dump "$log"; vk_fail "QEMU exit status $rc"; }
vk_pass "clean power-off"

vk_check "--stats shows traffic both ways on qp0, no errors; SIGTERM -> exit 0, socket removed"
sleep 1.2
vk_net_stats_active "$nlog" 0 tx || { grep qp0 "$nlog"; vk_fail "no tx traffic in the stats lines"; }
vk_net_stats_active "$nlog" 0 rx || { grep qp0 "$nlog"; vk_fail "no rx traffic in the stats lines"; }
read -r txm txg txd txe rxm rxg rxd rxe <<<"$(vk_net_stats_sum "$nlog" 0)"
((txe == 0 && rxe == 0)) || vk_fail "errors counted: tx $txe rx $rxe"
((rxd == 0)) || vk_fail "$rxd frames from veth-a did not fit the guest's buffers (rx drops)"
vk_net_stop "$net_pid"; rc=$?
((rc == 0)) || { cat "$nlog"; vk_fail "exit status $rc"; }
[[ ! -e $sock ]] || vk_fail "socket left behind"
vk_pass "stats sums: tx ${txg} Gbit drops $txd | rx ${rxg} Gbit drops $rxd; exit 0"

echo "net_af_packet_test: all checks passed in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"
