#!/usr/bin/env bash
# --metrics end to end (issue #18): vhostkit-net --loopback and vhostkit-blk serve Prometheus text
# at /metrics and JSON at /stats; vhostkit-bench drives traffic, and the counters scraped before
# and after move by exactly what the bench counted (net: every frame it sent is forwarded or
# dropped on the transmitq, every frame it got back is on the receiveq; blk: every request it
# completed, and its bytes). During traffic the gauges show the front-end connected, its rings
# started with their sizes and the features it acked, and with a front-end that sleeps on its
# call eventfds, kicks and calls counted on the rings. Other paths answer 404, other methods
# 405; a second program on the same port exits 2 with one line. No root, no QEMU.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/vhostkit.sh"

vk_find_programs VK_NET_BIN=vhostkit-net VK_BLK_BIN=vhostkit-blk VK_BENCH_BIN=vhostkit-bench
vk_require_cmd curl python3
vk_tmpdir

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# scrape PORT FILE: /metrics into FILE (headers into FILE.h); fails on anything but 200.
scrape() {
  curl -sf --max-time 5 -D "$2.h" -o "$2" "http://127.0.0.1:$1/metrics"
}
# value FILE SAMPLE: the value of the sample line that starts with SAMPLE and a space.
value() {
  awk -v s="$2" 'substr($0, 1, length(s) + 1) == s " " { print $2; found = 1 } END { exit !found }' "$1"
}
want_eq() {
  [[ $2 == "$3" ]] || vk_fail "$1: $2, want $3"
}

# ---------------------------------------------------------------- net
port=$(free_port)
sock=$VK_TMP/net.sock
vk_net_start "$VK_TMP/net.log" -- --loopback --socket-path="$sock" --metrics="127.0.0.1:$port"
vk_net_wait_listening "$sock" 10 || { cat "$VK_TMP/net.log"; vk_fail "vhostkit-net does not listen"; }

vk_check "before traffic: /metrics is Prometheus text 0.0.4 with HELP and TYPE, nothing connected"
scrape "$port" "$VK_TMP/before" || vk_fail "scrape failed"
grep -qi '^Content-Type: text/plain; version=0.0.4' "$VK_TMP/before.h" ||
  vk_fail "content type: $(grep -i content-type "$VK_TMP/before.h")"
grep -q '^# TYPE vhostkit_net_tx_frames_total counter$' "$VK_TMP/before" || vk_fail "no TYPE line"
grep -q '^# HELP vhostkit_net_tx_frames_total ' "$VK_TMP/before" || vk_fail "no HELP line"
want_eq connected "$(value "$VK_TMP/before" vhostkit_net_connected)" 0
vk_pass "$(grep -vc '^#' "$VK_TMP/before") samples"

vk_check "during traffic: connected, rings started with their sizes, features acked"
"$VK_BENCH_BIN" loop --socket-path="$sock" --size 64 --duration 2 --warmup 0 --json \
  >"$VK_TMP/bench.json" 2>"$VK_TMP/bench.err" &
bench=$!
vk_track_pid "$bench"
connected() { scrape "$port" "$VK_TMP/during" && [[ $(value "$VK_TMP/during" vhostkit_net_connected) == 1 ]] &&
  (($(value "$VK_TMP/during" vhostkit_net_queues_started) >= 2)); }
vk_wait_for 10 connected || vk_fail "never connected with two rings started: $(grep -v '^#' "$VK_TMP/during" | head -20)"
for q in 0 1; do
  size=$(value "$VK_TMP/during" "vhostkit_net_ring_size{queue=\"$q\"}")
  ((size > 0)) || vk_fail "ring_size of queue $q is $size"
  want_eq "queue_started $q" "$(value "$VK_TMP/during" "vhostkit_net_queue_started{queue=\"$q\"}")" 1
done
want_eq "VERSION_1 acked" "$(value "$VK_TMP/during" 'vhostkit_net_feature_acked{bit="32"}')" 1
want_eq sessions "$(value "$VK_TMP/during" vhostkit_net_sessions_total)" 1
vk_pass "ring sizes $(value "$VK_TMP/during" 'vhostkit_net_ring_size{queue="0"}')/$(value "$VK_TMP/during" 'vhostkit_net_ring_size{queue="1"}')"

wait "$bench" || { cat "$VK_TMP/bench.err"; vk_fail "vhostkit-bench failed"; }
read -r btx brx < <(python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).read().splitlines()[-1])["results"][0]; print(r["tx"], r["rx"])' "$VK_TMP/bench.json") ||
  vk_fail "no JSON from the bench: $(cat "$VK_TMP/bench.json")"
vk_check "after traffic: the counters moved by what the bench counted (tx $btx, rx $brx)"
idle() { scrape "$port" "$VK_TMP/after" && [[ $(value "$VK_TMP/after" vhostkit_net_connected) == 0 ]]; }
vk_wait_for 10 idle || vk_fail "still connected after the bench exited"
d() { echo $(($(value "$VK_TMP/after" "$1") - $(value "$VK_TMP/before" "$1"))); }
tx=$(d 'vhostkit_net_tx_frames_total{queue="1"}')
drops=$(d 'vhostkit_net_tx_drops_total{queue="1"}')
rx=$(d 'vhostkit_net_rx_frames_total{queue="0"}')
((brx > 0)) || vk_fail "the bench got nothing back"
want_eq "tx frames + drops" $((tx + drops)) "$btx"
want_eq "rx frames" "$rx" "$brx"
want_eq "tx bytes" "$(d 'vhostkit_net_tx_bytes_total{queue="1"}')" $((tx * 64))
want_eq "rx bytes" "$(d 'vhostkit_net_rx_bytes_total{queue="0"}')" $((rx * 64))
want_eq "tx errors" "$(d 'vhostkit_net_tx_errors_total{queue="1"}')" 0
vk_pass "tx $tx + drops $drops = $btx, rx $rx"

vk_check "/stats is the same as JSON"
curl -sf --max-time 5 -o "$VK_TMP/stats.json" "http://127.0.0.1:$port/stats" || vk_fail "/stats failed"
js=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); f=j["vhostkit_net_rx_frames_total"]; assert f["type"] == "counter"; print([s["value"] for s in f["samples"] if s["labels"] == {"queue": "0"}][0])' "$VK_TMP/stats.json") ||
  vk_fail "bad JSON: $(head -c 300 "$VK_TMP/stats.json")"
want_eq "rx frames in /stats" "$js" "$(value "$VK_TMP/after" 'vhostkit_net_rx_frames_total{queue="0"}')"
vk_pass "rx_frames $js"

vk_check "any other path is 404, any other method 405"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/")
want_eq "GET /" "$code" 404
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/metricsx")
want_eq "GET /metricsx" "$code" 404
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -d x "http://127.0.0.1:$port/metrics")
want_eq "POST /metrics" "$code" 405
vk_pass "404, 404, 405"

vk_check "a front-end that sleeps on its call eventfds: kicks and calls counted per ring"
"$VK_BENCH_BIN" loop --socket-path="$sock" --poll=event --size 64 --duration 3 --warmup 0 --json \
  >"$VK_TMP/bench-event.json" 2>"$VK_TMP/bench-event.err" &
bench=$!
vk_track_pid "$bench"
notified() { scrape "$port" "$VK_TMP/event" &&
  (($(value "$VK_TMP/event" 'vhostkit_net_kicks_total{queue="1"}') > 0)) &&
  (($(value "$VK_TMP/event" 'vhostkit_net_calls_total{queue="0"}') > 0)); }
vk_wait_for 10 notified || vk_fail "no kicks on the transmitq or calls on the receiveq: $(grep -E '^vhostkit_net_(kicks|calls)' "$VK_TMP/event")"
wait "$bench" || { cat "$VK_TMP/bench-event.err"; vk_fail "vhostkit-bench --poll=event failed"; }
vk_pass "kicks $(value "$VK_TMP/event" 'vhostkit_net_kicks_total{queue="1"}'), calls $(value "$VK_TMP/event" 'vhostkit_net_calls_total{queue="0"}') at one scrape"

vk_check "a second program on the same port: exit 2, one line naming it"
"$VK_NET_BIN" --loopback --socket-path="$VK_TMP/other.sock" --metrics="127.0.0.1:$port" \
  </dev/null >"$VK_TMP/out2" 2>"$VK_TMP/err2"
rc=$?
want_eq "exit" "$rc" 2
want_eq "stderr lines" "$(wc -l <"$VK_TMP/err2")" 1
grep -q "Address already in use" "$VK_TMP/err2" || vk_fail "stderr: $(cat "$VK_TMP/err2")"
[[ ! -e $VK_TMP/other.sock ]] || vk_fail "socket left behind"
vk_pass "$(cat "$VK_TMP/err2")"

vk_net_stop "$VK_NET_PID" || vk_fail "vhostkit-net exit $?"

# ---------------------------------------------------------------- blk
port=$(free_port)
bsock=$VK_TMP/blk.sock
truncate -s 64M "$VK_TMP/disk.img"
"$VK_BLK_BIN" --image="$VK_TMP/disk.img" --socket-path="$bsock" --metrics="127.0.0.1:$port" \
  </dev/null >"$VK_TMP/blk.log" 2>&1 &
blk=$!
vk_track_pid "$blk"
vk_net_wait_listening "$bsock" 10 "$VK_TMP/blk.log" || { cat "$VK_TMP/blk.log"; vk_fail "vhostkit-blk does not listen"; }
scrape "$port" "$VK_TMP/b0" || vk_fail "blk scrape failed"

# blk_run RW: one bench run; prints "total bs" (requests it completed, bytes each).
blk_run() {
  "$VK_BENCH_BIN" blk --socket-path="$bsock" --rw "$1" --duration 1 --warmup 0 --json \
    >"$VK_TMP/blk-$1.json" 2>"$VK_TMP/blk-$1.err" || { cat "$VK_TMP/blk-$1.err"; vk_fail "bench blk $1 failed"; }
  python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).read().splitlines()[-1])["results"][0]; assert r["errors"] == 0; print(r["total"], r["bs"])' "$VK_TMP/blk-$1.json"
}
bidle() { scrape "$port" "$1" && [[ $(value "$1" vhostkit_blk_connected) == 0 ]]; }
for rw in randwrite randread; do
  vk_check "blk $rw: the counters moved by what the bench completed"
  read -r total bs < <(blk_run "$rw") || vk_fail "no blk JSON"
  vk_wait_for 10 bidle "$VK_TMP/b1" || vk_fail "still connected after the bench exited"
  db() { echo $(($(value "$VK_TMP/b1" "$1") - $(value "$VK_TMP/b0" "$1"))); }
  if [[ $rw == randwrite ]]; then
    want_eq writes "$(db 'vhostkit_blk_writes_total{queue="0"}')" "$total"
    want_eq "written bytes" "$(db 'vhostkit_blk_written_bytes_total{queue="0"}')" $((total * bs))
    want_eq reads "$(db 'vhostkit_blk_reads_total{queue="0"}')" 0
  else
    want_eq reads "$(db 'vhostkit_blk_reads_total{queue="0"}')" "$total"
    want_eq "read bytes" "$(db 'vhostkit_blk_read_bytes_total{queue="0"}')" $((total * bs))
    want_eq writes "$(db 'vhostkit_blk_writes_total{queue="0"}')" 0
  fi
  want_eq "io errors" "$(db 'vhostkit_blk_io_errors_total{queue="0"}')" 0
  ((total > 0)) || vk_fail "the bench completed nothing"
  vk_pass "$total requests of $bs bytes"
  cp "$VK_TMP/b1" "$VK_TMP/b0"
done
want_eq "blk sessions" "$(value "$VK_TMP/b0" vhostkit_blk_sessions_total)" 2
vk_net_stop "$blk" || vk_fail "vhostkit-blk exit $?"
