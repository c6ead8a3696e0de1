#!/usr/bin/env bash
# The packed virtqueue with VIRTIO_F_IN_ORDER: DPDK's virtio-user (packed_vq=1,in_order=1)
# against vhostkit-net --loopback, the run and exact accounting of net_dpdk_loopback_test.sh,
# after checking that vhostkit-net negotiated both.
exec env VK_NET_VDEV_ARGS=",packed_vq=1,in_order=1" VK_NET_EXPECT_RING="packed ring, in order" \
  VK_SCRIPT_NAME=net_dpdk_in_order_test.sh bash "$(dirname "$0")/net_dpdk_loopback_test.sh"
