#!/usr/bin/env bash
# vhostkit-blk's command line, as QEMU's backend conventions and DESIGN.md promise: every bad
# argument (or an image or socket path that can't be used) exits 2 with exactly one line on
# stderr and leaves no socket behind; --print-capabilities prints JSON with "type": "blk";
# --help exits 0. Then vhostkit-bench's blk mode: its bad arguments exit 2 with one line, and a
# 2-second run against vhostkit-blk completes with 0 errors and IOPS > 0; vhostkit-blk exits 0
# on SIGTERM.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/vhostkit.sh"

t_start=$(vk_now)
vk_require_cmd python3 truncate
# The vk_net_* helpers start whatever VK_NET_BIN is: here vhostkit-blk.
vk_find_programs VK_NET_BIN=vhostkit-blk BENCH=vhostkit-bench
vk_tmpdir
sock=$VK_TMP/blk.sock
# The image the bench writes to lives in tmpfs: on a busy build host, O_DIRECT writes to the disk
# under /tmp can stall for most of a second.
shm=$(mktemp -d /dev/shm/vk-blk-cli.XXXXXX)
vk_on_exit "rm -rf '$shm'"
img=$shm/disk.img
truncate -s 16M "$img"
truncate -s 1000 "$VK_TMP/odd.img"   # not a whole number of sectors
: >"$VK_TMP/empty.img"
: >"$VK_TMP/regular-file"

# expect_exit2 WHAT BIN ARGS...: exit 2, exactly one stderr line, no socket left.
expect_exit2() {
  local what=$1 bin=$2; shift 2
  vk_check "bad arguments: $what -> exit 2, one line on stderr"
  local rc lines
  (cd "$VK_TMP" && exec timeout 10 "$bin" "$@" 5<"$VK_TMP/regular-file" </dev/null \
     >"$VK_TMP/out" 2>"$VK_TMP/err")
  rc=$?
  lines=$(wc -l <"$VK_TMP/err")
  ((rc == 2)) || { cat "$VK_TMP/out" "$VK_TMP/err"; vk_fail "$what: exit $rc, want 2"; }
  ((lines == 1)) || { cat "$VK_TMP/err"; vk_fail "$what: $lines lines on stderr, want 1"; }
  [[ ! -e $sock ]] || vk_fail "$what: socket $sock left behind"
  vk_pass "$what: $(cat "$VK_TMP/err")"
}
bad_blk() { local what=$1; shift; expect_exit2 "vhostkit-blk $what" "$VK_NET_BIN" "$@"; }

bad_blk "unknown option" --socket-path="$sock" --image="$img" --no-such-option
bad_blk "missing --image" --socket-path="$sock"
bad_blk "nonexistent image" --socket-path="$sock" --image="$VK_TMP/no-such.img"
bad_blk "image is a directory" --socket-path="$sock" --image="$VK_TMP"
bad_blk "empty image" --socket-path="$sock" --image="$VK_TMP/empty.img"
bad_blk "image not a whole number of sectors" --socket-path="$sock" --image="$VK_TMP/odd.img"
bad_blk "neither --socket-path nor --fd" --image="$img"
bad_blk "--socket-path and --fd together" --socket-path="$sock" --fd=5 --image="$img"
bad_blk "--fd not a socket (a regular file)" --fd=5 --image="$img"
bad_blk "--socket-path in a missing directory" --socket-path="$VK_TMP/missing/dir/x.sock" --image="$img"
bad_blk "--queues=0" --socket-path="$sock" --image="$img" --queues=0
bad_blk "--queues=65" --socket-path="$sock" --image="$img" --queues=65
bad_blk "--queues=abc" --socket-path="$sock" --image="$img" --queues=abc
bad_blk "--blk-size=1000" --socket-path="$sock" --image="$img" --blk-size=1000
bad_blk "--poll=foo" --socket-path="$sock" --image="$img" --poll=foo
bad_blk "--io=aio" --socket-path="$sock" --image="$img" --io=aio
bad_blk "--latency-us=10000001 (over 10 s)" --socket-path="$sock" --image="$img" --latency-us=10000001
bad_blk "--latency-us with --io=inline" --socket-path="$sock" --image="$img" --io=inline --latency-us=100
bad_blk "--stats=-1" --socket-path="$sock" --image="$img" --stats=-1
bad_blk "--cpu=x" --socket-path="$sock" --image="$img" --cpu=x
bad_blk "--metrics without a port" --socket-path="$sock" --image="$img" --metrics=127.0.0.1
bad_blk "--metrics=[::1]:99999" --socket-path="$sock" --image="$img" --metrics=[::1]:99999
bad_blk "--metrics on an address not local" --socket-path="$sock" --image="$img" \
  --metrics=192.0.2.77:9100

vk_check "vhostkit-blk --print-capabilities prints valid JSON with type blk and exits 0"
out=$("$VK_NET_BIN" --print-capabilities 2>"$VK_TMP/err"); rc=$?
((rc == 0)) || vk_fail "exit $rc"
[[ ! -s $VK_TMP/err ]] || vk_fail "stderr not empty: $(cat "$VK_TMP/err")"
python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d.get("type") == "blk" else 1)' "$out" ||
  vk_fail "not JSON with type blk: $out"
vk_pass "$out"

vk_check "vhostkit-blk --help exits 0 and names the options"
out=$("$VK_NET_BIN" --help 2>&1); rc=$?
((rc == 0)) || vk_fail "exit $rc"
for opt in --socket-path --fd --print-capabilities --image --read-only --queues --poll --cpu --stats \
           --no-packed --no-in-order --metrics --io --latency-us; do
  grep -q -- "$opt" <<<"$out" || vk_fail "--help does not mention $opt"
done
vk_pass "$(wc -l <<<"$out") lines of help"

# vhostkit-bench's blk-mode arguments are checked before it connects: no back-end needed.
bad_bench() { local what=$1; shift; expect_exit2 "vhostkit-bench $what" "$BENCH" "$@"; }
bad_bench "blk --rw=read" blk --socket-path="$sock" --rw=read
bad_bench "blk --bs=1000 (not whole sectors)" blk --socket-path="$sock" --bs=1000
bad_bench "blk --bs=0" blk --socket-path="$sock" --bs=0
bad_bench "blk --iodepth=0" blk --socket-path="$sock" --iodepth=0
bad_bench "blk with a net option (--size)" blk --socket-path="$sock" --size=64
bad_bench "blk with a net option (--burst)" blk --socket-path="$sock" --burst=8
bad_bench "loop with a blk option (--iodepth)" loop --socket-path="$sock" --iodepth=4
bad_bench "txonly with a blk option (--rw)" txonly --socket-path="$sock" --rw=randread
bad_bench "blk --queue-size too small for --iodepth" blk --socket-path="$sock" --iodepth=32 --queue-size=64
bad_bench "blk without --socket-path" blk

vk_check "vhostkit-bench blk (2 s, randwrite then randread) against vhostkit-blk: 0 errors, IOPS > 0"
log=$VK_TMP/vhostkit-blk.log
vk_net_start "$log" -- --socket-path="$sock" --image="$img"
vk_net_wait_listening "$sock" 10 || { cat "$log"; vk_fail "vhostkit-blk did not listen"; }
for rw in randwrite randread; do
  timeout 30 "$BENCH" blk --socket-path="$sock" --rw="$rw" --iodepth=8 --duration=2 --warmup=0.5 \
    --poll=event >"$VK_TMP/bench.out" 2>"$VK_TMP/bench.err"
  rc=$?
  ((rc == 0)) || { cat "$VK_TMP/bench.err" "$log"; vk_fail "$rw: vhostkit-bench exit $rc"; }
  json=$(tail -1 "$VK_TMP/bench.out")
  python3 - "$json" <<'PY' || { cat "$VK_TMP/bench.out" "$VK_TMP/bench.err"; vk_fail "$rw: bad result"; }
import json, sys
r = json.loads(sys.argv[1])["results"][0]
ok = r["mode"] == "blk" and r["errors"] == 0 and r["iops"] > 0 and r["samples"] > 0
print(f"  {r['rw']}: {r['iops']:.0f} IOPS, p50 {r['p50_us']:.1f} us, errors {r['errors']}")
sys.exit(0 if ok else 1)
PY
  grep -q "IOPS" "$VK_TMP/bench.err" || vk_fail "$rw: no live line on stderr"
  grep -q "p99.9 us" "$VK_TMP/bench.out" || vk_fail "$rw: no summary table on stdout"
done
vk_pass "both runs: errors 0, IOPS > 0, live lines, table and JSON"

vk_check "vhostkit-blk exits 0 on SIGTERM and removes its socket"
vk_net_stop "$VK_NET_PID"; rc=$?
((rc == 0)) || { cat "$log"; vk_fail "exit $rc after SIGTERM"; }
[[ ! -e $sock ]] || vk_fail "socket left behind"
vk_pass "exit 0, socket gone"

echo "blk_cli_test: all checks passed in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"
