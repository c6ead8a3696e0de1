#!/usr/bin/env bash
# A backend restarted under a reconnecting front-end. QEMU is the vhost-user client with
# `reconnect=1` on its chardev; vhostkit-net (server, TAP in a netns) is killed with SIGKILL while
# the host pings the guest; a new vhostkit-net starts on the same socket path; QEMU reconnects by
# itself (it stops vhost on the hang-up, takes the link down, and on the new connection
# negotiates again with each ring's base taken from the used index in guest memory, then takes
# the link up). The guest is never touched: the host's pings are answered again, the new backend
# holds as many fds in session as the old one did, and it exits 0 on SIGTERM.
#
# The killed vhostkit-net created the TAP, so the TAP goes with it; the new one creates it
# again. The test gives the TAP the same MAC each time so the guest's neighbour entry for the
# host stays right, as a management layer that recreates a host interface would.
#
# Second part (dpdk-testpmd is required; without it the test reports a skip): DPDK testpmd virtio-user in server mode
# (server=1) against vhostkit-net --client --loopback; vhostkit-net is killed and restarted,
# reconnects to testpmd, and testpmd's frames come back again. DPDK 22.11's virtio-user sends no
# SET_OWNER on a reconnect and restarts every ring at base 0 with its indices kept: the session
# takes SET_FEATURES as the start of the session and the device resumes each ring from its used
# index (without those two, the rings never started again).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/qemu.sh"
source "$here/../../scripts/lib/netns.sh"
source "$here/../../scripts/lib/vhostkit.sh"

TAP=vk-rst0
TAP_MAC=02:00:00:00:00:01
GUEST=192.0.2.2
t_start=$(vk_now)
elapsed() { awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}'; }

vk_require_root
vk_require_cmd ip ping busybox
[[ -c /dev/net/tun ]] || vk_skip "/dev/net/tun missing (no TAP support)"
vk_net_find_bin
vk_guest_ensure
vk_tmpdir
sock=$VK_TMP/vhost.sock
vk_netns_create restart || vk_fail "creating the namespace"

tap_up() {
  vk_wait_for 5 vk_netns_exec ip link show "$TAP" >/dev/null || return 1
  vk_netns_exec ip link set "$TAP" address "$TAP_MAC" &&
    vk_netns_exec ip addr add 192.0.2.1/24 dev "$TAP" &&
    vk_netns_exec ip link set "$TAP" up
}

host_ping() { vk_netns_exec ping -c 1 -W 1 "$GUEST" >/dev/null 2>&1; }

# start_backend LOG: vhostkit-net in the namespace on $sock with the TAP; sets net_pid.
start_backend() {
  vk_net_start "$1" --netns "$VK_NETNS" -- --socket-path="$sock" --tap="$TAP" --log-level=info
  net_pid=$VK_NET_PID
  vk_net_wait_listening "$sock" 10 "$1" || { cat "$1"; vk_fail "vhostkit-net did not listen"; }
  tap_up || { cat "$1"; vk_fail "TAP $TAP setup"; }
}

# ------------------------------------------------------------------ first backend, guest up
log1=$VK_TMP/net1.log
vk_check "vhostkit-net #1 listens; a QEMU guest (chardev reconnect=1) connects; the host pings it"
start_backend "$log1"
pid1=$net_pid
glog=$VK_TMP/guest.log
# no_timer_check: on a loaded host a TCG guest can miss the IO-APIC timer check at boot and panic.
vk_qemu_start --log "$glog" --timeout 300 \
  --cmdline "no_timer_check vk.ip=$GUEST/24 vk.peer=192.0.2.1 vk.cmd=idle" -- \
  -chardev "socket,id=vkc0,path=$sock,reconnect=1" \
  -netdev "vhost-user,id=vkn0,chardev=vkc0,queues=1" \
  -device "virtio-net-pci,netdev=vkn0,vectors=0"
qemu_pid=$VK_QEMU_PID
vk_net_wait_connected "$log1" 30 || { cat "$log1"; vk_qemu_dump "$glog"; vk_fail "QEMU never connected"; }
vk_qemu_wait_marker "$glog" '^VK-IDLE' 120 || { vk_qemu_dump "$glog"; vk_fail "the guest did not come up"; }
# The host pings the guest, before and after: the guest runs nothing but its kernel throughout.
vk_wait_for 30 host_ping || { vk_qemu_dump "$glog"; vk_fail "the host cannot ping the guest"; }
fds1=$(vk_net_fd_count "$pid1")
vk_pass "host pings the guest; vhostkit-net #1 (pid $pid1) holds $fds1 fds in session"

# ------------------------------------------------------------------ kill it mid-traffic
vk_check "SIGKILL vhostkit-net #1 while the host pings the guest every 0.1 s"
plog=$VK_TMP/ping.log
vk_netns_spawn "$plog" ping -D -i 0.1 -W 1 "$GUEST"
ping_pid=$VK_SPAWN_PID
# A TCG guest on a loaded host answers slowly: wait for a few replies rather than a fixed time.
vk_wait_for 30 bash -c "(( \$(grep -c 'bytes from' '$plog') >= 5 ))" ||
  vk_fail "only $(grep -c 'bytes from' "$plog") replies to the background ping in 30 s"
before_kill=$(grep -c 'bytes from' "$plog")
t_kill=$(vk_now)
kill -KILL "$pid1"
wait "$pid1" 2>/dev/null
kill -0 "$pid1" 2>/dev/null && vk_fail "vhostkit-net #1 survived SIGKILL"
sleep 1
kill -0 "$qemu_pid" 2>/dev/null || { vk_qemu_dump "$glog"; vk_fail "QEMU died with its backend"; }
vk_netns_exec ip link show "$TAP" >/dev/null 2>&1 && vk_fail "the TAP outlived the process that created it"
vk_pass "killed after $before_kill replies; QEMU runs on; the TAP went with the backend"

# ------------------------------------------------------------------ a new backend, QEMU reconnects
log2=$VK_TMP/net2.log
vk_check "vhostkit-net #2 on the same socket path; QEMU reconnects by itself"
t_restart=$(vk_now)
start_backend "$log2"
pid2=$net_pid
vk_net_wait_connected "$log2" 30 || { cat "$log2"; tail -20 "$glog.qemu"; vk_fail "QEMU did not reconnect"; }
t_conn=$(vk_now)
vk_pass "pid $pid2: QEMU reconnected $(awk -v a="$t_restart" -v b="$t_conn" 'BEGIN{printf "%.1f", b-a}') s after the restart"

vk_check "the guest answers the host again, without being touched"
vk_wait_for 60 host_ping || { cat "$log2"; vk_qemu_dump "$glog"; vk_fail "no reply from the guest after the restart"; }
t_back=$(vk_now)
vk_netns_exec ping -c 5 -i 0.2 -W 1 "$GUEST" >"$VK_TMP/ping2.log" 2>&1 ||
  { cat "$VK_TMP/ping2.log"; vk_fail "ping -c 5 after the restart"; }
kill -INT "$ping_pid" 2>/dev/null
wait "$ping_pid" 2>/dev/null
# Replies stamped after the kill: the background ping saw traffic stop and start again.
after=$(awk -v t="$t_kill" -F'[][]' '/bytes from/ && $2 > t + 0.5 { n++ } END { print n + 0 }' "$plog")
((after > 0)) || vk_fail "the background ping got no reply after the restart"
vk_pass "$(grep -o '[0-9]* received' "$VK_TMP/ping2.log") of 5; background ping: $before_kill replies before, $after after; traffic back $(awk -v a="$t_kill" -v b="$t_back" 'BEGIN{printf "%.1f", b-a}') s after the kill"

vk_check "vhostkit-net #2 holds as many fds in session as #1 did; SIGTERM -> exit 0"
fds2=$(vk_net_fd_count "$pid2")
((fds2 == fds1)) || vk_fail "#2 holds $fds2 fds in session, #1 held $fds1"
vk_net_stop "$pid2"; rc=$?
((rc == 0)) || { cat "$log2"; vk_fail "exit $rc"; }
[[ ! -e $sock ]] || vk_fail "socket left behind"
vk_pass "$fds2 fds; exit 0"
vk_kill "$qemu_pid"

# ------------------------------------------------------------------ DPDK virtio-user as the client
# Without testpmd the second half did not run: that is a skip (a failure under CI), never
# "all checks passed".
command -v dpdk-testpmd >/dev/null 2>&1 ||
  vk_skip "the QEMU half passed; the DPDK virtio-user half did not run: dpdk-testpmd is not installed (scripts/deps.sh)"
source "$here/../../scripts/lib/dpdk.sh"

dsock=$VK_TMP/dpdk.sock
# rx_frames LOG: the newest "RX-packets" figure testpmd printed for port 0.
rx_frames() { grep -o 'RX-packets: *[0-9]*' "$1" | tail -1 | grep -o '[0-9]*$'; }

vk_check "DPDK testpmd virtio-user server=1 <- vhostkit-net --client --loopback: frames come back"
tlog=$VK_TMP/testpmd.log
# virtio-user in server mode (the vdev string the dpdk.sh helpers don't offer): it listens on
# $dsock and takes back a backend that reconnects. flowgen both sends and receives (txonly never
# polls rx, so its RX counter stays 0).
vk__dpdk_start "net_virtio_user0,path=$dsock,queues=1,server=1" 1 "$tlog" --forward-mode=flowgen ||
  vk_fail "testpmd"
dpdk_pid=$VK_DPDK_PID
vk_wait_for 20 test -S "$dsock" || { cat "$tlog"; vk_fail "testpmd did not create $dsock"; }
nlog3=$VK_TMP/net3.log
vk_net_start "$nlog3" -- --client --socket-path="$dsock" --loopback --log-level=info
pid3=$VK_NET_PID
vk_net_wait_connected "$nlog3" 20 || { cat "$nlog3"; vk_fail "vhostkit-net did not connect to testpmd"; }
vk_wait_for 20 bash -c "(( \$(grep -o 'RX-packets: *[0-9]*' '$tlog' | tail -1 | grep -o '[0-9]*$' || echo 0) > 1000 ))" ||
  { tail -30 "$tlog"; vk_fail "testpmd receives nothing back"; }
vk_pass "testpmd RX $(rx_frames "$tlog") frames back through the loopback"

vk_check "SIGKILL vhostkit-net, start a new one: it reconnects to testpmd and frames come back again"
kill -KILL "$pid3"
wait "$pid3" 2>/dev/null
sleep 2
kill -0 "$dpdk_pid" 2>/dev/null || { tail -30 "$tlog"; vk_fail "testpmd died with its backend"; }
rx_before=$(rx_frames "$tlog")
nlog4=$VK_TMP/net4.log
vk_net_start "$nlog4" -- --client --socket-path="$dsock" --loopback --log-level=info
pid4=$VK_NET_PID
vk_net_wait_connected "$nlog4" 20 || { cat "$nlog4"; tail -20 "$tlog"; vk_fail "the new vhostkit-net did not connect"; }
vk_wait_for 30 bash -c "(( \$(grep -o 'RX-packets: *[0-9]*' '$tlog' | tail -1 | grep -o '[0-9]*$' || echo 0) > $rx_before + 1000 ))" ||
  { tail -30 "$tlog"; cat "$nlog4"
    grep -q 'before SET_OWNER' "$nlog4" &&
      vk_fail "no frames back after the restart: virtio-user reconnected without SET_OWNER and vhostkit-net refused its setup"
    vk_fail "no frames back after the restart (RX stayed near $rx_before)"; }
vk_pass "testpmd RX $rx_before -> $(rx_frames "$tlog") after the restart"
# DPDK sends SET_VRING_CALL for every ring before SET_FEATURES on a reconnect: all taken.
if grep -q 'before SET_OWNER' "$nlog4"; then
  grep 'before SET_OWNER' "$nlog4" | head -3
  vk_fail "part of virtio-user's reconnect was refused as coming before SET_OWNER"
fi
vk_pass "no message of the reconnect refused"
vk_net_stop "$pid4"; rc=$?
((rc == 0)) || { cat "$nlog4"; vk_fail "exit $rc"; }
vk_dpdk_stop "$dpdk_pid" >/dev/null 2>&1
vk_pass "exit 0"

echo "net_backend_restart_test: all checks passed in $(elapsed) s"
