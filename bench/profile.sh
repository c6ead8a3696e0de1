#!/usr/bin/env bash
# Where the cycles go: perf profiles of both sides of c4 (vhostkit-bench loop <-> vhostkit-net
# --loopback, busy polling, one core each) at one frame size, and optionally of the two back-ends
# under the same front-end, testpmd's virtio-user: vhostkit-net (c2) and DPDK's vhost PMD (c1).
#
#   bench/profile.sh [--size N] [--seconds S] [--c2] [--c1] [--build DIR]
#
#   --size     frame length in bytes (default 64)
#   --seconds  perf record window (default 4; the run lasts 3 s longer)
#   --c2       also profile vhostkit-net against testpmd's virtio-user (io fwd, --tx-first)
#   --c1       also profile testpmd's vhost PMD (macswap) against the same front-end
#   --build    build tree with vhostkit-net and vhostkit-bench (default: build/perf, made with
#              -g -fno-omit-frame-pointer if missing)
#
# Prints each side's top symbols (self time) and writes them, with the run's throughput, to
# bench/results/profile-<UTC>-<size>.txt. The perf.data files stay in the printed temp dir.
# Busy-polling sides spend idle time in their poll loops: read the shares of the copy and ring
# functions relative to each other, not as absolute costs.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
source "$root/scripts/lib/dpdk.sh"

size=64 seconds=4 c2=0 build=""
c1=0
vk_options profile.sh size=size seconds=seconds c2!c2 c1!c1 build=build -- "$@"
[[ $size =~ ^[0-9]+$ ]] && ((size >= 60 && size <= 9000)) ||
  { echo "profile.sh: --size must be 60..9000" >&2; exit 2; }
[[ $seconds =~ ^[0-9]+$ ]] && ((seconds >= 1)) ||
  { echo "profile.sh: --seconds must be a whole number >= 1" >&2; exit 2; }
command -v perf >/dev/null || { echo "profile.sh: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "profile.sh: perf record on other processes needs root" >&2; exit 1; }

if [[ -z $build ]]; then
  build=$root/build/perf
  if [[ ! -x $build/src/tools/vhostkit-net/vhostkit-net || ! -x $build/src/tools/vhostkit-bench/vhostkit-bench ]]; then
    echo "profile.sh: building vhostkit-net and vhostkit-bench with frame pointers in $build" >&2
    cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CXX_FLAGS="-g -fno-omit-frame-pointer" -DVHOSTKIT_TESTS=OFF >/dev/null &&
      cmake --build "$build" -j2 --target vhostkit-net vhostkit-bench >/dev/null ||
      { echo "profile.sh: build failed" >&2; exit 1; }
  fi
fi
NET=$build/src/tools/vhostkit-net/vhostkit-net
BENCH=$build/src/tools/vhostkit-bench/vhostkit-bench
[[ -x $NET && -x $BENCH ]] || { echo "profile.sh: $build lacks vhostkit-net or vhostkit-bench" >&2; exit 1; }

tmp=$(mktemp -d /tmp/vk-profile.XXXXXX)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$root/bench/results"
out=$root/bench/results/profile-$stamp-$size.txt
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT

top() {  # PERF_DATA TITLE: the top self-time symbols
  echo "== $2"
  perf report -i "$1" --no-children --stdio --percent-limit 1 -g none 2>/dev/null |
    grep -E '^ +[0-9]' | sed -E 's/ +/ /g' | cut -c1-150
  echo
}

start_net() {  # SOCK LOG
  rm -f "$1"
  "$NET" --socket-path="$1" --loopback --poll=busy --cpu=1 >"$2" 2>&1 &
  net_pid=$!
  pids+=("$net_pid")
  for _ in $(seq 100); do [[ -S $1 ]] && return 0; sleep 0.1; done
  echo "profile.sh: vhostkit-net did not listen (see $2)" >&2
  return 1
}

{
  echo "profile.sh --size $size, $(date -u +%Y-%m-%dT%H:%M:%SZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "host: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, kernel $(uname -r)"
  echo
} >"$out"

# c4: both sides profiled at once.
sock=$tmp/c4.sock
start_net "$sock" "$tmp/net.log" || exit 1
"$BENCH" loop --socket-path="$sock" --poll=busy --cpu=0 --size="$size" \
  --duration=$((seconds + 2)) --warmup=1 --json >"$tmp/bench.json" 2>"$tmp/bench.log" &
bench_pid=$!
pids+=("$bench_pid")
sleep 1.5
perf record -F 2999 -g -p "$net_pid" -o "$tmp/c4-backend.data" -- sleep "$seconds" >/dev/null 2>&1 &
perf_be=$!
perf record -F 2999 -g -p "$bench_pid" -o "$tmp/c4-frontend.data" -- sleep "$seconds" >/dev/null 2>&1 &
perf_fe=$!
wait "$bench_pid" "$perf_be" "$perf_fe"
kill "$net_pid" 2>/dev/null
wait "$net_pid" 2>/dev/null
mpps=$(python3 -c 'import json,sys; print("%.3f" % json.load(open(sys.argv[1]))["results"][0]["mpps"])' "$tmp/bench.json" 2>/dev/null || echo "?")
{
  echo "c4 (vhostkit-bench loop <-> vhostkit-net --loopback, busy): $mpps Mpps at $size B"
  echo
  top "$tmp/c4-backend.data" "vhostkit-net (back-end, CPU 1)"
  top "$tmp/c4-frontend.data" "vhostkit-bench (front-end, CPU 0)"
} >>"$out"

# Profiles back-end BE_PID (listening on SOCK) under testpmd's virtio-user (io fwd, --tx-first) and
# appends its top symbols: TAG is c1 or c2, WHAT names the pairing, TITLE the back-end.
profile_under_testpmd() {  # TAG SOCK BE_PID WHAT TITLE
  local tag=$1 sock=$2 be=$3 what=$4 title=$5 log=$tmp/testpmd-$1.log from to pps
  vk_dpdk_start_frontend "$sock" 0 "$log" --forward-mode=io --tx-first --txpkts="$size" --burst=32
  pids+=("$VK_DPDK_PID")
  if ! vk_dpdk_wait_ready "$log" 60 "$VK_DPDK_PID"; then
    echo "$tag: testpmd did not come up (see $log)" >>"$out"
    return 1
  fi
  sleep 1
  from=$(vk_dpdk_log_size "$log")
  perf record -F 2999 -g -p "$be" -o "$tmp/$tag-backend.data" -- sleep "$seconds" >/dev/null 2>&1
  to=$(vk_dpdk_log_size "$log")
  vk_dpdk_stop "$VK_DPDK_PID"
  pps=$(vk_dpdk_pps "$log" Rx-pps "$from" "$to")
  {
    echo "$tag ($what): $pps pps at $size B"
    echo
    top "$tmp/$tag-backend.data" "$title"
  } >>"$out"
}

if ((c2)); then
  start_net "$tmp/c2.sock" "$tmp/net2.log" || exit 1
  profile_under_testpmd c2 "$tmp/c2.sock" "$net_pid" \
    "testpmd virtio-user io fwd --tx-first <-> vhostkit-net --loopback, busy" \
    "vhostkit-net (back-end, CPU 1) under testpmd"
  kill "$net_pid" 2>/dev/null
  wait "$net_pid" 2>/dev/null
fi

if ((c1)); then
  # DPDK's back-end under the same front-end: testpmd's own symbols and librte_*'s exported ones
  # resolve; its static functions show as addresses inside the library that holds them.
  vk_dpdk_start_backend "$tmp/c1.sock" 1 "$tmp/vhost-pmd.log" --forward-mode=macswap --burst=32
  pmd_pid=$VK_DPDK_PID
  pids+=("$pmd_pid")
  vk_dpdk_wait_listening "$tmp/c1.sock" 60 || { echo "profile.sh: the vhost PMD did not listen" >&2; exit 1; }
  profile_under_testpmd c1 "$tmp/c1.sock" "$pmd_pid" \
    "testpmd virtio-user io fwd --tx-first <-> testpmd vhost PMD macswap" \
    "DPDK vhost PMD (back-end, CPU 1) under testpmd"
  vk_dpdk_stop "$pmd_pid"
fi

cat "$out"
echo "profile.sh: wrote $out; perf data in $tmp" >&2
