#!/usr/bin/env bash
# Multiqueue: two queue pairs through vhostkit-net --queues=2. Driven by DPDK virtio-user with
# queues=2 (testpmd --rxq=2 --txq=2, flowgen on both queues) against --loopback --queues=2: each
# pair must carry frames both ways (its own qp0/qp1 --stats lines) and the exact accounting of
# net_dpdk_loopback_test.sh holds over both pairs.
# Why not a QEMU guest: the test guest has one vCPU, so virtio_net enables one queue pair, and its
# busybox has no `ethtool -L` to enable the second; which queue a guest flow takes is also up to
# XPS and the TAP's flow steering, so a guest test could not promise traffic on both pairs.
exec env VK_NET_QUEUES=2 VK_SCRIPT_NAME=net_multiqueue_test.sh \
  bash "$(dirname "$0")/net_dpdk_loopback_test.sh"
