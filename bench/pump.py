"""The floor of a proxy written in Python on uvloop: bytes pumped between each client and a
server connection of its own, with no parsing, no pool and no state at all. `make bench` runs
`-S` simple through it beside the poolers, so the CPU row shows what any Python proxy pays in
uvloop's callbacks and the kernel before it does any work of its own (docs/benchmarks.md).
Not a product: nothing in unpinned imports it.

    python bench/pump.py LISTEN_PORT UPSTREAM_PORT
"""
from __future__ import annotations

import asyncio
import sys

import uvloop

HOST = "127.0.0.1"


class ServerSide(asyncio.Protocol):
    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc) -> None:
        self.client.transport.close()


class ClientSide(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server: ServerSide | None = None
        self.early: list[bytes] = []     # what the client sent before its server connection was up

    def connection_made(self, transport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, self.server = await loop.create_connection(lambda: ServerSide(self), HOST, self.upstream_port)
        except OSError:
            self.transport.close()
            return
        for data in self.early:
            self.server.transport.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.server is None:
            self.early.append(data)
        else:
            self.server.transport.write(data)

    def connection_lost(self, exc) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.close()


async def main(listen_port: int, upstream_port: int) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: ClientSide(upstream_port), HOST, listen_port)
    print(f"pump listening on {HOST}:{listen_port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
