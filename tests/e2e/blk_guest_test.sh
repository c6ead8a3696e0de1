#!/usr/bin/env bash
# vhostkit-blk serving a raw image to a QEMU guest (vhost-user-blk-pci, 2 queues). The host fills
# the image with a known pattern; the guest reads it back from /dev/vda (sha256 equal), writes
# random data and reads it back, and the host finds the guest's data in the image file (sha256
# equal), then discards the next MiB (the host reads zeros there; FLUSH and DISCARD are counted),
# once on the io_uring path (--io=uring) and once with --io=inline, each confirmed from the
# start-up line. Then the same image served
# --read-only: the guest's write fails and the image is unchanged. On SIGTERM vhostkit-blk exits 0
# and removes its socket.
# Variants (see blk_packed_test.sh): VK_QEMU_BLK_DEVICE_ARGS is appended to the
# vhost-user-blk-pci device (",packed=on"); VK_EXPECT_GUEST_BITS lists feature bits the guest must
# show as negotiated in /sys/block/vda/device/features (checked on both I/O paths);
# VK_BLK_EXPECT_RING is the ring vhostkit-blk must log ("packed ring"); VK_BLK_READ_ONLY_PHASE=0
# leaves out the --read-only phase, which does not depend on the ring.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/qemu.sh"
source "$here/../../scripts/lib/vhostkit.sh"

MIB=${VK_TEST_MIB:-4}
DEVICE_ARGS=${VK_QEMU_BLK_DEVICE_ARGS:-}
EXPECT_BITS=${VK_EXPECT_GUEST_BITS:-}
EXPECT_RING=${VK_BLK_EXPECT_RING:-}
READ_ONLY_PHASE=${VK_BLK_READ_ONLY_PHASE:-1}
me=${VK_SCRIPT_NAME:-blk_guest_test.sh}
t_start=$(vk_now)

vk_require_cmd sha256sum dd
# The vk_net_* helpers start whatever VK_NET_BIN is: here vhostkit-blk.
vk_find_programs VK_NET_BIN=vhostkit-blk
vk_guest_ensure
vk_tmpdir
img=$VK_TMP/disk.img
sock=$VK_TMP/blk.sock

# A known pattern: every 512-byte sector starts with its number.
python3 - "$img" <<'PY'
import sys
with open(sys.argv[1], "wb") as f:
    for s in range(32 * 2048):
        f.write((b"vhostkit sector %08d " % s).ljust(512, bytes([s % 251])))
PY
pattern_sum=$(dd if="$img" bs=1048576 count="$MIB" 2>/dev/null | sha256sum | cut -d' ' -f1)

blk_args() {
  # vectors=0 as for net: QEMU 7.2 under TCG crashes in msix_set_vector_notifiers with
  # vhost-user + MSI-X.
  qemu_blk=(-chardev "socket,id=c1,path=$sock" -device "vhost-user-blk-pci,chardev=c1,num-queues=2,vectors=0$DEVICE_ARGS")
}

boot() {  # boot LOG CMDLINE: one guest run against the listening backend
  blk_args
  vk_qemu_start --log "$1" --timeout 150 --cmdline "$2" -- "${qemu_blk[@]}"
  vk_net_wait_connected "$blog" 30 || { cat "$blog"; vk_qemu_dump "$1"; vk_fail "no front-end connected"; }
  vk_qemu_wait_marker "$1" '^VK-DONE' 120 || { cat "$blog"; vk_qemu_dump "$1"; vk_fail "the guest did not finish"; }
  vk_qemu_wait_exit "$VK_QEMU_PID" 30
  negotiated_ok "$1"
}

# negotiated_ok LOG: the guest's disk negotiated EXPECT_BITS and vhostkit-blk logged EXPECT_RING
# (QEMU falls back to the split ring without a word when the back-end does not offer packed).
negotiated_ok() {
  [[ -n $EXPECT_BITS || -n $EXPECT_RING ]] || return 0
  local feats b
  # sysfs prints one character per feature bit, bit 0 first.
  feats=$(grep -a -m1 '^VK-BLK-FEATURES' "$1" | tr -d '\r' | awk '{ print $2 }')
  [[ -n $feats ]] || { vk_qemu_dump "$1"; vk_fail "the guest printed no VK-BLK-FEATURES"; }
  for b in $EXPECT_BITS; do
    [[ ${feats:$b:1} == 1 ]] || vk_fail "the guest's disk did not negotiate feature bit $b: '$feats'"
  done
  if [[ -n $EXPECT_RING ]]; then
    grep -qE "features 0x[0-9a-f]+ acked: $EXPECT_RING(, |\$)" "$blog" ||
      { grep 'acked:' "$blog"; vk_fail "vhostkit-blk did not log '$EXPECT_RING'"; }
  fi
  echo "    negotiated: guest bits ${EXPECT_BITS:-any}; vhostkit-blk: $(grep -oE 'features 0x[0-9a-f]+ acked: .*' "$blog" | tail -1)"
}

vk_check "vhostkit-blk --image --io=uring (2 queues) listens on its socket, on the io_uring path"
blog=$VK_TMP/vhostkit-blk.log
# --io=uring, not auto: auto takes the inline path when $VK_TMP is on tmpfs, and this phase is
# the io_uring one whatever /tmp is.
vk_net_start "$blog" -- --socket-path="$sock" --image="$img" --queues=2 --stats=1 --io=uring
blk_pid=$VK_NET_PID
vk_net_wait_listening "$sock" 10 || { cat "$blog"; vk_fail "no listening socket $sock"; }
grep -q 'I/O uring' "$blog" || { cat "$blog"; vk_fail "the start-up line does not say 'I/O uring'"; }
vk_pass "listening, I/O uring"

# discarded_ok TAG LOG: the guest's blk-discard succeeded and the host reads zeros there, while
# the sector just after still holds the pattern.
discarded_ok() {
  local res off zeros after
  res=$(vk_guest_result "$2" blk-discard) || { vk_qemu_dump "$2"; vk_fail "$1: no blk-discard result"; }
  [[ $res == ok* ]] || { vk_qemu_dump "$2"; vk_fail "$1: blk-discard: $res"; }
  off=$((MIB * 1048576))
  zeros=$(dd if="$img" bs=1048576 skip="$MIB" count=1 2>/dev/null | tr -d '\0' | wc -c)
  ((zeros == 0)) || vk_fail "$1: $zeros non-zero bytes in the discarded MiB at $off"
  after=$(dd if="$img" bs=512 skip=$(((off + 1048576) / 512)) count=1 2>/dev/null | head -c 24)
  [[ $after == "vhostkit sector $(printf %08d $(((off + 1048576) / 512)))"* ]] ||
    vk_fail "$1: the sector after the discarded range changed ('$after')"
}

vk_check "the guest reads the host's pattern from /dev/vda, writes $MIB MiB and reads it back, then discards the next MiB"
log=$VK_TMP/console.log
boot "$log" "vk.cmd=blk-read,blk-write,blk-discard vk.mb=$MIB"
res=$(vk_guest_result "$log" blk-read) || { vk_qemu_dump "$log"; vk_fail "no blk-read result"; }
[[ $res == ok* ]] || { vk_qemu_dump "$log"; vk_fail "blk-read: $res"; }
gsum=$(vk_guest_field "$log" blk-read sha256)
[[ $gsum == "$pattern_sum" ]] || vk_fail "guest read sha256 $gsum, image has $pattern_sum"
vk_pass "blk-read sha256 $gsum equals the image's"
res=$(vk_guest_result "$log" blk-write) || { vk_qemu_dump "$log"; vk_fail "no blk-write result"; }
[[ $res == ok* ]] || { vk_qemu_dump "$log"; vk_fail "blk-write: $res"; }
wsum=$(vk_guest_field "$log" blk-write sha256)
hsum=$(dd if="$img" bs=1048576 count="$MIB" 2>/dev/null | sha256sum | cut -d' ' -f1)
[[ $wsum == "$hsum" ]] || vk_fail "guest wrote sha256 $wsum, the image file has $hsum"
vk_pass "blk-write sha256 $wsum is in the image file"
discarded_ok uring "$log"
vk_pass "blk-discard: the host reads zeros in the discarded MiB, the pattern right after it"

vk_check "vhostkit-blk counted FLUSH and DISCARD requests and no I/O errors, saw the guest go, and exits 0 on SIGTERM"
vk_net_wait_log "$blog" 'front-end disconnected' 10 || { cat "$blog"; vk_fail "no disconnect logged"; }
sleep 1.2
grep -E '^q[01] ' "$blog" | awk '$3 > 0 || $9 > 0' | head -4 | sed 's/^/    /'
grep -qE '^q[01] .*ioerr [1-9]' "$blog" && { grep -E '^q[01] ' "$blog"; vk_fail "I/O errors counted"; }
# dd conv=fsync in the guest flushes its write cache: FLUSH requests must have reached us.
flushes=$(grep -oE '^q[01] .* flush [0-9]+' "$blog" | awk '{ n += $NF } END { print n + 0 }')
((flushes > 0)) || { grep -E '^q[01] ' "$blog"; vk_fail "no FLUSH request counted"; }
discards=$(grep -oE '^q[01] .* discard [0-9]+' "$blog" | awk '{ n += $NF } END { print n + 0 }')
((discards > 0)) || { grep -E '^q[01] ' "$blog"; vk_fail "no DISCARD request counted"; }
vk_net_stop "$blk_pid"; rc=$?
((rc == 0)) || { cat "$blog"; vk_fail "exit status $rc"; }
[[ ! -e $sock ]] || vk_fail "socket $sock left behind"
grep -qE 'totals q0 reads [1-9][0-9]* ' "$blog" || { tail -5 "$blog"; vk_fail "no totals line with q0's reads at exit"; }
vk_pass "$flushes flush(es), $discards discard(s); exit 0, socket removed; $(grep -oE 'totals q0 reads [0-9]+ \([0-9]+ bytes\) writes [0-9]+' "$blog")"

vk_check "--io=inline (the path --io=auto takes for an image in tmpfs): the guest reads the image and writes it again"
cur_sum=$(dd if="$img" bs=1048576 count="$MIB" 2>/dev/null | sha256sum | cut -d' ' -f1)
# The MiB discarded above gets non-zero bytes again, for this phase's discard.
head -c 1048576 /dev/urandom | dd of="$img" bs=1048576 seek="$MIB" conv=notrunc 2>/dev/null
blog=$VK_TMP/vhostkit-blk-inline.log
vk_net_start "$blog" -- --socket-path="$sock" --image="$img" --queues=2 --io=inline
blk_pid=$VK_NET_PID
vk_net_wait_listening "$sock" 10 || { cat "$blog"; vk_fail "no listening socket $sock"; }
grep -q 'I/O inline' "$blog" || { cat "$blog"; vk_fail "the start-up line does not say 'I/O inline'"; }
log=$VK_TMP/console-inline.log
boot "$log" "vk.cmd=blk-read,blk-write,blk-discard vk.mb=$MIB"
res=$(vk_guest_result "$log" blk-read) || { vk_qemu_dump "$log"; vk_fail "no blk-read result"; }
[[ $res == ok* ]] || { vk_qemu_dump "$log"; vk_fail "inline blk-read: $res"; }
gsum=$(vk_guest_field "$log" blk-read sha256)
[[ $gsum == "$cur_sum" ]] || vk_fail "inline: guest read sha256 $gsum, image has $cur_sum"
res=$(vk_guest_result "$log" blk-write) || { vk_qemu_dump "$log"; vk_fail "no blk-write result"; }
[[ $res == ok* ]] || { vk_qemu_dump "$log"; vk_fail "inline blk-write: $res"; }
wsum=$(vk_guest_field "$log" blk-write sha256)
hsum=$(dd if="$img" bs=1048576 count="$MIB" 2>/dev/null | sha256sum | cut -d' ' -f1)
[[ $wsum == "$hsum" ]] || vk_fail "inline: guest wrote sha256 $wsum, the image file has $hsum"
[[ $wsum != "$cur_sum" ]] || vk_fail "inline: the guest's write did not change the image"
discarded_ok inline "$log"
vk_net_stop "$blk_pid"; rc=$?
((rc == 0)) || { cat "$blog"; vk_fail "exit status $rc"; }
vk_pass "read sha256 equals the image's; written sha256 $wsum is in the image file; the discarded MiB reads as zeros"

if ((READ_ONLY_PHASE)); then
  vk_check "--read-only: the guest's write fails and the image is unchanged"
  before=$(sha256sum "$img" | cut -d' ' -f1)
  blog=$VK_TMP/vhostkit-blk-ro.log
  vk_net_start "$blog" -- --socket-path="$sock" --image="$img" --queues=2 --read-only
  blk_pid=$VK_NET_PID
  vk_net_wait_listening "$sock" 10 || { cat "$blog"; vk_fail "no listening socket $sock"; }
  log=$VK_TMP/console-ro.log
  boot "$log" "vk.cmd=blk-read,blk-write vk.mb=1"
  res=$(vk_guest_result "$log" blk-read) || { vk_qemu_dump "$log"; vk_fail "no blk-read result"; }
  [[ $res == ok* ]] || { vk_qemu_dump "$log"; vk_fail "read-only blk-read: $res"; }
  res=$(vk_guest_result "$log" blk-write) || { vk_qemu_dump "$log"; vk_fail "no blk-write result"; }
  [[ $res == fail* ]] || { vk_qemu_dump "$log"; vk_fail "the write to a read-only disk succeeded: $res"; }
  after=$(sha256sum "$img" | cut -d' ' -f1)
  [[ $before == "$after" ]] || vk_fail "the read-only image changed"
  vk_net_stop "$blk_pid"; rc=$?
  ((rc == 0)) || { cat "$blog"; vk_fail "exit status $rc"; }
  vk_pass "blk-write: $res; image unchanged"
fi

echo "$me: all checks passed in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"
