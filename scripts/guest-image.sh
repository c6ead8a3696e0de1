#!/usr/bin/env bash
# Builds the test guest: a Debian cloud kernel plus a busybox initramfs whose /init loads the
# virtio modules, configures the first virtio NIC from the kernel command line and runs one or
# more built-in scenarios, printing "VK-..." markers on ttyS0, then powers off.
#
#   scripts/guest-image.sh [OUTDIR]        (default: build/guest under the repo root)
#
# Produces OUTDIR/vmlinuz and OUTDIR/initramfs.gz. Uses only Debian packages: the kernel .deb is
# fetched with `apt-get download` into OUTDIR/cache and unpacked with `dpkg -x`; busybox comes from
# busybox-static (installed by scripts/deps.sh). Idempotent: a stamp records what was built, and a
# re-run with everything in place returns at once.
#
# Kernel command line understood by /init (all optional except vk.ip for network scenarios):
#   vk.ip=192.0.2.2/24     guest address on the first virtio NIC
#   vk.peer=192.0.2.1      the host side (ping target, TCP peer)
#   vk.cmd=ping,tcp-tx     comma-separated scenarios, run in order:
#       ping     ping the peer vk.count times       -> VK-RESULT ping ok|fail sent=N received=M
#       tcp-tx   send vk.mb MiB of random data to peer:vk.port with nc
#                                                   -> VK-RESULT tcp-tx ok|fail bytes=N sha256=H
#       tcp-rx   receive from peer:vk.port+1 until EOF
#                                                   -> VK-RESULT tcp-rx ok|fail bytes=N sha256=H
#       blk-read   sha256 of the first vk.mb MiB of /dev/vda (whole disk if vk.mb=0), after
#                  "VK-BLK-FEATURES <bits>" (the disk's negotiated features, bit 0 first)
#       blk-write  write vk.mb MiB of random data to /dev/vda, read it back, compare
#       blk-discard  discard the 1 MiB of /dev/vda after the first vk.mb MiB (blkdiscard)
#                                                   -> VK-RESULT blk-discard ok|fail offset=N bytes=M
#       blk-writers  vk.writers parallel O_DIRECT writers, writer i rewriting MiB i*vk.mb..
#                  of /dev/vda with random data vk.rounds times, each round read back (O_DIRECT)
#                  and compared; "VK-WRITING" once they run, "VK-ROUND i r" per round
#                  -> VK-RESULT blk-writers ok|fail errors=N sha0=H sha1=H ... (the last round's)
#       idle     stay up until killed (vk.idle=SECONDS to bound it)
#       shell    interactive busybox shell on the console
#   vk.peer_mac=02:00:00:00:00:01   static neighbour entry for vk.peer (for reflectors that
#                          don't answer ARP, e.g. testpmd --forward-mode=5tswap)
#   vk.count=5 vk.mb=4 vk.port=5201 vk.link_timeout=20
# Markers: VK-BOOT, VK-MODULES ok|fail, VK-LINK up|down, VK-NET ..., VK-FEATURES <bits>,
#          VK-RESULT <scenario> ok|fail ..., VK-DONE <failed-count>
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/build/guest}
mkdir -p "$out/cache"
out=$(cd "$out" && pwd)
cache=$out/cache

# Built modules, in load order (dependencies first); virtio_blk last, for block tests.
modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
         failover net_failover virtio_net virtio_blk)

die() { echo "guest-image: $*" >&2; exit 1; }

# One builder at a time per OUTDIR (tests in several build dirs may call us together).
exec 9>"$out/.lock"
flock 9

busybox_bin=/bin/busybox
script_sum=$(sha256sum "$0" | cut -d' ' -f1)
stamp_want="script=$script_sum busybox=$(stat -c %s-%Y "$busybox_bin" 2>/dev/null || echo none)"
if [[ -f $out/stamp && -f $out/vmlinuz && -f $out/initramfs.gz ]] &&
   [[ $(head -1 "$out/stamp") == "$stamp_want" ]]; then
  echo "guest-image: up to date in $out ($(sed -n 2p "$out/stamp"))"
  exit 0
fi

[[ -x $busybox_bin ]] || die "$busybox_bin missing: run scripts/deps.sh (busybox-static)"
for tool in cpio gzip dpkg apt-get apt-cache; do
  command -v "$tool" >/dev/null || die "'$tool' not found: run scripts/deps.sh"
done

# --- kernel: resolve the versioned package behind linux-image-cloud-amd64, download, unpack ---
resolve_kernel_pkg() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -1
}
kpkg=$(resolve_kernel_pkg)
if [[ -z $kpkg ]]; then
  # Package lists may be absent on a fresh machine; refresh them once.
  echo "guest-image: linux-image-cloud-amd64 unknown to apt, running apt-get update"
  apt-get update -q >/dev/null || die "apt-get update failed"
  kpkg=$(resolve_kernel_pkg)
fi
if [[ -z $kpkg ]]; then
  # Offline fallback: reuse a kernel downloaded earlier.
  deb=$(ls -1 "$cache"/linux-image-*-cloud-amd64_*.deb 2>/dev/null | sort -V | tail -1 || true)
  [[ -n $deb ]] || die "cannot resolve linux-image-cloud-amd64 (apt-cache depends) and no cached kernel"
  kpkg=$(basename "$deb" | cut -d_ -f1)
fi
deb=$(ls -1 "$cache/${kpkg}"_*.deb 2>/dev/null | sort -V | tail -1 || true)
if [[ -z $deb ]]; then
  echo "guest-image: downloading $kpkg"
  (cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >/dev/null) ||
    die "apt-get download $kpkg failed"
  deb=$(ls -1 "$cache/${kpkg}"_*.deb | sort -V | tail -1)
fi
kdir=$cache/${kpkg}.unpacked
if [[ ! -f $kdir/.done ]]; then
  rm -rf "$kdir"
  dpkg -x "$deb" "$kdir"
  touch "$kdir/.done"
fi
kver=${kpkg#linux-image-}
vmlinuz=$kdir/boot/vmlinuz-$kver
[[ -f $vmlinuz ]] || die "no $vmlinuz in $deb"

# --- initramfs tree ---
stage=$out/initramfs.tmp
rm -rf "$stage"
mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,run,lib/modules,mnt}
cp "$busybox_bin" "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
for m in "${modules[@]}"; do
  src=$(find "$kdir/lib/modules/$kver/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -1)
  [[ -n $src ]] || die "module $m not found in $kpkg"
  case $src in
    # Decompress at build time: busybox insmod is not guaranteed to understand .xz/.zst.
    *.xz) xz -dc "$src" >"$stage/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$src" >"$stage/lib/modules/$m.ko" ;;
    *) cp "$src" "$stage/lib/modules/$m.ko" ;;
  esac
done
printf '%s\n' "${modules[@]}" >"$stage/lib/modules/order"

cat >"$stage/init" <<'INIT'
#!/bin/sh
# vhostkit test guest init (generated by scripts/guest-image.sh).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo "VK-BOOT kernel=$(uname -r)"

# Read vk.* parameters; the kernel keeps dotted params out of init's environment.
arg() {
  for w in $(cat /proc/cmdline); do
    case $w in "$1="*) echo "${w#*=}"; return ;; esac
  done
  echo "$2"
}
IP=$(arg vk.ip "")
PEER=$(arg vk.peer 192.0.2.1)
CMDS=$(arg vk.cmd idle)
COUNT=$(arg vk.count 5)
MB=$(arg vk.mb 4)
PORT=$(arg vk.port 5201)
LINK_TIMEOUT=$(arg vk.link_timeout 20)
IDLE=$(arg vk.idle 0)
WRITERS=$(arg vk.writers 4)
ROUNDS=$(arg vk.rounds 6)
PEER_MAC=$(arg vk.peer_mac "")
FAILED=0

modfail=0
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m.ko || { echo "VK-MODULES fail $m"; modfail=1; }
done
[ $modfail = 0 ] && echo "VK-MODULES ok"

# The first virtio NIC: whatever name the kernel gave it.
IFACE=
for d in /sys/class/net/*; do
  [ -e "$d/device/driver" ] || continue
  case $(readlink "$d/device/driver") in *virtio_net) IFACE=${d##*/}; break ;; esac
done

net_up() {
  if [ -z "$IFACE" ]; then echo "VK-NET none"; return 1; fi
  ip link set lo up
  ip link set "$IFACE" up
  [ -n "$IP" ] && ip addr add "$IP" dev "$IFACE"
  i=0
  while [ "$(cat /sys/class/net/$IFACE/carrier 2>/dev/null)" != 1 ]; do
    i=$((i + 1))
    if [ $i -gt $((LINK_TIMEOUT * 10)) ]; then echo "VK-LINK down"; return 1; fi
    usleep 100000
  done
  echo "VK-LINK up"
  # busybox ip has no "neigh add"; arp -s makes a permanent entry.
  [ -n "$PEER_MAC" ] && arp -i "$IFACE" -s "$PEER" "$PEER_MAC"
  echo "VK-NET iface=$IFACE mac=$(cat /sys/class/net/$IFACE/address) ip=$IP mtu=$(cat /sys/class/net/$IFACE/mtu)"
  echo "VK-FEATURES $(cat /sys/class/net/$IFACE/device/features 2>/dev/null)"
  return 0
}

result() { # result NAME ok|fail DETAILS...
  name=$1 status=$2; shift 2
  [ "$status" = ok ] || FAILED=$((FAILED + 1))
  echo "VK-RESULT $name $status $*"
}

# A reader whose stdin never ends: busybox nc shuts its write side down at stdin EOF, and a
# peer that is still sending would then stop early. A fifo held open by a sleeper avoids that.
hold_stdin() {
  rm -f /tmp/hold; mkfifo /tmp/hold
  sleep 100000 >/tmp/hold &
  HOLD_PID=$!
}

sc_ping() {
  out=$(ping -c "$COUNT" -W 2 "$PEER" 2>&1)
  sent=$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
  recv=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
  rtt=$(echo "$out" | sed -n 's/^round-trip.* = \(.*\)/\1/p' | tr ' ' '_')
  if [ "${recv:-0}" -ge 1 ] && [ "${recv:-0}" = "$COUNT" ]; then
    result ping ok sent=$sent received=$recv rtt=$rtt
  else
    echo "$out"; result ping fail sent=${sent:-0} received=${recv:-0}
  fi
}

sc_tcp_tx() {
  dd if=/dev/urandom of=/tmp/tx bs=1048576 count="$MB" 2>/dev/null
  sum=$(sha256sum /tmp/tx | cut -d' ' -f1)
  bytes=$(stat -c %s /tmp/tx)
  echo "VK-INFO tcp-tx connecting $PEER:$PORT bytes=$bytes"
  t0=$(cut -d' ' -f1 /proc/uptime)
  if nc -w 10 "$PEER" "$PORT" </tmp/tx >/dev/null; then
    t1=$(cut -d' ' -f1 /proc/uptime)
    result tcp-tx ok bytes=$bytes sha256=$sum seconds=$(echo "$t1 $t0" | awk '{print $1-$2}')
  else
    result tcp-tx fail bytes=$bytes sha256=$sum nc-exit
  fi
  rm -f /tmp/tx
}

sc_tcp_rx() {
  port=$((PORT + 1))
  echo "VK-INFO tcp-rx connecting $PEER:$port"
  hold_stdin
  t0=$(cut -d' ' -f1 /proc/uptime)
  nc -w 10 "$PEER" "$port" </tmp/hold >/tmp/rx; rc=$?
  t1=$(cut -d' ' -f1 /proc/uptime)
  kill $HOLD_PID 2>/dev/null
  bytes=$(stat -c %s /tmp/rx)
  sum=$(sha256sum /tmp/rx | cut -d' ' -f1)
  if [ $rc = 0 ] && [ "$bytes" -gt 0 ]; then
    result tcp-rx ok bytes=$bytes sha256=$sum seconds=$(echo "$t1 $t0" | awk '{print $1-$2}')
  else
    result tcp-rx fail bytes=$bytes sha256=$sum nc-exit=$rc
  fi
  rm -f /tmp/rx
}

sc_blk_read() {
  [ -b /dev/vda ] || { result blk-read fail no-/dev/vda; return; }
  echo "VK-BLK-FEATURES $(cat /sys/block/vda/device/features 2>/dev/null)"
  if [ "$MB" -gt 0 ]; then
    sum=$(dd if=/dev/vda bs=1048576 count="$MB" 2>/dev/null | sha256sum | cut -d' ' -f1)
    bytes=$((MB * 1048576))
  else
    sum=$(sha256sum /dev/vda | cut -d' ' -f1)
    bytes=$(blockdev --getsize64 /dev/vda)
  fi
  result blk-read ok bytes=$bytes sha256=$sum
}

sc_blk_write() {
  [ -b /dev/vda ] || { result blk-write fail no-/dev/vda; return; }
  dd if=/dev/urandom of=/tmp/blk bs=1048576 count="$MB" 2>/dev/null
  sum=$(sha256sum /tmp/blk | cut -d' ' -f1)
  dd if=/tmp/blk of=/dev/vda bs=1048576 conv=fsync 2>/dev/null || { result blk-write fail write-error; return; }
  sync; echo 3 >/proc/sys/vm/drop_caches
  back=$(dd if=/dev/vda bs=1048576 count="$MB" 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [ "$back" = "$sum" ]; then
    result blk-write ok bytes=$((MB * 1048576)) sha256=$sum
  else
    result blk-write fail bytes=$((MB * 1048576)) sha256=$sum readback=$back
  fi
  rm -f /tmp/blk
}

sc_blk_discard() {
  [ -b /dev/vda ] || { result blk-discard fail no-/dev/vda; return; }
  off=$((MB * 1048576))
  if blkdiscard -o "$off" -l 1048576 /dev/vda 2>/tmp/discard.err; then
    result blk-discard ok offset=$off bytes=1048576
  else
    result blk-discard fail offset=$off error=$(head -1 /tmp/discard.err | tr ' ' '_')
  fi
}

# One writer: its own vk.mb MiB at MiB $1*vk.mb, rewritten ROUNDS times (O_DIRECT, with a
# flush), each round read back (O_DIRECT) and compared. Each round writes another slice of one
# random file made at the start (random data per round would keep a TCG guest computing rather
# than writing). Any dd failure or a read-back that differs counts in /tmp/err$1; the sha256 of
# the last round's data goes to /tmp/sum$1.
blk_writer() {
  w=$1
  blocks=$((MB * 16))  # 64 KiB blocks
  dd if=/dev/urandom of=/tmp/r$w bs=65536 count=$((blocks * 2)) 2>/dev/null
  r=1
  while [ $r -le "$ROUNDS" ]; do
    dd if=/tmp/r$w of=/tmp/want$w bs=65536 skip=$((r % blocks)) count=$blocks 2>/dev/null
    dd if=/tmp/want$w of=/dev/vda bs=65536 seek=$((w * blocks)) oflag=direct conv=fsync \
      2>>/tmp/err$w || echo "write round $r" >>/tmp/err$w
    dd if=/dev/vda bs=65536 skip=$((w * blocks)) count=$blocks iflag=direct 2>>/tmp/err$w |
      cmp -s - /tmp/want$w || echo "readback round $r" >>/tmp/err$w
    echo "VK-ROUND $w $r"
    r=$((r + 1))
  done
  sha256sum /tmp/want$w | cut -d' ' -f1 >/tmp/sum$w
  rm -f /tmp/r$w /tmp/want$w
}

sc_blk_writers() {
  [ -b /dev/vda ] || { result blk-writers fail no-/dev/vda; return; }
  pids=
  i=0
  while [ $i -lt "$WRITERS" ]; do
    : >/tmp/err$i
    blk_writer $i &
    pids="$pids $!"
    i=$((i + 1))
  done
  echo "VK-WRITING"
  wait $pids
  errors=0
  sums=
  i=0
  while [ $i -lt "$WRITERS" ]; do
    # dd's own summary lines ("N+0 records") are not errors; anything else is.
    n=$(grep -cv 'records\|bytes' /tmp/err$i)
    [ "$n" -gt 0 ] && { echo "VK-WRITER-ERRORS $i"; head -5 /tmp/err$i; }
    errors=$((errors + n))
    sums="$sums sha$i=$(cat /tmp/sum$i 2>/dev/null)"
    i=$((i + 1))
  done
  ioerr=$(dmesg | grep -ci 'I/O error')
  if [ "$errors" = 0 ] && [ "$ioerr" = 0 ]; then
    result blk-writers ok errors=0$sums
  else
    result blk-writers fail errors=$errors kernel-io-errors=$ioerr$sums
  fi
}

need_net() { [ "$NET_OK" = 1 ] || { result "$1" fail no-network; return 1; }; }

NET_OK=0
case ",$CMDS," in
  *,ping,*|*,tcp-tx,*|*,tcp-rx,*|*,idle,*|*,shell,*) net_up && NET_OK=1 ;;
esac

for c in $(echo "$CMDS" | tr ',' ' '); do
  echo "VK-RUN $c"
  case $c in
    ping) need_net ping && sc_ping ;;
    tcp-tx) need_net tcp-tx && sc_tcp_tx ;;
    tcp-rx) need_net tcp-rx && sc_tcp_rx ;;
    blk-read) sc_blk_read ;;
    blk-write) sc_blk_write ;;
    blk-discard) sc_blk_discard ;;
    blk-writers) sc_blk_writers ;;
    idle)
      echo "VK-IDLE"
      if [ "$IDLE" -gt 0 ]; then sleep "$IDLE"; else while :; do sleep 3600; done; fi ;;
    shell) setsid cttyhack sh ;;
    *) result "$c" fail unknown-scenario ;;
  esac
done

echo "VK-DONE failed=$FAILED"
sync
poweroff -f
INIT
chmod +x "$stage/init"

(cd "$stage" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) | gzip -6 >"$out/initramfs.gz.tmp"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
cp "$vmlinuz" "$out/vmlinuz"
rm -rf "$stage"
printf '%s\n%s\n' "$stamp_want" "kernel=$kver" >"$out/stamp"
echo "guest-image: built $out/vmlinuz and $out/initramfs.gz (kernel $kver)"
