#!/usr/bin/env bash
# The control for net_migration_test with traffic during the switch-over: the same guest, the
# same bridge, the same paced TCP transfer spanning the migration, but QEMU's own virtio-net on a
# TAP instead of vhost-user and vhostkit-net. When this fails the way the vhostkit variant does
# (a kernel BUG in list_debug or the timer wheel, or soft lockups every 28 s on the
# destination), the fault is QEMU's (7.2, TCG), not the back-end's. Measured 2026-12-05 on this
# 2-core host at load 7-10: 3 of 8 runs failed, against 1 of 4 with vhostkit-net; with the guest
# idle during the migration 6 of 6 vhostkit-net runs passed. See README.md here.
VK_MIG_NIC=qemu VK_MIG_TRAFFIC=during exec bash "$(dirname "$0")/../e2e/net_migration_test.sh"
