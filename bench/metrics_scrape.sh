#!/usr/bin/env bash
# What a Prometheus scrape costs the data path (issue #18): vhostkit-bench loop against
# vhostkit-net --loopback --metrics in three configurations, interleaved: none (no scraper),
# scrape10 (a scraper fetching vhostkit-net's /metrics 10 times a second, a new connection each
# time, as Prometheus does at its interval) and other10 (the same scraper fetching the same text
# from another process: what the scraping client alone costs on this host). The back-end and
# the front-end are the same in every configuration; only the scraper differs.
#
#   bench/metrics_scrape.sh [--build DIR] [--rounds N] [--duration S] [--size B]
#
#   --build      build tree holding vhostkit-net and vhostkit-bench (default build)
#   --rounds     rounds (default 5; at least 3 for a claim, see DESIGN.md "How we measure")
#   --duration   seconds measured per run, after a 1 s warm-up (default 5)
#   --size       frame size (default 64)
#
# vhostkit-net (busy polling) on CPU 1, vhostkit-bench (busy polling) on CPU 0, the scraper
# unpinned: on a 2-core machine it competes with both, which is the point. A fresh vhostkit-net
# per run. Writes bench/results/metrics-scrape-<utc>.csv (round,config,size,mpps,tx,rx,drops,
# scrapes,load1) and prints medians with min..max.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VK_SCRIPT_NAME=metrics_scrape
source "$root/scripts/lib/vhostkit.sh"

build=$root/build rounds=5 duration=5 size=64
vk_options metrics_scrape.sh build=build rounds=rounds duration=duration size=size -- "$@"
for n in rounds duration size; do
  [[ ${!n} =~ ^[0-9]+$ ]] && ((${!n} >= 1)) ||
    { echo "metrics_scrape.sh: --$n must be a whole number >= 1" >&2; exit 2; }
done
VHOSTKIT_BUILD_DIR=$build vk_find_programs VK_NET_BIN=vhostkit-net VK_BENCH_BIN=vhostkit-bench
vk_tmpdir
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$root/bench/results"
out=$root/bench/results/metrics-scrape-$stamp.csv
echo "round,config,size,mpps,tx,rx,drops,scrapes,load1" >"$out"
say() { echo "[metrics_scrape.sh] $*" >&2; }
say "$rounds rounds of ${duration} s at $size B, load $(cut -d' ' -f1-3 /proc/loadavg)"

# The scraper: GET /metrics every 0.1 s until killed; prints how many answered 200 on exit.
cat >"$VK_TMP/scraper.py" <<'PY'
import signal, sys, time, urllib.request
url, n = sys.argv[1], 0
def done(*_):
    print(n)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
next_t = time.monotonic()
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200 and r.read():
                n += 1
    except OSError:
        pass
    next_t += 0.1
    time.sleep(max(0.0, next_t - time.monotonic()))
PY

run() {  # ROUND CONFIG
  local round=$1 config=$2 port sock log scraper="" scrapes=0 load
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  sock=$VK_TMP/net-$round-$config.sock log=$VK_TMP/net-$round-$config.log
  vk_net_start "$log" -- --loopback --poll=busy --cpu=1 --socket-path="$sock" --metrics="127.0.0.1:$port"
  vk_net_wait_listening "$sock" 10 || { cat "$log"; say "vhostkit-net does not listen"; exit 1; }
  case $config in
    scrape10) python3 "$VK_TMP/scraper.py" "http://127.0.0.1:$port/metrics" >"$VK_TMP/scrapes" & scraper=$! ;;
    other10) python3 "$VK_TMP/scraper.py" "http://127.0.0.1:$other_port/metrics" >"$VK_TMP/scrapes" & scraper=$! ;;
  esac
  load=$(cut -d' ' -f1 /proc/loadavg)
  "$VK_BENCH_BIN" loop --socket-path="$sock" --poll=busy --cpu=0 --size "$size" --warmup 1 \
    --duration "$duration" --json >"$VK_TMP/bench.json" 2>"$VK_TMP/bench.err" ||
    { cat "$VK_TMP/bench.err"; say "vhostkit-bench failed"; exit 1; }
  if [[ -n $scraper ]]; then
    kill -TERM "$scraper"
    wait "$scraper"
    scrapes=$(cat "$VK_TMP/scrapes")
  fi
  vk_net_stop "$VK_NET_PID" || { say "vhostkit-net exit $?"; exit 1; }
  python3 - "$VK_TMP/bench.json" "$round" "$config" "$size" "$scrapes" "$load" >>"$out" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])["results"][0]
_, _, rnd, cfg, size, scrapes, load = sys.argv
print(f'{rnd},{cfg},{size},{r["mpps"]:.3f},{r["tx"]},{r["rx"]},{r["drops"]},{scrapes},{load}')
PY
  tail -1 "$out" >&2
}

# The control: the same scraper fetching a copy of the text from another process (python's
# http.server), so that "other10" costs the data path what the scraping client costs and
# "scrape10" adds what serving it inside vhostkit-net costs.
mkdir -p "$VK_TMP/www"
vk_net_start "$VK_TMP/net-text.log" -- --loopback --socket-path="$VK_TMP/text.sock" \
  --metrics=127.0.0.1:$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
vk_net_wait_listening "$VK_TMP/text.sock" 10 || { say "vhostkit-net does not listen"; exit 1; }
curl -sf "http://$(grep -o '127.0.0.1:[0-9]*' "$VK_TMP/net-text.log.cmd")/metrics" -o "$VK_TMP/www/metrics" ||
  { say "no metrics text for the control"; exit 1; }
vk_net_stop "$VK_NET_PID" >/dev/null
other_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server --bind 127.0.0.1 --directory "$VK_TMP/www" "$other_port" >/dev/null 2>&1 &
vk_track_pid $!
vk_wait_for 10 curl -sf -o /dev/null "http://127.0.0.1:$other_port/metrics" || { say "no control server"; exit 1; }

configs=(none other10 scrape10)
for ((round = 1; round <= rounds; round++)); do
  # Rotate which configuration goes first, so that a drift in the host's load favours none.
  for ((i = 0; i < ${#configs[@]}; i++)); do
    run "$round" "${configs[(i + round) % ${#configs[@]}]}"
  done
done

python3 - "$out" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for cfg in ("none", "other10", "scrape10"):
    m = sorted(float(r["mpps"]) for r in rows if r["config"] == cfg)
    s = [int(r["scrapes"]) for r in rows if r["config"] == cfg]
    print(f"{cfg:9s} median {statistics.median(m):.3f} Mpps ({m[0]:.3f}..{m[-1]:.3f}), "
          f"{len(m)} runs, scrapes per run {min(s)}..{max(s)}")
PY
echo "results: $out"
