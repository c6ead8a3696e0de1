#!/usr/bin/env bash
# The control for tests/e2e/net_migration_test.sh with VK_MIG_TRAFFIC=during: the same guest, the
# same bridge, the same paced TCP transfer spanning the migration, but QEMU's own virtio-net on a
# TAP (QEMU runs in the namespace) instead of vhost-user and vhostkit-net. When this fails the
# way the vhostkit variant does (a kernel BUG in list_debug or the timer wheel, or soft lockups
# every 28 s on the destination), the fault is QEMU's (7.2, TCG), not the back-end's.
# Measured 2026-12-05 on this 2-core host at load 7-10: 3 of 8 runs failed (a list corruption
# panic, soft lockups, a destination that never ran), against 1 of 4 with vhostkit-net; with the
# guest idle during the migration 6 of 6 vhostkit-net runs passed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/qemu.sh"
source "$here/../../scripts/lib/tcp.sh"
source "$here/../../scripts/lib/vhostkit.sh"

MIB=${VK_TEST_MIB:-24}
RATE_KIB=${VK_TEST_RATE_KIB:-1024}
PORT=5201
QMP=$here/../../scripts/lib/qmp.py
t_start=$(vk_now)
elapsed() { awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}'; }

vk_require_root
vk_require_cmd ip ss busybox python3 bridge
[[ -c /dev/net/tun ]] || vk_skip "/dev/net/tun missing (no TAP support)"
vk_guest_ensure
vk_tmpdir

vk_netns_create mig || vk_fail "creating the namespace"
vk_netns_exec ip link add vk-br0 type bridge || vk_fail "creating the bridge"
VK_NETNS_LINKS+=(vk-br0)
vk_netns_exec ip addr add 192.0.2.1/24 dev vk-br0 || vk_fail "address on vk-br0"
vk_netns_exec ip link set vk-br0 up || vk_fail "bringing vk-br0 up"

declare -A PID
vk_random_file "$VK_TMP/to_guest" "$MIB"
vk_tcp_paced_source_start "$((PORT + 1))" "$VK_TMP/to_guest" "$RATE_KIB" ||
  vk_fail "starting the TCP source"

cmdline="vk.ip=192.0.2.2/24 vk.peer=192.0.2.1 vk.cmd=ping,tcp-rx,ping vk.count=3 vk.mb=$MIB vk.port=$PORT"
for side in src dst; do
  tap=vk-mig0; [[ $side == dst ]] && tap=vk-mig1
  net=(-netdev "tap,id=vkn0,ifname=$tap,script=no,downscript=no" -device "virtio-net-pci,netdev=vkn0,vectors=0")
  net+=(-qmp "unix:$VK_TMP/$side.qmp,server=on,wait=off")
  [[ $side == dst ]] && net+=(-incoming "unix:$VK_TMP/migrate.sock")
  vk_qemu_start --netns "$VK_NETNS" --log "$VK_TMP/console-$side.log" --timeout 300 --cmdline "$cmdline" -- "${net[@]}"
  PID[qemu-$side]=$VK_QEMU_PID
  vk_wait_for 20 vk_netns_exec ip link show "$tap" || vk_fail "no $tap"
  vk_netns_exec ip link set "$tap" master vk-br0 || vk_fail "adding $tap to the bridge"
  vk_netns_exec ip link set "$tap" up || vk_fail "bringing $tap up"
done
src_log=$VK_TMP/console-src.log dst_log=$VK_TMP/console-dst.log

vk_check "the guest boots on the source and pings the host through QEMU's virtio-net"
vk_qemu_wait_marker "$src_log" '^VK-RESULT ping ' 90 "${PID[qemu-src]}" ||
  { vk_qemu_dump "$src_log"; vk_fail "no ping result on the source"; }
res=$(vk_guest_result "$src_log" ping)
[[ $res == ok* ]] || { vk_qemu_dump "$src_log"; vk_fail "ping before migration: $res"; }
vk_pass "ping: $res"

python3 "$QMP" "$VK_TMP/dst.qmp" wait-status inmigrate --timeout 30 >/dev/null ||
  vk_fail "destination QEMU is not waiting for a migration"
vk_check "the guest's TCP receive is under way ($MIB MiB at $RATE_KIB KiB/s)"
vk_qemu_wait_marker "$src_log" '^VK-INFO tcp-rx connecting' 30 "${PID[qemu-src]}" ||
  { vk_qemu_dump "$src_log"; vk_fail "the guest never started tcp-rx"; }
vk_wait_for 30 bash -c "ip netns exec $VK_NETNS ss -Htn state established '( sport = :$((PORT + 1)) )' | grep -q ." ||
  vk_fail "no established connection to the paced source"
vk_pass "connected"

vk_check "QEMU migrates the running guest (source -> destination)"
mig=$(python3 "$QMP" "$VK_TMP/src.qmp" migrate "unix:$VK_TMP/migrate.sock" --timeout 120 \
  --max-bandwidth 1073741824 2>&1) ||
  { vk_fail "migration: $mig"; }
python3 "$QMP" "$VK_TMP/dst.qmp" wait-status running --timeout 90 >/dev/null ||
  vk_fail "the destination did not resume the guest"
vk_pass "$mig; destination running after $(elapsed) s"
python3 "$QMP" "$VK_TMP/src.qmp" run quit >/dev/null 2>&1
vk_qemu_wait_exit "${PID[qemu-src]}" 30 >/dev/null

vk_check "the guest finishes receiving on the destination, every byte intact"
vk_guest_check_tcp_rx "$dst_log" "$VK_TMP/to_guest" "$MIB" 180

vk_check "the guest pings the host again from the destination"
vk_qemu_wait_marker "$dst_log" '^VK-RESULT ping .*' 60 "${PID[qemu-dst]}" ||
  { vk_qemu_dump "$dst_log"; vk_fail "no ping result after migration"; }
res=$(vk_guest_result "$dst_log" ping)
[[ $res == ok* ]] || { vk_qemu_dump "$dst_log"; vk_fail "ping after migration: $res"; }
vk_pass "ping: $res"

vk_check "no kernel BUG, oops or lockup on the guest's console"
trouble=$(grep -E 'BUG|Oops|panic|soft lockup|general protection' "$src_log" "$dst_log" | head -3)
[[ -z $trouble ]] || { vk_qemu_dump "$dst_log"; vk_fail "$trouble"; }
vk_pass "clean console"

vk_check "the guest powers off cleanly"
vk_qemu_wait_exit "${PID[qemu-dst]}" 60; rc=$?
grep -q '^VK-DONE failed=0' "$dst_log" || { vk_qemu_dump "$dst_log"; vk_fail "VK-DONE missing or failures reported"; }
((rc == 0)) || vk_fail "destination QEMU exit status $rc"
vk_pass "clean"

echo "tcg_migration_control: all checks passed in $(elapsed) s"
