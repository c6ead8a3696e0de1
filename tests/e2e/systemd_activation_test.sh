#!/usr/bin/env bash
# systemd's side of vhostkit-net and vhostkit-blk, without systemd as PID 1 (docs/systemd.md):
#   socket activation  systemd-socket-activate listens and execs the back-end on the first
#                      connection; vhostkit-bench then moves traffic through the inherited socket
#                      (net loop, twice: one front-end after the other; blk randwrite), SIGTERM
#                      exits 0 and the socket file, systemd's, is left in place
#   refused fds        fd 3 bound but not listening, a datagram socket, a TCP listener, two
#                      sockets, a listening socket and --socket-path too: exit 2, one line
#   readiness          NOTIFY_SOCKET at a datagram socket of ours (scripts/lib/systemd_check.py):
#                      READY=1 once, when the path takes a connection (server) or after the
#                      connect was accepted and not before (--client); STOPPING=1 on SIGTERM
#   path readiness     50 starts of vhostkit-net: a connect the moment inotify reports the path
#                      is never refused (the same check against a binder that listens 5 ms
#                      after bind() must catch it, or the check proves nothing)
# Unix sockets only: no root, no QEMU.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/vhostkit.sh"

vk_require_cmd python3 systemd-socket-activate
vk_find_programs NET=vhostkit-net BLK=vhostkit-blk BENCH=vhostkit-bench
vk_tmpdir
# systemd_check.py's socket directories go under VK_TMP, removed on exit: `activate` execs the
# program, so the script cannot remove them itself.
export TMPDIR=$VK_TMP
check_py="$here/../../scripts/lib/systemd_check.py"
shm=$(mktemp -d /dev/shm/vk-systemd.XXXXXX)
vk_on_exit "rm -rf '$shm'"
truncate -s 16M "$shm/disk.img"

# activated LOG SOCK CMD...: systemd-socket-activate listening on SOCK for CMD; sets PID (which
# becomes CMD's pid at the exec) once the socket is there.
activated() {
  local log=$1 sock=$2; shift 2
  systemd-socket-activate -l "$sock" "$@" </dev/null >"$log" 2>&1 &
  PID=$!
  vk_track_pid "$PID"
  vk_wait_for 20 grep -q "Listening on $sock" "$log" || { cat "$log"; vk_fail "no listener on $sock"; }
}

# json_field JSON EXPR: a Python expression over the bench's JSON line `j`, printed.
json_field() {
  python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(eval(sys.argv[2]))' "$1" "$2"
}

stop_exit0() {
  local pid=$1 log=$2 what=$3 rc
  kill -TERM "$pid"
  vk_wait_for 20 eval "! kill -0 $pid" || { cat "$log"; vk_fail "$what: still running after SIGTERM"; }
  wait "$pid"; rc=$?
  ((rc == 0)) || { cat "$log"; vk_fail "$what: exit $rc after SIGTERM, want 0"; }
}

vk_check "socket activation: vhostkit-net --loopback on systemd-socket-activate's socket moves traffic"
sock=$VK_TMP/net-act.sock
activated "$VK_TMP/net-act.log" "$sock" "$NET" --loopback
for round in 1 2; do
  json=$("$BENCH" --socket-path="$sock" --duration=0.5 --json loop 2>"$VK_TMP/bench$round.err") ||
    { cat "$VK_TMP/bench$round.err" "$VK_TMP/net-act.log"; vk_fail "bench run $round failed"; }
  rx=$(json_field "$json" 'j["results"][0]["rx"]')
  ((rx > 1000)) || { echo "$json"; vk_fail "bench run $round: $rx frames came back, want > 1000"; }
  vk_pass "run $round: $rx frames looped through the activated back-end"
done
grep -q "listening on socket-activated fd 3" "$VK_TMP/net-act.log" ||
  { cat "$VK_TMP/net-act.log"; vk_fail "vhostkit-net did not serve the inherited socket"; }
(($(grep -c "front-end connected on inherited fd 3" "$VK_TMP/net-act.log") == 2)) ||
  { cat "$VK_TMP/net-act.log"; vk_fail "want two sessions on the inherited socket"; }
stop_exit0 "$PID" "$VK_TMP/net-act.log" "activated vhostkit-net"
[[ -S $sock ]] || vk_fail "vhostkit-net removed $sock, which belongs to its activator"
vk_pass "two sessions on fd 3, exit 0 on SIGTERM, socket file left to its owner"

vk_check "socket activation: vhostkit-blk serves a randwrite run"
sock=$VK_TMP/blk-act.sock
activated "$VK_TMP/blk-act.log" "$sock" "$BLK" --image="$shm/disk.img"
json=$("$BENCH" blk --socket-path="$sock" --duration=0.5 --rw=randwrite --json 2>"$VK_TMP/bench-blk.err") ||
  { cat "$VK_TMP/bench-blk.err" "$VK_TMP/blk-act.log"; vk_fail "bench blk failed"; }
ios=$(json_field "$json" 'j["results"][0]["requests"]')
((ios > 100)) || { echo "$json"; vk_fail "bench blk: $ios requests, want > 100"; }
stop_exit0 "$PID" "$VK_TMP/blk-act.log" "activated vhostkit-blk"
vk_pass "$ios writes through the activated vhostkit-blk"

vk_check "socket activation: a wrong fd 3 is refused with exit 2 and one line"
for kind in unix-bound unix-dgram tcp-listen two; do
  for prog in "$NET --loopback" "$BLK --image=$shm/disk.img"; do
    # shellcheck disable=SC2086 # prog is a command line of our own
    timeout 20 python3 "$check_py" activate "$kind" -- $prog >"$VK_TMP/bad.out" 2>"$VK_TMP/bad.err"
    rc=$?
    ((rc == 2)) || { cat "$VK_TMP/bad.out" "$VK_TMP/bad.err"; vk_fail "$kind, ${prog%% *}: exit $rc, want 2"; }
    (($(wc -l <"$VK_TMP/bad.err") == 1)) && grep -q "socket" "$VK_TMP/bad.err" ||
      { cat "$VK_TMP/bad.err"; vk_fail "$kind, ${prog%% *}: want one line about the socket on stderr"; }
  done
  vk_pass "$kind: $(cat "$VK_TMP/bad.err")"
done
# A .socket unit's socket and a conf with --socket-path: nobody would accept on systemd's socket.
timeout 20 python3 "$check_py" activate unix-listen -- "$NET" --loopback --socket-path="$VK_TMP/both.sock" \
  >"$VK_TMP/bad.out" 2>"$VK_TMP/bad.err"
rc=$?
((rc == 2)) && (($(wc -l <"$VK_TMP/bad.err") == 1)) && grep -q -- "--socket-path" "$VK_TMP/bad.err" ||
  { cat "$VK_TMP/bad.out" "$VK_TMP/bad.err"; vk_fail "activated socket plus --socket-path: exit $rc, want 2 and one line"; }
[[ ! -e $VK_TMP/both.sock ]] || vk_fail "listened on --socket-path despite the refusal"
vk_pass "activated socket plus --socket-path: $(cat "$VK_TMP/bad.err")"

vk_check "readiness: READY=1 when the socket takes connections, STOPPING=1 on SIGTERM"
python3 "$check_py" notify server "$VK_TMP/n1.sock" -- "$NET" --loopback --socket-path="$VK_TMP/n1.sock" ||
  vk_fail "vhostkit-net server readiness"
python3 "$check_py" notify server "$VK_TMP/n2.sock" -- "$BLK" --image="$shm/disk.img" --socket-path="$VK_TMP/n2.sock" ||
  vk_fail "vhostkit-blk server readiness"
python3 "$check_py" notify client "$VK_TMP/n3.sock" -- "$NET" --loopback --client --socket-path="$VK_TMP/n3.sock" ||
  vk_fail "vhostkit-net --client readiness"

vk_check "path readiness: the socket path exists only once it listens"
python3 "$check_py" path-ready 5 "$VK_TMP/naive.sock" --expect-refused -- python3 -c '
import signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
time.sleep(0.005)
s.listen(1)
time.sleep(600)' "$VK_TMP/naive.sock" || vk_fail "the path check did not catch a binder that listens late"
python3 "$check_py" path-ready 50 "$VK_TMP/p.sock" -- "$NET" --loopback --socket-path="$VK_TMP/p.sock" ||
  vk_fail "vhostkit-net's socket path appeared before it listened"
leftover=$(find "$VK_TMP" -name '.vk*' | head -3)
[[ -z $leftover ]] || vk_fail "staging names left behind: $leftover"
vk_pass "systemd integration"
