#!/usr/bin/env bash
# A QEMU guest's disk on the packed virtqueue (vhost-user-blk-pci packed=on) through
# vhostkit-blk: the checks of blk_guest_test.sh on the io_uring and the inline paths (the guest
# reads the host's pattern, writes and reads back, discards; FLUSH and DISCARD counted; clean
# exits), after checking that the guest negotiated VIRTIO_F_RING_PACKED (bit 34 in its
# /sys/block/vda/device/features) and vhostkit-blk logged the packed ring: QEMU falls back to the
# split ring without a word when the back-end does not offer it.
exec env VK_QEMU_BLK_DEVICE_ARGS=",packed=on" VK_EXPECT_GUEST_BITS=34 \
  VK_BLK_EXPECT_RING="packed ring" VK_BLK_READ_ONLY_PHASE=0 VK_SCRIPT_NAME=blk_packed_test.sh \
  bash "$(dirname "$0")/blk_guest_test.sh"
