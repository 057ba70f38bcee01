"""A lean HTTP/1.1 load-generator client: prepared requests over keep-alive asyncio streams.

Benchmarks of the service time it from a client on the same host, so the client's own
per-request Python counts against the service. httpx spends about 1.4 ms per multipart POST
building the body and parsing the response (measured against this client, same service, same
photos): as much as the whole HTTP layer of the service. Here each request's bytes are built
once, before timing, and a response is read by its status line, headers and
``Content-Length`` (or chunks), nothing more, as load generators such as wrk do.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


def multipart_post(
    host: str, path: str, field: str, filename: str, data: bytes, content_type: str
) -> bytes:
    """The bytes of a keep-alive ``POST`` of one file as ``multipart/form-data``."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        [
            f"--{boundary}\r\n".encode(),
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'.encode(),
            f"Content-Type: {content_type}\r\n\r\n".encode(),
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    """One keep-alive connection; :meth:`send` reconnects if the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> Response:
        """Send prepared request bytes and read the whole response.

        Raises:
            ConnectionError: The connection broke (it is reopened on the next call).
            ValueError: The response is not HTTP/1.1 as this client reads it.
        """
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        try:
            self._writer.write(request)
            await self._writer.drain()
            response, keep = await _read_response(self._reader)
        except (ConnectionError, asyncio.IncompleteReadError) as err:
            await self.close()
            raise ConnectionError(
                f"the connection to {self.host}:{self.port} broke: {err}"
            ) from err
        if not keep:
            await self.close()
        return response

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader) -> tuple[Response, bool]:
    """One response off the stream, and whether the connection stays open."""
    status_line = await reader.readuntil(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    headers: dict[bytes, bytes] = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = await _read_chunks(reader)
    else:
        body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    keep = headers.get(b"connection", b"").lower() != b"close"
    return Response(int(parts[1]), body), keep


async def _read_chunks(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
        pass
    return b"".join(chunks)
