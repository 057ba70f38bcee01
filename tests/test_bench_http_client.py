"""The benchmarks' lean HTTP client against a real uvicorn server."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import FastAPI, File, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse

from bench.http_client import Connection, multipart_post
from tests.live_server import serve_in_thread


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/upload")
    async def upload(image: Annotated[UploadFile, File()]) -> dict:
        data = await image.read()
        return {"name": image.filename, "type": image.content_type, "bytes": list(data[:4])}

    @app.get("/chunks")
    async def chunks() -> StreamingResponse:
        return StreamingResponse(iter([b"one,", b"two,", b"three"]), media_type="text/plain")

    @app.get("/bye")
    async def bye() -> JSONResponse:
        return JSONResponse({"bye": True}, headers={"Connection": "close"})

    return app


def test_prepared_multipart_posts_chunks_and_closed_connections() -> None:
    with serve_in_thread(_app(), log_level="warning") as url:
        host = url.removeprefix("http://")
        address, port = host.split(":")

        async def main() -> list:
            connection = Connection(address, int(port))
            request = multipart_post(
                host, "/upload", "image", "q.jpg", b"\xff\xd8\xff\x00", "image/jpeg"
            )
            answers = [await connection.send(request) for _ in range(3)]  # one kept-alive socket
            answers.append(
                await connection.send(f"GET /chunks HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            )
            answers.append(
                await connection.send(f"GET /bye HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            )
            answers.append(await connection.send(request))  # reopened after the server closed it
            answers.append(
                await connection.send(f"GET /nope HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            )
            await connection.close()
            return answers

        *uploads, chunked, bye, again, missing = asyncio.run(main())
    expected = {"name": "q.jpg", "type": "image/jpeg", "bytes": [255, 216, 255, 0]}
    for answer in [*uploads, again]:
        assert answer.status == 200 and json.loads(answer.body) == expected
    assert (chunked.status, chunked.body) == (200, b"one,two,three")
    assert bye.status == 200 and json.loads(bye.body) == {"bye": True}
    assert missing.status == 404
