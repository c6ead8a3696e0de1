#!/usr/bin/env bash
# vhostkit-bench blk against qemu-storage-daemon (QSD), the reference vhost-user-blk back-end:
# 1 s of randread and 1 s of randwrite, with the image opened buffered (cache.direct=off) and
# with O_DIRECT (cache.direct=on). Each run must exit 0 with requests completed and no error.
# QSD 7.2 offers VIRTIO_BLK_F_SIZE_MAX with size_max 0 in its config (either cache mode); the
# front-end once refused that disk ("size_max 0 is less than a sector").
# The image lives on a file system that supports O_DIRECT (/var/tmp or /tmp, not a tmpfs), and
# the cache.direct=on case checks that QSD really holds the image with O_DIRECT.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/vhostkit.sh"

t_start=$(vk_now)
vk_require_cmd python3 truncate
QSD=${QSD:-qemu-storage-daemon}
command -v "$QSD" >/dev/null 2>&1 ||
  vk_fail "$QSD not installed: it is in Debian's qemu-system-common (scripts/deps.sh installs it)"
vk_find_programs BENCH=vhostkit-bench
vk_tmpdir

imgdir=""
for d in /var/tmp /tmp; do
  if [[ -d $d && -w $d && $(stat -f -c %T "$d") != tmpfs ]]; then
    imgdir=$(mktemp -d "$d/vk-blk-qsd.XXXXXX")
    break
  fi
done
[[ -n $imgdir ]] || vk_skip "neither /var/tmp nor /tmp is a file system with O_DIRECT (both tmpfs)"
vk_on_exit "rm -rf '$imgdir'"
img=$imgdir/disk.img
truncate -s 64M "$img"
vk_log "image $img on $(stat -f -c %T "$imgdir"), $("$QSD" --version | head -1)"

# qsd_start DIRECT: QSD exporting $img writable on $VK_TMP/qsd-DIRECT.sock; sets QSD_PID.
qsd_start() {
  local direct=$1 sock=$VK_TMP/qsd-$1.sock
  "$QSD" --blockdev "driver=file,node-name=disk,filename=$img,cache.direct=$direct" \
    --export "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path=$sock,writable=on" \
    </dev/null >"$VK_TMP/qsd-$direct.log" 2>&1 &
  QSD_PID=$!
  vk_track_pid "$QSD_PID"
  vk_wait_for 30 test -S "$sock" || { cat "$VK_TMP/qsd-$direct.log"; vk_fail "QSD did not listen on $sock"; }
  QSD_SOCK=$sock
}

# image_flags PID: the open flags (octal) of PID's fd on $img.
image_flags() {
  local fd
  for fd in /proc/"$1"/fd/*; do
    [[ $(readlink "$fd") == "$img" ]] || continue
    awk '$1 == "flags:" { print $2 }' "/proc/$1/fdinfo/${fd##*/}"
    return 0
  done
  return 1
}

for direct in off on; do
  qsd_start "$direct"
  vk_check "QSD cache.direct=$direct opened the image $([[ $direct == on ]] && echo with || echo without) O_DIRECT"
  flags=$(image_flags "$QSD_PID") || vk_fail "QSD holds no fd on $img"
  # O_DIRECT is 040000 on x86-64.
  if [[ $direct == on ]]; then
    (( (8#$flags & 8#40000) != 0 )) || vk_fail "flags $flags: no O_DIRECT"
  else
    (( (8#$flags & 8#40000) == 0 )) || vk_fail "flags $flags: O_DIRECT"
  fi
  vk_pass "open flags $flags"
  for rw in randread randwrite; do
    vk_check "vhostkit-bench blk --rw=$rw for 1 s against QSD cache.direct=$direct: exit 0, requests done, no error"
    out=$VK_TMP/bench-$direct-$rw.out
    timeout 60 "$BENCH" blk --socket-path="$QSD_SOCK" --rw="$rw" --duration=1 --warmup=0 \
      --poll=event --json </dev/null >"$out" 2>"$VK_TMP/bench-$direct-$rw.err"
    rc=$?
    ((rc == 0)) || { cat "$out" "$VK_TMP/bench-$direct-$rw.err" "$VK_TMP/qsd-$direct.log"; vk_fail "exit $rc"; }
    summary=$(python3 - "$out" 2>&1 <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("{")]
if not lines:
    sys.exit("no JSON line")
r = json.loads(lines[-1])["results"][0]
if r["errors"] != 0 or r["requests"] <= 0:
    sys.exit(f"requests {r['requests']} errors {r['errors']}")
print(f"{r['requests']} requests, {r['iops']:.0f} IOPS, p50 {r['p50_us']:.0f} us, 0 errors")
EOF
    ) || { cat "$out" "$VK_TMP/bench-$direct-$rw.err"; vk_fail "results: $summary"; }
    vk_pass "$summary"
  done
  vk_kill "$QSD_PID"
  vk_check "QSD cache.direct=$direct logged no error"
  if grep -qi "error" "$VK_TMP/qsd-$direct.log"; then cat "$VK_TMP/qsd-$direct.log"; vk_fail "QSD logged an error"; fi
  vk_pass "QSD log clean"
done

echo "blk_qsd_test: all checks passed in $(awk -v a="$t_start" -v b="$(vk_now)" 'BEGIN{printf "%.1f", b-a}') s"
