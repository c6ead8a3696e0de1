#!/usr/bin/env python3
"""Stand-ins for systemd's side of the daemon protocols, for tests without systemd as PID 1.

  activate KIND -- CMD...     exec CMD (same pid, as systemd does) with fd 3 (and 4) set up
                              as KIND and LISTEN_FDS/LISTEN_PID naming it: unix-listen,
                              unix-bound (bound, not listening), unix-dgram, tcp-listen, two
                              (two listening unix sockets)
  notify server PATH -- CMD...  run CMD (which listens on PATH) with NOTIFY_SOCKET set: READY=1
                              must arrive once, and at that moment PATH accepts a connection;
                              SIGTERM then brings STOPPING=1 and exit 0
  notify client PATH -- CMD...  CMD connects to PATH (--client): no READY=1 while nothing
                              listens there (checked once CMD logs a failed connect); READY=1
                              after PATH is listened on and its connection accepted; SIGTERM
                              then brings STOPPING=1 and exit 0
  path-ready N PATH [--expect-refused] -- CMD...
                              N times: start CMD, connect to PATH the moment inotify reports
                              its name in the directory, stop CMD with SIGTERM (exit 0 wanted).
                              Fails if any connect is refused (or, with --expect-refused, if
                              none is: the check's own control, against a naive binder)
Prints PASS/FAIL lines; exit 0 on success, 1 on failure.
"""
import atexit
import ctypes
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def split_cmd(argv):
    if "--" not in argv:
        fail("usage: missing -- CMD")
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def activate(kind, cmd):
    socks = []
    tmp = tempfile.mkdtemp(prefix="vk-activate.")
    atexit.register(shutil.rmtree, tmp, True)  # on fail() too: nothing left in /tmp
    if kind in ("unix-listen", "unix-bound", "two"):
        for n in range(2 if kind == "two" else 1):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(os.path.join(tmp, f"s{n}.sock"))
            if kind != "unix-bound":
                s.listen(4)
            socks.append(s)
    elif kind == "unix-dgram":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(os.path.join(tmp, "d.sock"))
        socks.append(s)
    elif kind == "tcp-listen":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        socks.append(s)
    else:
        fail(f"unknown kind {kind}")
    # Via copies above the target range: a socket may already sit on 3 or 4.
    high = [os.dup(s.fileno()) for s in socks]
    for n, fd in enumerate(high):
        os.dup2(fd, 3 + n)  # dup2 leaves the copy inheritable
    env = dict(os.environ, LISTEN_FDS=str(len(socks)), LISTEN_PID=str(os.getpid()))
    os.execvpe(cmd[0], cmd, env)


class Output:
    """Collects a child's merged stdout/stderr lines on a thread."""

    def __init__(self, proc):
        self.lines = []
        self.cv = threading.Condition()
        self.t = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.t.start()

    def _read(self, proc):
        for raw in proc.stdout:
            with self.cv:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self.cv.notify_all()

    def wait_for(self, text, timeout):
        with self.cv:
            return self.cv.wait_for(lambda: any(text in l for l in self.lines), timeout)

    def dump(self):
        with self.cv:
            return "\n".join(self.lines)


def recv_notify(s, timeout):
    r, _, _ = select.select([s], [], [], timeout)
    if not r:
        return None
    return s.recv(4096).decode()


def notify(mode, path, cmd):
    tmp = tempfile.mkdtemp(prefix="vk-notify.")
    atexit.register(shutil.rmtree, tmp, True)  # on fail() too: nothing left in /tmp
    nsock = os.path.join(tmp, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(nsock)
    env = dict(os.environ, NOTIFY_SOCKET=nsock)
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = Output(proc)
    try:
        listener = None
        if mode == "client":
            if not out.wait_for("cannot connect to", 20):
                fail(f"client: no failed-connect log line within 20 s\n{out.dump()}")
            early = recv_notify(s, 0.2)
            if early is not None:
                fail(f"client: notification while nothing listens on {path}: {early!r}")
            print("PASS: client: no READY=1 while the server is absent", flush=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1)
            listener.settimeout(20)
            conn, _ = listener.accept()  # the back-end's reconnect arrives
        msg = recv_notify(s, 20)
        if msg is None:
            fail(f"{mode}: no notification within 20 s\n{out.dump()}")
        fields = msg.split("\n")
        if "READY=1" not in fields:
            fail(f"{mode}: first notification is not READY=1: {msg!r}")
        if mode == "server":
            # At READY=1 the socket must take a connection (the back-end's accept comes later).
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                c.connect(path)
            except OSError as e:
                fail(f"server: READY=1 arrived but connect({path}) failed: {e}")
            c.close()
        status = [f for f in fields if f.startswith("STATUS=")]
        if not status or path not in status[0]:
            fail(f"{mode}: READY=1 without a STATUS naming {path}: {msg!r}")
        print(f"PASS: {mode}: {msg!r}", flush=True)
        proc.send_signal(signal.SIGTERM)
        msg = recv_notify(s, 20)
        if msg is None or "STOPPING=1" not in msg.split("\n"):
            fail(f"{mode}: after SIGTERM want STOPPING=1, got {msg!r}\n{out.dump()}")
        rc = proc.wait(20)
        if rc != 0:
            fail(f"{mode}: exit {rc} after SIGTERM\n{out.dump()}")
        extra = recv_notify(s, 0)
        if extra is not None and "READY=1" in extra.split("\n"):
            fail(f"{mode}: a second READY=1 after STOPPING=1: {extra!r}")
        print(f"PASS: {mode}: STOPPING=1 on SIGTERM, exit 0", flush=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


IN_CREATE = 0x100
IN_MOVED_TO = 0x80


def path_ready(n, path, expect_refused, cmd):
    libc = ctypes.CDLL(None, use_errno=True)
    ifd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if ifd < 0:
        fail(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
    d, name = os.path.split(path)
    if libc.inotify_add_watch(ifd, d.encode(), IN_CREATE | IN_MOVED_TO) < 0:
        fail(f"inotify_add_watch {d}: {os.strerror(ctypes.get_errno())}")
    refused = 0
    for i in range(n):
        if os.path.exists(path):
            os.unlink(path)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        seen = False
        deadline = time.monotonic() + 20
        while not seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ifd], [], [], left)[0]:
                proc.kill()
                fail(f"round {i}: {path} did not appear within 20 s")
            buf = os.read(ifd, 65536)
            off = 0
            while off < len(buf):
                _, _, _, ln = struct.unpack_from("iIII", buf, off)
                ev = buf[off + 16:off + 16 + ln].rstrip(b"\0").decode()
                off += 16 + ln
                if ev == name:
                    seen = True
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            c.connect(path)
        except ConnectionRefusedError:
            refused += 1
        c.close()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
        if rc != 0:
            fail(f"round {i}: exit {rc} after SIGTERM")
    print(f"path-ready: {refused} of {n} connects refused when {name} appeared", flush=True)
    if expect_refused and refused == 0:
        fail("control: the naive binder was never caught between bind() and listen()")
    if not expect_refused and refused:
        fail(f"{path} existed before it accepted connections ({refused} of {n} rounds)")
    print("PASS: path-ready", flush=True)


def main():
    opts, cmd = split_cmd(sys.argv[1:])
    if not opts or not cmd:
        fail("usage: see the docstring")
    if opts[0] == "activate" and len(opts) == 2:
        activate(opts[1], cmd)
    elif opts[0] == "notify" and len(opts) == 3 and opts[1] in ("server", "client"):
        notify(opts[1], opts[2], cmd)
    elif opts[0] == "path-ready" and len(opts) in (3, 4):
        path_ready(int(opts[1]), opts[2], "--expect-refused" in opts[3:], cmd)
    else:
        fail(f"usage: bad arguments {opts}")


if __name__ == "__main__":
    main()
