# shellcheck shell=bash
# DPDK testpmd as a vhost-user peer: the vhost PMD as a backend (server on SOCK) or virtio-user as
# a frontend (client of SOCK), each pinned to one CPU, without hugepages or PCI.
#
#   vk_dpdk_start_backend SOCK CPU LOG [TESTPMD_APP_ARGS...]
#   vk_dpdk_start_frontend SOCK CPU LOG [TESTPMD_APP_ARGS...]
#        start testpmd in the background; sets VK_DPDK_PID; killed on exit. App args default to
#        --forward-mode=io; pass e.g. --forward-mode=txonly --txpkts=1518 --burst=32.
#   vk_dpdk_wait_listening SOCK TIMEOUT   0 once the backend listens on SOCK (EAL init with -m 1024
#                                         and no hugepages takes ~3-4 s on a loaded 2-core box)
#   vk_dpdk_wait_ready LOG TIMEOUT [PID]  0 once the port in LOG is usable: for the vhost PMD,
#                                         "virtio is now ready for processing" (the frontend set up
#                                         every ring); for virtio-user, testpmd finished port setup
#                                         and started forwarding. 2 if PID died first.
#   vk_dpdk_stop PID                      SIGINT (testpmd prints final stats and exits), then KILL
#   vk_dpdk_pps LOG FIELD [FROM_BYTE [TO_BYTE]]
#                                         mean of testpmd's per-second "FIELD:" samples (Rx-pps or
#                                         Tx-pps) between two log offsets, dropping the first
#                                         sample of the window (partial second)
#   vk_dpdk_log_size LOG                  current size of LOG in bytes, for the window above
#
# Flags that matter, found by trial on DPDK 22.11 (Debian):
#   * testpmd needs a forwarding lcore besides its main lcore: "-l 0" alone fails with "No cores
#     defined for forwarding". --lcores 0@CPU,1@CPU puts both on one CPU; the main lcore only
#     prints stats once a second.
#   * --no-pci --no-huge -m 1024 --file-prefix=<unique> (several DPDK processes at once) and
#     --total-num-mbufs=16384 (the default pool does not fit in 1 GiB without hugepages).
#   * Non-interactive testpmd exits at once on closed stdin unless --stats-period N is given.
#   * --txpkts=N sets the txonly packet length (bytes in the buffer, no CRC, no virtio-net hdr).
[[ -n ${VK_DPDK_SH:-} ]] && return 0
VK_DPDK_SH=1
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

VK_TESTPMD=${VK_TESTPMD:-dpdk-testpmd}
VK_DPDK_SEQ=0

vk__dpdk_start() {
  local vdev=$1 cpu=$2 log=$3; shift 3
  local app=("$@")
  ((${#app[@]})) || app=(--forward-mode=io)
  VK_DPDK_SEQ=$((VK_DPDK_SEQ + 1))
  local prefix="vk-$$-$VK_DPDK_SEQ"
  local cmd=("$VK_TESTPMD" --lcores "0@$cpu,1@$cpu" --no-pci --no-huge -m 1024
             --file-prefix="$prefix" --vdev "$vdev"
             -- --total-num-mbufs=16384 --stats-period 1 "${app[@]}")
  echo "${cmd[*]}" >"$log.cmd"
  # testpmd installs its own SIGINT handler, so a ^C also stops it cleanly.
  "${cmd[@]}" </dev/null >"$log" 2>&1 &
  VK_DPDK_PID=$!
  vk_on_exit "vk_dpdk_stop $VK_DPDK_PID; rm -rf /var/run/dpdk/$prefix"
}

vk_dpdk_start_backend() {
  local sock=$1 cpu=$2 log=$3; shift 3
  rm -f "$sock"
  vk__dpdk_start "net_vhost0,iface=$sock,queues=1" "$cpu" "$log" "$@"
}

vk_dpdk_start_frontend() {
  local sock=$1 cpu=$2 log=$3; shift 3
  vk__dpdk_start "net_virtio_user0,path=$sock,queues=1" "$cpu" "$log" "$@"
}

# A testpmd virtio-user front-end (io fwd, --tx-first, bursts of 32 SIZE-byte frames) on CPU
# against the back-end on SOCK, VDEV_EXTRA appended to its vdev (",packed_vq=1,in_order=1"):
# prints its mean Rx-pps over DURATION s after WARMUP s; 1 if it never started forwarding.
vk_dpdk_frontend_pps() {  # SOCK CPU LOG SIZE WARMUP DURATION [VDEV_EXTRA]
  local sock=$1 cpu=$2 log=$3 size=$4 warmup=$5 duration=$6 extra=${7:-} pid from to
  vk__dpdk_start "net_virtio_user0,path=$sock,queues=1$extra" "$cpu" "$log" \
    --forward-mode=io --tx-first --txpkts="$size" --burst=32
  pid=$VK_DPDK_PID
  vk_dpdk_wait_ready "$log" 30 "$pid" || { vk_dpdk_stop "$pid"; return 1; }
  sleep "$warmup"
  from=$(vk_dpdk_log_size "$log")
  sleep "$duration"
  to=$(vk_dpdk_log_size "$log")
  vk_dpdk_stop "$pid"
  vk_dpdk_pps "$log" Rx-pps "$from" "$to"
}

vk_dpdk_wait_listening() {
  local sock=$1 timeout=$2
  vk_wait_for "$timeout" vk__dpdk_listening "$sock"
}

vk__dpdk_listening() {
  [[ -S $1 ]] && ss -Hxl 2>/dev/null | grep -qF " $1 "
}

vk_dpdk_wait_ready() {
  local log=$1 timeout=$2 pid=${3:-${VK_DPDK_PID:-}}
  local n=0 max=$((timeout * 10)) re='packet forwarding - ports=1'
  # The vhost PMD starts forwarding before any frontend connects: wait for the rings instead.
  grep -q net_vhost "$log.cmd" 2>/dev/null && re='virtio is now ready for processing'
  while ((n++ < max)); do
    grep -qE "$re" "$log" 2>/dev/null && return 0
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then return 2; fi
    sleep 0.1
  done
  return 1
}

vk_dpdk_stop() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
  kill -INT "$pid" 2>/dev/null
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}

vk_dpdk_log_size() {
  stat -c %s "$1" 2>/dev/null || echo 0
}

vk_dpdk_pps() {
  local log=$1 field=$2 from=${3:-0} to=${4:-}
  [[ -n $to ]] || to=$(vk_dpdk_log_size "$log")
  tail -c +"$((from + 1))" "$log" | head -c "$((to - from))" |
    sed -n "s/.*$field: *\([0-9]*\).*/\1/p" |
    awk 'NR > 1 { s += $1; n++ } END { if (n) printf "%.0f\n", s / n; else print 0 }'
}
