#!/usr/bin/env bash
# vhostkit-net outlives its front-ends. Server mode: a guest streams TCP through vhostkit-net's
# TAP; QEMU is killed with SIGKILL mid-transfer; a new QEMU connects to the same socket and its
# guest pings. vhostkit-net is the same process throughout, holds as many fds during the second
# session as during the first, and drops back to its idle fd count after each. Client mode: QEMU
# owns the socket (server=on,wait=off) and vhostkit-net --client connects to it; QEMU is killed
# and restarted, vhostkit-net reconnects by itself and the new guest pings.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/qemu.sh"
source "$here/../../scripts/lib/tcp.sh"
source "$here/../../scripts/lib/vhostkit.sh"

PORT=5201
TAP=vk-tap0
t_start=$(vk_now)

vk_require_root
vk_require_cmd ip ss busybox
[[ -c /dev/net/tun ]] || vk_skip "/dev/net/tun missing (no TAP support)"
vk_net_find_bin
vk_guest_ensure
vk_tmpdir
sock=$VK_TMP/vhost.sock
vk_netns_create reconn || vk_fail "creating the namespace"

elapsed() { awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}'; }

tap_up() {
  vk_wait_for 5 vk_netns_exec ip link show "$TAP" >/dev/null || return 1
  vk_netns_exec ip addr add 192.0.2.1/24 dev "$TAP" && vk_netns_exec ip link set "$TAP" up
}

# boot_guest LOG CMDLINE CHARDEV_OPTS: a guest whose NIC is vhost-user on $sock.
boot_guest() {
  local net=(-chardev "socket,id=vkc0,path=$sock$3"
             -netdev "vhost-user,id=vkn0,chardev=vkc0,queues=1"
             -device "virtio-net-pci,netdev=vkn0,vectors=0")
  vk_qemu_start --log "$1" --timeout 120 --cmdline "vk.ip=192.0.2.2/24 vk.peer=192.0.2.1 $2" -- "${net[@]}"
}

# kill_mid_transfer LOG SINK: wait until the guest's TCP stream is flowing, then SIGKILL QEMU.
kill_mid_transfer() {
  local log=$1 sink=$2
  vk_qemu_wait_marker "$log" '^VK-LINK up' 60 || { vk_qemu_dump "$log"; vk_fail "first guest: no link"; }
  vk_wait_for 60 bash -c "(( \$(stat -c %s '$sink' 2>/dev/null || echo 0) > 1048576 ))" ||
    { vk_qemu_dump "$log"; vk_fail "first guest's TCP stream never passed 1 MiB"; }
  fds_busy=$(vk_net_fd_count "$net_pid")
  kill -KILL "$VK_QEMU_PID"
  wait "$VK_QEMU_PID" 2>/dev/null
  echo "  killed QEMU after $(stat -c %s "$sink") bytes had arrived; vhostkit-net held $fds_busy fds"
}

# ---------------------------------------------------------------- server mode (--socket-path)
nlog=$VK_TMP/net-server.log
vk_check "server mode: vhostkit-net --socket-path --tap=$TAP listens"
vk_net_start "$nlog" --netns "$VK_NETNS" -- --socket-path="$sock" --tap="$TAP" --log-level=info
net_pid=$VK_NET_PID
vk_net_wait_listening "$sock" 10 || { cat "$nlog"; vk_fail "did not listen"; }
tap_up || vk_fail "TAP $TAP setup"
fds_idle=$(vk_net_fd_count "$net_pid")
vk_pass "pid $net_pid, $fds_idle fds idle"

vk_check "server mode: guest 1 streams TCP; QEMU is killed with SIGKILL mid-transfer"
vk_tcp_sink_start "$PORT" "$VK_TMP/sink1" || vk_fail "TCP sink"
boot_guest "$VK_TMP/guest1.log" "vk.cmd=tcp-tx vk.mb=16 vk.port=$PORT" ""
kill_mid_transfer "$VK_TMP/guest1.log" "$VK_TMP/sink1"
vk_net_wait_log "$nlog" 'front-end disconnected' 10 || { cat "$nlog"; vk_fail "no disconnect logged"; }
kill -0 "$net_pid" || vk_fail "vhostkit-net died with its front-end"
vk_wait_for 5 bash -c "(( \$(find /proc/$net_pid/fd -mindepth 1 | wc -l) == $fds_idle ))" ||
  vk_fail "fds after the killed session: $(vk_net_fd_count "$net_pid"), idle was $fds_idle"
vk_pass "disconnect seen, same process, back to $fds_idle fds"

vk_check "server mode: a new QEMU connects to the same socket and its guest pings 192.0.2.1"
boot_guest "$VK_TMP/guest2.log" "vk.cmd=ping,idle vk.count=3" ""
vk_net_wait_connected "$nlog" 30 2 || { cat "$nlog"; vk_fail "second front-end never connected"; }
vk_guest_check_ping "$VK_TMP/guest2.log" 60
fds_busy2=$(vk_net_fd_count "$net_pid")
((fds_busy2 == fds_busy)) || vk_fail "second session holds $fds_busy2 fds, the first held $fds_busy"
vk_pass "same pid $net_pid, $fds_busy2 fds in session as in the first"
vk_kill "$VK_QEMU_PID"
vk_net_wait_log "$nlog" 'front-end disconnected' 10 2 || vk_fail "second disconnect not logged"
vk_wait_for 5 bash -c "(( \$(find /proc/$net_pid/fd -mindepth 1 | wc -l) == $fds_idle ))" ||
  vk_fail "fds after the second session: $(vk_net_fd_count "$net_pid"), idle was $fds_idle"

vk_check "server mode: SIGTERM -> exit 0, socket removed"
vk_net_stop "$net_pid"; rc=$?
((rc == 0)) || { cat "$nlog"; vk_fail "exit $rc"; }
[[ ! -e $sock ]] || vk_fail "socket left behind"
vk_pass "exit 0 ($(elapsed) s so far)"

# ---------------------------------------------------------------- client mode (--client)
nlog=$VK_TMP/net-client.log
vk_wait_for 5 bash -c "! ip netns exec '$VK_NETNS' ip link show '$TAP' >/dev/null 2>&1" || vk_fail "old TAP still there"
vk_check "client mode: vhostkit-net --client waits for QEMU's socket, then connects to it"
vk_net_start "$nlog" --netns "$VK_NETNS" -- --client --socket-path="$sock" --tap="$TAP"
net_pid=$VK_NET_PID
tap_up || vk_fail "TAP $TAP setup"
vk_net_wait_log "$nlog" 'cannot connect to .*retrying' 10 || { cat "$nlog"; vk_fail "no retry logged"; }
fds_idle=$(vk_net_fd_count "$net_pid")
vk_tcp_sink_start "$PORT" "$VK_TMP/sink3" || vk_fail "TCP sink"
boot_guest "$VK_TMP/guest3.log" "vk.cmd=tcp-tx vk.mb=16 vk.port=$PORT" ",server=on,wait=off"
vk_net_wait_connected "$nlog" 30 1 || { cat "$nlog"; vk_qemu_dump "$VK_TMP/guest3.log"; vk_fail "never connected"; }
vk_pass "connected to QEMU"

vk_check "client mode: QEMU killed mid-transfer, restarted; vhostkit-net reconnects by itself; guest pings"
kill_mid_transfer "$VK_TMP/guest3.log" "$VK_TMP/sink3"
vk_net_wait_log "$nlog" 'front-end disconnected' 10 || { cat "$nlog"; vk_fail "no disconnect logged"; }
rm -f "$sock"  # what a killed QEMU leaves; QEMU would also replace it
boot_guest "$VK_TMP/guest4.log" "vk.cmd=ping,idle vk.count=3" ",server=on,wait=off"
vk_net_wait_connected "$nlog" 30 2 || { cat "$nlog"; vk_fail "did not reconnect"; }
vk_guest_check_ping "$VK_TMP/guest4.log" 60
kill -0 "$net_pid" || vk_fail "vhostkit-net gone"
fds_busy2=$(vk_net_fd_count "$net_pid")
((fds_busy2 == fds_busy)) || vk_fail "second session holds $fds_busy2 fds, the first held $fds_busy"
vk_pass "same pid $net_pid reconnected; $fds_busy2 fds in session as in the first"

vk_check "client mode: QEMU gone for good -> vhostkit-net back to retrying, idle fds; SIGTERM -> exit 0"
vk_kill "$VK_QEMU_PID"
vk_net_wait_log "$nlog" 'front-end disconnected' 10 2 || vk_fail "second disconnect not logged"
vk_wait_for 5 bash -c "(( \$(find /proc/$net_pid/fd -mindepth 1 | wc -l) == $fds_idle ))" ||
  vk_fail "fds while retrying: $(vk_net_fd_count "$net_pid"), idle was $fds_idle"
vk_net_stop "$net_pid"; rc=$?
((rc == 0)) || { cat "$nlog"; vk_fail "exit $rc"; }
vk_pass "exit 0"

echo "net_reconnect_test: all checks passed in $(elapsed) s"
