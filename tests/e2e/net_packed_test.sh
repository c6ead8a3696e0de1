#!/usr/bin/env bash
# A QEMU guest on the packed virtqueue (virtio-net-pci packed=on) through vhostkit-net --tap: the
# checks of net_tap_ping_test.sh (ping, 20 MiB over TCP each way with sha256 equal on both ends,
# clean exits), after checking that the guest negotiated VIRTIO_F_RING_PACKED (bit 34 in its
# /sys/class/net/eth0/device/features) and vhostkit-net logged the packed ring: QEMU falls back
# to the split ring without a word when the back-end does not offer it.
exec env VK_QEMU_NET_DEVICE_ARGS=",packed=on" VK_EXPECT_GUEST_BITS=34 \
  VK_NET_EXPECT_RING="packed ring" VK_SCRIPT_NAME=net_packed_test.sh \
  bash "$(dirname "$0")/net_tap_ping_test.sh"
