#!/usr/bin/env bash
# vhostkit-blk against qemu-storage-daemon (QSD) on the same image, in one run: an image in a
# tmpfs (the default), or with --disk an image file on a disk file system, opened with O_DIRECT.
#
#   bench/blk.sh [--quick] [--duration S] [--build DIR] [--keep-logs] [--size MIB]
#   bench/blk.sh --disk[=DIR] [--rounds N] [--quick] [--duration S] [--build DIR] [--keep-logs]
#                [--size MIB]
#
#   --quick      2 s per point (default 10 s), after a 1 s warm-up
#   --duration   seconds measured per point
#   --build      build tree with vhostkit-blk and vhostkit-bench (default: the first of
#                build/release build/bench build that has both; else builds build/release)
#   --keep-logs  keep the per-process logs (their directory is printed)
#   --size       image size in MiB (default 256; 1024 with --disk)
#   --disk[=DIR] disk mode (below): the image in a fresh directory under DIR (default /var/tmp),
#                removed on exit. DIR must be on a disk file system that takes O_DIRECT
#   --rounds     disk mode only: rounds (default 3, the least for a claim)
#
# One core per side: the back-end on CPU 1 (taskset for QSD, --cpu for vhostkit-blk), the
# front-end (vhostkit-bench blk --poll=busy) on CPU 0. One request queue. Workloads: 4 KiB
# randread and randwrite at queue depth 1 and 32. Each point starts a fresh back-end.
#
# tmpfs mode (the default): one run of every point. Back-ends:
#   vk-busy    vhostkit-blk --poll=busy
#   vk-event   vhostkit-blk (its default polling: sleeps on kicks)
#   vk-uring   vhostkit-blk --io=uring (event polling; every request through io_uring even
#              though the image is in tmpfs, where --io=auto answers requests inline)
#   qsd        qemu-storage-daemon --export type=vhost-user-blk, one iothread-less export,
#              --blockdev driver=file,cache.direct=off,aio=io_uring (aio=threads if this QSD
#              lacks io_uring; the report says which)
# The image is a file in a tmpfs (a temporary directory under /dev/shm), written through once
# so every page exists. Output: bench/results/blk-<UTC>.csv (+ blk-latest.csv),
# docs/perf_blk.png (gnuplot) and docs/performance-blk.md (table with ratios ours / QSD,
# machine line, how to reproduce).
#
# Disk mode (--disk): the image is random data written through O_DIRECT and fsynced, so every
# block is allocated and written (reads of a hole or an unwritten extent cost no device I/O);
# both sides open it with O_DIRECT. Back-ends:
#   vk-busy     vhostkit-blk --poll=busy   (--io=auto: io_uring for an image on a disk)
#   vk-event    vhostkit-blk               (default polling)
#   vk-adaptive vhostkit-blk --poll=adaptive (sleeps at once while only its I/O is in flight)
#   qsd-uring   QSD --blockdev driver=file,cache.direct=on,aio=io_uring
#   qsd-native  QSD --blockdev driver=file,cache.direct=on,aio=native (Linux AIO)
# Checked at every point: the back-end holds the image open with O_DIRECT (/proc/PID/fdinfo),
# vhostkit-blk's log says O_DIRECT and I/O uring, and no request of its went through its
# buffered fd; otherwise the script stops at once with exit 1. A QSD aio mode this QSD refuses
# is left out (said on stderr, in the table and the report; exit 1 at the end).
# The round loop is outermost: each round runs every (workload, back-end) point once, the
# back-ends' order rotated each round, so a slow phase of the host hits all alike. Output:
# bench/results/blk-disk-<UTC>.csv (+ blk-disk-latest.csv; a row per round and point, the
# round in the first column), then per point the median and min..max over the rounds of IOPS
# and p50, and each vhostkit back-end / each QSD mode (ratio of the medians): on stdout, in
# docs/performance-blk-disk.md, and docs/perf_blk_disk.png (gnuplot).
#
# Exit status: 0; 1 when a point failed or the run could not be made (no room under DIR, its
# file system refuses O_DIRECT, a refused QSD mode in disk mode); 2 on bad arguments.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
VK_SCRIPT_NAME=blk.sh
source "$root/scripts/lib/vhostkit.sh"

quick=0 duration="" build="" keep=0 size_mib="" disk="" rounds=""
# --disk takes its value only as --disk=DIR: a bare --disk means the default directory.
args=() disk_mode=0
for a in "$@"; do
  [[ $a == --disk ]] && a=--disk=/var/tmp
  [[ $a == --disk=* ]] && disk_mode=1
  args+=("$a")
done
vk_options blk.sh quick!quick duration=duration build=build size=size_mib keep-logs!keep \
  disk=disk rounds=rounds -- "${args[@]}"
if ((quick)); then : "${duration:=2}"; else : "${duration:=10}"; fi
if ((disk_mode)); then : "${size_mib:=1024}" "${rounds:=3}"; else : "${size_mib:=256}"; fi
[[ $duration =~ ^[0-9]+$ ]] && ((duration >= 1)) || { echo "blk.sh: --duration must be a whole number of seconds >= 1" >&2; exit 2; }
[[ $size_mib =~ ^[0-9]+$ ]] && ((size_mib >= 1)) || { echo "blk.sh: --size must be a whole number of MiB >= 1" >&2; exit 2; }
if ((disk_mode)); then
  [[ $rounds =~ ^[0-9]+$ ]] && ((rounds >= 1)) || { echo "blk.sh: --rounds must be a whole number >= 1" >&2; exit 2; }
  [[ -n $disk ]] || { echo "blk.sh: --disk= needs a directory (or --disk alone for /var/tmp)" >&2; exit 2; }
  [[ -d $disk ]] || { echo "blk.sh: --disk: $disk is not a directory" >&2; exit 2; }
  [[ -w $disk ]] || { echo "blk.sh: --disk: $disk is not writable" >&2; exit 2; }
  disk=$(cd "$disk" && pwd -P)
  case $(stat -f -c %T "$disk") in
    tmpfs|ramfs|hugetlbfs)
      echo "blk.sh: --disk: $disk is on $(stat -f -c %T "$disk"), not a disk (tmpfs mode is blk.sh without --disk)" >&2
      exit 2 ;;
  esac
elif [[ -n $rounds ]]; then
  echo "blk.sh: --rounds is for disk mode (--disk); tmpfs mode runs every point once" >&2
  exit 2
fi
warmup=1
FE_CPU=0 BE_CPU=1
QSD=${QSD:-qemu-storage-daemon}
command -v "$QSD" >/dev/null || { echo "blk.sh: $QSD not installed (qemu-system-x86 / qemu-utils)" >&2; exit 1; }
command -v gnuplot >/dev/null || echo "blk.sh: gnuplot missing: no plot" >&2
((disk_mode)) || [[ -d /dev/shm ]] || { echo "blk.sh: no /dev/shm tmpfs" >&2; exit 1; }

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
utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
results=$root/bench/results
mkdir -p "$results" "$root/docs"
say() { echo "[blk.sh] $*" >&2; }

qsd_probe() {  # AIO [DIRECT]: 0 if QSD opens the image with aio=AIO (it then listens; stopped at once)
  local pid direct=${2:-off}
  "$QSD" --blockdev "driver=file,filename=$img,node-name=d,cache.direct=$direct,aio=$1" \
    --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$VK_TMP/probe.sock,writable=on" \
    </dev/null >"$VK_TMP/qsd-probe.log" 2>&1 &
  pid=$!
  vk_wait_for 10 test -S "$VK_TMP/probe.sock"
  local ok=$?
  # With cache.direct=on, QSD must hold the image with O_DIRECT (it opens it at start).
  if ((ok == 0)) && [[ $direct == on ]] && ! fd_direct "$pid" "$img"; then
    echo "QSD holds $img without O_DIRECT despite cache.direct=on" >>"$VK_TMP/qsd-probe.log"
    ok=1
  fi
  vk_kill "$pid"
  rm -f "$VK_TMP/probe.sock"
  return $ok
}

# 0 if process PID has FILE open with O_DIRECT (octal 040000 in fdinfo's flags, x86 and arm64).
fd_direct() {  # PID FILE
  local fd flags
  for fd in /proc/"$1"/fd/*; do
    [[ $(readlink "$fd" 2>/dev/null) == "$2" ]] || continue
    flags=$(awk '$1 == "flags:" { print $2 }' "/proc/$1/fdinfo/${fd##*/}" 2>/dev/null)
    [[ -n $flags ]] && (((8#$flags & 8#40000) != 0)) && return 0
  done
  return 1
}

BE_PID=""
start_backend() {  # NAME SOCK LOG: start back-end NAME listening on SOCK (on BE_CPU)
  local name=$1 sock=$2 log=$3
  rm -f "$sock"
  case $name in
    vk-busy|vk-event|vk-uring|vk-adaptive)
      local extra=()
      [[ $name == vk-busy ]] && extra=(--poll=busy)
      [[ $name == vk-adaptive ]] && extra=(--poll=adaptive)
      [[ $name == vk-uring ]] && extra=(--io=uring)
      vk_net_start "$log" -- --socket-path="$sock" --image="$img" --cpu="$BE_CPU" "${extra[@]}"
      BE_PID=$VK_NET_PID
      vk_net_wait_listening "$sock" 30 "$log"
      ;;
    qsd|qsd-uring|qsd-native)
      local aio=${qsd_aio:-} direct=off
      [[ $name == qsd-uring ]] && aio=io_uring direct=on
      [[ $name == qsd-native ]] && aio=native direct=on
      taskset -c "$BE_CPU" "$QSD" \
        --blockdev "driver=file,filename=$img,node-name=d,cache.direct=$direct,aio=$aio" \
        --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$sock,writable=on,num-queues=1" \
        </dev/null >"$log" 2>&1 &
      BE_PID=$!
      vk_track_pid "$BE_PID"
      vk_wait_for 30 test -S "$sock"
      ;;
  esac
}

# --- disk mode ----------------------------------------------------------------------------------
# Names, commands and plot titles of the disk mode's back-ends.
declare -A DISK_TITLE=([vk-busy]="vhostkit-blk busy" [vk-event]="vhostkit-blk event"
  [vk-adaptive]="vhostkit-blk adaptive"
  [qsd-uring]="QSD aio=io_uring" [qsd-native]="QSD aio=native")
WORKLOADS=("randread 1" "randread 32" "randwrite 1" "randwrite 32")

# The directory, then the image: every block allocated and written.
disk_prepare() {
  local need avail err alloc
  need=$((size_mib * 1024 + 64 * 1024))  # KiB: the image, and some room to spare
  avail=$(df -Pk "$disk" | awk 'NR == 2 { print $4 }')
  [[ $avail =~ ^[0-9]+$ ]] || { say "cannot tell the free space in $disk"; return 1; }
  ((avail >= need)) || {
    say "$disk has $((avail / 1024)) MiB free; the ${size_mib} MiB image needs $((need / 1024)) MiB (--size, or another --disk=DIR)"
    return 1
  }
  work=$(mktemp -d "$disk/vk-blkbench.XXXXXX") || { say "cannot create a directory in $disk"; return 1; }
  vk_on_exit "rm -rf '$work'"
  img=$work/disk.img
  disk_fs=$(findmnt -no FSTYPE -T "$disk") disk_dev=$(findmnt -no SOURCE -T "$disk")
  if ! err=$(dd if=/dev/zero of="$work/probe" bs=4096 count=1 oflag=direct status=none 2>&1); then
    if [[ $err == *"Invalid argument"* ]]; then
      say "the file system of $disk ($disk_fs on $disk_dev) refuses O_DIRECT: $err"
    else
      say "cannot write to $disk: $err"
    fi
    return 1
  fi
  rm -f "$work/probe"
  say "writing ${size_mib} MiB of random data to $img (O_DIRECT, then fsync)"
  err=$(dd if=/dev/urandom of="$img" bs=1M count="$size_mib" iflag=fullblock oflag=direct \
    conv=fsync status=none 2>&1) || { say "cannot write the image $img: $err"; return 1; }
  # A hole or an unwritten extent reads as zeros without a device read: neither may remain.
  alloc=$(stat -c '%b %B' "$img" | awk '{ printf "%.0f", $1 * $2 }')
  ((alloc >= size_mib * 1048576)) || { say "$img has only $alloc bytes allocated"; return 1; }
  if command -v filefrag >/dev/null && filefrag -v "$img" 2>/dev/null | grep -q unwritten; then
    say "$img has unwritten extents"
    return 1
  fi
}

# vhostkit-blk PID, just started with LOG, serves the image with O_DIRECT through io_uring.
vk_check_direct() {  # BE LOG PID
  local line
  line=$(grep -m1 -oE '\([0-9]+ sectors, [^)]*\)' "$2")
  [[ $line == *", O_DIRECT, I/O uring"* ]] ||
    { say "$1 does not serve $img with O_DIRECT through io_uring: ${line:-no start line} (see $2)"; return 1; }
  fd_direct "$3" "$img" || { say "$1 (pid $3) does not hold $img open with O_DIRECT"; return 1; }
}

# The stopped vhostkit-blk's totals: no read or write went through its buffered fd.
vk_check_unbuffered() {  # BE LOG
  local n
  n=$(grep -oE 'totals q0 .*\| buffered [0-9]+' "$2" | tail -1 | awk '{ print $NF }')
  [[ -n $n ]] || { say "$1 left no totals line (see $2)"; return 1; }
  ((n == 0)) || { say "$1 sent $n request(s) through its buffered fd, not O_DIRECT (see $2)"; return 1; }
}

# One point. 0 (failed points are recorded in FAILED); 1 when the image was not served with
# O_DIRECT, which makes the whole comparison void.
disk_point() {  # ROUND BE RW QD
  local r=$1 be=$2 rw=$3 qd=$4 load log sock=$VK_TMP/$2.sock tag=r$1-$2-$3-qd$4
  log=$VK_TMP/$tag-backend.log
  load=$(cut -d' ' -f1 /proc/loadavg)
  say "round $r/$rounds: $be $rw iodepth $qd"
  start_backend "$be" "$sock" "$log" ||
    { say "  $be did not come up (see $log)"; FAILED[$tag]=1; vk_kill "$BE_PID"; return 0; }
  if [[ $be == vk-* ]]; then
    vk_check_direct "$be" "$log" "$BE_PID" || return 1
  else
    fd_direct "$BE_PID" "$img" || { say "$be (pid $BE_PID) does not hold $img open with O_DIRECT"; return 1; }
  fi
  rm -f "$VK_TMP/point.csv"
  timeout $((duration + warmup + 30)) "$BENCH" blk --socket-path="$sock" --rw="$rw" \
    --iodepth="$qd" --bs=4096 --duration="$duration" --warmup="$warmup" --poll=busy \
    --cpu="$FE_CPU" --label="$be" --csv="$VK_TMP/point.csv" \
    >"$VK_TMP/$tag-bench.out" 2>"$VK_TMP/$tag-bench.err" ||
    { say "  vhostkit-bench failed: $(tail -1 "$VK_TMP/$tag-bench.err")"; FAILED[$tag]=1; }
  if [[ $be == vk-* ]]; then
    vk_net_stop "$BE_PID" 10 >/dev/null || { say "  $be exited with status $?"; FAILED[$tag]=1; }
    vk_check_unbuffered "$be" "$log" || return 1
  else
    vk_kill "$BE_PID"
  fi
  grep -E '^rand' "$VK_TMP/$tag-bench.out" | sed 's/^/  /' >&2
  [[ -z ${FAILED[$tag]:-} && -s $VK_TMP/point.csv ]] || return 0
  [[ -s $out ]] || echo "round,$(head -1 "$VK_TMP/point.csv"),load1" >"$out"
  sed -n 2p "$VK_TMP/point.csv" | sed -e "s/^/$r,/" -e "s/\$/,$load/" >>"$out"
}

# The table (markdown, read as it is in a terminal too): per workload and back-end the median
# and min..max over the rounds, and each vhostkit back-end / each QSD mode (ratio of the medians).
disk_summary() {
  awk -F, -v bes="${disk_backends[*]}" '
    NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
    { k = $c["rw"] " QD" $c["iodepth"]; b = $c["label"]
      if (!(k in seen)) { seen[k] = 1; wl[++nw] = k }
      io[k, b] = io[k, b] " " $c["iops"]; p50[k, b] = p50[k, b] " " $c["p50_us"]
      p99[k, b] = p99[k, b] " " $c["p99_us"]; err[k, b] += $c["errors"]; n[k, b]++ }
    function stats(list,   a, m, i, j, t) {
      m = split(list, a, " ")
      for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
      MED = (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2; LO = a[1]; HI = a[m]
      return m
    }
    function ratio(x, y) { return (x > 0 && y > 0) ? sprintf("%.2f", x / y) : "-" }
    END {
      nb = split(bes, B, " ")
      for (i = 1; i <= nb; i++) if (B[i] ~ /^qsd/) Q[++nq] = B[i]
      printf "| workload | back-end | IOPS | p50 us | p99 us |"
      for (q = 1; q <= nq; q++) printf " IOPS / %s |", Q[q]
      for (q = 1; q <= nq; q++) printf " p50 / %s |", Q[q]
      printf " errors |\n|---|---|---:|---:|---:|"
      for (q = 1; q <= 2 * nq; q++) printf "---:|"
      print "---:|"
      for (w = 1; w <= nw; w++) {
        k = wl[w]
        for (i = 1; i <= nb; i++) if (stats(io[k, B[i]])) { MI[B[i]] = MED; stats(p50[k, B[i]]); MP[B[i]] = MED }
        for (i = 1; i <= nb; i++) {
          b = B[i]
          if (!n[k, b]) { printf "| %s | %s | - | - | - |", k, b; for (q = 1; q <= 2 * nq; q++) printf " - |"; print " - |"; continue }
          stats(io[k, b]); printf "| %s | %s | %.0f (%.0f..%.0f) |", k, b, MED, LO, HI
          stats(p50[k, b]); printf " %.1f (%.1f..%.1f) |", MED, LO, HI
          stats(p99[k, b]); printf " %.1f |", MED
          for (q = 1; q <= nq; q++) printf " %s |", (b ~ /^qsd/) ? "-" : ratio(MI[b], MI[Q[q]])
          for (q = 1; q <= nq; q++) printf " %s |", (b ~ /^qsd/) ? "-" : ratio(MP[b], MP[Q[q]])
          printf " %d |\n", err[k, b]
        }
        delete MI; delete MP
      }
    }' "$out"
}

# docs/perf_blk_disk.png: IOPS and p50 per workload, each back-end's median with min..max.
disk_plot() {
  command -v gnuplot >/dev/null || return 1
  local col what i plots
  for what in iops p50_us; do
    awk -F, -v bes="${disk_backends[*]}" -v what="$what" '
      NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
      { k = $c["rw"] " QD" $c["iodepth"]; if (!(k in seen)) { seen[k] = 1; wl[++nw] = k }
        v[k, $c["label"]] = v[k, $c["label"]] " " $c[what] }
      function st(list,   a, m, i, j, t) {
        m = split(list, a, " ")
        if (!m) return " ? ? ?"
        for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
        return sprintf(" %s %s %s", (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2, a[1], a[m])
      }
      END { nb = split(bes, B, " ")
        for (w = 1; w <= nw; w++) { printf "\"%s\"", wl[w]; for (i = 1; i <= nb; i++) printf "%s", st(v[wl[w], B[i]]); print "" } }' \
      "$out" >"$VK_TMP/plot-$what.dat"
  done
  plots=() col=2
  for i in "${disk_backends[@]}"; do
    plots+=("'DAT' using $col:$((col + 1)):$((col + 2))$( ((col == 2)) && echo ':xtic(1)') title \"${DISK_TITLE[$i]}\"")
    col=$((col + 3))
  done
  local IFS=,
  gnuplot <<EOT 2>"$VK_TMP/gnuplot.err" || { say "gnuplot failed: $(head -1 "$VK_TMP/gnuplot.err")"; return 1; }
set terminal pngcairo size 1200,480 font ",10" noenhanced
set output "$root/docs/perf_blk_disk.png"
set multiplot layout 1,2 title "vhostkit-blk vs qemu-storage-daemon, 4 KiB random I/O, O_DIRECT image on $disk_fs ($utc; medians, min..max over $rounds round(s))"
set style data histograms
set style histogram errorbars gap 1 lw 1
set style fill solid 0.8 border -1
set datafile missing "?"
set grid ytics
set key top left
set yrange [0:*]
set title "IOPS (higher is better)"
set format y "%.0s%c"
plot ${plots[*]//DAT/$VK_TMP/plot-iops.dat}
set title "p50 latency, us (lower is better)"
set format y "%g"
set logscale y
set yrange [1:*]
plot ${plots[*]//DAT/$VK_TMP/plot-p50_us.dat}
unset multiplot
EOT
}

# The report's warning when the host was loaded during the run (load1: load average after it).
loaded_warning() {
  awk -v l="$load1" 'BEGIN { exit !(l > 3) }' || return 0
  cat <<EOT
> **The host was shared and loaded during this run (load average $load1 > 3 on $cores cores).**
> Pinned threads lose their core to other work; absolute figures are depressed and noisy, and
> only ratios within this run mean anything.

EOT
}

disk_report() {
  local model cores kernel qsd_ver load1 mnt dev sched=""
  model=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
  cores=$(nproc)
  kernel=$(uname -r)
  qsd_ver=$("$QSD" --version | head -1 | sed 's/^qemu-storage-daemon version //')
  load1=$(awk -v a="${load_before%% *}" -v b="${load_after%% *}" 'BEGIN { print (a > b ? a : b) }')
  mnt=$(findmnt -no TARGET -T "$disk")
  dev=$(basename "$disk_dev")
  [[ -r /sys/class/block/$dev/queue/scheduler ]] &&
    sched=", I/O scheduler $(grep -oE '\[[^]]+\]' "/sys/class/block/$dev/queue/scheduler" | tr -d '[]')"
  cat <<EOT
# Block performance on a disk: vhostkit-blk and qemu-storage-daemon, O_DIRECT

Generated by \`bench/blk.sh --disk$( ((quick)) && echo " --quick") --rounds $rounds\` on $utc; raw figures (a row per round and
point) in \`bench/results/$(basename "$out")\` (and \`bench/results/blk-disk-latest.csv\`).

**Machine:** $model, $cores cores, kernel $kernel, qemu-storage-daemon $qsd_ver.
**Image:** a ${size_mib} MiB file on $disk_fs ($disk_dev, mounted on $mnt$sched), in a temporary
directory under $disk. Load average before the run: $load_before; after: $load_after.

EOT
  loaded_warning
  ((${#REFUSED[@]})) && printf '> This QSD refused: %s. Its rows are empty.\n\n' "$(printf '%s; ' "${REFUSED[@]}" | sed 's/; $//')"
  ((${#FAILED[@]})) && printf '> Points with a failed step (left out of the medians): %s\n\n' "${!FAILED[*]}"
  ((quick || rounds < 3)) && printf '> A smoke run (%s s per point, %s round(s)): no figure here is a claim.\n\n' "$duration" "$rounds"
  cat <<EOT
The image is random data written through O_DIRECT and fsynced before the run, every block
allocated and written (checked: allocated size, no unwritten extent), so a read costs a device
read: a sparse or unwritten file would answer reads with zeros and no I/O. 4 KiB requests at
uniformly random 4 KiB-aligned offsets over the whole image, one request queue, one core per side:
the back-end on CPU $BE_CPU, the front-end (\`vhostkit-bench blk --poll=busy\`, which polls the used
ring and keeps call notifications off) on CPU $FE_CPU. ${duration} s measured after a ${warmup} s warm-up, a
fresh back-end for every point. $rounds round(s), interleaved: each round runs every (workload,
back-end) point once, the back-ends' order rotated each round. Per point the median over the
rounds with min..max; the ratios are ours / QSD, of the medians (IOPS: higher is better; p50:
lower is better). Latency is per request, from the moment the front-end puts it on the avail
ring to the moment it sees it on the used ring.

Checked at every point, else the run stops: the back-end holds the image open with O_DIRECT
(\`/proc/PID/fdinfo\`); vhostkit-blk's start line says O_DIRECT and I/O uring, and its totals at
exit say no request went through its buffered fd (the fallback for requests O_DIRECT cannot take).

| back-end | command |
|---|---|
| vk-busy | \`vhostkit-blk --image=IMG --cpu=$BE_CPU --poll=busy\` (\`--io=auto\` takes io_uring for an image on a disk) |
| vk-event | \`vhostkit-blk --image=IMG --cpu=$BE_CPU\` (default polling: sleeps on kicks) |
| vk-adaptive | \`vhostkit-blk --image=IMG --cpu=$BE_CPU --poll=adaptive\` (spins while requests come, sleeps at once while only its I/O is in flight) |
| qsd-uring | \`taskset -c $BE_CPU qemu-storage-daemon --blockdev driver=file,filename=IMG,node-name=d,cache.direct=on,aio=io_uring --export type=vhost-user-blk,...,writable=on,num-queues=1\` |
| qsd-native | the same with \`aio=native\` (Linux AIO) |

EOT
  disk_summary
  cat <<EOT

![IOPS and p50 latency per workload, medians with min..max](perf_blk_disk.png)

EOT
  [[ $dev == vd* ]] && cat <<EOT
$disk_dev is a virtio disk: what stands behind it on the hypervisor (its devices, its cache, the
other guests sharing them) is out of sight and changes over time. The figures hold for this
host at this time; compare back-ends within one run, as ratios.

EOT
  cat <<EOT
## How to reproduce

As root on a Debian 12 host with qemu-system-x86 (for qemu-storage-daemon) and gnuplot, with
${size_mib} MiB and 64 MiB to spare free under the directory:

    bench/blk.sh --disk                       # /var/tmp, 1024 MiB, 3 rounds of 10 s per point
    bench/blk.sh --disk=DIR --rounds 5        # another file system, more rounds
    bench/blk.sh --disk --quick --rounds 1    # a smoke run: 2 s per point

It builds vhostkit-blk and vhostkit-bench if no build tree has them and writes
bench/results/blk-disk-<UTC>.csv, blk-disk-latest.csv, docs/perf_blk_disk.png and this file.
EOT
}

disk_main() {
  declare -gA FAILED=()
  REFUSED=()
  out=$results/blk-disk-$stamp.csv
  disk_prepare || exit 1
  disk_backends=(vk-busy vk-event vk-adaptive)
  local m be
  for m in io_uring native; do
    be=qsd-${m/io_uring/uring}
    if qsd_probe "$m" on; then
      disk_backends+=("$be")
    else
      REFUSED+=("aio=$m ($(tail -1 "$VK_TMP/qsd-probe.log"))")
      say "QSD REFUSED aio=$m with cache.direct=on: $(tail -1 "$VK_TMP/qsd-probe.log"); no $be point"
    fi
  done
  ((${#disk_backends[@]} > 3)) || { say "QSD refused both aio modes: nothing to compare with"; exit 1; }
  local nb=${#disk_backends[@]} r k w
  say "${size_mib} MiB image on $disk_fs ($disk_dev), $rounds round(s) of ${#WORKLOADS[@]} workloads x $nb back-ends, ${duration}s per point (about $(((rounds * ${#WORKLOADS[@]} * nb * (duration + warmup + 2) + 59) / 60)) min), logs in $VK_TMP, load $load_before"
  for ((r = 1; r <= rounds; r++)); do
    for w in "${WORKLOADS[@]}"; do
      for ((k = 0; k < nb; k++)); do
        # shellcheck disable=SC2086  # "RW QD" split on purpose
        disk_point "$r" "${disk_backends[(k + r - 1) % nb]}" $w ||
          { say "stopped: the comparison needs O_DIRECT on both sides"; exit 1; }
      done
    done
  done
  load_after=$(cut -d' ' -f1-3 /proc/loadavg)
  [[ -s $out ]] || { say "no results"; exit 1; }
  cp "$out" "$results/blk-disk-latest.csv"
  say "results: $out"
  disk_plot || say "no plot (gnuplot missing or failed)"
  disk_report >"$root/docs/performance-blk-disk.md"
  say "report: docs/performance-blk-disk.md"
  disk_summary
  ((${#REFUSED[@]} == 0)) || say "QSD refused: ${REFUSED[*]}"
  ((${#FAILED[@]} == 0)) || say "failed points: ${!FAILED[*]}"
  ((${#FAILED[@]} == 0 && ${#REFUSED[@]} == 0))
}

if ((disk_mode)); then
  disk_main
  exit $?
fi

shm=$(mktemp -d /dev/shm/vk-blkbench.XXXXXX)
vk_on_exit "rm -rf '$shm'"
img=$shm/disk.img
out=$results/blk-$stamp.csv
say "image ${size_mib} MiB in $shm, ${duration}s per point, logs in $VK_TMP, load $load_before"
dd if=/dev/zero of="$img" bs=1M count="$size_mib" status=none || { say "cannot write $img"; exit 1; }

# QSD's AIO engine: io_uring if this build accepts it.
qsd_aio=io_uring
qsd_probe io_uring || { qsd_aio=threads; say "QSD refused aio=io_uring ($(tail -1 "$VK_TMP/qsd-probe.log")): using aio=threads"; }
say "QSD aio=$qsd_aio"
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
  loaded_warning
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
