#!/usr/bin/env bash
# The benchmark matrix: vhostkit and DPDK side by side, in one run, on this host.
#
#   bench/run.sh [--quick] [--duration S] [--build DIR] [--keep-logs]
#
#   --quick      3 s per point, sizes 64 512 1518 (default: 10 s, sizes 64 256 512 1024 1518)
#   --duration   seconds measured per point (after a 1 s warm-up)
#   --build      build tree with vhostkit-net, vhostkit-bench and host_probe (default: the first
#                of build/release build/bench build that has all three; else builds build/release)
#   --keep-logs  keep the per-process logs (their directory is printed)
#
# One core per side: the back-end / vhost side on CPU 1, the front-end on CPU 0.
# Throughput, frames round-tripping through a MAC-swapping back-end (loop), one queue pair:
#   c1  DPDK pair (reference): testpmd virtio-user (io fwd, --tx-first) <-> testpmd vhost PMD (macswap)
#   c2  testpmd virtio-user (io fwd, --tx-first) <-> vhostkit-net --loopback --poll=busy
#   c3  vhostkit-bench loop <-> testpmd vhost PMD (macswap)
#   c4  vhostkit-bench loop <-> vhostkit-net --loopback --poll=busy
# Every figure also as a ratio to c1 at the same size from this run. Then round-trip latency
# (64 B, one frame in flight) of vhostkit-bench against testpmd's vhost PMD and against
# vhostkit-net, busy and event polling; vhostkit-net's idle CPU use with a connected idle
# front-end (event and adaptive polling; /proc/PID/stat utime+stime over 5 s); and host_probe.
#
# Output: bench/results/run-<UTC>.csv (+ latest.csv), docs/perf_throughput.png,
# docs/perf_latency.png (gnuplot, bench/plot.gp), docs/performance.md.
# testpmd's throughput: the mean of its per-second Rx-pps samples (virtio-user port) inside the
# measured window, the first (partial) sample dropped.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
VK_SCRIPT_NAME=run.sh
source "$root/scripts/lib/dpdk.sh"
source "$root/scripts/lib/vhostkit.sh"

quick=0 duration="" build="" keep=0
vk_options run.sh quick!quick duration=duration build=build keep-logs!keep -- "$@"
if ((quick)); then
  sizes=(64 512 1518); : "${duration:=3}"
else
  sizes=(64 256 512 1024 1518); : "${duration:=10}"
fi
[[ $duration =~ ^[0-9]+$ ]] && ((duration >= 1)) || { echo "run.sh: --duration must be a whole number of seconds >= 1" >&2; exit 2; }
warmup=1
FE_CPU=0 BE_CPU=1

command -v "$VK_TESTPMD" >/dev/null || { echo "run.sh: $VK_TESTPMD not installed (dpdk-dev)" >&2; exit 1; }
command -v gnuplot >/dev/null || echo "run.sh: gnuplot missing: no plots" >&2
[[ $(id -u) -eq 0 ]] || { echo "run.sh: testpmd without hugepages needs root here" >&2; exit 1; }

# --- binaries ----------------------------------------------------------------------------------
have_bins() {
  [[ -x $1/src/tools/vhostkit-net/vhostkit-net && -x $1/src/tools/vhostkit-bench/vhostkit-bench &&
     -x $1/bench/host_probe ]]
}
if [[ -z $build ]]; then
  for b in "$root/build/release" "$root/build/bench" "$root/build"; do
    have_bins "$b" && { build=$b; break; }
  done
fi
if [[ -z $build ]]; then
  build=$root/build/release
  echo "run.sh: building vhostkit-net, vhostkit-bench, host_probe in $build" >&2
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null &&
    cmake --build "$build" -j2 --target vhostkit-net vhostkit-bench host_probe >/dev/null ||
    { echo "run.sh: build failed" >&2; exit 1; }
fi
have_bins "$build" || { echo "run.sh: $build lacks vhostkit-net, vhostkit-bench or host_probe" >&2; exit 1; }
VK_NET_BIN=$build/src/tools/vhostkit-net/vhostkit-net
BENCH=$build/src/tools/vhostkit-bench/vhostkit-bench
PROBE=$build/bench/host_probe

VK_KEEP=$keep vk_tmpdir
utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
results=$root/bench/results
mkdir -p "$results" "$root/docs"
out=$results/run-$stamp.csv
echo "utc,section,config,name,mode,size,poll,mpps,gbps,ratio,p50_us,p99_us,p999_us,drops,value,unit" >"$out"
row() { echo "$utc,$*" >>"$out"; }
say() { echo "[run.sh] $*" >&2; }
say "sizes ${sizes[*]}, ${duration}s per point, logs in $VK_TMP, load $load_before"

declare -A NAME=(
  [c1]="testpmd virtio-user <-> testpmd vhost PMD"
  [c2]="testpmd virtio-user <-> vhostkit-net"
  [c3]="vhostkit-bench <-> testpmd vhost PMD"
  [c4]="vhostkit-bench <-> vhostkit-net"
)
declare -A FAILED=()
mpps_of() { awk -v p="$1" 'BEGIN { printf "%.4f", p / 1e6 }'; }
gbps_of() { awk -v p="$1" -v s="$2" 'BEGIN { printf "%.4f", p * s * 8 / 1e9 }'; }

start_vhost_pmd() {  # SOCK LOG [testpmd app args]: testpmd's vhost PMD on BE_CPU, listening
  local sock=$1 log=$2; shift 2
  vk_dpdk_start_backend "$sock" "$BE_CPU" "$log" "$@"
  BE_PID=$VK_DPDK_PID
  vk_dpdk_wait_listening "$sock" 30
}
start_vhostkit_net() {  # SOCK LOG POLL: vhostkit-net --loopback on BE_CPU, listening
  local sock=$1 log=$2 poll=$3
  rm -f "$sock"
  vk_net_start "$log" -- --socket-path="$sock" --loopback --poll="$poll" --cpu="$BE_CPU"
  BE_PID=$VK_NET_PID
  vk_net_wait_listening "$sock" 30 "$log"
}

# A testpmd virtio-user front-end (io fwd, --tx-first) against the back-end on SOCK: prints its
# mean Rx-pps over the measured window.
dpdk_frontend_pps() {
  vk_dpdk_frontend_pps "$1" "$FE_CPU" "$3" "$2" "$warmup" "$duration" || { echo 0; return 1; }
}

# --- throughput: c1, c2 (testpmd front-end; one testpmd start per size) ----------------------------
for size in "${sizes[@]}"; do
  for c in c1 c2; do
    sock=$VK_TMP/$c-$size.sock blog=$VK_TMP/$c-$size-backend.log
    say "$c ${NAME[$c]}, $size B"
    if [[ $c == c1 ]]; then
      start_vhost_pmd "$sock" "$blog" --forward-mode=macswap --burst=32 --txpkts="$size"
    else
      start_vhostkit_net "$sock" "$blog" busy
    fi || { say "$c: back-end did not come up (see $blog)"; FAILED[$c]=1; continue; }
    pps=$(dpdk_frontend_pps "$sock" "$size" "$VK_TMP/$c-$size-frontend.log") || FAILED[$c]=1
    if [[ $c == c1 ]]; then vk_dpdk_stop "$BE_PID"; else vk_net_stop "$BE_PID" >/dev/null; fi
    row "throughput,$c,${NAME[$c]},loop,$size,busy,$(mpps_of "$pps"),$(gbps_of "$pps" "$size"),,,,,,,"
    say "  $(mpps_of "$pps") Mpps"
  done
done

# --- throughput: c3, c4 (vhostkit-bench; one connection runs every size in turn) -------------------
size_list=$(IFS=,; echo "${sizes[*]}")
bench_rows() {  # CONFIG RAW_CSV: throughput rows from vhostkit-bench's CSV
  awk -F, -v utc="$utc" -v c="$1" -v name="${NAME[$1]}" 'NR > 1 {
    printf "%s,throughput,%s,%s,%s,%s,%s,%.4f,%.4f,,,,,%s,,\n", utc, c, name, $3, $4, $5, $10, $11, $16
  }' "$2" >>"$out"
}
for c in c3 c4; do
  sock=$VK_TMP/$c.sock blog=$VK_TMP/$c-backend.log raw=$VK_TMP/$c.csv
  say "$c ${NAME[$c]}, sizes $size_list"
  if [[ $c == c3 ]]; then
    start_vhost_pmd "$sock" "$blog" --forward-mode=macswap --burst=32
  else
    start_vhostkit_net "$sock" "$blog" busy
  fi || { say "$c: back-end did not come up (see $blog)"; FAILED[$c]=1; continue; }
  [[ $c == c3 ]] && { vk_dpdk_wait_ready "$blog" 1 "$BE_PID"; true; }
  timeout $((${#sizes[@]} * (duration + warmup + 5) + 30)) "$BENCH" loop --socket-path="$sock" \
    --size="$size_list" --duration="$duration" --warmup="$warmup" --poll=busy --cpu="$FE_CPU" \
    --label="$c" --csv="$raw" >"$VK_TMP/$c-bench.out" 2>"$VK_TMP/$c-bench.err" ||
    { say "$c: vhostkit-bench failed: $(tail -1 "$VK_TMP/$c-bench.err")"; FAILED[$c]=1; }
  if [[ $c == c3 ]]; then vk_dpdk_stop "$BE_PID"; else vk_net_stop "$BE_PID" >/dev/null; fi
  [[ -s $raw ]] && bench_rows "$c" "$raw"
  grep -E '^loop ' "$VK_TMP/$c-bench.out" | sed 's/^/  /' >&2
done

# Ratios to c1 at the same size (second pass over the throughput rows).
awk -F, -v OFS=, 'NR == FNR { if ($2 == "throughput" && $3 == "c1") ref[$6] = $8; next }
  FNR == 1 { print; next }
  $2 == "throughput" { $10 = (ref[$6] > 0) ? sprintf("%.3f", $8 / ref[$6]) : "" }
  { print }' "$out" "$out" >"$out.tmp" && mv "$out.tmp" "$out"

# --- latency: 64 B, one frame in flight -------------------------------------------------------
lat_duration=$duration
for spec in "dpdk-vhost busy" "dpdk-vhost event" "vhostkit-net busy" "vhostkit-net event"; do
  read -r peer poll <<<"$spec"
  sock=$VK_TMP/lat-$peer-$poll.sock blog=$VK_TMP/lat-$peer-$poll-backend.log raw=$VK_TMP/lat-$peer-$poll.csv
  say "latency: vhostkit-bench ($poll) <-> $peer"
  if [[ $peer == dpdk-vhost ]]; then
    start_vhost_pmd "$sock" "$blog" --forward-mode=macswap --burst=32
  else
    start_vhostkit_net "$sock" "$blog" "$poll"
  fi || { say "latency $peer: back-end did not come up"; continue; }
  timeout $((lat_duration + warmup + 30)) "$BENCH" latency --socket-path="$sock" --size=64 \
    --duration="$lat_duration" --warmup="$warmup" --poll="$poll" --cpu="$FE_CPU" \
    --label="$peer" --csv="$raw" >"$VK_TMP/lat-$peer-$poll.out" 2>&1 ||
    say "latency $peer $poll: vhostkit-bench failed"
  if [[ $peer == dpdk-vhost ]]; then vk_dpdk_stop "$BE_PID"; else vk_net_stop "$BE_PID" >/dev/null; fi
  [[ -s $raw ]] && awk -F, -v utc="$utc" -v peer="$peer" 'NR > 1 {
    printf "%s,latency,%s,vhostkit-bench <-> %s,latency,%s,%s,%.4f,,,%.3f,%.3f,%.3f,%s,%s,samples\n",
      utc, peer, peer, $4, $5, $10, $18, $19, $20, $16, $17 }' "$raw" >>"$out"
  grep -E '^latency ' "$VK_TMP/lat-$peer-$poll.out" | sed 's/^/  /' >&2
done

# --- idle CPU of vhostkit-net with a connected, idle front-end --------------------------------
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
hz=$(getconf CLK_TCK)
for poll in event adaptive; do
  sock=$VK_TMP/idle-$poll.sock blog=$VK_TMP/idle-$poll.log
  say "idle CPU: vhostkit-net --poll=$poll"
  start_vhostkit_net "$sock" "$blog" "$poll" || { say "idle $poll: vhostkit-net did not come up"; continue; }
  # rxonly against a loopback port: connected, rx ring posted, nothing ever arrives.
  "$BENCH" rxonly --socket-path="$sock" --poll=event --duration=8 --warmup=0 --json \
    >/dev/null 2>"$VK_TMP/idle-$poll-bench.err" &
  bpid=$!
  vk_net_wait_connected "$blog" 10 || say "idle $poll: front-end did not connect"
  sleep 1  # set-up done, rings quiet
  t0=$(ticks "$BE_PID") f0=$(ticks "$bpid")
  sleep 5
  t1=$(ticks "$BE_PID") f1=$(ticks "$bpid")
  wait "$bpid" 2>/dev/null
  vk_net_stop "$BE_PID" >/dev/null
  pct=$(awk -v d=$((t1 - t0)) -v hz="$hz" 'BEGIN { printf "%.2f", d / hz / 5 * 100 }')
  fpct=$(awk -v d=$((f1 - f0)) -v hz="$hz" 'BEGIN { printf "%.2f", d / hz / 5 * 100 }')
  row "idle,vhostkit-net,vhostkit-net idle (front-end connected),idle,,$poll,,,,,,,,$pct,% CPU"
  row "idle,vhostkit-bench,vhostkit-bench idle (event) beside it,idle,,$poll,,,,,,,,$fpct,% CPU"
  say "  vhostkit-net $pct % CPU (front-end $fpct %)"
done

# --- host limits ---------------------------------------------------------------------------------
say "host_probe"
probe_s=1; ((quick)) && probe_s=0.5
"$PROBE" --cpu-a="$FE_CPU" --cpu-b="$BE_CPU" --seconds="$probe_s" --csv="$VK_TMP/probe.csv" >&2
awk -F, -v utc="$utc" 'NR > 1 { printf "%s,host,host_probe,%s,%s,%s,,,,,,,,,%s,%s\n", utc, $2, $2, $3, $4, $5 }' \
  "$VK_TMP/probe.csv" >>"$out"

load_after=$(cut -d' ' -f1-3 /proc/loadavg)
# What bench/report.sh needs besides the figures.
meta() { row "meta,$1,,,,,,,,,,,,$2,"; }
meta cpu_model "$(lscpu | sed -n 's/^Model name: *//p' | head -1 | tr -d ,)"
meta cores "$(nproc)"
meta kernel "$(uname -r)"
meta dpdk "$(dpkg-query -W -f='${Version}' dpdk 2>/dev/null || echo unknown)"
meta load_before "$load_before"
meta load_after "$load_after"
meta duration "$duration"
meta warmup "$warmup"
meta quick "$quick"
meta fe_cpu "$FE_CPU"
meta be_cpu "$BE_CPU"
meta failed "${!FAILED[*]}"
cp "$out" "$results/latest.csv"
say "results: $out"

# --- plots and docs/performance.md ---------------------------------------------------------------
"$here/report.sh" "$out" || say "report failed"
grep -v ',meta,' "$out" | column -s, -t | cut -c1-200 >&2
