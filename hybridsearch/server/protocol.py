"""uvicorn's h11 protocol with the limits a hostile client must not get around.

* **Request deadline.** From the first byte of a request, its request line, headers and body
  must all arrive within ``request_timeout_s``; otherwise the connection is closed. (uvicorn's
  own keep-alive timer only runs between requests, and every byte received restarts it, so a
  client trickling one byte every few seconds would hold a connection for ever.)
* **JSON errors.** A request h11 cannot parse (bad request line, malformed header or
  Content-Length) gets ``400 {"error": ...}`` like every other error, not uvicorn's plain text.
* **TCP_NODELAY** on every connection (keep-alive requests are not held back by Nagle).
* **Shutdown.** When uvicorn starts a graceful shutdown it tells every connection; the first
  one tells the app (``/ready`` turns 503, new requests get 503).
"""

from __future__ import annotations

import json
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

APP_STATE_KEY = "hybridsearch"  # the lifespan state entry holding the app's runtime


class Protocol(H11Protocol):
    _deadline = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn writes headers and body in separate sends; with Nagle on, a keep-alive client
        # waits for its delayed ACK (~40 ms). asyncio only sets TCP_NODELAY on sockets whose
        # proto is IPPROTO_TCP, which an accepted socket's is not when the listener was made with 0.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            # the first bytes of a new request: it has request_timeout_s to arrive in full
            self._deadline = self.loop.call_later(self._timeout(), self._on_deadline)
        super().data_received(data)
        if self._deadline is not None and self.conn.their_state is not h11.IDLE \
                and self.conn.their_state is not h11.SEND_BODY:
            self._deadline.cancel()  # the whole request is in
            self._deadline = None

    def _timeout(self) -> float:
        rt = self.app_state.get(APP_STATE_KEY)
        return rt.settings.request_timeout_s if rt is not None else 30.0

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            rt = self.app_state.get(APP_STATE_KEY)
            if rt is not None:
                rt.note_slow_client(self.client)
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # the app's receive() sees a disconnect
                self.cycle.message_event.set()
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": "invalid HTTP request: a malformed request line, header or "
                                    "Content-Length (send one well-formed Content-Length, or none)"}).encode()
        headers = [(b"content-type", b"application/json; charset=utf-8"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers,
                                                             reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # a response was already under way: just close
            pass
        self.transport.close()

    def shutdown(self) -> None:
        rt = self.app_state.get(APP_STATE_KEY)
        if rt is not None:
            rt.stopping = True
        super().shutdown()
