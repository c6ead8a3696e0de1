# shellcheck shell=bash
# Booting the test guest (scripts/guest-image.sh) in QEMU, and reading its VK-* markers.
#
#   vk_guest_ensure                    build or refresh the image (cached); sets VK_GUEST_DIR
#   vk_qemu_start --log FILE [--cmdline "vk.cmd=ping vk.ip=..."] [--netns NS] [--timeout S]
#                 [--mem MB] [--interactive] -- [QEMU NIC/disk args...]
#                                      boot in the background, console to FILE; QEMU is killed
#                                      after S seconds (default 180) and on exit; sets VK_QEMU_PID
#   vk_qemu_vhost_user_net_args ARRAY SOCK [N] [QUEUES]
#                                      append to ARRAY the args for vhost-user virtio-net NIC
#                                      number N (default 0) on SOCK, QUEUES queue pairs (default 1);
#                                      QEMU is the client: the backend must listen already;
#                                      VK_QEMU_NET_DEVICE_ARGS (e.g. ",packed=on") is appended to
#                                      the virtio-net-pci device
#   vk_qemu_tap_net_args ARRAY TAP     same for QEMU's own tap backend (QEMU must run in the netns)
#   vk_qemu_wait_marker LOG REGEX TIMEOUT [PID]
#                                      0 when a console line matches REGEX (grep -E), 1 on
#                                      timeout, 2 if PID (default VK_QEMU_PID) exited first
#   vk_qemu_wait_exit PID TIMEOUT      QEMU's exit status, 124 on timeout (then it is killed)
#   vk_guest_result LOG SCENARIO       the "ok|fail k=v..." tail of "VK-RESULT SCENARIO", or 1
#   vk_guest_field LOG SCENARIO KEY    one k=v value from that line (e.g. sha256, bytes)
#   vk_qemu_dump LOG [LINES]           the console tail, for failure reports
#   vk_qemu_wait_incoming DST_QMP [BACKEND_LOG]
#                                      the destination QEMU (-incoming) waits for a migration:
#                                      its back-end, when BACKEND_LOG is given, saw the front-end
#                                      connect (vk_net_wait_connected, vhostkit.sh), and QMP says
#                                      inmigrate; vk_fail otherwise
#   vk_qemu_migrate SRC_QMP DST_QMP URI SRC_PID SRC_LOG
#                                      live migration between two running QEMUs: migrate the
#                                      source over URI (1 GiB/s, 120 s), wait for the destination
#                                      to run the guest, quit the source; QMP's summary in
#                                      VK_QEMU_MIGRATED; vk_fail (with SRC_LOG) on any step
#
# Environment: VK_GUEST_DIR (default build/guest), VK_QEMU_ACCEL (default tcg; "kvm:tcg" uses KVM
# when /dev/kvm works), VK_GUEST_DEBUG=1 (full kernel log instead of `quiet`).
# The machine is the one DESIGN.md gives for vhost-user: q35, all guest RAM in one shared memfd
# (vhost-user backends map it), 256 MiB.
[[ -n ${VK_QEMU_SH:-} ]] && return 0
VK_QEMU_SH=1
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

VK_QEMU_BIN=${VK_QEMU_BIN:-qemu-system-x86_64}

vk_guest_ensure() {
  local root
  root=$(vk_repo_root)
  VK_GUEST_DIR=${VK_GUEST_DIR:-$root/build/guest}
  vk_require_cmd "$VK_QEMU_BIN" cpio gzip
  [[ -x /bin/busybox ]] || vk_skip "busybox-static not installed (run scripts/deps.sh)"
  # The image is built from Debian packages scripts/deps.sh can always get: a failure to build
  # it is a failure of the suite, never a skip.
  "$root/scripts/guest-image.sh" "$VK_GUEST_DIR" >&2 ||
    vk_fail "the guest image could not be built (scripts/guest-image.sh failed, see above)"
  [[ -f $VK_GUEST_DIR/vmlinuz && -f $VK_GUEST_DIR/initramfs.gz ]] ||
    vk_fail "scripts/guest-image.sh left no vmlinuz and initramfs.gz in $VK_GUEST_DIR"
}

vk_qemu_vhost_user_net_args() {
  # shellcheck disable=SC2178  # a nameref to the caller's array
  local -n _args=$1
  local sock=$2 n=${3:-0} queues=${4:-1} mq=""
  ((queues > 1)) && mq=",mq=on"
  # vectors=0: QEMU 7.2 under TCG crashes in msix_set_vector_notifiers with vhost-user + MSI-X.
  _args+=(-chardev "socket,id=vkc$n,path=$sock"
          -netdev "vhost-user,id=vkn$n,chardev=vkc$n,queues=$queues"
          -device "virtio-net-pci,netdev=vkn$n,vectors=0$mq${VK_QEMU_NET_DEVICE_ARGS:-}")
}

vk_qemu_tap_net_args() {
  # shellcheck disable=SC2178  # a nameref to the caller's array
  local -n _args=$1
  _args+=(-netdev "tap,id=vkn0,ifname=$2,script=no,downscript=no"
          -device "virtio-net-pci,netdev=vkn0")
}

vk_qemu_start() {
  local log="" cmdline="" netns="" timeout=180 mem=256 interactive=0
  while (($#)); do
    case $1 in
      --log) log=$2; shift ;;
      --cmdline) cmdline=$2; shift ;;
      --netns) netns=$2; shift ;;
      --timeout) timeout=$2; shift ;;
      --mem) mem=$2; shift ;;
      --interactive) interactive=1 ;;
      --) shift; break ;;
      *) echo "vk_qemu_start: unknown option $1" >&2; return 2 ;;
    esac
    shift
  done
  [[ -n $log || $interactive == 1 ]] || { echo "vk_qemu_start: --log required" >&2; return 2; }
  [[ -n ${VK_GUEST_DIR:-} ]] || vk_guest_ensure
  local quiet=quiet
  [[ ${VK_GUEST_DEBUG:-0} == 1 ]] && quiet="loglevel=7"
  local console=(-display none -monitor none -serial "file:$log")
  ((interactive)) && console=(-display none -serial mon:stdio)
  # shellcheck disable=SC2054  # commas belong to QEMU option values
  local cmd=(timeout -k 5 "$timeout" "$VK_QEMU_BIN"
    -machine "q35,accel=${VK_QEMU_ACCEL:-tcg}" -m "$mem"
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa node,memdev=mem
    -nodefaults -no-user-config -no-reboot "${console[@]}"
    -kernel "$VK_GUEST_DIR/vmlinuz" -initrd "$VK_GUEST_DIR/initramfs.gz"
    -append "console=ttyS0 $quiet panic=-1 $cmdline"
    "$@")
  [[ -n $netns ]] && cmd=(ip netns exec "$netns" "${cmd[@]}")
  if ((interactive)); then
    "${cmd[@]}"
    return
  fi
  : >"$log"
  echo "${cmd[*]}" >"$log.cmd"
  "${cmd[@]}" </dev/null >"$log.qemu" 2>&1 &
  VK_QEMU_PID=$!
  vk_track_pid "$VK_QEMU_PID"
}

vk_qemu_wait_marker() {
  local log=$1 re=$2 timeout=$3 pid=${4:-${VK_QEMU_PID:-}}
  local n=0 max=$((timeout * 10))
  while ((n++ < max)); do
    grep -qE -- "$re" "$log" 2>/dev/null && return 0
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
      grep -qE -- "$re" "$log" 2>/dev/null && return 0
      return 2
    fi
    sleep 0.1
  done
  return 1
}

vk_qemu_wait_exit() {
  local pid=$1 timeout=$2 n=0 rc
  while kill -0 "$pid" 2>/dev/null; do
    if ((n++ >= timeout * 10)); then
      vk_kill "$pid"
      return 124
    fi
    sleep 0.1
  done
  wait "$pid" 2>/dev/null
  rc=$?
  return $rc
}

vk_guest_result() {
  local line
  line=$(grep -a "^VK-RESULT $2 " "$1" | tail -1 | tr -d '\r')
  [[ -n $line ]] || return 1
  echo "${line#VK-RESULT $2 }"
}

vk_guest_field() {
  local res
  res=$(vk_guest_result "$1" "$2") || return 1
  tr ' ' '\n' <<<"$res" | sed -n "s/^$3=//p" | head -1
}

vk_qemu_dump() {
  local log=$1 lines=${2:-40}
  echo "----- guest console ($log), last $lines lines -----"
  tail -n "$lines" "$log" 2>/dev/null | tr -d '\r'
  if [[ -s $log.qemu ]]; then
    echo "----- qemu stderr -----"
    tail -n 20 "$log.qemu"
  fi
  echo "-----"
}

vk_qemu_wait_incoming() {
  local dst=$1 backend_log=${2:-}
  if [[ -n $backend_log ]]; then
    vk_net_wait_connected "$backend_log" 30 1 || { cat "$backend_log"; vk_fail "destination never connected"; }
  fi
  python3 "$(vk_repo_root)/scripts/lib/qmp.py" "$dst" wait-status inmigrate --timeout 30 >/dev/null ||
    vk_fail "destination QEMU is not waiting for a migration"
}

vk_qemu_migrate() {
  local src=$1 dst=$2 uri=$3 src_pid=$4 src_log=$5 qmp mig
  qmp="$(vk_repo_root)/scripts/lib/qmp.py"
  mig=$(python3 "$qmp" "$src" migrate "$uri" --timeout 120 --max-bandwidth 1073741824 2>&1) ||
    { cat "$src_log"; vk_fail "migration: $mig"; }
  python3 "$qmp" "$dst" wait-status running --timeout 90 >/dev/null ||
    vk_fail "the destination did not resume the guest"
  python3 "$qmp" "$src" run quit >/dev/null 2>&1
  vk_qemu_wait_exit "$src_pid" 30 >/dev/null
  VK_QEMU_MIGRATED=$mig
}
