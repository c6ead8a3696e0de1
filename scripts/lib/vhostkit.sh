# shellcheck shell=bash
# Running vhostkit-net in tests and the demo: start it with a log, wait until it listens or a
# front-end is connected, read its --stats lines, stop it and check it exited 0.
#
#   vk_find_programs VAR=PROGRAM...  sets each VAR to PROGRAM's binary, all from one build tree
#                                    (VHOSTKIT_BUILD_DIR, else build/e2e, build/release, build);
#                                    skips (77) when none has them all
#   vk_net_find_bin                  vk_find_programs VK_NET_BIN=vhostkit-net
#   vk_net_start LOG [--netns NS] -- ARGS...
#                                    start vhostkit-net ARGS in the background (inside NS with
#                                    `ip netns exec`, which execs: the pid is vhostkit-net's own),
#                                    stdout+stderr to LOG; stopped on exit; sets VK_NET_PID
#                                    and VK_NET_LOG
#   vk_net_wait_listening SOCK TIMEOUT [LOG]
#                                    0 once SOCK exists and LOG (default VK_NET_LOG) says
#                                    vhostkit-net listens on it
#   vk_net_wait_log LOG REGEX TIMEOUT [COUNT [PID]]
#                                    0 once COUNT (default 1) lines of LOG match REGEX (grep -E);
#                                    1 on timeout, 2 if PID (default VK_NET_PID) exited first
#   vk_net_wait_connected LOG TIMEOUT [COUNT]
#                                    the COUNTth "front-end connected" (server) or "connected to"
#                                    (client) log line
#   vk_net_stop PID [TIMEOUT]        SIGTERM, wait; returns vhostkit-net's exit status (124 and
#                                    SIGKILL when it does not exit within TIMEOUT, default 5 s)
#   vk_net_fd_count PID              open fds of PID
#   vk_net_stats LOG QP              per --stats line of queue pair QP: "tx_mpps tx_gbps tx_drops
#                                    tx_err rx_mpps rx_gbps rx_drops rx_err", one line each
#   vk_net_stats_sum LOG QP          those columns summed over every line of QP (rates summed
#                                    too: with --stats=1, Mpps x 1e6 ~ frames)
#   vk_guest_check_ping LOG [TIMEOUT]          wait for the guest's ping result; fail unless ok
#   vk_guest_check_tcp_tx LOG SINK MIB [TIMEOUT]
#                                    guest -> host: the guest's tcp-tx ok, the host sink (see
#                                    tcp.sh) got MIB MiB with the guest's sha256
#   vk_guest_check_tcp_rx LOG SOURCE MIB [TIMEOUT]
#                                    host -> guest: the guest's tcp-rx ok, MIB MiB, SOURCE's sha256
#   (these three need qemu.sh and tcp.sh sourced; on failure they dump the console and vk_fail)
#   vk_net_stats_active LOG QP DIR   0 if some QP line shows traffic (Mpps or Gbit/s above 0) in
#                                    DIR (tx: guest -> port, rx: port -> guest)
#
# The stats line format (src/tools/vhostkit-net/stats_printer.cc):
#   qp0 tx    0.012 Mpps   0.140 Gbit/s drops 0 err 0 | rx    0.010 Mpps   0.120 Gbit/s drops 0 err 0
# Rates have three decimals, so a trickle (a few pings) reads 0.000: tests that check the stats
# move enough data (TCP, testpmd) to show.
[[ -n ${VK_VHOSTKIT_SH:-} ]] && return 0
VK_VHOSTKIT_SH=1
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# vk_find_programs VAR=PROGRAM...: sets each VAR to PROGRAM's path in the first build tree that
# has all of them (VHOSTKIT_BUILD_DIR when set, as under ctest: test that tree, never a stale
# binary from another; else build/e2e, build/release, build); skips (77) when none has them.
vk_find_programs() {
  local root b pair ok
  root=$(vk_repo_root)
  local dirs=("$root/build/e2e" "$root/build/release" "$root/build")
  [[ -n ${VHOSTKIT_BUILD_DIR:-} ]] && dirs=("$VHOSTKIT_BUILD_DIR")
  for b in "${dirs[@]}"; do
    ok=1
    for pair in "$@"; do
      [[ -n $b && -x $b/src/tools/${pair#*=}/${pair#*=} ]] || { ok=0; break; }
    done
    ((ok)) || continue
    for pair in "$@"; do
      printf -v "${pair%%=*}" '%s' "$b/src/tools/${pair#*=}/${pair#*=}"
    done
    return 0
  done
  vk_skip "${*#*=} not all built in ${VHOSTKIT_BUILD_DIR:-build} (cmake --build BUILD)"
}

vk_net_find_bin() { vk_find_programs VK_NET_BIN=vhostkit-net; }

vk_net_start() {
  local log=$1 netns=""; shift
  while (($#)); do
    case $1 in
      --netns) netns=$2; shift 2 ;;
      --) shift; break ;;
      *) echo "vk_net_start: unknown option $1" >&2; return 2 ;;
    esac
  done
  [[ -n ${VK_NET_BIN:-} ]] || vk_net_find_bin
  local cmd=("$VK_NET_BIN" "$@")
  [[ -n $netns ]] && cmd=(ip netns exec "$netns" "${cmd[@]}")
  echo "${cmd[*]}" >"$log.cmd"
  "${cmd[@]}" </dev/null >>"$log" 2>&1 &
  VK_NET_PID=$!
  VK_NET_LOG=$log
  vk_track_pid "$VK_NET_PID"
}

# A socket file alone may be stale; ss only sees the caller's namespace, and vhostkit-net may run
# in another: so the socket file plus the log line written once listen() succeeded.
vk__net_listening() {
  [[ -S $1 ]] && grep -qF "listening on $1" "${2:-$VK_NET_LOG}" 2>/dev/null
}

vk_net_wait_listening() {
  vk_wait_for "$2" vk__net_listening "$1" "${3:-$VK_NET_LOG}"
}

vk_net_wait_log() {
  local log=$1 re=$2 timeout=$3 count=${4:-1} pid=${5:-${VK_NET_PID:-}}
  local n=0 max=$(($3 * 10))
  while ((n++ < max)); do
    (($(grep -cE -- "$re" "$log" 2>/dev/null) >= count)) && return 0
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
      (($(grep -cE -- "$re" "$log" 2>/dev/null) >= count)) && return 0
      return 2
    fi
    sleep 0.1
  done
  return 1
}

vk_net_wait_connected() {
  vk_net_wait_log "$1" 'front-end connected|: connected to ' "$2" "${3:-1}"
}

vk_net_stop() {
  local pid=$1 timeout=${2:-5} n=0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return $?; }
  kill -TERM "$pid" 2>/dev/null
  while kill -0 "$pid" 2>/dev/null; do
    if ((n++ >= timeout * 10)); then
      kill -KILL "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      return 124
    fi
    sleep 0.1
  done
  wait "$pid" 2>/dev/null
}

vk_net_fd_count() {
  find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l
}

vk_net_stats() {
  awk -v qp="qp$2" '$1 == qp && $2 == "tx" && $11 == "|" {
    print $3, $5, $8, $10, $13, $15, $18, $20 }' "$1"
}

vk_net_stats_sum() {
  vk_net_stats "$1" "$2" | awk '{ for (i = 1; i <= 8; i++) s[i] += $i }
    END { printf "%.3f %.3f %d %d %.3f %.3f %d %d\n", s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8] }'
}

vk_net_stats_active() {
  local col=1
  [[ $3 == rx ]] && col=5
  vk_net_stats "$1" "$2" | awk -v c="$col" '$c > 0 || $(c + 1) > 0 { found = 1 } END { exit !found }'
}

vk_guest_check_ping() {
  local log=$1 timeout=${2:-60} res
  vk_qemu_wait_marker "$log" '^VK-RESULT ping ' "$timeout" || { vk_qemu_dump "$log"; vk_fail "no ping result"; }
  res=$(vk_guest_result "$log" ping)
  [[ $res == ok* ]] || { vk_qemu_dump "$log"; vk_fail "ping: $res"; }
  vk_pass "ping: $res"
}

vk_guest_check_tcp_tx() {
  local log=$1 sink=$2 mib=$3 timeout=${4:-90} gsum hsum hbytes
  vk_qemu_wait_marker "$log" '^VK-RESULT tcp-tx ' "$timeout" || { vk_qemu_dump "$log"; vk_fail "no tcp-tx result"; }
  vk_tcp_wait_done "$sink" 10 || vk_fail "host sink nc failed (status $?)"
  [[ $(vk_guest_result "$log" tcp-tx) == ok* ]] || { vk_qemu_dump "$log"; vk_fail "guest reports tcp-tx failure"; }
  gsum=$(vk_guest_field "$log" tcp-tx sha256)
  hsum=$(vk_sha256 "$sink")
  hbytes=$(stat -c %s "$sink")
  [[ $hbytes == $((mib * 1048576)) ]] || vk_fail "host received $hbytes bytes, want $((mib * 1048576))"
  [[ -n $gsum && $gsum == "$hsum" ]] || vk_fail "sha256 mismatch: guest sent $gsum, host got $hsum"
  vk_pass "tcp-tx $hbytes bytes, sha256 $hsum ($(vk_guest_field "$log" tcp-tx seconds) s in guest)"
}

vk_guest_check_tcp_rx() {
  local log=$1 src=$2 mib=$3 timeout=${4:-90} gsum gbytes want
  want=$(vk_sha256 "$src")
  vk_qemu_wait_marker "$log" '^VK-RESULT tcp-rx ' "$timeout" || { vk_qemu_dump "$log"; vk_fail "no tcp-rx result"; }
  vk_tcp_wait_done "$src" 10 || vk_fail "host source nc failed (status $?)"
  gsum=$(vk_guest_field "$log" tcp-rx sha256)
  gbytes=$(vk_guest_field "$log" tcp-rx bytes)
  [[ $gbytes == $((mib * 1048576)) ]] || { vk_qemu_dump "$log"; vk_fail "guest received $gbytes bytes, want $((mib * 1048576))"; }
  [[ $gsum == "$want" ]] || vk_fail "sha256 mismatch: host sent $want, guest got $gsum"
  vk_pass "tcp-rx $gbytes bytes, sha256 $gsum ($(vk_guest_field "$log" tcp-rx seconds) s in guest)"
}
