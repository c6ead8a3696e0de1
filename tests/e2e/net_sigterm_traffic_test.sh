#!/usr/bin/env bash
# SIGTERM while frames flow: vhostkit-net --loopback under vhostkit-bench loop (our front-end,
# event mode, 64-byte frames); once vhostkit-net's --stats lines show traffic both ways, it gets
# SIGTERM mid-stream. It must exit 0, remove its socket and log per-queue totals, and those
# totals must agree with what the peer counted:
#   1. frames the back-end returned to the peer: its rx frames == the peer's rx count, exactly.
#      A burst the worker took is delivered and published before the ring stops (the worker
#      finishes a handler before it parks, and counts before it publishes), so nothing the
#      back-end counted is lost to the peer and nothing the peer got is uncounted.
#   2. frames the back-end took from the peer's transmitq (tx frames + tx drops + tx errors)
#      == what the peer saw leave its ring: its sent count minus the chains still on the ring
#      (the peer's live "drops" line is sent - received - still-on-ring, so it must equal the
#      back-end's tx drops + tx errors), exactly.
#   3. the frames in flight at the stop, sent but never taken, are those the back-end had not
#      popped yet: 0 <= sent - taken <= the transmitq's size (256): a ring never holds more.
# Then the peer gets SIGTERM too and exits 0 with its JSON line. Everything waits on log lines
# and process exits, never on fixed sleeps.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/vhostkit.sh"

t_start=$(vk_now)
vk_require_cmd python3
QSIZE=256
vk_find_programs VK_NET_BIN=vhostkit-net BENCH=vhostkit-bench
vk_tmpdir
sock=$VK_TMP/vhost.sock
nlog=$VK_TMP/vhostkit-net.log
bout=$VK_TMP/bench.out
berr=$VK_TMP/bench.err

vk_check "vhostkit-net --loopback --stats=1 listens; vhostkit-bench loop connects and moves frames"
vk_net_start "$nlog" -- --socket-path="$sock" --loopback --stats=1
net_pid=$VK_NET_PID
vk_net_wait_listening "$sock" 10 || { cat "$nlog"; vk_fail "did not listen"; }
# --duration far beyond the test: the run ends by our SIGTERM, never by itself.
"$BENCH" loop --socket-path="$sock" --size=64 --duration=600 --warmup=0 --poll=event \
  --queue-size="$QSIZE" --burst=32 >"$bout" 2>"$berr" &
bench_pid=$!
vk_track_pid "$bench_pid"
vk_net_wait_connected "$nlog" 20 || { cat "$nlog" "$berr"; vk_fail "vhostkit-net saw no front-end"; }
# A stats line with frames both ways (guest -> loopback and back) in its interval.
flowing() {
  awk '$1 == "qp0" && $2 == "tx" && $11 == "|" && ($3 > 0 || $5 > 0) && ($13 > 0 || $15 > 0) { n++ }
       END { exit !(n >= 1) }' "$nlog"
}
vk_wait_for 30 flowing || { cat "$nlog" "$berr"; vk_fail "no stats line with traffic both ways"; }
kill -0 "$bench_pid" 2>/dev/null || { cat "$berr"; vk_fail "vhostkit-bench exited early"; }
lines=$(grep -c '^qp0 tx' "$nlog")
vk_wait_for 10 bash -c "(( \$(grep -c '^qp0 tx' '$nlog') > $lines ))" || vk_fail "stats lines stopped"
last=$(grep '^qp0 tx' "$nlog" | tail -1)
awk '{ exit !(($3 > 0 || $5 > 0) && ($13 > 0 || $15 > 0)) }' <<<"$last" ||
  vk_fail "traffic stopped before the SIGTERM: $last"
vk_pass "frames flow both ways; the last interval before the stop: $last"

vk_check "SIGTERM to vhostkit-net mid-traffic: exit 0, socket removed, totals logged"
vk_net_stop "$net_pid" 10; rc=$?
((rc == 0)) || { tail -20 "$nlog"; vk_fail "vhostkit-net exit $rc after SIGTERM"; }
[[ ! -e $sock ]] || vk_fail "socket left behind"
totals=$(grep -oE 'totals qp0 tx [0-9]+ frames .*' "$nlog" | tail -1)
re='totals qp0 tx ([0-9]+) frames ([0-9]+) bytes drops ([0-9]+) err ([0-9]+) \| rx ([0-9]+) frames ([0-9]+) bytes drops ([0-9]+) err ([0-9]+)'
[[ $totals =~ $re ]] || { tail -5 "$nlog"; vk_fail "no totals line at exit: '$totals'"; }
n_txf=${BASH_REMATCH[1]} n_txb=${BASH_REMATCH[2]} n_txd=${BASH_REMATCH[3]} n_txe=${BASH_REMATCH[4]}
n_rxf=${BASH_REMATCH[5]} n_rxd=${BASH_REMATCH[7]} n_rxe=${BASH_REMATCH[8]}
((n_txf > 10000 && n_rxf > 10000)) || vk_fail "too little traffic to judge: $totals"
((n_txb == 64 * n_txf)) || vk_fail "tx bytes $n_txb are not 64 x $n_txf frames"
((n_txe == 0 && n_rxe == 0 && n_rxd == 0)) || vk_fail "errors or rx drops counted: $totals"
vk_pass "exit 0; $totals"

vk_check "vhostkit-bench (SIGTERM next) exits 0 with its JSON line and a final live line"
kill -0 "$bench_pid" 2>/dev/null || { cat "$berr"; vk_fail "vhostkit-bench died with the back-end"; }
kill -TERM "$bench_pid"
vk_wait_for 30 bash -c "! kill -0 $bench_pid" || { tail -5 "$berr"; vk_fail "vhostkit-bench did not stop"; }
wait "$bench_pid"; rc=$?
((rc == 0)) || { tail -20 "$berr"; vk_fail "vhostkit-bench exit $rc"; }
json=$(grep '^{' "$bout" | tail -1)
read -r p_tx p_rx p_int < <(python3 -c '
import json, sys
j = json.loads(sys.argv[1]); r = j["results"][0]
print(r["tx"], r["rx"], int(j["interrupted"]))' "$json") ||
  { cat "$bout"; vk_fail "no JSON result line"; }
((p_int == 1)) || vk_fail "the JSON says the run was not interrupted"
# Its last live line is printed after the SIGTERM, long after the back-end stopped answering:
# by then every used entry was reclaimed, so "drops" = sent - received - still on the ring.
live=$(grep -E '^ *[0-9.]+s +tx ' "$berr" | tail -1)
[[ $live =~ drops\ ([0-9]+)$ ]] || { tail -5 "$berr"; vk_fail "no live line: '$live'"; }
p_lost=${BASH_REMATCH[1]}
vk_pass "peer: sent $p_tx, received $p_rx; last live line: $live"

vk_check "returned to the peer: back-end rx frames ($n_rxf) == peer received ($p_rx)"
((n_rxf == p_rx)) || vk_fail "off by $((n_rxf - p_rx)) frames"
vk_pass "equal"

taken=$((n_txf + n_txd + n_txe))
vk_check "taken from the peer: tx frames + drops + errors ($taken) == peer's sent - still on its ring ($((p_lost + p_rx)))"
((p_lost + p_rx == taken)) || vk_fail "off by $((p_lost + p_rx - taken)) frames (peer: $p_lost taken and not returned)"
vk_pass "equal (back-end tx drops $n_txd, errors $n_txe)"

vk_check "in flight at the stop: 0 <= sent ($p_tx) - taken ($taken) <= the transmitq size ($QSIZE)"
inflight=$((p_tx - taken))
((inflight >= 0 && inflight <= QSIZE)) || vk_fail "$inflight frames unaccounted for"
vk_pass "$inflight frame(s) were on the transmitq, never popped"

echo "${VK_SCRIPT_NAME%.sh}: all checks passed in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"
