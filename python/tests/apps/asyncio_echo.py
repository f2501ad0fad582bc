"""serve_asyncio_streams (argv[1] == "streams") or serve_asyncio: a line echo server."""
import asyncio
import sys

from rr_cluster_worker import serve_asyncio, serve_asyncio_streams


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)
        if b"bye" in data:
            self.transport.close()


async def echo(reader, writer):
    while True:
        line = await reader.readline()
        if not line:
            return
        writer.write(line)
        await writer.drain()
        if b"bye" in line:
            return


if sys.argv[1:] == ["streams"]:
    serve_asyncio_streams(echo)
else:
    serve_asyncio(Echo)
