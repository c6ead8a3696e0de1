#!/usr/bin/env bash
# vhostkit-bench loop against DPDK testpmd's vhost PMD (macswap) on each ring layout: split,
# packed, and packed with IN_ORDER. The back-end is the same in every run, so the figures compare
# our front-end's layouts with each other. Configurations interleave (split, packed, packed+io,
# then again), a fresh testpmd for each run; reported as medians with min..max.
#
#   bench/layouts.sh [--build DIR] [--rounds N] [--duration S] [--size B] [--keep-logs]
#
#   --build      build tree holding vhostkit-bench (default build)
#   --rounds     rounds (default 3; at least 3 for a claim, see DESIGN.md "How we measure")
#   --duration   seconds measured per run, after a 1 s warm-up (default 5)
#   --size       frame size (default 64)
#
# testpmd on CPU 0, vhostkit-bench (busy polling) on CPU 1. Writes
# bench/results/layouts-<utc>.csv (round,config,ring,in_order,size,mpps,tx,rx,drops,load1: the
# 1-minute load average when the run started, to judge a noisy point by) and prints a table,
# which also goes to docs/performance-layouts.md (bench/report.sh includes it).
# Exits 77 when testpmd is missing, 1 when a run fails or the layout asked for was not
# negotiated (the bench runs with --strict).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VK_SCRIPT_NAME=layouts
source "$root/scripts/lib/dpdk.sh"

build=$root/build rounds=3 duration=5 size=64 keep=0
vk_options layouts.sh build=build rounds=rounds duration=duration size=size keep-logs!keep -- "$@"
for n in rounds duration size; do
  [[ ${!n} =~ ^[0-9]+$ ]] && ((${!n} >= 1)) || { echo "layouts.sh: --$n must be a whole number >= 1" >&2; exit 2; }
done
bench=$build/src/tools/vhostkit-bench/vhostkit-bench
[[ -x $bench ]] || { echo "layouts.sh: $bench not built" >&2; exit 1; }
command -v "$VK_TESTPMD" >/dev/null || { echo "layouts.sh: no $VK_TESTPMD" >&2; exit 77; }
command -v jq >/dev/null || { echo "layouts.sh: no jq" >&2; exit 1; }

VK_KEEP=$keep vk_tmpdir
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$root/bench/results"
out=$root/bench/results/layouts-$stamp.csv
echo "round,config,ring,in_order,size,mpps,tx,rx,drops,load1" >"$out"
say() { echo "[layouts.sh] $*" >&2; }
say "bench $bench, $rounds rounds of ${duration} s at $size B, load $(cut -d' ' -f1-3 /proc/loadavg)"

declare -A ARGS=([split]="--ring=split" [packed]="--ring=packed" [packed+io]="--ring=packed --in-order")
configs=(split packed packed+io)

run() {  # ROUND CONFIG
  local r=$1 c=$2 sock=$VK_TMP/vhost-$1-$2.sock tlog=$VK_TMP/testpmd-$1-$2.log json pmd load
  load=$(cut -d' ' -f1 /proc/loadavg)
  vk_dpdk_start_backend "$sock" 0 "$tlog" --forward-mode=macswap
  pmd=$VK_DPDK_PID
  vk_dpdk_wait_listening "$sock" 60 || { say "testpmd did not listen (see $tlog)"; return 1; }
  # shellcheck disable=SC2086  # ARGS holds several words on purpose
  json=$("$bench" loop --socket-path="$sock" ${ARGS[$c]} --strict --size="$size" \
    --duration="$duration" --warmup=1 --poll=busy --cpu=1 --label="$c" --json \
    2>"$VK_TMP/bench-$r-$c.err") ||
    { say "vhostkit-bench failed ($c): $(tail -1 "$VK_TMP/bench-$r-$c.err")"; vk_dpdk_stop "$pmd"; return 1; }
  vk_dpdk_stop "$pmd"
  jq -r --arg r "$r" --arg c "$c" --arg load "$load" \
    '[$r, $c, .ring, (if .in_order then 1 else 0 end), .results[0].size,
      (.results[0].mpps * 1000 | round / 1000), .results[0].tx, .results[0].rx,
      .results[0].drops, $load] | map(tostring) | join(",")' <<<"$json" >>"$out"
  say "round $r $c: $(tail -1 "$out")"
}

for ((r = 1; r <= rounds; r++)); do
  # Rotate the order each round, so a slow drift of the host favours no configuration.
  for ((k = 0; k < ${#configs[@]}; k++)); do
    run "$r" "${configs[(k + r - 1) % ${#configs[@]}]}" || exit 1
  done
done

summary() {  # the table, in markdown
  awk -F, 'NR > 1 { v[$2] = v[$2] " " $6; if (!($2 in seen)) { seen[$2] = 1; order[++n] = $2 } }
    function stats(list,   a, k, i, j, t) {
      k = split(list, a, " ")
      for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
      MED = (k % 2) ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2; LO = a[1]; HI = a[k]
    }
    END {
      print "| ring | Mpps, median (min..max) | vs split |"
      print "|---|---:|---:|"
      stats(v["split"]); base = MED
      for (i = 1; i <= n; i++) {
        stats(v[order[i]])
        printf "| %s | %.3f (%.3f..%.3f) | %.2f |\n", order[i], MED, LO, HI, (base > 0 ? MED / base : 0)
      }
    }' "$out"
}
summary
# The report's section (bench/report.sh includes it in docs/performance.md).
{
  echo "## Ring layouts on the front-end (vhostkit-bench against testpmd's vhost PMD)"
  echo
  echo "\`bench/layouts.sh\` of $(date -u +%Y-%m-%dT%H:%MZ): vhostkit-bench loop, $size B, busy polling on"
  echo "CPU 1, against testpmd's vhost PMD (macswap) on CPU 0, a fresh testpmd per run, the layouts"
  echo "rotated each round; $rounds rounds of $duration s; one back-end throughout, so the rows compare"
  echo "our driver's layouts. Load average $(awk -F, 'NR > 1 { s += $10; n++ } END { if (n) printf "%.1f", s / n }' "$out") over the runs"
  echo "(\`bench/results/$(basename "$out")\`)."
  echo
  summary
} >"$root/docs/performance-layouts.md"
say "rows in $out"
