#!/usr/bin/env python3
"""The peer side of scripts/bench-net.sh (run inside the peer network namespace).

  send HOST PORT BYTES   connect (retrying for up to 60 s), send BYTES, half-close, wait for the
                         server to close; print the Mbit/s from connect to close
  recv PORT BYTES        listen on PORT, accept one connection, read BYTES; print the Mbit/s from
                         accept to the last byte
  rtt HOST PORT N        N round trips of 64 bytes to an echo server; print the median in us
Every wait is bounded (socket timeouts), so a stuck peer ends with an error, not a hang.
"""
import socket
import statistics
import sys
import time

TIMEOUT = 60.0


def connect(host, port):
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return socket.create_connection((host, port), timeout=TIMEOUT)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def send(host, port, n):
    chunk = b"\0" * 65536
    s = connect(host, int(port))
    t0 = time.monotonic()
    left = int(n)
    while left > 0:
        left -= s.send(chunk[: min(left, len(chunk))])
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    dt = time.monotonic() - t0
    print(f"{int(n) * 8 / dt / 1e6:.1f}")


def recv(port, n):
    l = socket.create_server(("0.0.0.0", int(port)))
    l.settimeout(TIMEOUT)
    print("listening", file=sys.stderr, flush=True)
    s, _ = l.accept()
    s.settimeout(TIMEOUT)
    t0 = time.monotonic()
    got = 0
    while got < int(n):
        b = s.recv(1 << 20)
        if not b:
            break
        got += len(b)
    dt = time.monotonic() - t0
    if got != int(n):
        sys.exit(f"netbench: received {got} of {n} bytes")
    print(f"{got * 8 / dt / 1e6:.1f}")


def rtt(host, port, n):
    s = connect(host, int(port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64
    times = []
    for _ in range(int(n)):
        t0 = time.monotonic()
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            b = s.recv(len(msg) - len(got))
            if not b:
                sys.exit("netbench: echo server closed")
            got += b
        times.append(time.monotonic() - t0)
    print(f"{statistics.median(times) * 1e6:.0f}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"send": send, "recv": recv, "rtt": rtt}[cmd](*args)
