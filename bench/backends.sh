#!/usr/bin/env bash
# Back-end against back-end under the same front-end, and front-end against front-end on the same
# back-end (issue #17; "How we measure" in DESIGN.md). The back-ends: DPDK's vhost PMD (testpmd,
# macswap) and vhostkit-net --loopback --poll=busy. The front-ends:
#   tpmd       testpmd virtio-user with its defaults (split ring), io fwd, --tx-first
#   tpmd-pio   testpmd virtio-user asking for packed_vq=1,in_order=1 (each back-end negotiates
#              what it offers; the row says what vhostkit-net acked)
#   bench      vhostkit-bench loop (split ring), busy polling: keeps the transmitq full, writes
#              every frame
#   bench-fwd  vhostkit-bench fwd --in-order (split ring), busy polling: testpmd's io forwarding
#              with --tx-first, done by vhostkit-bench (32 frames in flight, each sent back out of
#              the buffer it arrived in), asking for IN_ORDER as testpmd's virtio-user does by
#              default: the like-for-like front-end for tpmd
#
#   bench/backends.sh [--build DIR] [--rounds N] [--duration S] [--sizes LIST] [--keep-logs]
#
#   --build      build tree holding vhostkit-net and vhostkit-bench (default build/release)
#   --rounds     rounds (default 3: the least for a claim)
#   --duration   seconds measured per run, after a 1 s warm-up (default 5)
#   --sizes      frame sizes, comma-separated (default 64,1518)
#   --from CSV   measure nothing: the tables (and docs/performance-backends.md) from an earlier run
#
# The back-end on CPU 1, the front-end on CPU 0. Every run starts a fresh back-end and front-end;
# the eight pairings interleave, their order rotated each round, so a drift of the host favours
# none. Before and after each run host_probe takes a 0.1 s cache-line round trip between the two
# CPUs: it says where the hypervisor has placed the vCPUs (here 110, 450 or 900 ns), and every
# figure moves inversely with it, so runs are also compared within one placement.
# Writes bench/results/backends-<utc>.csv (round,frontend,backend,size,mpps,ring,load1,
# c2c_before_ns,c2c_after_ns) and prints, per front-end and size, each back-end's median
# (min..max) and vhostkit-net / DPDK; then per back-end, vhostkit-bench / testpmd virtio-user; then
# the first table again per placement (runs whose probes disagree left out); the same tables go
# to docs/performance-backends.md, which the report includes, with docs/perf_backends.png.
# A failed run is a row marked fail, left out of the medians, exit status 1; 77 without testpmd.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VK_SCRIPT_NAME=backends
source "$root/scripts/lib/dpdk.sh"
source "$root/scripts/lib/vhostkit.sh"

build=$root/build/release rounds=3 duration=5 sizes=64,1518 keep=0 from=""
vk_options backends.sh build=build rounds=rounds duration=duration sizes=sizes keep-logs!keep from=from -- "$@"
for n in rounds duration; do
  [[ ${!n} =~ ^[0-9]+$ ]] && ((${!n} >= 1)) || { echo "backends.sh: --$n must be a whole number >= 1" >&2; exit 2; }
done
# testpmd prints a rate a second and the first one is partial: fewer than 3 s leave none.
((duration >= 3)) || { echo "backends.sh: --duration must be at least 3 s (testpmd's rate samples)" >&2; exit 2; }
[[ $sizes =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "backends.sh: --sizes wants e.g. 64,1518" >&2; exit 2; }
IFS=, read -r -a size_list <<<"$sizes"
say() { echo "[backends.sh] $*" >&2; }
failed=0
if [[ -n $from ]]; then
  [[ -f $from ]] || { echo "backends.sh: no such CSV: $from" >&2; exit 2; }
  head -1 "$from" | grep -q '^round,frontend,backend,' || { echo "backends.sh: $from is not a backends.sh CSV" >&2; exit 2; }
  out=$from
  rounds=$(awk -F, 'NR > 1 && $1 > r { r = $1 } END { print r + 0 }' "$from")
else
  VK_NET_BIN=$build/src/tools/vhostkit-net/vhostkit-net
  bench=$build/src/tools/vhostkit-bench/vhostkit-bench
  probe=$build/bench/host_probe
  [[ -x $VK_NET_BIN && -x $bench && -x $probe ]] ||
    { echo "backends.sh: vhostkit-net, vhostkit-bench or host_probe not built in $build" >&2; exit 1; }
  command -v "$VK_TESTPMD" >/dev/null || { echo "backends.sh: no $VK_TESTPMD (dpdk-dev)" >&2; exit 77; }
  command -v jq >/dev/null || { echo "backends.sh: no jq" >&2; exit 1; }
  [[ $(id -u) -eq 0 ]] || { echo "backends.sh: testpmd without hugepages needs root here" >&2; exit 1; }

  FE_CPU=0 BE_CPU=1 warmup=1
  VK_KEEP=$keep vk_tmpdir
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  mkdir -p "$root/bench/results"
  out=$root/bench/results/backends-$stamp.csv
  echo "round,frontend,backend,size,mpps,ring,load1,c2c_before_ns,c2c_after_ns" >"$out"
  say "$rounds rounds of ${duration} s, sizes ${size_list[*]}, load $(cut -d' ' -f1-3 /proc/loadavg)"

  declare -A VDEV_EXTRA=([tpmd]="" [tpmd-pio]=",packed_vq=1,in_order=1")

  start_backend() {  # BACKEND SOCK LOG: sets BE_PID; 0 once it listens
    local be=$1 sock=$2 log=$3
    if [[ $be == dpdk ]]; then
      vk_dpdk_start_backend "$sock" "$BE_CPU" "$log" --forward-mode=macswap --burst=32
      BE_PID=$VK_DPDK_PID
      vk_dpdk_wait_listening "$sock" 60
    else
      rm -f "$sock"
      vk_net_start "$log" -- --socket-path="$sock" --loopback --poll=busy --cpu="$BE_CPU"
      BE_PID=$VK_NET_PID
      vk_net_wait_listening "$sock" 30 "$log"
    fi
  }
  stop_backend() {  # BACKEND
    if [[ $1 == dpdk ]]; then vk_dpdk_stop "$BE_PID"; else vk_net_stop "$BE_PID" >/dev/null; fi
  }

  # testpmd virtio-user (io fwd, --tx-first) on SOCK: prints its mean Rx-pps over the window.
  testpmd_pps() {  # FRONTEND SOCK SIZE LOG
    vk_dpdk_frontend_pps "$2" "$FE_CPU" "$4" "$3" "$warmup" "$duration" "${VDEV_EXTRA[$1]}"
  }

  c2c() {  # the cache-line round trip between the two CPUs now, ns
    "$probe" --cpu-a "$FE_CPU" --cpu-b "$BE_CPU" --test cacheline_rtt --seconds 0.1 --bare 2>/dev/null || echo -
  }

  run() {  # ROUND FRONTEND BACKEND SIZE
    local r=$1 fe=$2 be=$3 size=$4 tag="$1-$2-$3-$4" load mpps pps json ring=- c2c0 c2c1
    local sock=$VK_TMP/$tag.sock blog=$VK_TMP/$tag-backend.log
    load=$(cut -d' ' -f1 /proc/loadavg)
    c2c0=$(c2c)
    start_backend "$be" "$sock" "$blog" || { say "$tag: the back-end did not listen (see $blog)"; stop_backend "$be"; return 1; }
    if [[ $fe == bench* ]]; then
      local mode=(loop)
      [[ $fe == bench-fwd ]] && mode=(fwd --in-order)
      json=$("$bench" "${mode[@]}" --socket-path="$sock" --size="$size" --duration="$duration" \
        --warmup="$warmup" --poll=busy --cpu="$FE_CPU" --label="$tag" --json 2>"$VK_TMP/$tag-bench.err") ||
        { say "$tag: vhostkit-bench failed: $(tail -1 "$VK_TMP/$tag-bench.err")"; stop_backend "$be"; return 1; }
      mpps=$(jq -r '.results[0].mpps * 10000 | round / 10000' <<<"$json")
    else
      pps=$(testpmd_pps "$fe" "$sock" "$size" "$VK_TMP/$tag-frontend.log") ||
        { say "$tag: testpmd virtio-user failed (see $VK_TMP/$tag-frontend.log)"; stop_backend "$be"; return 1; }
      mpps=$(awk -v p="$pps" 'BEGIN { printf "%.4f", p / 1e6 }')
    fi
    stop_backend "$be"
    c2c1=$(c2c)
    # What vhostkit-net acked ("packed ring, in order", ...): the ring each front-end really ran.
    if [[ $be == vhostkit ]]; then
      ring=$(grep -oE 'acked: [a-z]+ ring(, in order)?' "$blog" | tail -1 | sed -e 's/^acked: //' -e 's/, /+/')
      [[ -n $ring ]] || ring=-
    fi
    echo "$r,$fe,$be,$size,$mpps,$ring,$load,$c2c0,$c2c1" >>"$out"
    say "round $r: $fe <-> $be, $size B: $mpps Mpps ($ring; cache-line round trip $c2c0 / $c2c1 ns)"
  }

  pairings=()
  for size in "${size_list[@]}"; do
    for fe in tpmd tpmd-pio bench bench-fwd; do
      for be in dpdk vhostkit; do pairings+=("$fe $be $size"); done
    done
  done
  for ((r = 1; r <= rounds; r++)); do
    for ((k = 0; k < ${#pairings[@]}; k++)); do
      # shellcheck disable=SC2086  # "FE BE SIZE" split on purpose
      run "$r" ${pairings[(k + (r - 1) * 2) % ${#pairings[@]}]} || {
        # shellcheck disable=SC2086
        set -- ${pairings[(k + (r - 1) * 2) % ${#pairings[@]}]}
        echo "$r,$1,$2,$3,fail,-,-,-,-" >>"$out"
        failed=$((failed + 1))
      }
    done
  done
fi

# awk functions the tables and the plot share. stats(list): the median of a space-separated list
# of numbers, also left in MED with its LO..HI (0 for an empty list). sort_sizes(sz, sizes): the
# keys of sz as numbers, ascending, in sizes[1..n]; returns n. fe_names(): the front-ends in
# table order in FES[1..4], their row names in NAME[].
awk_lib='
  function stats(list,   a, n, i, j, t) {
    n = split(list, a, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    MED = n ? ((n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2) : 0; LO = n ? a[1] : 0; HI = n ? a[n] : 0
    return MED
  }
  function sort_sizes(sz, sizes,   s, n, i, j, t) {
    n = 0; for (s in sz) sizes[++n] = s + 0
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (sizes[j] < sizes[i]) { t = sizes[i]; sizes[i] = sizes[j]; sizes[j] = t }
    return n
  }
  function fe_names() {
    split("tpmd tpmd-pio bench bench-fwd", FES, " ")
    NAME["tpmd"] = "testpmd virtio-user (defaults)"
    NAME["tpmd-pio"] = "testpmd virtio-user packed_vq=1,in_order=1"
    NAME["bench"] = "vhostkit-bench loop"
    NAME["bench-fwd"] = "vhostkit-bench fwd --in-order"
  }
'
summary() {  # the tables, in markdown (read as they are in a terminal too)
  awk -F, "$awk_lib"'NR > 1 && $5 != "fail" { k = $2 SUBSEP $3 SUBSEP $4; v[k] = v[k] " " $5; sz[$4] = 1
      if ($3 == "vhostkit" && $6 != "-") ring[$2, $4] = $6 }
    function cell(fe, be, s) { M[fe, be, s] = stats(v[fe, be, s]); return sprintf("%.3f (%.3f..%.3f)", MED, LO, HI) }
    function ratio(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "-" }
    END {
      fe_names(); n = 4; ns = sort_sizes(sz, sizes)
      print "| front-end | size (B) | DPDK vhost PMD, Mpps | vhostkit-net, Mpps | vhostkit / DPDK | vhostkit-net ran |"
      print "|---|---:|---:|---:|---:|---|"
      for (k = 1; k <= ns; k++) for (i = 1; i <= n; i++) {
        s = sizes[k]; d = cell(FES[i], "dpdk", s); h = cell(FES[i], "vhostkit", s)
        printf "| %s | %s | %s | %s | %s | %s |\n", NAME[FES[i]], s, d, h,
          ratio(M[FES[i], "vhostkit", s], M[FES[i], "dpdk", s]), ring[FES[i], s]
      }
      print ""
      print "| vhostkit-bench mode | size (B) | vhostkit-bench / testpmd virtio-user on DPDK vhost PMD | on vhostkit-net |"
      print "|---|---:|---:|---:|"
      for (k = 1; k <= ns; k++) for (i = 3; i <= n; i++) {
        s = sizes[k]
        printf "| %s | %s | %s | %s |\n", FES[i] == "bench" ? "loop" : "fwd", s,
          ratio(M[FES[i], "dpdk", s], M["tpmd", "dpdk", s]),
          ratio(M[FES[i], "vhostkit", s], M["tpmd", "vhostkit", s])
      }
    }' "$out"
  echo
  by_placement
}
# The first table again, per placement of the two vCPUs: a run counts in a class when both of its
# cache-line probes fall in it (near < 250 ns, far < 650 ns, farther beyond).
by_placement() {
  awk -F, "$awk_lib"'function cls(x) { return x == "" || x == "-" ? "" : x + 0 < 250 ? "near" : x + 0 < 650 ? "far" : "farther" }
    NR > 1 && $5 != "fail" { c = cls($8); if (c == "") { noprobe++; next } if (c != cls($9)) { moved++; next }
      k = c SUBSEP $2 SUBSEP $3 SUBSEP $4; v[k] = v[k] " " $5; n[k]++; sz[$4] = 1; rt[c] = rt[c] " " $8 }
    END {
      split("near far farther", cs, " "); fe_names(); ns = sort_sizes(sz, sizes)
      rows = 0
      for (c = 1; c <= 3; c++) for (k = 1; k <= ns; k++) for (i = 1; i <= 4; i++) {
        s = sizes[k]; d = cs[c] SUBSEP FES[i] SUBSEP "dpdk" SUBSEP s; h = cs[c] SUBSEP FES[i] SUBSEP "vhostkit" SUBSEP s
        if (!(d in n) || !(h in n)) continue
        if (!rows++) {
          print "| placement (cache-line round trip) | front-end | size (B) | DPDK vhost PMD, Mpps (runs) | vhostkit-net, Mpps (runs) | vhostkit / DPDK |"
          print "|---|---|---:|---:|---:|---:|"
        }
        printf "| %s (median %.0f ns) | %s | %s | %.3f (%d) | %.3f (%d) | %.2f |\n", cs[c], stats(rt[cs[c]]), NAME[FES[i]], s,
          stats(v[d]), n[d], stats(v[h]), n[h], stats(v[h]) / stats(v[d])
      }
      if (noprobe) printf "%d run(s) without cache-line probes (a CSV from before they were taken): no placement for them.\n", noprobe
      else if (!rows) print "No placement holds runs of both back-ends under one front-end."
      if (moved) printf "\n%d run(s) left out of this table: the placement changed during the run.\n", moved
    }' "$out"
}
summary
# docs/perf_backends.png: per front-end and size, each back-end's median with its min..max.
plot() {
  command -v gnuplot >/dev/null || { say "gnuplot missing: no plot"; return 1; }
  local dat
  dat=$(mktemp)
  awk -F, "$awk_lib"'NR > 1 && $5 != "fail" { k = $2 SUBSEP $4; v[k, $3] = v[k, $3] " " $5; keys[k] = 1 }
    function st(list) { stats(list); return sprintf("%s %s %s", MED, LO, HI) }
    END {
      split("tpmd tpmd-pio bench bench-fwd", fes, " "); lab["tpmd"] = "testpmd"; lab["tpmd-pio"] = "testpmd-packed"
      lab["bench"] = "vk-bench-loop"; lab["bench-fwd"] = "vk-bench-fwd"
      for (k in keys) { split(k, p, SUBSEP); sz[p[2] + 0] = 1 }
      for (s in sz) for (i = 1; i <= 4; i++) { k = fes[i] SUBSEP s
        if (k in keys) printf "%d %d %s-%sB %s %s\n", s, i, lab[fes[i]], s, st(v[k, "dpdk"]), st(v[k, "vhostkit"]) }
    }' "$out" | sort -n -k1,1 -k2,2 | cut -d' ' -f3- >"$dat"
  gnuplot <<EOT || { rm -f "$dat"; say "gnuplot failed: no plot"; return 1; }
set terminal pngcairo size 900,480
set output '$root/docs/perf_backends.png'
set title 'Back-end against back-end under the same front-end (medians, min..max)'
set ylabel 'Mpps'
set style data histograms
set style histogram errorbars gap 2 lw 1
set style fill solid 0.6 border -1
set xtics rotate by -20
set key top right
set yrange [0:*]
plot '$dat' using 2:3:4:xtic(1) title 'DPDK vhost PMD', '' using 5:6:7 title 'vhostkit-net'
EOT
  rm -f "$dat"
}
# The report's section (docs/performance.md includes it; bench/report.sh keeps it there).
{
  echo "## Back-end against back-end, under the same front-end"
  echo
  echo "\`bench/backends.sh\`, $rounds rounds of $duration s per pairing,"
  echo "the eight pairings interleaved and rotated each round, a fresh back-end and front-end per run;"
  echo "back-end on CPU 1, front-end on CPU 0, one core each, busy polling. Medians (min..max) and"
  echo "the ratio of the medians; load average $(awk -F, 'NR > 1 && $7 != "-" { s += $7; n++ } END { if (n) printf "%.1f", s / n }' "$out") over the runs"
  echo "(\`bench/results/$(basename "$out")\`)."
  echo
  summary
  echo
  echo "The second table holds the back-end and changes the front-end. testpmd's front-end runs"
  echo "32 frames in flight (--tx-first) and forwards each frame from its buffer (io); vhostkit-bench"
  echo "fwd does the same, vhostkit-bench loop keeps its ring full and writes every frame."
  echo
  echo "The third table splits the runs by where the hypervisor had placed the two vCPUs, read from"
  echo "a cache-line round trip between them (host_probe, 0.1 s before and after each run). Every"
  echo "figure here moves inversely with that round trip, so a ratio between runs in one placement"
  echo "is the like-for-like one; a back-end that only ran in one placement has no row there."
  if plot; then
    echo
    echo "![back-end against back-end](perf_backends.png)"
  fi
} >"$root/docs/performance-backends.md"
say "rows in $out"
((failed == 0)) || { say "$failed run(s) failed (rows marked fail; logs: rerun with --keep-logs)"; exit 1; }
