"""A TLS terminator for Triton's HTTP endpoint, which has no TLS of its own.

It accepts TLS (optionally mutual TLS) connections on the public address and relays the bytes, both
ways, to Triton's HTTP server listening on loopback. It runs an asyncio loop in a background thread of
the ``braintumor serve`` process, so it lives and dies with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with ``client_ca``, clients must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        context.load_verify_locations(str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TlsProxy:
    """Relay TLS connections on ``listen`` to plain TCP on ``target``.

    Args:
        listen: ``(host, port)`` to accept TLS on.
        target: ``(host, port)`` of the plain HTTP server.
        context: the server TLS context (see :func:`server_context`).
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], context: ssl.SSLContext) -> None:
        self.listen, self.target, self.context = listen, target, context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        with contextlib.suppress(OSError, ssl.SSLError, ConnectionError):
            await asyncio.gather(self._relay(client_reader, server_writer), self._relay(server_reader, client_writer))
        for writer in (client_writer, server_writer):
            with contextlib.suppress(OSError):
                writer.close()

    def start(self) -> TlsProxy:
        """Bind and start relaying (raises ``OSError`` when the address is taken)."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, *self.listen, ssl=self.context), self._loop
        )
        self._server = future.result(timeout=10)
        return self

    def stop(self) -> None:
        """Stop accepting and end the loop."""
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
