#!/usr/bin/env bash
# A TAP deleted under a running vhostkit-net (issue: reliability): the backend must not crash or
# spin on the dead fd, must say what happened in one log line, must go on serving vhost-user
# (a new frontend negotiates), and must still exit 0 on SIGTERM.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/netns.sh"
source "$here/../../scripts/lib/vhostkit.sh"

vk_require_root
vk_require_cmd ip
vk_net_find_bin
probe=$(dirname "$(dirname "$VK_NET_BIN")")/vhostkit-probe/vhostkit-probe
[[ -x $probe ]] || vk_skip "vhostkit-probe is not built next to $VK_NET_BIN"
vk_tmpdir
vk_netns_create taprm || vk_fail "creating the namespace"
sock=$VK_TMP/net.sock

vk_net_start "$VK_TMP/net.log" --netns "$VK_NETNS" -- --socket-path="$sock" --tap=vk-rm0
vk_net_wait_listening "$sock" 10 || { cat "$VK_TMP/net.log"; vk_fail "vhostkit-net did not listen"; }
vk_netns_exec ip link set vk-rm0 up || vk_fail "bringing vk-rm0 up"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Frames the kernel received on vk-rm0, i.e. that vhostkit-net wrote to the TAP from a tx ring.
tap_rx() { vk_netns_exec cat /sys/class/net/vk-rm0/statistics/rx_packets 2>/dev/null || echo 0; }

vk_check "a frontend connects and sets up its rings"
"$probe" --socket-path="$sock" --frames 10 --wait 4000 >"$VK_TMP/probe1.json" 2>"$VK_TMP/probe1.err" &
probe_pid=$!
vk_track_pid "$probe_pid"
vk_net_wait_connected "$VK_TMP/net.log" 10 || vk_fail "the probe did not connect"
# The rings run once the probe's frames come out of the TAP (it sends 10, then waits 4 s for
# replies that never come, so it is still connected when the TAP goes).
vk_wait_for 20 bash -c "(( \$(ip netns exec '$VK_NETNS' cat /sys/class/net/vk-rm0/statistics/rx_packets) > 0 ))" ||
  { cat "$VK_TMP/net.log"; vk_fail "no frame from the probe reached vk-rm0"; }
vk_pass "connected, $(tap_rx) frame(s) through the TAP"

vk_check "deleting the TAP under the running device"
vk_netns_exec ip link del vk-rm0 || vk_fail "ip link del vk-rm0"
# The backend has seen the TAP go once it says so.
vk_net_wait_log "$VK_TMP/net.log" 'reading tap vk-rm0 failed' 20 ||
  { cat "$VK_TMP/net.log"; vk_fail "no log line about the failed TAP"; }
vk_pass "logged: $(grep -m1 'reading tap vk-rm0 failed' "$VK_TMP/net.log" | sed 's/^\[[^]]*\] //')"
t0=$(cpu_ticks "$VK_NET_PID")
sleep 2                       # the window its CPU time is measured over, not a wait for an event
t1=$(cpu_ticks "$VK_NET_PID")
kill -0 "$VK_NET_PID" 2>/dev/null || { cat "$VK_TMP/net.log"; vk_fail "vhostkit-net died"; }
ticks=$((t1 - t0))
# 2 s of one spinning core would be ~200 ticks (~100 on a loaded host); an idle backend uses ~0.
((ticks < 20)) || { cat "$VK_TMP/net.log"; vk_fail "vhostkit-net used $ticks ticks in 2 s after the TAP went (spinning)"; }
vk_pass "alive, $ticks CPU ticks in 2 s"
wait "$probe_pid" 2>/dev/null

vk_check "a new frontend still negotiates with the same process"
"$probe" --socket-path="$sock" >"$VK_TMP/probe2.json" 2>"$VK_TMP/probe2.err" ||
  { cat "$VK_TMP/probe2.err" "$VK_TMP/net.log"; vk_fail "second probe failed"; }
grep -q '"connected":true' "$VK_TMP/probe2.json" || vk_fail "second probe did not negotiate"
vk_pass "negotiated again"

vk_check "SIGTERM exits 0"
vk_net_stop "$VK_NET_PID" 5
rc=$?
((rc == 0)) || { cat "$VK_TMP/net.log"; vk_fail "vhostkit-net exited $rc"; }
vk_pass "exit 0"
echo "net_tap_removed_test: all checks passed"
