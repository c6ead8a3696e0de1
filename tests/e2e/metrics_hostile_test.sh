#!/usr/bin/env bash
# --metrics under hostile HTTP clients (issue #18): while vhostkit-bench drives vhostkit-net's
# loopback, clients send huge headers (thousands of header lines, one line of a megabyte),
# slowloris requests (a header line every 0.3 s, never finished) and open 1500 connections at
# once, for 8 s. The bench still completes and the counters match what it counted exactly; the
# program's fd count and RSS stay bounded while it lasts (the HTTP side has 2 workers, 16 queued
# connections, a deadline and a byte budget per connection); /metrics answers again once they
# stop. No root, no QEMU.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/vhostkit.sh"

vk_find_programs VK_NET_BIN=vhostkit-net VK_BENCH_BIN=vhostkit-bench
vk_require_cmd curl python3
vk_tmpdir

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
scrape() { curl -sf --max-time 5 -o "$1" "http://127.0.0.1:$port/metrics"; }
value() {
  awk -v s="$2" 'substr($0, 1, length(s) + 1) == s " " { print $2; found = 1 } END { exit !found }' "$1"
}
sock=$VK_TMP/net.sock
vk_net_start "$VK_TMP/net.log" -- --loopback --socket-path="$sock" --metrics="127.0.0.1:$port"
vk_net_wait_listening "$sock" 10 || { cat "$VK_TMP/net.log"; vk_fail "vhostkit-net does not listen"; }
pid=$VK_NET_PID
scrape "$VK_TMP/before" || vk_fail "first scrape failed"

"$VK_BENCH_BIN" loop --socket-path="$sock" --size 64 --duration 12 --warmup 0 --json \
  >"$VK_TMP/bench.json" 2>"$VK_TMP/bench.err" &
bench=$!
vk_track_pid "$bench"
connected() { scrape "$VK_TMP/during" && [[ $(value "$VK_TMP/during" vhostkit_net_connected) == 1 ]]; }
vk_wait_for 10 connected || vk_fail "the bench never connected"

cat >"$VK_TMP/hostile.py" <<'PY'
import os, resource, socket, sys, threading, time

host, port, pid, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
stop = time.monotonic() + seconds
lock = threading.Lock()
stats = {"huge_sent_max": 0, "huge_cut": 0, "slow_cut": 0, "flood_opened": 0}

def bump(k, v=1, mx=False):
    with lock:
        stats[k] = max(stats[k], v) if mx else stats[k] + v

def huge(one_line):
    # Keeps sending header bytes until the server cuts the connection or 4 MiB went out.
    while time.monotonic() < stop:
        sent = 0
        try:
            s = socket.create_connection((host, port), timeout=2)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            chunk = b"X-Huge: " + b"a" * 65536 if one_line else b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaa\r\n" * 2048
            while sent < 4 << 20:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            bump("huge_cut")
        bump("huge_sent_max", sent, mx=True)
        try:
            s.close()
        except Exception:
            pass
        time.sleep(0.05)

def slowloris():
    while time.monotonic() < stop:
        try:
            s = socket.create_connection((host, port), timeout=2)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() < stop:
                time.sleep(0.3)
                s.sendall(b"X-a: b\r\n")
        except OSError:
            bump("slow_cut")
        try:
            s.close()
        except Exception:
            pass

def flood(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            continue
        socks.append(s)
    bump("flood_opened", len(socks))
    for s in socks:
        try:
            s.send(b"GET /metr")
        except OSError:
            pass
    while time.monotonic() < stop:
        time.sleep(0.1)
    for s in socks:
        s.close()

def sample():
    fds, rss = 0, 0
    while time.monotonic() < stop:
        try:
            fds = max(fds, len(os.listdir(f"/proc/{pid}/fd")))
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = max(rss, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.05)
    print(f"max_fds {fds} max_rss_kib {rss}")

threads = [threading.Thread(target=huge, args=(i % 2 == 0,)) for i in range(6)]
threads += [threading.Thread(target=slowloris) for _ in range(40)]
threads += [threading.Thread(target=flood, args=(1500,))]
sampler = threading.Thread(target=sample)
for t in threads + [sampler]:
    t.start()
for t in threads + [sampler]:
    t.join()
print(" ".join(f"{k} {v}" for k, v in stats.items()))
PY

fd0=$(vk_net_fd_count "$pid")
rss0=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
vk_check "8 s of huge headers, slowloris and 1500 connections at once, the bench running"
python3 "$VK_TMP/hostile.py" 127.0.0.1 "$port" "$pid" 8 >"$VK_TMP/hostile.out" 2>"$VK_TMP/hostile.err" ||
  vk_fail "the hostile client failed: $(tail -5 "$VK_TMP/hostile.err")"
read -r _ maxfd _ maxrss < <(head -1 "$VK_TMP/hostile.out")
summary=$(tail -1 "$VK_TMP/hostile.out")
vk_pass "fds $fd0 -> max $maxfd, RSS $rss0 -> max $maxrss KiB; $summary"

vk_check "the program stayed bounded: fds +40 at most, RSS +32 MiB at most"
((maxfd - fd0 <= 40)) || vk_fail "fds grew from $fd0 to $maxfd"
((maxrss - rss0 <= 32768)) || vk_fail "RSS grew from $rss0 to $maxrss KiB"
# What a huge-header client gets out before the cut is mostly the kernel's socket buffers (MiBs
# on loopback), not ours: RSS is the measure of what it cost the program.
vk_pass "fds +$((maxfd - fd0)), RSS +$((maxrss - rss0)) KiB"

vk_check "/metrics answers again once the clients stop"
vk_wait_for 10 scrape "$VK_TMP/again" || vk_fail "/metrics does not answer"
vk_pass "$(grep -vc '^#' "$VK_TMP/again") samples"

vk_check "the bench completed through it and the counters match it exactly"
wait "$bench" || { cat "$VK_TMP/bench.err"; vk_fail "vhostkit-bench failed"; }
read -r btx brx < <(python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).read().splitlines()[-1])["results"][0]; print(r["tx"], r["rx"])' "$VK_TMP/bench.json") ||
  vk_fail "no JSON from the bench"
idle() { scrape "$VK_TMP/after" && [[ $(value "$VK_TMP/after" vhostkit_net_connected) == 0 ]]; }
vk_wait_for 10 idle || vk_fail "still connected after the bench exited"
d() { echo $(($(value "$VK_TMP/after" "$1") - $(value "$VK_TMP/before" "$1"))); }
tx=$(d 'vhostkit_net_tx_frames_total{queue="1"}')
drops=$(d 'vhostkit_net_tx_drops_total{queue="1"}')
rx=$(d 'vhostkit_net_rx_frames_total{queue="0"}')
((brx > 0)) || vk_fail "the bench got nothing back"
((tx + drops == btx)) || vk_fail "tx $tx + drops $drops != bench tx $btx"
((rx == brx)) || vk_fail "rx $rx != bench rx $brx"
vk_pass "bench tx $btx rx $brx"
vk_net_stop "$pid" || vk_fail "vhostkit-net exit $?"
