#!/usr/bin/env bash
# DPDK's virtio-user driver against vhostkit-net --loopback, no guest: testpmd (interactive, its
# commands through a fifo) forwards in flowgen mode for a few seconds (transmits as fast as it
# can and receives everything that comes back), so frames go both ways through vhostkit-net and
# the loopback runs out of rx buffers now and then. Then the books are closed exactly:
#   1. "stop" ends forwarding; vhostkit-net finishes whatever is left in the tx ring;
#   2. "set fwd rxonly" + "start" + "stop" drains what the loopback put in testpmd's rx ring;
#   3. testpmd's port counters now satisfy TX-packets == RX-packets + vhostkit-net's drops, to the
#      frame, where drops are the exact per-interval drop counts of its --stats lines (printed for
#      at least one more interval after the traffic ended).
# VK_NET_QUEUES=N (net_multiqueue_test.sh uses 2): N queue pairs on both sides (testpmd
# --rxq=N --txq=N, flowgen on every queue); each pair must show traffic both ways, and the
# accounting holds over all pairs.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/dpdk.sh"
source "$here/../../scripts/lib/vhostkit.sh"

SECONDS_FWD=${VK_TEST_SECONDS:-4}
QUEUES=${VK_NET_QUEUES:-1}
t_start=$(vk_now)
vk_require_root
vk_require_cmd "$VK_TESTPMD" ss
vk_net_find_bin
vk_tmpdir
sock=$VK_TMP/vhost.sock
nlog=$VK_TMP/vhostkit-net.log
tlog=$VK_TMP/testpmd.log
prefix=vk-$$-loop

vk_check "vhostkit-net --loopback --queues=$QUEUES --stats=1 listens"
vk_net_start "$nlog" -- --socket-path="$sock" --loopback --queues="$QUEUES" --stats=1
net_pid=$VK_NET_PID
vk_net_wait_listening "$sock" 10 || { cat "$nlog"; vk_fail "did not listen"; }
vk_pass "listening on $sock"

vk_check "testpmd (virtio-user, interactive) connects and brings its port up"
mkfifo "$VK_TMP/cmd"
exec 7<>"$VK_TMP/cmd"  # read-write: opening never blocks, and testpmd never sees EOF early
vk_on_exit "exec 7>&-"
"$VK_TESTPMD" --lcores 0@0,1@0 --no-pci --no-huge -m 1024 --file-prefix="$prefix" \
  --vdev "net_virtio_user0,path=$sock,queues=$QUEUES" -- -i --total-num-mbufs=16384 \
  --rxq="$QUEUES" --txq="$QUEUES" \
  --forward-mode=flowgen <"$VK_TMP/cmd" >"$tlog" 2>&1 &
tpmd=$!
vk_on_exit "vk_dpdk_stop $tpmd; rm -rf /var/run/dpdk/$prefix"
pmd() { echo "$*" >&7; }
vk_wait_for 60 grep -q 'testpmd> ' "$tlog" || { tail -20 "$tlog"; vk_fail "testpmd never finished port setup"; }
vk_net_wait_connected "$nlog" 5 || { cat "$nlog"; vk_fail "vhostkit-net saw no front-end"; }
vk_pass "port up, vhostkit-net: front-end connected"

vk_check "flowgen for ${SECONDS_FWD} s: frames go out to vhostkit-net and come back"
pmd start
sleep "$SECONDS_FWD"
pmd stop
sleep 1                       # vhostkit-net empties the tx ring into testpmd's rx ring
pmd set fwd rxonly
pmd start
sleep 1                       # testpmd reads everything the loopback delivered
pmd stop
sleep 0.5
pmd show port stats 0
pmd quit
vk_wait_for 20 bash -c "! kill -0 $tpmd" || { tail -30 "$tlog"; vk_fail "testpmd did not quit"; }
wait "$tpmd"; rc=$?
((rc == 0)) || { tail -30 "$tlog"; vk_fail "testpmd exit $rc"; }
port_rx=$(sed -n 's/^ *RX-packets: *\([0-9]*\) *RX-missed.*/\1/p' "$tlog" | tail -1)
port_tx=$(sed -n 's/^ *TX-packets: *\([0-9]*\) *TX-errors.*/\1/p' "$tlog" | tail -1)
[[ -n $port_rx && -n $port_tx ]] || { tail -40 "$tlog"; vk_fail "no port stats in testpmd's output"; }
((port_tx > 10000 && port_rx > 10000)) || vk_fail "too little traffic: testpmd tx $port_tx rx $port_rx"
vk_pass "testpmd port 0: TX-packets $port_tx, RX-packets $port_rx"

vk_check "vhostkit-net's --stats lines: traffic both ways, no errors; SIGTERM -> exit 0"
vk_net_wait_log "$nlog" 'front-end disconnected' 10 || vk_fail "no disconnect logged"
# At least two more stats lines after the disconnect: the interval holding the last frames is out.
n0=$(grep -c '^qp0 ' "$nlog")
vk_wait_for 5 bash -c "(( \$(grep -c '^qp0 ' '$nlog') >= $n0 + 2 ))" || vk_fail "stats lines stopped"
vk_net_stop "$net_pid"; rc=$?
((rc == 0)) || { cat "$nlog"; vk_fail "vhostkit-net exit $rc"; }
txm=0 txd=0 rxd=0
for ((qp = 0; qp < QUEUES; qp++)); do
  vk_net_stats_active "$nlog" "$qp" tx && vk_net_stats_active "$nlog" "$qp" rx ||
    { grep "^qp$qp" "$nlog"; vk_fail "stats show no traffic both ways on qp$qp"; }
  read -r m _ d e _ _ rd re <<<"$(vk_net_stats_sum "$nlog" "$qp")"
  ((e == 0 && re == 0)) || vk_fail "qp$qp errors counted: tx $e rx $re"
  awk -v q="qp$qp" '$1 == q && ($3 > 0 || $13 > 0)' "$nlog" | sed 's/^/    /'
  echo "  qp$qp: tx ${m} Mpps-s, drops tx $d rx $rd"
  txm=$(awk -v a="$txm" -v b="$m" 'BEGIN { print a + b }')
  txd=$((txd + d)) rxd=$((rxd + rd))
done
vk_pass "every one of $QUEUES queue pair(s) moved frames both ways; drops: tx $txd rx $rxd"

vk_check "exact accounting: testpmd TX ($port_tx) == testpmd RX ($port_rx) + vhostkit-net drops ($((txd + rxd)))"
((port_tx == port_rx + txd + rxd)) ||
  vk_fail "off by $((port_tx - port_rx - txd - rxd)) frames"
vk_pass "balanced to the frame"

vk_check "vhostkit-net's own rate counters agree with testpmd within 10% (rates x ~1 s intervals)"
est=$(awk -v m="$txm" 'BEGIN { printf "%d", m * 1e6 }')
awk -v e="$est" -v t="$port_tx" 'BEGIN { d = e - t; if (d < 0) d = -d; exit !(d <= t * 0.10) }' ||
  vk_fail "vhostkit-net counted ~$est guest tx frames, testpmd sent $port_tx"
vk_pass "~$est vs $port_tx"

echo "${VK_SCRIPT_NAME%.sh} (queues=$QUEUES): all checks passed in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"
