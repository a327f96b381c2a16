"""The listening side of ``edgetts serve``: the socket, the HTTP protocol's timeouts, and the run.

:func:`listen` binds the socket before the engines load, so a busy port fails at once.  Its
protocol is named (``IPPROTO_TCP``): asyncio turns Nagle's algorithm off only on accepted
sockets whose protocol is TCP, and with it on, a response's second write (headers, then body)
waits for the client's delayed ACK, 40 ms on Linux, longer than the tightest deadlines.

:func:`run` serves an ASGI app with uvicorn's h11 protocol plus a header timeout: uvicorn
closes idle keep-alive connections, and the app cuts a body that stalls (408), but a client
that connects and sends half a request line, or headers a byte a minute, would hold its
connection for ever.  :class:`HeaderTimeout` answers such a connection 408 and closes it, and
stamps each request's scope with the time its first bytes arrived (``FIRST_BYTE``): the
server's clock for its deadline starts there, not once its headers are parsed.
"""

from __future__ import annotations

import errno
import json
import socket
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

FIRST_BYTE = "edgetts.first_byte"  # scope key: perf_counter() when the request's first bytes came in


class ListenError(Exception):
    """The server cannot listen where it was asked to (one line, for the user)."""


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, listening, or :class:`ListenError` saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as e:
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts need no wait
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        busy = " (another program is listening there; choose another --port)" if e.errno == errno.EADDRINUSE else ""
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}{busy}") from None
    sock.listen(2048)  # clients that connect while the engines load wait in the backlog
    return sock


class HeaderTimeout(H11Protocol):
    """uvicorn's h11 protocol, with a limit on the time a request's line and headers may take."""

    timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.header_timer = None
        self.first_byte: float | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self.first_byte is None:
            self.first_byte = time.perf_counter()  # a request's first bytes: its deadline counts from here
        super().data_received(data)
        cycle = getattr(self, "cycle", None)
        if cycle is not None and self.first_byte is not None and FIRST_BYTE not in cycle.scope:
            cycle.scope[FIRST_BYTE] = self.first_byte  # the request is parsed: its app has not run yet
            self.first_byte = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()  # part of a request line or of headers: they must be complete in time
        else:
            self._disarm()  # headers are in (the app times the body) or the connection ends

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # an idle keep-alive connection: uvicorn's own timer closes it

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.timeout_s, self._stalled)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _stalled(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        body = json.dumps({"error": {"message": f"the request's headers took longer than {self.timeout_s:g} s",
                                     "type": "invalid_request_error", "param": None, "code": "timeout"}}).encode()
        head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n").encode()  # fmt: skip
        self.transport.write(head + body)
        self.transport.close()


def run(app, sock: socket.socket, header_timeout_s: float = 10.0, keep_alive_s: float = 20.0) -> None:
    """Serve ``app`` on ``sock`` until interrupted.

    Idle keep-alive connections close after ``keep_alive_s``: longer than common clients keep
    them (httpx, and so the ``openai`` client: 5 s; aiohttp: 15 s), because a server closing a
    connection just as the client reuses it fails that request.
    """
    import uvicorn

    protocol = type("HeaderTimeout", (HeaderTimeout,), {"timeout_s": header_timeout_s})
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=keep_alive_s, http=protocol)
    uvicorn.Server(config).run(sockets=[sock])
