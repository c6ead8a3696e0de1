#!/usr/bin/env bash
# DPDK's virtio-user driver against vhostkit-net --loopback, no guest: testpmd (interactive, its
# commands through a fifo) forwards in flowgen mode for a few seconds (transmits as fast as it
# can and receives everything that comes back), so frames go both ways through vhostkit-net and
# the loopback runs out of rx buffers now and then. Then the books are closed exactly, from
# exact totals on both sides (no rates, no fixed sleeps):
#   1. "stop" ends flowgen: testpmd sends nothing more; vhostkit-net finishes what is left in
#      the tx ring (at most a ring's worth) into testpmd's rx ring;
#   2. "set fwd rxonly" + "start": testpmd reads everything the loopback put in its rx ring; its
#      port counters are read until two reads a second apart, with a vhostkit-net --stats line
#      between them, agree (nothing in flight any more);
#   3. testpmd quits, vhostkit-net gets SIGTERM and logs its per-queue-pair totals at exit;
#   4. testpmd TX-packets == what vhostkit-net took from the tx rings (frames + drops + errors),
#      testpmd RX-packets == the frames vhostkit-net put in the rx rings, and so
#      TX-packets == RX-packets + vhostkit-net's drops, to the frame.
# VK_NET_QUEUES=N (net_multiqueue_test.sh uses 2): N queue pairs on both sides (testpmd
# --rxq=N --txq=N, flowgen on every queue); each pair must show traffic both ways, and the
# accounting holds over all pairs.
# VK_NET_VDEV_ARGS (net_dpdk_packed_test.sh, net_dpdk_in_order_test.sh): more virtio-user
# arguments, e.g. ",packed_vq=1,in_order=1"; VK_NET_EXPECT_RING: the ring vhostkit-net must log as
# negotiated, all of it but event idx ("packed ring" means packed without IN_ORDER), checked
# before the traffic. VK_NET_ARGS: more vhostkit-net options (e.g. --no-in-order).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/dpdk.sh"
source "$here/../../scripts/lib/vhostkit.sh"

SECONDS_FWD=${VK_TEST_SECONDS:-4}
QUEUES=${VK_NET_QUEUES:-1}
VDEV_ARGS=${VK_NET_VDEV_ARGS:-}
EXPECT_RING=${VK_NET_EXPECT_RING:-}
read -r -a NET_ARGS <<<"${VK_NET_ARGS:-}"
t_start=$(vk_now)
vk_require_root
vk_require_cmd "$VK_TESTPMD" ss stdbuf
vk_net_find_bin
vk_tmpdir
sock=$VK_TMP/vhost.sock
nlog=$VK_TMP/vhostkit-net.log
tlog=$VK_TMP/testpmd.log
prefix=vk-$$-loop

vk_check "vhostkit-net --loopback --queues=$QUEUES --stats=1 listens"
vk_net_start "$nlog" -- --socket-path="$sock" --loopback --queues="$QUEUES" --stats=1 "${NET_ARGS[@]}"
net_pid=$VK_NET_PID
vk_net_wait_listening "$sock" 10 || { cat "$nlog"; vk_fail "did not listen"; }
vk_pass "listening on $sock"

vk_check "testpmd (virtio-user, interactive) connects and brings its port up"
mkfifo "$VK_TMP/cmd"
exec 7<>"$VK_TMP/cmd"  # read-write: opening never blocks, and testpmd never sees EOF early
vk_on_exit "exec 7>&-"
# Line-buffered: its answers are read while it runs (to a file stdio would hold them until exit).
stdbuf -oL "$VK_TESTPMD" --lcores 0@0,1@0 --no-pci --no-huge -m 1024 --file-prefix="$prefix" \
  --vdev "net_virtio_user0,path=$sock,queues=$QUEUES$VDEV_ARGS" -- -i --total-num-mbufs=16384 \
  --rxq="$QUEUES" --txq="$QUEUES" \
  --forward-mode=flowgen <"$VK_TMP/cmd" >"$tlog" 2>&1 &
tpmd=$!
vk_on_exit "vk_dpdk_stop $tpmd; rm -rf /var/run/dpdk/$prefix"
pmd() { echo "$*" >&7; }
vk_wait_for 60 grep -q 'testpmd> ' "$tlog" || { tail -20 "$tlog"; vk_fail "testpmd never finished port setup"; }
vk_net_wait_connected "$nlog" 5 || { cat "$nlog"; vk_fail "vhostkit-net saw no front-end"; }
vk_pass "port up, vhostkit-net: front-end connected"

if [[ -n $EXPECT_RING ]]; then
  vk_check "negotiated: $EXPECT_RING"
  vk_net_wait_log "$nlog" "features 0x[0-9a-f]+ acked: $EXPECT_RING(, event idx)?\$" 10 ||
    { grep 'acked:' "$nlog"; vk_fail "vhostkit-net did not negotiate '$EXPECT_RING'"; }
  vk_pass "$(grep -oE 'features 0x[0-9a-f]+ acked: .*' "$nlog" | tail -1)"
fi

vk_check "flowgen for ${SECONDS_FWD} s: frames go out to vhostkit-net and come back"
stats_re='^ *TX-packets: *[0-9]+ *TX-errors'
# Asks testpmd for port 0's counters and waits for that answer; sets port_rx and port_tx.
port_stats() {
  local n
  n=$(grep -cE "$stats_re" "$tlog")
  pmd show port stats 0
  vk_wait_for 30 bash -c "(( \$(grep -cE '$stats_re' '$tlog') > $n ))" || return 1
  port_rx=$(sed -n 's/^ *RX-packets: *\([0-9]*\) *RX-missed.*/\1/p' "$tlog" | tail -1)
  port_tx=$(sed -n 's/^ *TX-packets: *\([0-9]*\) *TX-errors.*/\1/p' "$tlog" | tail -1)
  [[ -n $port_rx && -n $port_tx ]]
}
pmd start
sleep "$SECONDS_FWD"          # the length of the traffic run, not a wait for anything
pmd stop
pmd set fwd rxonly
pmd start
# Settled when two reads a second apart agree and vhostkit-net printed a --stats line between
# them (its process ran in that second): testpmd sends nothing now, so what vhostkit-net still
# held (at most a ring's worth) was moved, and testpmd read all of it.
port_stats || { tail -30 "$tlog"; vk_fail "testpmd did not answer 'show port stats 0'"; }
settled=0
for ((i = 0; i < 30; i++)); do
  prev_rx=$port_rx prev_tx=$port_tx
  lines=$(grep -c '^qp0 ' "$nlog")
  vk_wait_for 10 bash -c "(( \$(grep -c '^qp0 ' '$nlog') > $lines ))" || vk_fail "vhostkit-net's stats lines stopped"
  sleep 1                     # the second the counters must stay still for
  port_stats || { tail -30 "$tlog"; vk_fail "testpmd did not answer 'show port stats 0'"; }
  if ((port_rx == prev_rx && port_tx == prev_tx)); then settled=1; break; fi
done
((settled)) || vk_fail "testpmd's counters never settled (RX $prev_rx -> $port_rx, TX $prev_tx -> $port_tx)"
pmd stop
pmd quit
vk_wait_for 20 bash -c "! kill -0 $tpmd" || { tail -30 "$tlog"; vk_fail "testpmd did not quit"; }
wait "$tpmd"; rc=$?
((rc == 0)) || { tail -30 "$tlog"; vk_fail "testpmd exit $rc"; }
((port_tx > 10000 && port_rx > 10000)) || vk_fail "too little traffic: testpmd tx $port_tx rx $port_rx"
vk_pass "testpmd port 0, settled: TX-packets $port_tx, RX-packets $port_rx"

vk_check "vhostkit-net: SIGTERM -> exit 0, per-pair totals at exit with traffic both ways, no errors"
vk_net_wait_log "$nlog" 'front-end disconnected' 10 || vk_fail "no disconnect logged"
vk_net_stop "$net_pid"; rc=$?
((rc == 0)) || { cat "$nlog"; vk_fail "vhostkit-net exit $rc"; }
vk_tx=0 vk_rx=0 vk_drops=0
for ((qp = 0; qp < QUEUES; qp++)); do
  # "vhostkit-net: totals qp0 tx F frames B bytes drops D err E | rx F frames B bytes drops D err E"
  line=$(grep -oE "totals qp$qp tx [0-9]+ frames .*" "$nlog" | tail -1)
  read -r tf td te rf rd re <<<"$(awk '{ print $4, $9, $11, $14, $19, $21 }' <<<"$line")"
  [[ -n $line && -n $re ]] || { tail -5 "$nlog"; vk_fail "no exit totals for qp$qp"; }
  echo "    $line"
  ((tf > 0 && rf > 0)) || vk_fail "qp$qp moved no traffic both ways: tx $tf rx $rf frames"
  ((te == 0 && re == 0)) || vk_fail "qp$qp errors counted: tx $te rx $re"
  vk_tx=$((vk_tx + tf + td + te)) vk_rx=$((vk_rx + rf)) vk_drops=$((vk_drops + td + rd))
done
vk_pass "every one of $QUEUES queue pair(s) moved frames both ways; took $vk_tx from tx, put $vk_rx in rx, dropped $vk_drops"

vk_check "exact accounting: testpmd TX ($port_tx) == taken by vhostkit-net ($vk_tx); testpmd RX ($port_rx) == delivered ($vk_rx)"
((port_tx == vk_tx)) || vk_fail "testpmd sent $((port_tx - vk_tx)) frames more than vhostkit-net took"
((port_rx == vk_rx)) || vk_fail "vhostkit-net delivered $((vk_rx - port_rx)) frames more than testpmd received"
((port_tx == port_rx + vk_drops)) || vk_fail "TX != RX + drops: off by $((port_tx - port_rx - vk_drops)) frames"
vk_pass "balanced to the frame: $port_tx sent == $port_rx received + $vk_drops dropped"

echo "${VK_SCRIPT_NAME%.sh} (queues=$QUEUES): all checks passed in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"
