#!/usr/bin/env python3
"""A small QMP client for the e2e tests (QEMU's machine protocol over a unix socket).

  qmp.py SOCK run CMD [JSON-ARGS]       execute one command, print its "return" as JSON
  qmp.py SOCK migrate URI [--timeout S] [--max-bandwidth BYTES]
                                        migrate to URI and wait for the MIGRATION event that
                                        ends it; prints "completed <ms> ms, <MiB> MiB" or exits 1
                                        with QEMU's own reason ("failed: <error-desc>")
  qmp.py SOCK wait-status STATUS [--timeout S]
                                        wait until query-status reports STATUS (e.g. running)

Exit status: 0 on success, 1 when QEMU answers with an error or the awaited state is not
reached in time, 2 on bad usage. Errors go to stderr in one line.
"""
import json
import socket
import sys
import time


class Qmp:
    def __init__(self, path, timeout):
        self.deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self._left())
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise RuntimeError(f"no QMP greeting from {path}: {greeting}")
        self.execute("qmp_capabilities")

    def _left(self):
        return max(0.1, self.deadline - time.monotonic())

    def _read(self):
        while b"\n" not in self.buf:
            self.sock.settimeout(self._left())
            if time.monotonic() > self.deadline:
                raise TimeoutError("timed out waiting for QEMU")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("QEMU closed the QMP socket")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd, args=None):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"{cmd}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def next_event(self, name):
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name:
                    return self.events.pop(i)
            self.events.clear()
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)


def migrate(q, uri, max_bandwidth):
    q.execute("migrate-set-capabilities",
              {"capabilities": [{"capability": "events", "state": True}]})
    if max_bandwidth:
        q.execute("migrate-set-parameters", {"max-bandwidth": max_bandwidth})
    q.execute("migrate", {"uri": uri})
    while True:
        status = q.next_event("MIGRATION")["data"]["status"]
        if status in ("completed", "failed", "cancelled"):
            break
    info = q.execute("query-migrate")
    if status != "completed":
        print(f"{status}: {info.get('error-desc', 'no reason given')}", file=sys.stderr)
        return 1
    ram = info.get("ram", {})
    print(f"completed {info.get('total-time', 0)} ms, downtime {info.get('downtime', 0)} ms, "
          f"{ram.get('transferred', 0) / 1048576:.1f} MiB")
    return 0


def wait_status(q, want):
    while True:
        status = q.execute("query-status")["status"]
        if status == want:
            print(status)
            return 0
        # RESUME/STOP events announce changes; query again after each (or at the deadline).
        try:
            q.sock.settimeout(min(1.0, q._left()))
            q.events.append(q._read())
        except (TimeoutError, socket.timeout):
            if time.monotonic() > q.deadline:
                raise TimeoutError(f"status still {status}, wanted {want}")


def main(argv):
    if len(argv) < 3 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr if len(argv) < 3 else sys.stdout)
        return 2 if len(argv) < 3 else 0
    sock, verb, rest = argv[1], argv[2], argv[3:]
    timeout, max_bw, pos = 60.0, 0, []
    i = 0
    while i < len(rest):
        if rest[i] == "--timeout" and i + 1 < len(rest):
            timeout = float(rest[i + 1]); i += 2
        elif rest[i] == "--max-bandwidth" and i + 1 < len(rest):
            max_bw = int(rest[i + 1]); i += 2
        else:
            pos.append(rest[i]); i += 1
    try:
        q = Qmp(sock, timeout)
        if verb == "run" and pos:
            args = json.loads(pos[1]) if len(pos) > 1 else None
            print(json.dumps(q.execute(pos[0], args)))
            return 0
        if verb == "migrate" and len(pos) == 1:
            return migrate(q, pos[0], max_bw)
        if verb == "wait-status" and len(pos) == 1:
            return wait_status(q, pos[0])
        print(f"qmp.py: bad usage '{' '.join(argv[2:])}' (see --help)", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, TimeoutError, ValueError) as e:
        print(f"qmp.py: {verb}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
