#!/usr/bin/env bash
# The DPDK reference pair: testpmd with the vhost PMD (backend, CPU 0) and testpmd with
# virtio-user (frontend, CPU 1) over one vhost-user socket, one queue pair. The number vhostkit's
# own figures are compared with (as a ratio, within one run: the host is shared).
#
#   bench/dpdk_pair.sh [--size BYTES] [--duration S] [--mode tx|rx|loop] [--burst N]
#                      [--csv FILE] [--keep-logs]
#
#   --size      packet length testpmd generates (--txpkts; 64 default, up to 2000), no CRC
#   --duration  measured seconds after the device is ready (default 10)
#   --mode      tx   (default) frontend txonly -> backend rxonly: the vhost dequeue path
#               rx   backend txonly -> frontend rxonly: the vhost enqueue path
#               loop both mac fwd, frontend sends a first burst (--tx-first); packets bounce
#   --burst     packets per burst (default 32)
#   --csv       append the result line here (default build/bench/dpdk_pair.csv; header if new)
#
# Prints Mpps per side (mean of testpmd's per-second samples inside the window) and one CSV line:
#   utc,host,mode,size,burst,duration,fe_tx_mpps,fe_rx_mpps,be_rx_mpps,be_tx_mpps,dpdk
# Exits 77 when testpmd is missing, 1 when the pair does not come up or moves nothing.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../scripts/lib/dpdk.sh"

size=64 duration=10 mode=tx burst=32 csv="" keep=0
while (($#)); do
  case $1 in
    --size) size=$2; shift ;;
    --duration) duration=$2; shift ;;
    --mode) mode=$2; shift ;;
    --burst) burst=$2; shift ;;
    --csv) csv=$2; shift ;;
    --keep-logs) keep=1 ;;
    -h|--help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "dpdk_pair.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $size =~ ^[0-9]+$ ]] && ((size >= 64 && size <= 2000)) ||
  { echo "dpdk_pair.sh: --size must be 64..2000" >&2; exit 2; }
[[ $duration =~ ^[0-9]+$ ]] && ((duration >= 2)) ||
  { echo "dpdk_pair.sh: --duration must be >= 2 seconds" >&2; exit 2; }
[[ $burst =~ ^[0-9]+$ ]] && ((burst >= 1 && burst <= 512)) ||
  { echo "dpdk_pair.sh: --burst must be 1..512" >&2; exit 2; }
case $mode in tx|rx|loop) ;; *) echo "dpdk_pair.sh: --mode must be tx, rx or loop" >&2; exit 2 ;; esac

command -v "$VK_TESTPMD" >/dev/null || { echo "SKIP: $VK_TESTPMD not installed (dpdk-dev)"; exit 77; }
[[ $(id -u) -eq 0 ]] || { echo "SKIP: testpmd without hugepages still needs root here"; exit 77; }

[[ -n $csv ]] || csv=$(vk_repo_root)/build/bench/dpdk_pair.csv
VK_KEEP=$keep vk_tmpdir
sock=$VK_TMP/vhost.sock
common=(--burst="$burst" --txpkts="$size")
case $mode in
  tx)   be_app=(--forward-mode=rxonly); fe_app=(--forward-mode=txonly) ;;
  rx)   be_app=(--forward-mode=txonly); fe_app=(--forward-mode=rxonly) ;;
  loop) be_app=(--forward-mode=mac); fe_app=(--forward-mode=mac --tx-first) ;;
esac

echo "dpdk_pair: mode=$mode size=$size burst=$burst duration=${duration}s logs in $VK_TMP"
vk_dpdk_start_backend "$sock" 0 "$VK_TMP/backend.log" "${be_app[@]}" "${common[@]}"
be_pid=$VK_DPDK_PID
vk_dpdk_wait_listening "$sock" 30 ||
  { tail -20 "$VK_TMP/backend.log"; echo "FAIL: backend never listened on $sock"; exit 1; }
vk_dpdk_start_frontend "$sock" 1 "$VK_TMP/frontend.log" "${fe_app[@]}" "${common[@]}"
fe_pid=$VK_DPDK_PID
vk_dpdk_wait_ready "$VK_TMP/backend.log" 30 "$be_pid" ||
  { tail -20 "$VK_TMP/backend.log" "$VK_TMP/frontend.log"; echo "FAIL: backend device never ready"; exit 1; }
vk_dpdk_wait_ready "$VK_TMP/frontend.log" 30 "$fe_pid" ||
  { tail -20 "$VK_TMP/frontend.log"; echo "FAIL: frontend never started forwarding"; exit 1; }

# The measured window: log offsets now and after the duration; samples in between count.
be_from=$(vk_dpdk_log_size "$VK_TMP/backend.log")
fe_from=$(vk_dpdk_log_size "$VK_TMP/frontend.log")
sleep "$duration"
be_to=$(vk_dpdk_log_size "$VK_TMP/backend.log")
fe_to=$(vk_dpdk_log_size "$VK_TMP/frontend.log")
vk_dpdk_stop "$fe_pid"
vk_dpdk_stop "$be_pid"

mpps() { awk -v p="$1" 'BEGIN { printf "%.3f", p / 1e6 }'; }
fe_tx=$(mpps "$(vk_dpdk_pps "$VK_TMP/frontend.log" Tx-pps "$fe_from" "$fe_to")")
fe_rx=$(mpps "$(vk_dpdk_pps "$VK_TMP/frontend.log" Rx-pps "$fe_from" "$fe_to")")
be_rx=$(mpps "$(vk_dpdk_pps "$VK_TMP/backend.log" Rx-pps "$be_from" "$be_to")")
be_tx=$(mpps "$(vk_dpdk_pps "$VK_TMP/backend.log" Tx-pps "$be_from" "$be_to")")
dpdk_ver=$(dpkg-query -W -f='${Version}' dpdk 2>/dev/null || echo unknown)

echo "frontend (virtio-user, CPU 1): tx $fe_tx Mpps, rx $fe_rx Mpps"
echo "backend  (vhost PMD,   CPU 0): rx $be_rx Mpps, tx $be_tx Mpps"
line="$(date -u +%Y-%m-%dT%H:%M:%SZ),$(hostname),$mode,$size,$burst,$duration,$fe_tx,$fe_rx,$be_rx,$be_tx,$dpdk_ver"
mkdir -p "$(dirname "$csv")"
[[ -s $csv ]] || echo "utc,host,mode,size,burst,duration,fe_tx_mpps,fe_rx_mpps,be_rx_mpps,be_tx_mpps,dpdk" >"$csv"
echo "$line" >>"$csv"
echo "csv: $line  (appended to $csv)"

# Something must have moved in the measured direction.
case $mode in
  tx) moved=$be_rx ;;
  rx) moved=$fe_rx ;;
  loop) moved=$be_rx ;;
esac
awk -v m="$moved" 'BEGIN { exit !(m > 0) }' || { echo "FAIL: no packets moved"; exit 1; }
