"""Benchmark: connections the server refuses before reading their body are closed, however many.

    python bench/serve_conns.py [--config pareto.json] [--connections 1000] [--read-timeout 10]

``edgetts serve`` with an API key; ``--connections`` raw sockets each send a request without the
key that announces a body (``Content-Length: 100``), read the 401, then send one byte more, as a
client that ignores the answer would.  The server must close every one of them (``Connection:
close``, the body never read), within its read timeout: connections it kept would hold a file
descriptor each for as long as the client stayed.  Then one request with the key must still be
answered.  Reported: how many the server closed, the seconds from the last 401 until the last
close, and the file descriptors the server held at the end against before.

The last line is one JSON object with ``closed`` (of ``connections``) and ``all_closed_s``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import socket
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import default_config, serve_threads, start_edgetts

REQUEST = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--read-timeout", type=float, default=10.0)
    args = ap.parse_args()
    config = args.config or default_config(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-conns-{os.getpid()}")
    proc, url = start_edgetts(config, serve_threads(), "--api-key", "k", "--read-timeout", str(args.read_timeout))
    host, port = url.removeprefix("http://").split(":")
    try:
        before = fds(proc.pid)
        socks = []
        for _ in range(args.connections):
            s = socket.create_connection((host, int(port)))
            s.sendall(REQUEST)
            socks.append(s)
        refused = 0
        for s in socks:
            s.settimeout(30)
            head = s.recv(4096)
            refused += head.startswith(b"HTTP/1.1 401") and b"connection: close" in head.lower()
            with contextlib.suppress(OSError):  # the server may have closed it already
                s.sendall(b"x")
        t0 = time.perf_counter()
        sel = selectors.DefaultSelector()
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        closed, last = 0, 0.0
        deadline = t0 + 2 * args.read_timeout + 5
        while closed < len(socks) and time.perf_counter() < deadline:
            for key, _ in sel.select(timeout=0.5):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                if not data:  # end of stream, or a reset for the byte it never read: closed by the server
                    sel.unregister(s)
                    s.close()
                    closed += 1
                    last = time.perf_counter() - t0
        held = fds(proc.pid)
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        ok = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                        json={"prompt": "Evaluate left to right: 8*4-3", "deadline_ms": 5000}).status_code  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)
    out = {"connections": args.connections, "refused_401_with_close": refused, "closed": closed,
           "all_closed_s": round(last, 3), "read_timeout_s": args.read_timeout,
           "server_fds_before": before, "server_fds_after": held, "then_a_request_with_the_key": ok}  # fmt: skip
    print(json.dumps(out))
    if closed < args.connections:
        sys.exit(1)


if __name__ == "__main__":
    main()
