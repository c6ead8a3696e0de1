# shellcheck shell=bash
# Host-side peers for the guest's tcp-tx / tcp-rx scenarios: one-shot busybox nc listeners inside
# the test namespace, with the received data's sha256 to compare with the guest's VK-RESULT line.
#
#   vk_tcp_sink_start PORT OUT      listen on PORT in VK_NETNS, write what arrives to OUT;
#                                   OUT.rc gets nc's exit status when the peer closes
#   vk_tcp_source_start PORT IN     listen on PORT in VK_NETNS, send IN to whoever connects, then
#                                   half-close; IN.rc gets nc's exit status
#   vk_tcp_paced_source_start PORT IN KIB_PER_S
#                                   the same, sending at most KIB_PER_S KiB/s (so that a transfer
#                                   spans a window the test needs, e.g. a live migration)
#   vk_tcp_wait_done FILE TIMEOUT   wait for FILE.rc; returns the nc status (124 on timeout)
#   vk_random_file PATH MIB         MIB MiB of random data
#   vk_sha256 PATH                  the hex digest
#
# Why a held stdin: busybox nc shuts down its sending side when its stdin ends. A receiver with
# stdin at EOF would thus send FIN at once, and the sending nc exits when it sees it, possibly
# before it has sent everything. The receiver's stdin is a fifo kept open by a sleeper instead.
[[ -n ${VK_TCP_SH:-} ]] && return 0
VK_TCP_SH=1
source "$(dirname "${BASH_SOURCE[0]}")/netns.sh"

vk__tcp_listening() {
  vk_netns_exec ss -Hltn "sport = :$1" 2>/dev/null | grep -q LISTEN
}

vk_tcp_sink_start() {
  local port=$1 out=$2
  rm -f "$out" "$out.rc" "$out.hold"
  mkfifo "$out.hold"
  # shellcheck disable=SC2016
  vk_netns_spawn "$out.log" bash -c '
    sleep 100000 >"$3" & hold=$!
    busybox nc -l -p "$1" <"$3" >"$2"; rc=$?
    kill $hold 2>/dev/null; echo $rc >"$2.rc"' vk-sink "$port" "$out" "$out.hold"
  vk_wait_for 10 vk__tcp_listening "$port" ||
    { echo "tcp.sh: sink on port $port did not start: $(cat "$out.log")" >&2; return 1; }
}

vk_tcp_source_start() {
  local port=$1 in=$2
  rm -f "$in.rc"
  # shellcheck disable=SC2016
  vk_netns_spawn "$in.log" bash -c '
    busybox nc -l -p "$1" <"$2" >/dev/null; echo $? >"$2.rc"' vk-source "$port" "$in"
  vk_wait_for 10 vk__tcp_listening "$port" ||
    { echo "tcp.sh: source on port $port did not start: $(cat "$in.log")" >&2; return 1; }
}

vk_tcp_paced_source_start() {
  local port=$1 in=$2 rate=$3
  rm -f "$in.rc"
  # Pacing, not a barrier: a 64 KiB chunk every 64/rate seconds. The pipe holds the first chunk
  # until nc accepts.
  # shellcheck disable=SC2016
  vk_netns_spawn "$in.log" bash -c '
    python3 -c "
import sys, time
rate = int(sys.argv[2]) * 1024
with open(sys.argv[1], \"rb\") as f:
    while chunk := f.read(65536):
        sys.stdout.buffer.write(chunk); sys.stdout.flush(); time.sleep(len(chunk) / rate)
" "$2" "$3" | busybox nc -l -p "$1" >/dev/null; echo $? >"$2.rc"' vk-source "$port" "$in" "$rate"
  vk_wait_for 10 vk__tcp_listening "$port" ||
    { echo "tcp.sh: source on port $port did not start: $(cat "$in.log")" >&2; return 1; }
}

vk_tcp_wait_done() {
  local f=$1 timeout=$2
  vk_wait_for "$timeout" test -s "$f.rc" || return 124
  return "$(cat "$f.rc")"
}

vk_random_file() {
  head -c "$(($2 * 1048576))" /dev/urandom >"$1"
}

vk_sha256() {
  sha256sum "$1" | cut -d' ' -f1
}
