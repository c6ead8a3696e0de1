#!/usr/bin/env bash
# vhostkit-blk against qemu-storage-daemon (QSD) on the same tmpfs image, in one run.
#
#   bench/blk.sh [--quick] [--duration S] [--build DIR] [--keep-logs] [--size MIB]
#
#   --quick      2 s per point (default 10 s), after a 1 s warm-up
#   --duration   seconds measured per point
#   --build      build tree with vhostkit-blk and vhostkit-bench (default: the first of
#                build/release build/bench build that has both; else builds build/release)
#   --keep-logs  keep the per-process logs (their directory is printed)
#   --size       image size in MiB (default 256)
#
# One core per side: the back-end on CPU 1 (taskset for QSD, --cpu for vhostkit-blk), the
# front-end (vhostkit-bench blk --poll=busy) on CPU 0. One request queue. Back-ends:
#   vk-busy    vhostkit-blk --poll=busy
#   vk-event   vhostkit-blk (its default polling: sleeps on kicks)
#   vk-uring   vhostkit-blk --io=uring (event polling; every request through io_uring even
#              though the image is in tmpfs, where --io=auto answers requests inline)
#   qsd        qemu-storage-daemon --export type=vhost-user-blk, one iothread-less export,
#              --blockdev driver=file,cache.direct=off,aio=io_uring (aio=threads if this QSD
#              lacks io_uring; the report says which)
# Workloads: 4 KiB randread and randwrite at queue depth 1 and 32. Each point starts a fresh
# back-end. The image is a file in a tmpfs (a temporary directory under /dev/shm), written
# through once so every page exists.
#
# Output: bench/results/blk-<UTC>.csv (+ blk-latest.csv), docs/perf_blk.png (gnuplot) and
# docs/performance-blk.md (table with ratios ours / QSD, machine line, how to reproduce).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
VK_SCRIPT_NAME=blk.sh
source "$root/scripts/lib/vhostkit.sh"

quick=0 duration="" build="" keep=0 size_mib=256
vk_options blk.sh 25 quick!quick duration=duration build=build size=size_mib keep-logs!keep -- "$@"
if ((quick)); then : "${duration:=2}"; else : "${duration:=10}"; fi
[[ $duration =~ ^[0-9]+$ ]] && ((duration >= 1)) || { echo "blk.sh: --duration must be a whole number of seconds >= 1" >&2; exit 2; }
[[ $size_mib =~ ^[0-9]+$ ]] && ((size_mib >= 1)) || { echo "blk.sh: --size must be a whole number of MiB >= 1" >&2; exit 2; }
warmup=1
FE_CPU=0 BE_CPU=1
QSD=${QSD:-qemu-storage-daemon}
command -v "$QSD" >/dev/null || { echo "blk.sh: $QSD not installed (qemu-system-x86 / qemu-utils)" >&2; exit 1; }
command -v gnuplot >/dev/null || echo "blk.sh: gnuplot missing: no plot" >&2
[[ -d /dev/shm ]] || { echo "blk.sh: no /dev/shm tmpfs" >&2; exit 1; }

# --- binaries ----------------------------------------------------------------------------------
have_bins() {
  [[ -x $1/src/tools/vhostkit-blk/vhostkit-blk && -x $1/src/tools/vhostkit-bench/vhostkit-bench ]]
}
if [[ -z $build ]]; then
  for b in "$root/build/release" "$root/build/bench" "$root/build"; do
    have_bins "$b" && { build=$b; break; }
  done
fi
if [[ -z $build ]]; then
  build=$root/build/release
  echo "blk.sh: building vhostkit-blk and vhostkit-bench in $build" >&2
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null &&
    cmake --build "$build" -j2 --target vhostkit-blk vhostkit-bench >/dev/null ||
    { echo "blk.sh: build failed" >&2; exit 1; }
fi
have_bins "$build" || { echo "blk.sh: $build lacks vhostkit-blk or vhostkit-bench" >&2; exit 1; }
VK_NET_BIN=$build/src/tools/vhostkit-blk/vhostkit-blk  # the vk_net_* helpers start this binary
BENCH=$build/src/tools/vhostkit-bench/vhostkit-bench

VK_KEEP=$keep vk_tmpdir
shm=$(mktemp -d /dev/shm/vk-blkbench.XXXXXX)
vk_on_exit "rm -rf '$shm'"
img=$shm/disk.img
utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
results=$root/bench/results
mkdir -p "$results" "$root/docs"
out=$results/blk-$stamp.csv
say() { echo "[blk.sh] $*" >&2; }
say "image ${size_mib} MiB in $shm, ${duration}s per point, logs in $VK_TMP, load $load_before"
dd if=/dev/zero of="$img" bs=1M count="$size_mib" status=none || { say "cannot write $img"; exit 1; }

# QSD's AIO engine: io_uring if this build accepts it.
qsd_aio=io_uring
qsd_probe() {  # AIO: 0 if QSD opens the image with aio=AIO (it then listens; stopped at once)
  local pid
  "$QSD" --blockdev "driver=file,filename=$img,node-name=d,cache.direct=off,aio=$1" \
    --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$VK_TMP/probe.sock,writable=on" \
    </dev/null >"$VK_TMP/qsd-probe.log" 2>&1 &
  pid=$!
  vk_wait_for 10 test -S "$VK_TMP/probe.sock"
  local ok=$?
  vk_kill "$pid"
  rm -f "$VK_TMP/probe.sock"
  return $ok
}
qsd_probe io_uring || { qsd_aio=threads; say "QSD refused aio=io_uring ($(tail -1 "$VK_TMP/qsd-probe.log")): using aio=threads"; }
say "QSD aio=$qsd_aio"

BE_PID=""
start_backend() {  # NAME SOCK LOG: start back-end NAME listening on SOCK (on BE_CPU)
  local name=$1 sock=$2 log=$3
  rm -f "$sock"
  case $name in
    vk-busy|vk-event|vk-uring)
      local extra=()
      [[ $name == vk-busy ]] && extra=(--poll=busy)
      [[ $name == vk-uring ]] && extra=(--io=uring)
      vk_net_start "$log" -- --socket-path="$sock" --image="$img" --cpu="$BE_CPU" "${extra[@]}"
      BE_PID=$VK_NET_PID
      vk_net_wait_listening "$sock" 30 "$log"
      ;;
    qsd)
      taskset -c "$BE_CPU" "$QSD" \
        --blockdev "driver=file,filename=$img,node-name=d,cache.direct=off,aio=$qsd_aio" \
        --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$sock,writable=on,num-queues=1" \
        </dev/null >"$log" 2>&1 &
      BE_PID=$!
      vk_track_pid "$BE_PID"
      vk_wait_for 30 test -S "$sock"
      ;;
  esac
}

declare -A FAILED=()
backends=(vk-busy vk-event vk-uring qsd)
for rw in randread randwrite; do
  for qd in 1 32; do
    for be in "${backends[@]}"; do
      tag=$be-$rw-qd$qd sock=$VK_TMP/$be.sock
      say "$be $rw iodepth $qd"
      start_backend "$be" "$sock" "$VK_TMP/$tag-backend.log" ||
        { say "  $be did not come up (see $VK_TMP/$tag-backend.log)"; FAILED[$tag]=1; vk_kill "$BE_PID"; continue; }
      timeout $((duration + warmup + 30)) "$BENCH" blk --socket-path="$sock" --rw="$rw" \
        --iodepth="$qd" --bs=4096 --duration="$duration" --warmup="$warmup" --poll=busy \
        --cpu="$FE_CPU" --label="$be" --csv="$VK_TMP/raw.csv" \
        >"$VK_TMP/$tag-bench.out" 2>"$VK_TMP/$tag-bench.err" ||
        { say "  vhostkit-bench failed: $(tail -1 "$VK_TMP/$tag-bench.err")"; FAILED[$tag]=1; }
      vk_kill "$BE_PID"
      grep -E '^rand' "$VK_TMP/$tag-bench.out" | sed 's/^/  /' >&2
    done
  done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
direct=$(grep -hoE 'O_DIRECT|buffered' "$VK_TMP"/vk-*-backend.log 2>/dev/null | sort -u | paste -sd/ -)
auto_io=$(grep -hoE 'I/O [a-z_]+' "$VK_TMP"/vk-event-*-backend.log 2>/dev/null | sort -u | sed 's/^I\/O //' | paste -sd/ -)
[[ -s $VK_TMP/raw.csv ]] || { say "no results"; exit 1; }

# The bench's rows plus the ratio to QSD at the same rw and iodepth (IOPS, and p50 latency).
awk -F, -v OFS=, 'NR == FNR { if (FNR > 1 && $2 == "qsd") { iops[$4 SUBSEP $6] = $10; p50[$4 SUBSEP $6] = $16 }; next }
  FNR == 1 { print $0, "iops_ratio_to_qsd", "p50_ratio_to_qsd"; next }
  { k = $4 SUBSEP $6
    print $0, (iops[k] > 0 ? sprintf("%.3f", $10 / iops[k]) : ""), (p50[k] > 0 ? sprintf("%.3f", $16 / p50[k]) : "") }' \
  "$VK_TMP/raw.csv" "$VK_TMP/raw.csv" >"$out"
cp "$out" "$results/blk-latest.csv"
say "results: $out"

# --- plot: IOPS and p50 per workload, one bar per back-end ---------------------------------------
if command -v gnuplot >/dev/null; then
  awk -F, 'NR > 1 { k = $4 " QD" $6; if (!(k in seen)) { seen[k] = 1; order[n++] = k }
                    i[k SUBSEP $2] = $10; p[k SUBSEP $2] = $16 }
    END { for (j = 0; j < n; j++) { k = order[j]
            printf "\"%s\" %s %s %s %s %s %s %s %s\n", k, i[k SUBSEP "vk-busy"] + 0, i[k SUBSEP "vk-event"] + 0,
              i[k SUBSEP "vk-uring"] + 0, i[k SUBSEP "qsd"] + 0, p[k SUBSEP "vk-busy"] + 0,
              p[k SUBSEP "vk-event"] + 0, p[k SUBSEP "vk-uring"] + 0, p[k SUBSEP "qsd"] + 0 } }' \
    "$out" >"$VK_TMP/plot.dat"
  gnuplot <<EOT 2>"$VK_TMP/gnuplot.err" || say "gnuplot failed: $(head -1 "$VK_TMP/gnuplot.err")"
set terminal pngcairo size 1200,480 font ",10" noenhanced
set output "$root/docs/perf_blk.png"
set multiplot layout 1,2 title "vhostkit-blk vs qemu-storage-daemon, 4 KiB random I/O on tmpfs ($utc)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set grid ytics
set key top left
set yrange [0:*]
set title "IOPS (higher is better)"
set format y "%.0s%c"
plot "$VK_TMP/plot.dat" using 2:xtic(1) title "vhostkit-blk busy", '' using 3 title "vhostkit-blk event", '' using 4 title "vhostkit-blk event, io_uring", '' using 5 title "QSD ($qsd_aio)"
set title "p50 latency, us (lower is better)"
set format y "%g"
set logscale y
set yrange [1:*]
plot "$VK_TMP/plot.dat" using 6:xtic(1) title "vhostkit-blk busy", '' using 7 title "vhostkit-blk event", '' using 8 title "vhostkit-blk event, io_uring", '' using 9 title "QSD ($qsd_aio)"
unset multiplot
EOT
fi

# --- docs/performance-blk.md ---------------------------------------------------------------------
write_report() {
  local csv=$1 model cores kernel qsd_ver load1
  model=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
  cores=$(nproc)
  kernel=$(uname -r)
  qsd_ver=$("$QSD" --version | head -1 | sed 's/^qemu-storage-daemon version //')
  load1=$(awk -v a="${load_before%% *}" -v b="${load_after%% *}" 'BEGIN { print (a > b ? a : b) }')
  cat <<EOT
# Block performance: vhostkit-blk and qemu-storage-daemon

Generated by \`bench/blk.sh$( ((quick)) && echo " --quick")\` on $utc; raw figures in
\`bench/results/$(basename "$out")\` (and \`bench/results/blk-latest.csv\`).

**Machine:** $model, $cores cores, kernel $kernel, qemu-storage-daemon $qsd_ver. Load average
before the run: $load_before; after: $load_after.

EOT
  if awk -v l="$load1" 'BEGIN { exit !(l > 3) }'; then
    cat <<EOT
> **The host was shared and loaded during this run (load average $load1 > 3 on $cores cores).**
> Pinned threads lose their core to other work; absolute figures are depressed and noisy, and
> only ratios within this run mean anything.

EOT
  fi
  ((${#FAILED[@]})) && printf '> Points with a failed step (figures missing or partial): %s\n\n' "${!FAILED[*]}"
  # A p99.9 beyond 0.1 s is no I/O cost on tmpfs: a thread of the pair was off its core.
  local stalled
  stalled=$(awk -F, 'NR > 1 && $18 > 100000 { printf "%s%s %s QD%s", (n++ ? ", " : ""), $2, $4, $6 }' "$csv")
  [[ -n $stalled ]] && printf '> Stalls of 0.1 s or more (p99.9) at: %s. Their IOPS mostly measure how long the\n> pinned threads were descheduled, not the data path.\n\n' "$stalled"
  cat <<EOT
A ${size_mib} MiB raw image in tmpfs (/dev/shm), 4 KiB requests at uniformly random 4 KiB-aligned
offsets, one request queue, one core per side: the back-end on CPU $BE_CPU, the front-end
(\`vhostkit-bench blk --poll=busy\`, which polls the used ring and keeps call notifications off) on
CPU $FE_CPU. ${duration} s measured after a ${warmup} s warm-up; a fresh back-end for every point.
Latency is per request, from the moment the front-end puts it on the avail ring to the moment it
sees it on the used ring. The ratios are ours / QSD at the same workload (IOPS: higher is better;
p50: lower is better).

| back-end | command |
|---|---|
| vk-busy | \`vhostkit-blk --image=IMG --cpu=$BE_CPU --poll=busy\` (${direct:-?}; \`--io=auto\` chose ${auto_io:-?}) |
| vk-event | \`vhostkit-blk --image=IMG --cpu=$BE_CPU\` (default polling: sleeps on kicks; ${auto_io:-?} I/O) |
| vk-uring | \`vhostkit-blk --image=IMG --cpu=$BE_CPU --io=uring\` (event polling, every request through io_uring) |
| qsd | \`taskset -c $BE_CPU qemu-storage-daemon --blockdev driver=file,filename=IMG,node-name=d,cache.direct=off,aio=$qsd_aio --export type=vhost-user-blk,...,writable=on,num-queues=1\` |

| workload | back-end | IOPS | MB/s | p50 us | p99 us | p99.9 us | IOPS / QSD | p50 / QSD | errors |
|---|---|---:|---:|---:|---:|---:|---:|---:|---:|
EOT
  awk -F, 'NR > 1 { printf "| %s QD%s | %s | %.0f | %.1f | %.1f | %.1f | %.1f | %s | %s | %s |\n",
    $4, $6, $2, $10, $11, $16, $17, $18, ($22 == "" ? "-" : "x" $22), ($23 == "" ? "-" : "x" $23), $14 }' "$csv"
  cat <<EOT

![IOPS and p50 latency per workload](perf_blk.png)

Goal (issue 7): at least 1.5x QSD's IOPS at queue depth 32, and a lower p50 at queue depth 1.

Why two I/O paths. tmpfs has no non-blocking read or write (\`preadv2(..., RWF_NOWAIT)\` fails
with EOPNOTSUPP on this kernel), so io_uring cannot finish a tmpfs request when it is submitted
and hands every one to an io-wq kernel thread (\`iou-wrk-*\`): a thread wake-up, a context switch
and a completion event per request, on top of a 4 KiB copy that takes about a microsecond. QSD
(aio=io_uring) pays that on every request, and so does vk-uring. With \`--io=auto\` (the default)
vhostkit-blk sees that the image is on a memory file system (tmpfs, ramfs, hugetlbfs) and serves
each request with a plain preadv/pwritev/fdatasync/fallocate call on the queue's worker, which
answers it at once: the copy is then the whole cost. On any other file or a block device
\`--io=auto\` keeps io_uring, where the kernel can complete or queue a request without a thread.

Busy polling with io_uring (\`--poll=busy --io=uring\`): while requests are in flight and the ring
has nothing new, the worker yields its core (\`sched_yield\`), because the io-wq thread that
completes them may share that core: without the yield the io-wq thread gets the core only when
the scheduler preempts the spinner. (The before/after figures measured when the yield went in
were not kept as a result file; bench/blk.sh has no busy io_uring point.)

## How to reproduce

As root on a Debian 12 host with qemu-system-x86 (for qemu-storage-daemon) and gnuplot:

    bench/blk.sh            # 10 s per point (about 3 minutes)
    bench/blk.sh --quick    # 2 s per point

It builds vhostkit-blk and vhostkit-bench if no build tree has them and writes
bench/results/blk-<UTC>.csv, blk-latest.csv, docs/perf_blk.png and this file.
EOT
}
write_report "$out" >"$root/docs/performance-blk.md"
say "report: docs/performance-blk.md"
((${#FAILED[@]} == 0)) || { say "failed points: ${!FAILED[*]}"; exit 1; }
