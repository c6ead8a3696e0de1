#!/usr/bin/env bash
# A/B of two build trees on this host: the same measurements run on each, interleaved
# (A B A B ...), reported as medians with min..max and the ratio B/A.
#
#   bench/ab.sh --a DIR --b DIR [--rounds N] [--duration S] [--size B] [--what LIST] [--keep-logs]
#
#   --a, --b     build trees (Release) holding the programs below; A is the reference
#   --rounds     rounds per side (default 3; at least 3 for a claim, see DESIGN.md "How we measure")
#   --duration   seconds measured per c4 point, after a 1 s warm-up (default 5)
#   --size       frame size for c4 (default 64)
#   --what       comma list of: ring (bench/ring_bench, every benchmark), c4 (each tree's
#                vhostkit-bench loop <-> its vhostkit-net --loopback --poll=busy), tpmd and
#                tpmd-pio (testpmd virtio-user, io fwd --tx-first, with its defaults or asking for
#                packed_vq=1,in_order=1, against each tree's vhostkit-net); default ring,c4
#
# Writes bench/results/ab-<utc>.csv (one row per measurement) and prints a table. Runs as any
# user (tpmd: root, testpmd without hugepages); the two trees must be built first (ninja
# ring_bench vhostkit-net vhostkit-bench).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VK_SCRIPT_NAME=ab
source "$root/scripts/lib/vhostkit.sh"
source "$root/scripts/lib/dpdk.sh"

a="" b="" rounds=3 duration=5 size=64 what=ring,c4 keep=0
vk_options ab.sh a=a b=b rounds=rounds duration=duration size=size what=what keep-logs!keep -- "$@"
[[ -n $a && -n $b ]] || { echo "ab.sh: --a DIR and --b DIR are required (see --help)" >&2; exit 2; }
for n in rounds duration size; do
  [[ ${!n} =~ ^[0-9]+$ ]] && ((${!n} >= 1)) || { echo "ab.sh: --$n must be a whole number >= 1" >&2; exit 2; }
done
want() { [[ ,$what, == *,$1,* ]]; }
for w in ${what//,/ }; do
  [[ $w =~ ^(ring|c4|tpmd|tpmd-pio)$ ]] || { echo "ab.sh: --what takes ring, c4, tpmd, tpmd-pio; not $w" >&2; exit 2; }
done
if want tpmd || want tpmd-pio; then
  command -v "$VK_TESTPMD" >/dev/null || { echo "ab.sh: no $VK_TESTPMD (dpdk-dev) for tpmd" >&2; exit 77; }
  ((duration >= 3)) || { echo "ab.sh: tpmd needs --duration of at least 3 s (testpmd's rate samples)" >&2; exit 2; }
fi
declare -A DIR=([A]=$(cd "$a" && pwd) [B]=$(cd "$b" && pwd))
for s in A B; do
  d=${DIR[$s]}
  if want ring; then
    [[ -x $d/bench/ring_bench ]] || { echo "ab.sh: $d/bench/ring_bench not built" >&2; exit 1; }
  fi
  if want c4 || want tpmd || want tpmd-pio; then
    for p in vhostkit-net vhostkit-bench; do
      [[ -x $d/src/tools/$p/$p ]] || { echo "ab.sh: $d/src/tools/$p/$p not built" >&2; exit 1; }
    done
  fi
done

VK_KEEP=$keep vk_tmpdir
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$root/bench/results"
out=$root/bench/results/ab-$stamp.csv
echo "side,round,what,value,unit" >"$out"
say() { echo "[ab.sh] $*" >&2; }
say "A=${DIR[A]} B=${DIR[B]}, $rounds rounds, load $(cut -d' ' -f1-3 /proc/loadavg)"

ring_round() {  # SIDE ROUND
  local d=${DIR[$1]} csv=$VK_TMP/ring-$1-$2.csv
  "$d/bench/ring_bench" --benchmark_format=csv --benchmark_min_time=0.5 >"$csv" 2>/dev/null ||
    { say "ring_bench failed in $d"; return 1; }
  # items_per_second, in millions; one row per benchmark. "<Split>" is dropped from the names: a
  # tree from before the packed ring names its split benchmarks without it, and they compare.
  awk -F, -v s="$1" -v r="$2" 'NR > 1 && $7 != "" {
    gsub(/"/, "", $1); sub(/<Split>/, "", $1); printf "%s,%s,ring %s,%.3f,M items/s\n", s, r, $1, $7 / 1e6 }' "$csv" >>"$out"
}

c4_round() {  # SIDE ROUND: vhostkit-bench loop against vhostkit-net --loopback, busy, cores 0/1
  local d=${DIR[$1]} sock=$VK_TMP/c4-$1-$2.sock log=$VK_TMP/c4-$1-$2.log mpps
  rm -f "$sock"
  VK_NET_BIN=$d/src/tools/vhostkit-net/vhostkit-net vk_net_start "$log" -- \
    --socket-path="$sock" --loopback --poll=busy --cpu=1
  vk_net_wait_listening "$sock" 30 "$log" || { say "vhostkit-net did not listen (see $log)"; return 1; }
  "$d/src/tools/vhostkit-bench/vhostkit-bench" loop --socket-path="$sock" --size="$size" \
    --duration="$duration" --warmup=1 --poll=busy --cpu=0 --label="$1" \
    --csv="$VK_TMP/c4-$1-$2.csv" >"$VK_TMP/c4-$1-$2.out" 2>&1 ||
    { say "vhostkit-bench failed: $(tail -1 "$VK_TMP/c4-$1-$2.out")"; vk_net_stop "$VK_NET_PID"; return 1; }
  vk_net_stop "$VK_NET_PID" >/dev/null || true
  mpps=$(awk -F, 'NR == 2 { print $10 }' "$VK_TMP/c4-$1-$2.csv")
  echo "$1,$2,c4 ${size} B,$mpps,Mpps" >>"$out"
}

tpmd_round() {  # SIDE ROUND KIND: testpmd virtio-user against vhostkit-net --loopback, busy
  local d=${DIR[$1]} kind=$3 tag=$3-$1-$2 extra="" pps
  local sock=$VK_TMP/$tag.sock log=$VK_TMP/$tag.log
  [[ $kind == tpmd-pio ]] && extra=",packed_vq=1,in_order=1"
  rm -f "$sock"
  VK_NET_BIN=$d/src/tools/vhostkit-net/vhostkit-net vk_net_start "$log" -- \
    --socket-path="$sock" --loopback --poll=busy --cpu=1
  vk_net_wait_listening "$sock" 30 "$log" || { say "vhostkit-net did not listen (see $log)"; return 1; }
  pps=$(vk_dpdk_frontend_pps "$sock" 0 "$VK_TMP/$tag-testpmd.log" "$size" 1 "$duration" "$extra") ||
    { say "testpmd failed (see $VK_TMP/$tag-testpmd.log)"; vk_net_stop "$VK_NET_PID"; return 1; }
  vk_net_stop "$VK_NET_PID" >/dev/null || true
  awk -v s="$1" -v r="$2" -v k="$kind" -v z="$size" -v p="$pps" \
    'BEGIN { printf "%s,%s,%s %s B,%.4f,Mpps\n", s, r, k, z, p / 1e6 }' >>"$out"
}

for ((r = 1; r <= rounds; r++)); do
  for s in A B; do
    # Alternate which side goes first, so a slow drift of the host favours neither.
    [[ $((r % 2)) -eq 0 ]] && s=$([[ $s == A ]] && echo B || echo A)
    say "round $r/$rounds: $s"
    if want ring; then ring_round "$s" "$r"; fi
    if want c4; then c4_round "$s" "$r"; fi
    for k in tpmd tpmd-pio; do
      if want $k; then tpmd_round "$s" "$r" $k; fi
    done
  done
done

# Medians with min..max per side and measurement, and B/A of the medians.
awk -F, 'NR > 1 { key = $3; v[key, $1] = v[key, $1] " " $4; u[key] = $5; if (!(key in seen)) { seen[key] = 1; order[++n] = key } }
  function stats(list,   a, k, i, j, t, m) {
    k = split(list, a, " ")
    if (k == 0) { MED = 0; LO = 0; HI = 0; return 0 }
    for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    m = (k % 2) ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
    MED = m; LO = a[1]; HI = a[k]
    return 1
  }
  END {
    printf "%-34s %-26s %-26s %s\n", "measurement", "A median (min..max)", "B median (min..max)", "B/A"
    for (i = 1; i <= n; i++) {
      key = order[i]
      # A measurement only one tree has (a benchmark added since) shows "-" on the other side.
      ha = stats(v[key, "A"]); ma = MED; sa = ha ? sprintf("%.3f (%.3f..%.3f)", MED, LO, HI) : "-"
      hb = stats(v[key, "B"]); mb = MED; sb = hb ? sprintf("%.3f (%.3f..%.3f)", MED, LO, HI) : "-"
      printf "%-34s %-26s %-26s %s\n", key " [" u[key] "]", sa, sb, (ha && hb && ma > 0 ? sprintf("%.3f", mb / ma) : "-")
    }
  }' "$out"
say "rows in $out"
