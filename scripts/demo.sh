#!/usr/bin/env bash
# vhostkit end to end, in one command (as root, Debian 12):
#
#   scripts/demo.sh
#
# 1. installs what is missing (scripts/deps.sh);
# 2. builds vhostkit-net, Release, in build/release;
# 3. builds the test guest (Debian cloud kernel + busybox initramfs, scripts/guest-image.sh);
# 4. creates a network namespace, starts vhostkit-net in it on a TAP (host side 192.0.2.1/24),
#    boots a QEMU guest (TCG, no KVM needed) whose NIC is vhost-user served by vhostkit-net;
#    the guest (192.0.2.2) pings the host, sends 8 MiB over TCP and receives 8 MiB back, and
#    both ends compare sha256;
# 5. prints vhostkit-net's per-second stats lines and its exact totals at exit, and removes
#    everything it made (namespace, TAP, processes, socket), also on Ctrl-C.
#
# Environment: VK_DEMO_MIB (default 8) MiB each way, VK_JOBS build parallelism (default: nproc),
# VK_KEEP=1 keeps the logs directory. Exit 0 when the guest's traffic went through intact.
set -uo pipefail
VK_SCRIPT_NAME=demo
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/scripts/lib/qemu.sh"
source "$repo/scripts/lib/tcp.sh"
source "$repo/scripts/lib/vhostkit.sh"

MIB=${VK_DEMO_MIB:-8}
PORT=5201
TAP=vk-demo0
build=$repo/build/release
t0=$(vk_now)

say() { echo "[demo] $*"; }
die() { echo "[demo] FAILED: $*" >&2; exit 1; }
took() { awk -v a="$1" -v b="$(vk_now)" 'BEGIN{printf "%.0f", b-a}'; }
# vk_fail / vk_skip from the helpers end the demo too; say why in the demo's words.
vk_fail() { echo "[demo] FAILED: $*" >&2; exit 1; }
vk_skip() { echo "[demo] cannot run: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || { echo "[demo] run me as root: I install packages and create a network namespace and a TAP" >&2; exit 1; }

say "installing missing Debian packages (scripts/deps.sh)..."
"$repo/scripts/deps.sh" || die "scripts/deps.sh failed (see above)"

say "building vhostkit-net (Release, $build)..."
t=$(vk_now)
mkdir -p "$build"
blog=$repo/build/demo-cmake.log
configure() { cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >"$blog" 2>&1; }
if ! configure; then
  # A build tree left by another generator, another source path or an older CMake can't be
  # reconfigured in place: start that tree afresh once, then give up with the log.
  if [[ -f $build/CMakeCache.txt ]]; then
    say "the old build tree in $build does not configure; starting it afresh"
    rm -rf "$build"; mkdir -p "$build"
    configure || { tail -20 "$blog"; die "cmake configure failed (log: $blog)"; }
  else
    tail -20 "$blog"; die "cmake configure failed (log: $blog)"
  fi
fi
# The compiler's output goes to the log; the terminal gets a progress line every quarter.
cmake --build "$build" --target vhostkit-net -j "${VK_JOBS:-$(nproc)}" 2>&1 | tee -a "$blog" |
  gawk -v t0="$(date +%s)" 'match($0, /^\[([0-9]+)\/([0-9]+)\]/, m) {
      q = int(4 * m[1] / m[2]); if (q > last) { last = q
        printf "[demo]   compiled %d of %d steps (%d s)\n", m[1], m[2], systime() - t0; fflush() } }'
((PIPESTATUS[0] == 0)) || { tail -30 "$blog"; die "build failed (log: $blog)"; }
VK_NET_BIN=$build/src/tools/vhostkit-net/vhostkit-net
[[ -x $VK_NET_BIN ]] || die "no $VK_NET_BIN after the build"
say "built in $(took "$t") s"

say "building the guest image (kernel + busybox initramfs; cached after the first run)..."
VK_GUEST_DIR=$repo/build/guest
"$repo/scripts/guest-image.sh" "$VK_GUEST_DIR" | sed 's/^/[demo]   /' ||
  die "scripts/guest-image.sh failed (it needs the Debian archive for the kernel package)"
[[ -f $VK_GUEST_DIR/vmlinuz && -f $VK_GUEST_DIR/initramfs.gz ]] || die "no guest image in $VK_GUEST_DIR"
[[ -c /dev/net/tun ]] || die "/dev/net/tun missing: this kernel or container has no TAP support"

vk_tmpdir
log=$VK_TMP/guest-console.log
nlog=$VK_TMP/vhostkit-net.log
sock=$VK_TMP/vhost-user.sock

say "creating network namespace with vhostkit-net on TAP $TAP (192.0.2.1/24)..."
vk_netns_create demo || die "cannot create a network namespace"
vk_net_start "$nlog" --netns "$VK_NETNS" -- --socket-path="$sock" --tap="$TAP" --stats=1
net_pid=$VK_NET_PID
vk_net_wait_listening "$sock" 10 || { cat "$nlog"; die "vhostkit-net did not start"; }
vk_netns_exec ip addr add 192.0.2.1/24 dev "$TAP" && vk_netns_exec ip link set "$TAP" up ||
  die "cannot configure $TAP"
say "vhostkit-net (pid $net_pid) listening on $sock, namespace $VK_NETNS"

vk_random_file "$VK_TMP/to_guest" "$MIB"
vk_tcp_sink_start "$PORT" "$VK_TMP/from_guest" || die "cannot start the TCP listener"
vk_tcp_source_start "$((PORT + 1))" "$VK_TMP/to_guest" || die "cannot start the TCP sender"

say "booting guest (TCG, ~10 s)..."
t=$(vk_now)
net=()
vk_qemu_vhost_user_net_args net "$sock"
vk_qemu_start --log "$log" --timeout 150 \
  --cmdline "vk.ip=192.0.2.2/24 vk.peer=192.0.2.1 vk.cmd=ping,tcp-tx,tcp-rx vk.count=3 vk.mb=$MIB vk.port=$PORT" \
  -- "${net[@]}"
vk_net_wait_connected "$nlog" 30 || { vk_qemu_dump "$log"; die "QEMU never connected to vhostkit-net"; }
vk_qemu_wait_marker "$log" '^VK-LINK' 90 || { vk_qemu_dump "$log"; die "the guest did not boot"; }
grep -q '^VK-LINK up' "$log" || { vk_qemu_dump "$log"; die "the guest's NIC has no link"; }
say "guest up after $(took "$t") s: $(grep -a -m1 '^VK-NET' "$log" | tr -d '\r' | cut -d' ' -f2-)"

say "guest pings 192.0.2.1, then sends and receives $MIB MiB over TCP..."
vk_guest_check_ping "$log" 30 | sed 's/^PASS: /[demo]   /'; ((PIPESTATUS[0] == 0)) || exit 1
vk_guest_check_tcp_tx "$log" "$VK_TMP/from_guest" "$MIB" 90 | sed 's/^PASS: /[demo]   /'; ((PIPESTATUS[0] == 0)) || exit 1
vk_guest_check_tcp_rx "$log" "$VK_TMP/to_guest" "$MIB" 90 | sed 's/^PASS: /[demo]   /'; ((PIPESTATUS[0] == 0)) || exit 1
vk_qemu_wait_exit "$VK_QEMU_PID" 30; rc=$?
grep -q '^VK-DONE failed=0' "$log" || { vk_qemu_dump "$log"; die "the guest reported a failed step"; }
((rc == 0)) || die "QEMU exited with status $rc"

say "vhostkit-net stats lines with traffic (tx = guest -> TAP, rx = TAP -> guest, per second):"
awk '$1 ~ /^qp/ && ($3 > 0 || $5 > 0 || $13 > 0 || $15 > 0)' "$nlog" | sed 's/^/[demo]   /'
vk_net_stop "$net_pid"; nrc=$?
((nrc == 0)) || die "vhostkit-net exited with status $nrc on SIGTERM"
# The exact per-queue totals vhostkit-net logs as it exits:
# "totals qp0 tx F frames B bytes drops D err E | rx F frames B bytes drops D err E".
totals=$(grep -oE 'totals qp0 tx [0-9]+ frames .*' "$nlog" | tail -1)
[[ -n $totals ]] || { tail -5 "$nlog"; die "vhostkit-net logged no totals at exit"; }
read -r txf txb txd txe rxf rxb rxd rxe <<<"$(awk '{print $4, $6, $9, $11, $14, $16, $19, $21}' <<<"$totals")"
((txf > 0 && rxf > 0)) || die "vhostkit-net's totals show no traffic both ways: $totals"
mb() { awk -v b="$1" 'BEGIN{printf "%.1f", b / 1e6}'; }

ping_res=$(vk_guest_result "$log" ping)
cat <<EOF
[demo] ------------------------------------------------------------------------------------
[demo] SUCCESS: a QEMU guest used vhostkit-net as its NIC (vhost-user, TAP backend)
[demo]   ran:       vhostkit-net --tap=$TAP --stats=1 in netns $VK_NETNS; QEMU 7.2 (TCG),
[demo]              virtio-net-pci over vhost-user socket $sock
[demo]   guest:     ping 192.0.2.1 ${ping_res%% *} (${ping_res#* });
[demo]              sent $MIB MiB, received $MIB MiB, sha256 equal on both ends
[demo]   moved:     guest -> host $txf frames, $(mb "$txb") MB; host -> guest $rxf frames, $(mb "$rxb") MB
[demo]              (vhostkit-net's totals at exit; TSO frames carry up to 64 KiB each);
[demo]              drops tx $txd rx $rxd, errors $((txe + rxe))
[demo]   vhostkit-net exited 0 on SIGTERM; total $(took "$t0") s; cleaning up
[demo] ------------------------------------------------------------------------------------
EOF
exit 0
