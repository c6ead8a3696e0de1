#!/usr/bin/env bash
# net_migration_test with QEMU's guest_announce=off: the guest cannot announce itself, so QEMU
# sends vhost-user SEND_RARP to the destination's vhostkit-net, which must put a RARP from the
# guest's MAC on its port. Everything else as net_migration_test.sh.
VK_MIG_ANNOUNCE=rarp exec bash "$(dirname "$0")/net_migration_test.sh"
