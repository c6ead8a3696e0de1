#!/usr/bin/env bash
# libvirt drives a guest whose NIC and disk are vhostkit's: a TCG domain (type='qemu'; no KVM
# here) defined and started with virsh, direct kernel boot of the test guest, memfd shared memory,
# an <interface type='vhostuser'> served by vhostkit-net --tap in a namespace of its own
# (192.0.2.1/24 on the TAP, 192.0.2.2/24 in the guest) and a <disk type='vhostuser'> served by
# vhostkit-blk on an image file. Two phases, one per socket mode of the NIC: libvirt's
# mode='client' (vhostkit-net listens) and mode='server' (QEMU listens, vhostkit-net --client
# connects). In each, the domain boots three times (virsh start, then virsh destroy + virsh start
# twice) against the same back-end processes, and every boot: the guest pings the host, moves
# 4 MiB over TCP each way (sha256 equal on both ends), reads the disk (sha256 equal to what the
# host or the previous boot left in the image) and writes it (the guest reads its data back, the
# host finds it in the image file). Both back-ends must see each front-end come and go and exit 0.
# In the first phase vhostkit-net is also restarted under the third boot's running guest: the
# interface's <reconnect> brings QEMU back, and the guest answers pings through the new process.
#
# Which libvirt: a private libvirtd of the test's own, never the system's. It runs as root in a
# mount namespace (unshare -m) where the daemon's state directories (/etc/libvirt, /run/libvirt,
# /var/{lib,log,cache}/libvirt) are bind mounts of directories in the test's temp dir, and its
# socket lives in the temp dir (unix_sock_dir), reached with qemu:///system?socket=... Why this
# and not the alternatives:
#   - qemu:///system of a running daemon would need that daemon (there is no systemd here to
#     start one), leave its state behind, and run QEMU as libvirt-qemu, which then needs access
#     to the guest kernel (dynamic_ownership would chown the shared build/guest files);
#   - qemu:///session is the system daemon anyway when the caller is root (libvirt only makes a
#     per-user daemon for other users), and as another user it would need that user set up.
# The private daemon's qemu.conf (in the temp dir) runs QEMU as root, with no cgroups, no
# per-QEMU mount namespace, no security driver and QEMU's log in a file: nothing outside the temp
# dir is touched, so the test runs the same whether or not a system libvirtd runs, and killing
# the daemon and the QEMU processes it started leaves nothing behind. The domain's XML is the one
# docs/libvirt.md describes, including the vectors=0 <qemu:override> (QEMU 7.2 under TCG crashes
# in msix_set_vector_notifiers with vhost-user + MSI-X).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/qemu.sh"
source "$here/../../scripts/lib/tcp.sh"
source "$here/../../scripts/lib/vhostkit.sh"

MIB=${VK_TEST_MIB:-4}
PORT=5201
TAP=vk-lvtap0
t_start=$(vk_now)

vk_require_root
vk_require_cmd ip ss busybox unshare sha256sum dd virsh libvirtd
[[ -c /dev/net/tun ]] || vk_skip "/dev/net/tun missing (no TAP support)"
getent passwd libvirt-qemu >/dev/null ||
  vk_skip "user libvirt-qemu missing (libvirtd needs it at start-up; install libvirt-daemon-system)"
vk_find_programs VK_NET_BIN=vhostkit-net BLK_BIN=vhostkit-blk
vk_guest_ensure
vk_tmpdir
elapsed() { awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}'; }

# ---------------------------------------------------------------- the private libvirtd
lv=$VK_TMP/libvirt
mkdir -p "$lv"/{etc,run,lib,log,cache,sock}
cat >"$lv/etc/qemu.conf" <<'EOF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
EOF
cat >"$lv/libvirtd.conf" <<EOF
unix_sock_dir = "$lv/sock"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:$lv/libvirtd.log"
EOF
binds=(etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt log:/var/log/libvirt
       cache:/var/cache/libvirt)
# A bind mount needs its mount point: create the ones the packages did not, remove them after.
for b in "${binds[@]}"; do
  if [[ ! -d ${b#*:} ]]; then
    mkdir -p "${b#*:}" || vk_fail "creating ${b#*:}"
    vk_on_exit "rmdir '${b#*:}'"
  fi
done
URI="qemu:///system?socket=$lv/sock/libvirt-sock"
lvsh() { virsh -q -c "$URI" "$@"; }

vk_check "a private libvirtd starts (mount namespace, state and socket in the test's temp dir)"
# unshare and bash exec: the pid is libvirtd's own.
# shellcheck disable=SC2016
unshare -m --propagation private bash -c '
  set -e; lv=$1; shift
  for b in "$@"; do mount --bind "$lv/${b%%:*}" "${b#*:}"; done
  exec libvirtd -f "$lv/libvirtd.conf" -p "$lv/libvirtd.pid"' \
  vk-libvirtd "$lv" "${binds[@]}" >"$lv/daemon.out" 2>&1 &
lv_pid=$!
vk_track_pid "$lv_pid"
# Runs before the daemon is killed (cleanups run last-registered first): a QEMU outlives its
# libvirtd, so every one it started is killed by the pid in its pidfile.
qemu_sweep() {
  local f
  for f in "$lv"/run/qemu/*.pid; do
    [[ -s $f ]] && vk_kill "$(cat "$f")"
  done
}
vk_on_exit qemu_sweep
vk_wait_for 60 lvsh version >/dev/null ||
  { cat "$lv/daemon.out"; tail -20 "$lv/libvirtd.log"; vk_fail "libvirtd did not answer on $URI"; }
vk_pass "libvirtd pid $lv_pid: $(lvsh version | grep -i 'hypervisor' | tr -s ' ')"

# ---------------------------------------------------------------- the back-ends
vk_netns_create lv || vk_fail "creating the namespace"
img=$VK_TMP/disk.img
bsock=$VK_TMP/blk.sock
# A known pattern the first boot must read: every 512-byte sector starts with its number.
python3 - "$img" <<'PY'
import sys
with open(sys.argv[1], "wb") as f:
    for s in range(16 * 2048):
        f.write((b"vhostkit sector %08d " % s).ljust(512, bytes([s % 251])))
PY
image_sum() { dd if="$img" bs=1048576 count="$MIB" 2>/dev/null | sha256sum | cut -d' ' -f1; }

vk_check "vhostkit-blk listens on $bsock for the domain's <disk type='vhostuser'>"
blog=$VK_TMP/vhostkit-blk.log
echo "$BLK_BIN --socket-path=$bsock --image=$img" >"$blog.cmd"
"$BLK_BIN" --socket-path="$bsock" --image="$img" </dev/null >"$blog" 2>&1 &
blk_pid=$!
vk_track_pid "$blk_pid"
vk_net_wait_listening "$bsock" 10 "$blog" || { cat "$blog"; vk_fail "vhostkit-blk does not listen"; }
vk_pass "vhostkit-blk pid $blk_pid"

tap_up() {
  vk_wait_for 5 vk_netns_exec ip link show "$TAP" >/dev/null || return 1
  vk_netns_exec ip addr add 192.0.2.1/24 dev "$TAP" && vk_netns_exec ip link set "$TAP" up
}

# ---------------------------------------------------------------- the domain
# domain_xml NAME NET_SOCKET MODE CONSOLE: MODE is the interface's <source mode>, QEMU's side.
# QEMU reconnects to a restarted back-end only where QEMU is the client (<reconnect> is not
# allowed on a listening socket).
domain_xml() {
  local reconnect=""
  [[ $3 == client ]] && reconnect="<reconnect enabled='yes' timeout='2'/>"
  cat <<EOF
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>$1</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>$VK_GUEST_DIR/vmlinuz</kernel>
    <initrd>$VK_GUEST_DIR/initramfs.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 vk.ip=192.0.2.2/24 vk.peer=192.0.2.1 vk.cmd=ping,tcp-tx,tcp-rx,blk-read,blk-write,idle vk.count=3 vk.mb=$MIB vk.port=$PORT</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>$(command -v "$VK_QEMU_BIN")</emulator>
    <interface type='vhostuser'>
      <mac address='52:54:00:c0:00:02'/>
      <source type='unix' path='$2' mode='$3'>$reconnect</source>
      <model type='virtio'/>
      <alias name='ua-net0'/>
    </interface>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw'/>
      <source type='unix' path='$bsock'>
        <reconnect enabled='yes' timeout='2'/>
      </source>
      <target dev='vda' bus='virtio'/>
      <alias name='ua-disk0'/>
    </disk>
    <serial type='file'>
      <source path='$4'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:override>
    <qemu:device alias='ua-net0'>
      <qemu:frontend>
        <qemu:property name='vectors' type='unsigned' value='0'/>
      </qemu:frontend>
    </qemu:device>
    <qemu:device alias='ua-disk0'>
      <qemu:frontend>
        <qemu:property name='vectors' type='unsigned' value='0'/>
      </qemu:frontend>
    </qemu:device>
  </qemu:override>
</domain>
EOF
}

domstate() { lvsh domstate "$1" 2>/dev/null | head -1; }

# boot DOMAIN CONSOLE TAG NET_LOG N: virsh start (vhostkit-net's Nth front-end, vhostkit-blk's
# nblk-th), then every scenario checked; the guest stays up (idle) for virsh destroy.
boot() {
  local dom=$1 log=$2 tag=$3 nlog=$4 n=$5 res before gsum hsum
  before=$(image_sum)
  [[ -e $log ]] && mv "$log" "$log.prev"
  vk_random_file "$VK_TMP/to_guest" "$MIB"
  vk_tcp_sink_start "$PORT" "$VK_TMP/from_guest" || vk_fail "$tag: TCP sink"
  vk_tcp_source_start "$((PORT + 1))" "$VK_TMP/to_guest" || vk_fail "$tag: TCP source"

  vk_check "$tag: virsh start; vhostkit-net sees its front-end number $n, vhostkit-blk its $nblk"
  lvsh start "$dom" >/dev/null || { tail -20 "$lv/log/qemu/$dom.log"; vk_fail "$tag: virsh start"; }
  [[ $(domstate "$dom") == running ]] || vk_fail "$tag: domain state '$(domstate "$dom")' after start"
  qemu_pid=$(cat "$lv/run/qemu/$dom.pid")
  # The guest waits below end early if this QEMU dies (vk_qemu_wait_marker watches
  # VK_QEMU_PID), and failure dumps show libvirt's QEMU log (vk_qemu_dump prints LOG.qemu).
  # shellcheck disable=SC2034  # read by qemu.sh's waits
  VK_QEMU_PID=$qemu_pid
  ln -sf "$lv/log/qemu/$dom.log" "$log.qemu"
  vk_net_wait_connected "$nlog" 30 "$n" || { cat "$nlog"; vk_fail "$tag: vhostkit-net saw no front-end $n"; }
  vk_net_wait_log "$blog" 'front-end connected' 30 "$nblk" "$blk_pid" ||
    { cat "$blog"; vk_fail "$tag: vhostkit-blk saw no front-end $n"; }
  grep -q 'vectors=0\|"vectors":0' "$lv/log/qemu/$dom.log" ||
    vk_fail "$tag: QEMU's command line lacks the vectors=0 override"
  vk_pass "QEMU pid $qemu_pid, both back-ends connected"

  vk_check "$tag: the guest pings, moves $MIB MiB each way over TCP, reads and writes the disk"
  vk_guest_check_ping "$log" 90
  vk_guest_check_tcp_tx "$log" "$VK_TMP/from_guest" "$MIB"
  vk_guest_check_tcp_rx "$log" "$VK_TMP/to_guest" "$MIB"
  vk_qemu_wait_marker "$log" '^VK-RESULT blk-write ' 60 || { vk_qemu_dump "$log"; vk_fail "$tag: no blk-write result"; }
  res=$(vk_guest_result "$log" blk-read)
  [[ $res == ok* ]] || { vk_qemu_dump "$log"; vk_fail "$tag: blk-read: $res"; }
  gsum=$(vk_guest_field "$log" blk-read sha256)
  [[ $gsum == "$before" ]] || vk_fail "$tag: the guest read sha256 $gsum, the image held $before"
  res=$(vk_guest_result "$log" blk-write)
  [[ $res == ok* ]] || { vk_qemu_dump "$log"; vk_fail "$tag: blk-write: $res"; }
  gsum=$(vk_guest_field "$log" blk-write sha256)
  hsum=$(image_sum)
  [[ $gsum == "$hsum" ]] || vk_fail "$tag: the guest wrote sha256 $gsum, the image file has $hsum"
  [[ $gsum != "$before" ]] || vk_fail "$tag: the guest's write did not change the image"
  vk_pass "blk-read sha256 ${before:0:16}... as the image held; blk-write sha256 ${gsum:0:16}... is in the image file"
}

# destroy DOMAIN TAG NET_LOG N: virsh destroy; both back-ends see front-end N go and live on.
destroy() {
  local dom=$1 tag=$2 nlog=$3 n=$4
  vk_check "$tag: virsh destroy; both back-ends see the front-end go and keep running"
  lvsh destroy "$dom" >/dev/null || vk_fail "$tag: virsh destroy"
  [[ $(domstate "$dom") == "shut off" ]] || vk_fail "$tag: domain state '$(domstate "$dom")' after destroy"
  vk_net_wait_log "$nlog" 'front-end disconnected' 15 "$n" ||
    { cat "$nlog"; vk_fail "$tag: vhostkit-net saw no disconnect"; }
  vk_net_wait_log "$blog" 'front-end disconnected' 15 "$nblk" "$blk_pid" ||
    { cat "$blog"; vk_fail "$tag: vhostkit-blk saw no disconnect"; }
  kill -0 "$net_pid" 2>/dev/null || vk_fail "$tag: vhostkit-net exited"
  kill -0 "$blk_pid" 2>/dev/null || vk_fail "$tag: vhostkit-blk exited"
  vk_pass "shut off; vhostkit-net and vhostkit-blk running"
}

# restart_net TAG SOCKET LOG: with the guest up, vhostkit-net (listening) is stopped and started
# again on the same socket; the interface's <reconnect> brings QEMU back by itself, and the
# guest, idle, answers pings from the host through the new process and its new TAP.
restart_net() {
  local tag=$1 sock=$2 log=$3.2 rc
  vk_check "$tag: vhostkit-net restarted under the running guest; QEMU reconnects (<reconnect>)"
  vk_net_stop "$net_pid"; rc=$?
  ((rc == 0)) || { cat "$3"; vk_fail "$tag: vhostkit-net exit status $rc"; }
  vk_wait_for 5 bash -c "! ip netns exec '$VK_NETNS' ip link show '$TAP' >/dev/null 2>&1" ||
    vk_fail "$tag: TAP $TAP still there after vhostkit-net exited"
  vk_net_start "$log" --netns "$VK_NETNS" -- --socket-path="$sock" --tap="$TAP"
  net_pid=$VK_NET_PID
  vk_net_wait_listening "$sock" 10 || { cat "$log"; vk_fail "$tag: vhostkit-net does not listen again"; }
  tap_up || { cat "$log"; vk_fail "$tag: TAP $TAP setup"; }
  vk_net_wait_log "$log" 'features 0x[0-9a-f]+ acked' 30 ||
    { cat "$log"; tail -5 "$lv/log/qemu/$dom.log"; vk_fail "$tag: QEMU did not reconnect and negotiate"; }
  [[ $(domstate "$dom") == running ]] || vk_fail "$tag: domain state '$(domstate "$dom")'"
  vk_netns_exec ping -c 3 -w 30 192.0.2.2 >"$VK_TMP/ping-after-restart.log" 2>&1 ||
    { cat "$VK_TMP/ping-after-restart.log"; vk_fail "$tag: the guest does not answer pings after the restart"; }
  vk_pass "reconnected; the guest answers: $(grep -o '[0-9]* received' "$VK_TMP/ping-after-restart.log")"
}

# phase MODE NAME NET_ARGS...: one NIC socket mode, three boots of one domain.
nblk=0
phase() {
  local mode=$1 label=$2 dom nlog nsock i; shift 2
  dom=vk-test-$$-$mode
  nlog=$VK_TMP/vhostkit-net-$mode.log
  nsock=$VK_TMP/net-$mode.sock

  vk_check "$label: vhostkit-net $* --tap=$TAP in $VK_NETNS"
  vk_net_start "$nlog" --netns "$VK_NETNS" -- --socket-path="$nsock" --tap="$TAP" "$@"
  net_pid=$VK_NET_PID
  if [[ $mode == client ]]; then
    vk_net_wait_listening "$nsock" 10 || { cat "$nlog"; vk_fail "vhostkit-net does not listen"; }
  else
    vk_net_wait_log "$nlog" 'cannot connect to .*retrying' 10 || { cat "$nlog"; vk_fail "no retry logged"; }
  fi
  tap_up || { cat "$nlog"; vk_fail "TAP $TAP setup"; }
  vk_pass "vhostkit-net pid $net_pid"

  vk_check "$label: virsh define (interface source mode='$mode')"
  domain_xml "$dom" "$nsock" "$mode" "$VK_TMP/console-$mode.log" >"$VK_TMP/$dom.xml"
  lvsh define "$VK_TMP/$dom.xml" >/dev/null || vk_fail "virsh define $VK_TMP/$dom.xml"
  vk_on_exit "virsh -q -c '$URI' undefine '$dom'"
  vk_on_exit "virsh -q -c '$URI' destroy '$dom'"
  vk_pass "defined $dom"

  for i in 1 2 3; do
    nblk=$((nblk + 1))
    boot "$dom" "$VK_TMP/console-$mode.log" "$label boot $i" "$nlog" "$i"
    if [[ $mode == client && $i == 3 ]]; then
      restart_net "$label boot $i" "$nsock" "$nlog"
      nlog=$nlog.2
      destroy "$dom" "$label boot $i" "$nlog" 1
    else
      destroy "$dom" "$label boot $i" "$nlog" "$i"
    fi
  done

  vk_check "$label: virsh undefine; vhostkit-net exits 0 on SIGTERM"
  lvsh undefine "$dom" >/dev/null || vk_fail "virsh undefine $dom"
  vk_net_stop "$net_pid"; rc=$?
  ((rc == 0)) || { cat "$nlog"; vk_fail "vhostkit-net exit status $rc"; }
  vk_wait_for 5 bash -c "! ip netns exec '$VK_NETNS' ip link show '$TAP' >/dev/null 2>&1" ||
    vk_fail "TAP $TAP still there after vhostkit-net exited"
  vk_pass "undefined; exit 0 ($(elapsed) s so far)"
}

phase client "net mode='client' (vhostkit-net listens)"
phase server "net mode='server' (QEMU listens, vhostkit-net --client)" --client

vk_check "vhostkit-blk served six boots of two domains and exits 0 on SIGTERM"
vk_net_stop "$blk_pid"; rc=$?
((rc == 0)) || { cat "$blog"; vk_fail "vhostkit-blk exit status $rc"; }
[[ ! -e $bsock ]] || vk_fail "vhostkit-blk left $bsock behind"
vk_pass "$nblk front-ends served, exit 0"

echo "libvirt_vhostuser_test: all checks passed in $(elapsed) s"
