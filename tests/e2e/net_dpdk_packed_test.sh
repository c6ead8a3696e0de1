#!/usr/bin/env bash
# The packed virtqueue with DPDK's virtio-user (packed_vq=1) against vhostkit-net --loopback
# --no-in-order: the run and exact accounting of net_dpdk_loopback_test.sh, after checking that
# vhostkit-net negotiated the packed ring without IN_ORDER. (virtio-user 22.11 with packed_vq=1
# acks IN_ORDER whenever it is offered: --no-in-order is how this test keeps the packed ring's
# out-of-order path covered; net_dpdk_in_order_test.sh runs with both.)
exec env VK_NET_VDEV_ARGS=",packed_vq=1" VK_NET_ARGS="--no-in-order" VK_NET_EXPECT_RING="packed ring" \
  VK_SCRIPT_NAME=net_dpdk_packed_test.sh bash "$(dirname "$0")/net_dpdk_loopback_test.sh"
