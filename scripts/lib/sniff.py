#!/usr/bin/env python3
"""Waits for one announce frame on an interface (run it inside the test's namespace).

  sniff.py IFACE MAC [--timeout S]

An announce is what a migrated guest's new port must put on the wire so that switches learn
where MAC now lives: a RARP (ethertype 0x8035, what QEMU and vhost-user's SEND_RARP send) or a
gratuitous ARP (ethertype 0x0806 whose sender IP equals its target IP, what a guest that acked
VIRTIO_NET_F_GUEST_ANNOUNCE sends), from MAC. Prints "rarp" or "garp" on the first one and exits
0; exits 1 when none came within S seconds (default 60), 2 on bad usage.
"""
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003


def main(argv):
    if len(argv) not in (3, 5) or (len(argv) == 5 and argv[3] != "--timeout"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    iface, mac = argv[1], bytes.fromhex(argv[2].replace(":", ""))
    timeout = float(argv[4]) if len(argv) == 5 else 60.0
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    # Ready only once bound: the caller waits for this line before it causes the announce.
    print("listening", flush=True)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([s], [], [], left)[0]:
            break
        frame = s.recv(2048)
        if len(frame) < 14 or frame[6:12] != mac:
            continue
        ethertype = int.from_bytes(frame[12:14], "big")
        if ethertype == 0x8035:
            print("rarp", flush=True)
            return 0
        # ARP for IPv4 over Ethernet: sender IP at 28..32, target IP at 38..42.
        if ethertype == 0x0806 and len(frame) >= 42 and frame[28:32] == frame[38:42]:
            print("garp", flush=True)
            return 0
    print(f"sniff.py: no announce from {argv[2]} on {iface} in {timeout:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
