#!/usr/bin/env bash
# vhostkit-net's command line, as QEMU's backend conventions and DESIGN.md promise: every bad
# argument (or a resource the arguments name that can't be used) exits 2 with exactly one line on
# stderr and leaves nothing behind (no socket file, no TAP); --print-capabilities prints JSON with
# "type": "net"; --help exits 0. Runs inside a fresh namespace, so TAPs it might create can be
# counted and can't collide with anything.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/netns.sh"
source "$here/../../scripts/lib/vhostkit.sh"

t_start=$(vk_now)
vk_require_root
vk_require_cmd ip
vk_net_find_bin
vk_tmpdir
vk_netns_create cli || vk_fail "creating the namespace"
sock=$VK_TMP/cli.sock
: >"$VK_TMP/regular-file"

links() { vk_netns_exec ip -o link show | awk -F': ' '{print $2}' | sort | tr '\n' ' '; }
links_before=$(links)

# expect_bad NAME ARGS...: exit 2, one stderr line, no socket, no new link.
expect_bad() {
  local name=$1; shift
  vk_check "bad arguments: $name -> exit 2, one line on stderr, nothing left behind"
  local rc lines
  (cd "$VK_TMP" && exec timeout 10 ip netns exec "$VK_NETNS" "$VK_NET_BIN" "$@" \
     5<"$VK_TMP/regular-file" </dev/null >"$VK_TMP/out" 2>"$VK_TMP/err")
  rc=$?
  lines=$(wc -l <"$VK_TMP/err")
  ((rc == 2)) || { cat "$VK_TMP/out" "$VK_TMP/err"; vk_fail "$name: exit $rc, want 2"; }
  ((lines == 1)) || { cat "$VK_TMP/err"; vk_fail "$name: $lines lines on stderr, want 1"; }
  [[ ! -e $sock ]] || vk_fail "$name: socket $sock left behind"
  [[ $(links) == "$links_before" ]] || vk_fail "$name: links now '$(links)', before '$links_before'"
  vk_pass "$name: $(cat "$VK_TMP/err")"
}

expect_bad "unknown option" --socket-path="$sock" --loopback --no-such-option
expect_bad "no port" --socket-path="$sock"
expect_bad "two ports (--tap and --loopback)" --socket-path="$sock" --tap=vk-cli0 --loopback
expect_bad "two ports (--af-packet and --tap)" --socket-path="$sock" --af-packet=lo --tap=vk-cli0
expect_bad "neither --socket-path nor --fd" --loopback
expect_bad "--socket-path and --fd together" --socket-path="$sock" --fd=5 --loopback
expect_bad "--client without --socket-path" --client --fd=5 --loopback
expect_bad "--fd not a socket (a regular file)" --fd=5 --loopback
expect_bad "--fd not open" --fd=42 --loopback
expect_bad "--tap with a name over 15 characters" --socket-path="$sock" --tap=vk-this-name-is-too-long
expect_bad "socket path in a missing directory" --socket-path="$VK_TMP/missing/dir/x.sock" --loopback
expect_bad "socket path in a missing directory, TAP already created" \
  --socket-path="$VK_TMP/missing/dir/x.sock" --tap=vk-cli0
expect_bad "--af-packet on a missing interface" --socket-path="$sock" --af-packet=vk-nosuch0
expect_bad "--queues=0" --socket-path="$sock" --loopback --queues=0
expect_bad "--queues=abc" --socket-path="$sock" --loopback --queues=abc
expect_bad "--poll=foo" --socket-path="$sock" --loopback --poll=foo
expect_bad "--mac=zz" --socket-path="$sock" --loopback --mac=zz
expect_bad "--mac with 7 bytes" --socket-path="$sock" --loopback --mac=52:54:00:12:34:56:78
expect_bad "--mtu=10" --socket-path="$sock" --loopback --mtu=10
expect_bad "--stats=-1" --socket-path="$sock" --loopback --stats=-1
expect_bad "--cpu=x" --socket-path="$sock" --loopback --cpu=x
expect_bad "--log-level=loud" --socket-path="$sock" --loopback --log-level=loud
expect_bad "--metrics without a port" --socket-path="$sock" --loopback --metrics=127.0.0.1
expect_bad "--metrics with a host name" --socket-path="$sock" --loopback --metrics=localhost:9100
expect_bad "--metrics=ADDR:0" --socket-path="$sock" --loopback --metrics=127.0.0.1:0
expect_bad "--metrics IPv6 without brackets" --socket-path="$sock" --loopback --metrics=::1:9100
expect_bad "--metrics on an address not local" --socket-path="$sock" --loopback \
  --metrics=192.0.2.77:9100

vk_check "--print-capabilities prints valid JSON with type net and exits 0"
out=$("$VK_NET_BIN" --print-capabilities 2>"$VK_TMP/err"); rc=$?
((rc == 0)) || vk_fail "exit $rc"
[[ ! -s $VK_TMP/err ]] || vk_fail "stderr not empty: $(cat "$VK_TMP/err")"
python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d.get("type") == "net" else 1)' "$out" ||
  vk_fail "not JSON with type net: $out"
vk_pass "$out"

vk_check "--help exits 0 and names the options"
out=$("$VK_NET_BIN" --help 2>&1); rc=$?
((rc == 0)) || vk_fail "exit $rc"
for opt in --socket-path --fd --client --print-capabilities --tap --af-packet --loopback --queues \
           --poll --cpu --mac --mtu --stats --log-level --no-packed --no-in-order --metrics; do
  grep -q -- "$opt" <<<"$out" || vk_fail "--help does not mention $opt"
done
vk_pass "$(wc -l <<<"$out") lines of help"

vk_check "a good command line starts, listens and exits 0 on SIGINT (the control case)"
vk_net_start "$VK_TMP/good.log" --netns "$VK_NETNS" -- --socket-path="$sock" --tap=vk-cli0
vk_net_wait_listening "$sock" 10 || { cat "$VK_TMP/good.log"; vk_fail "did not listen"; }
vk_netns_exec ip link show vk-cli0 >/dev/null 2>&1 || vk_fail "no TAP vk-cli0 while running"
kill -INT "$VK_NET_PID"
vk_net_stop "$VK_NET_PID"; rc=$?
((rc == 0)) || { cat "$VK_TMP/good.log"; vk_fail "exit $rc after SIGINT"; }
[[ ! -e $sock ]] || vk_fail "socket left behind after SIGINT"
[[ $(links) == "$links_before" ]] || vk_fail "links after exit: '$(links)'"
vk_pass "listened, TAP created, SIGINT -> exit 0, socket and TAP gone"

echo "net_cli_test: all checks passed in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"
