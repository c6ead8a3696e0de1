#!/usr/bin/env bash
# vhostkit-blk killed (SIGKILL) under a guest's parallel O_DIRECT writers and restarted on the
# same socket: no request is lost or fails. QEMU is the vhost-user client (chardev reconnect=1);
# vhostkit-blk offers INFLIGHT_SHMFD, so QEMU set up the inflight region and keeps its fd. Each
# time the back-end dies with requests in flight, QEMU reconnects to the new one, hands it the
# region and resumes each ring at its used index; the new back-end resubmits what was in flight
# (and says so in its log) before anything new. The guest's writers rewrite their own MiB range
# round after round, reading each round back: none sees an I/O error or a difference, the kernel
# logs no I/O error, and the image file holds what each writer wrote last.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/qemu.sh"
source "$here/../../scripts/lib/vhostkit.sh"

WRITERS=4
MB=4
# Each kill waits for a writer's round twice (before the kill, after the restart): 12 rounds of
# 4 writers leave room for every kill; the rounds left after the last kill only add run time.
ROUNDS=${VK_TEST_ROUNDS:-12}
# A TCG guest spends most of its time computing and the back-end answers in microseconds, so a
# kill at a random moment found requests in flight only now and then (one in three, then one in
# five once vhostkit-blk saved three system calls per request, and a CI run of 24 kills found
# none). Each request is answered LATENCY_US after its I/O (--latency-us): a writer then waits on
# the disk most of its time, and a kill nearly always lands on requests in flight. Up to KILLS
# kills, until HITS of them found requests to resubmit.
LATENCY_US=5000
KILLS=12
HITS=2
t_start=$(vk_now)
elapsed() { awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}'; }

vk_require_cmd sha256sum dd truncate
# The vk_net_* helpers start whatever VK_NET_BIN is: here vhostkit-blk.
vk_find_programs VK_NET_BIN=vhostkit-blk
vk_guest_ensure
vk_tmpdir
img=$VK_TMP/disk.img
sock=$VK_TMP/blk.sock
truncate -s $((WRITERS * MB + 16))M "$img"

# start_backend LOG: vhostkit-blk on $sock (io_uring: completions out of order), each answer
# LATENCY_US late; sets blk_pid.
start_backend() {
  vk_net_start "$1" -- --socket-path="$sock" --image="$img" --io=uring --latency-us=$LATENCY_US \
    --log-level=info
  blk_pid=$VK_NET_PID
  vk_net_wait_listening "$sock" 10 "$1" || { cat "$1"; vk_fail "vhostkit-blk did not listen"; }
}

resubmitted() { grep -o '[0-9]* request(s) left in flight' "$1" | awk '{ n += $1 } END { print n + 0 }'; }

vk_check "a QEMU guest (vhost-user-blk-pci, chardev reconnect=1) runs $WRITERS O_DIRECT writers on vhostkit-blk"
log=$VK_TMP/blk1.log
start_backend "$log"
glog=$VK_TMP/guest.log
# vectors=0: QEMU 7.2 under TCG crashes in msix_set_vector_notifiers with vhost-user + MSI-X.
vk_qemu_start --log "$glog" --timeout 540 \
  --cmdline "no_timer_check vk.cmd=blk-writers vk.mb=$MB vk.writers=$WRITERS vk.rounds=$ROUNDS" -- \
  -chardev "socket,id=c1,path=$sock,reconnect=1" \
  -device "vhost-user-blk-pci,chardev=c1,num-queues=1,vectors=0"
qemu_pid=$VK_QEMU_PID
vk_net_wait_connected "$log" 30 || { cat "$log"; vk_qemu_dump "$glog"; vk_fail "QEMU never connected"; }
vk_qemu_wait_marker "$glog" '^VK-WRITING' 120 || { cat "$log"; vk_qemu_dump "$glog"; vk_fail "the writers did not start"; }
vk_pass "writers running"

total=0
hits=0
for k in $(seq 1 $KILLS); do
  vk_check "kill $k: SIGKILL vhostkit-blk while the writers write, start a new one on the same socket"
  # Wait for one more round to finish, so the kill lands in the middle of the writers' traffic.
  rounds_before=$(grep -c '^VK-ROUND' "$glog")
  vk_wait_for 120 bash -c "(( \$(grep -c '^VK-ROUND' '$glog') > $rounds_before ))" ||
    { vk_qemu_dump "$glog"; vk_fail "no writer finished a round in 120 s"; }
  grep -q '^VK-RESULT blk-writers' "$glog" && break  # the writers are done: nothing left to hit
  sleep "0.$((RANDOM % 5))"  # somewhere in the other writers' rounds
  kill -KILL "$blk_pid"
  wait "$blk_pid" 2>/dev/null
  kill -0 "$qemu_pid" 2>/dev/null || { vk_qemu_dump "$glog"; vk_fail "QEMU died with its back-end"; }
  log=$VK_TMP/blk$((k + 1)).log
  start_backend "$log"
  vk_net_wait_connected "$log" 30 || { cat "$log"; tail -20 "$glog.qemu" 2>/dev/null; vk_fail "QEMU did not reconnect"; }
  # The rings start once QEMU has sent the region and the bases: wait for the guest's I/O to go
  # on (a writer finishing a round) before counting what was resubmitted.
  rounds_before=$(grep -c '^VK-ROUND' "$glog")
  vk_wait_for 120 bash -c "(( \$(grep -c '^VK-ROUND' '$glog') > $rounds_before )) || grep -q '^VK-RESULT blk-writers' '$glog'" ||
    { cat "$log"; vk_qemu_dump "$glog"; vk_fail "the writers made no progress after the restart"; }
  n=$(resubmitted "$log")
  total=$((total + n))
  ((n > 0)) && hits=$((hits + 1))
  vk_pass "reconnected; $n request(s) resubmitted by the new back-end"
  ((hits >= HITS)) && break
done

vk_check "the writers finish without an error, and the image holds what each wrote last"
vk_qemu_wait_marker "$glog" '^VK-DONE' 400 || { cat "$log"; vk_qemu_dump "$glog"; vk_fail "the guest did not finish"; }
res=$(vk_guest_result "$glog" blk-writers) || { vk_qemu_dump "$glog"; vk_fail "no blk-writers result"; }
[[ $res == ok* ]] || { vk_qemu_dump "$glog" 60; vk_fail "blk-writers: $res"; }
for i in $(seq 0 $((WRITERS - 1))); do
  want=$(vk_guest_field "$glog" blk-writers "sha$i")
  got=$(dd if="$img" bs=1048576 skip=$((i * MB)) count=$MB 2>/dev/null | sha256sum | cut -d' ' -f1)
  [[ $got == "$want" ]] || vk_fail "writer $i: the guest wrote sha256 $want, the image has $got"
done
vk_pass "$(grep -c '^VK-ROUND' "$glog") rounds, no error; each writer's last data is in the image"

vk_check "requests were in flight at the kills and were resubmitted; the last back-end exits 0"
((total > 0)) || vk_fail "no kill hit a request in flight (nothing resubmitted): the test proved nothing"
vk_qemu_wait_exit "$qemu_pid" 30
vk_net_wait_log "$log" 'front-end disconnected' 10 || { cat "$log"; vk_fail "no disconnect logged"; }
vk_net_stop "$blk_pid"; rc=$?
((rc == 0)) || { cat "$log"; vk_fail "exit status $rc"; }
vk_pass "$total request(s) resubmitted over $k restart(s); exit 0"

echo "blk_backend_restart_test: all checks passed in $(elapsed) s"
