#!/usr/bin/env bash
# vhostkit-net on a TAP, a QEMU guest through it. vhostkit-net runs inside a fresh namespace and
# creates the TAP there (--tap); the host side gets 192.0.2.1/24, the guest 192.0.2.2/24. The
# guest pings the host, sends 20 MiB to a listener and receives 20 MiB from another (sha256 equal
# on both ends); vhostkit-net's --stats lines show the traffic both ways; on SIGTERM it exits 0
# and removes its socket, and its TAP goes with it.
# VK_QEMU_NET_DEVICE_ARGS (net_packed_test.sh: ",packed=on") goes on the guest's NIC;
# VK_EXPECT_GUEST_BITS (e.g. "34"): feature bits the guest must show as negotiated in
# /sys/class/net/eth0/device/features; VK_NET_EXPECT_RING: the ring vhostkit-net must log.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/qemu.sh"
source "$here/../../scripts/lib/tcp.sh"
source "$here/../../scripts/lib/vhostkit.sh"

MIB=${VK_TEST_MIB:-20}
EXPECT_BITS=${VK_EXPECT_GUEST_BITS:-}
EXPECT_RING=${VK_NET_EXPECT_RING:-}
NAME=${VK_SCRIPT_NAME:-net_tap_ping_test.sh}
PORT=5201
TAP=vk-tap0
t_start=$(vk_now)

vk_require_root
vk_require_cmd ip ss busybox
[[ -c /dev/net/tun ]] || vk_skip "/dev/net/tun missing (no TAP support)"
vk_net_find_bin
vk_guest_ensure
vk_tmpdir
log=$VK_TMP/console.log
nlog=$VK_TMP/vhostkit-net.log
sock=$VK_TMP/vhost.sock

vk_netns_create nettap || vk_fail "creating the namespace"

vk_check "vhostkit-net --tap=$TAP (inside $VK_NETNS) listens on its socket and creates the TAP"
vk_net_start "$nlog" --netns "$VK_NETNS" -- --socket-path="$sock" --tap="$TAP" --stats=1
net_pid=$VK_NET_PID
vk_net_wait_listening "$sock" 10 || { cat "$nlog"; vk_fail "no listening socket $sock"; }
vk_netns_exec ip link show "$TAP" >/dev/null 2>&1 || { cat "$nlog"; vk_fail "no TAP $TAP in $VK_NETNS"; }
vk_netns_exec ip addr add 192.0.2.1/24 dev "$TAP" || vk_fail "address on $TAP"
vk_netns_exec ip link set "$TAP" up || vk_fail "bringing $TAP up"
vk_pass "listening; $TAP is 192.0.2.1/24"

vk_random_file "$VK_TMP/to_guest" "$MIB"
vk_tcp_sink_start "$PORT" "$VK_TMP/from_guest" || vk_fail "starting the TCP sink"
vk_tcp_source_start "$((PORT + 1))" "$VK_TMP/to_guest" || vk_fail "starting the TCP source"

net=()
vk_qemu_vhost_user_net_args net "$sock"
vk_qemu_start --log "$log" --timeout 150 \
  --cmdline "vk.ip=192.0.2.2/24 vk.peer=192.0.2.1 vk.cmd=ping,tcp-tx,tcp-rx vk.count=3 vk.mb=$MIB vk.port=$PORT" \
  -- "${net[@]}"

vk_check "QEMU connects to vhostkit-net and the guest NIC gets link"
vk_net_wait_connected "$nlog" 30 || { cat "$nlog"; vk_qemu_dump "$log"; vk_fail "no front-end connected"; }
vk_qemu_wait_marker "$log" '^VK-LINK' 60 || { vk_qemu_dump "$log"; vk_fail "no VK-LINK marker"; }
grep -q '^VK-LINK up' "$log" || { vk_qemu_dump "$log"; vk_fail "link down"; }
vk_pass "$(grep -a -m1 '^VK-NET' "$log" | tr -d '\r'), $(grep -a -m1 '^VK-FEATURES' "$log" | tr -d '\r')"

if [[ -n $EXPECT_BITS || -n $EXPECT_RING ]]; then
  vk_check "negotiated: guest feature bits ${EXPECT_BITS:-none asked}, vhostkit-net: ${EXPECT_RING:-any ring}"
  # sysfs prints one character per feature bit, bit 0 first.
  feats=$(grep -a -m1 '^VK-FEATURES' "$log" | tr -d '\r' | awk '{ print $2 }')
  for b in $EXPECT_BITS; do
    [[ ${feats:$b:1} == 1 ]] || vk_fail "the guest did not negotiate feature bit $b: '$feats'"
  done
  if [[ -n $EXPECT_RING ]]; then
    grep -qE "features 0x[0-9a-f]+ acked: $EXPECT_RING(, |\$)" "$nlog" ||
      { grep 'acked:' "$nlog"; vk_fail "vhostkit-net did not log '$EXPECT_RING'"; }
  fi
  vk_pass "$(grep -oE 'features 0x[0-9a-f]+ acked: .*' "$nlog" | tail -1)"
fi

vk_check "the guest pings 192.0.2.1 three times, all answered"
vk_guest_check_ping "$log" 30
vk_check "guest -> host: $MIB MiB over TCP, sha256 equal on both ends"
vk_guest_check_tcp_tx "$log" "$VK_TMP/from_guest" "$MIB" 90
vk_check "host -> guest: $MIB MiB over TCP, sha256 equal on both ends"
vk_guest_check_tcp_rx "$log" "$VK_TMP/to_guest" "$MIB" 90

vk_check "the guest reports no failed scenario and powers off"
vk_qemu_wait_exit "$VK_QEMU_PID" 30; rc=$?
grep -q '^VK-DONE failed=0' "$log" || { vk_qemu_dump "$log"; vk_fail "VK-DONE missing or failures reported"; }
((rc == 0)) || { vk_qemu_dump "$log"; vk_fail "QEMU exit status $rc"; }
vk_pass "clean power-off"

vk_check "vhostkit-net saw the front-end go and still serves (process alive, socket listening)"
vk_net_wait_log "$nlog" 'front-end disconnected' 10 || { cat "$nlog"; vk_fail "no disconnect logged"; }
kill -0 "$net_pid" 2>/dev/null && vk__net_listening "$sock" || { cat "$nlog"; vk_fail "vhostkit-net gone"; }
vk_pass "alive, listening"

vk_check "--stats lines show guest tx and guest rx traffic on qp0, no errors"
sleep 1.2  # one more stats interval after the traffic
vk_net_stats_active "$nlog" 0 tx || { grep qp0 "$nlog"; vk_fail "no tx traffic in the stats lines"; }
vk_net_stats_active "$nlog" 0 rx || { grep qp0 "$nlog"; vk_fail "no rx traffic in the stats lines"; }
read -r txm txg txd txe rxm rxg rxd rxe <<<"$(vk_net_stats_sum "$nlog" 0)"
((txe == 0 && rxe == 0)) || vk_fail "errors counted: tx $txe rx $rxe"
echo "  stats lines with traffic:"
awk '$1 == "qp0" && ($3 > 0 || $5 > 0 || $13 > 0 || $15 > 0)' "$nlog" | sed 's/^/    /'
vk_pass "stats sums: tx ${txm} Mpps-s ${txg} Gbit drops $txd | rx ${rxm} Mpps-s ${rxg} Gbit drops $rxd"

vk_check "SIGTERM: vhostkit-net exits 0, removes its socket, its TAP disappears, logs its totals"
vk_net_stop "$net_pid"; rc=$?
((rc == 0)) || { cat "$nlog"; vk_fail "exit status $rc"; }
[[ ! -e $sock ]] || vk_fail "socket $sock left behind"
vk_wait_for 3 bash -c "! ip netns exec '$VK_NETNS' ip link show '$TAP' >/dev/null 2>&1" ||
  vk_fail "TAP $TAP still exists after exit"
# The exit summary counts what the guest sent and received (ping requests and replies at least).
totals=$(grep -oE 'totals qp0 tx [0-9]+ frames .*' "$nlog")
[[ $totals =~ tx\ [1-9][0-9]*\ frames.*rx\ [1-9][0-9]*\ frames ]] || { tail -5 "$nlog"; vk_fail "no exit totals with frames both ways: '$totals'"; }
vk_pass "exit 0, clean; $totals"

echo "${NAME%.sh}: all checks passed in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"
