# The calling side of tcp_server.py: a client that executes nothing itself.
import asyncio

from patio import NullExecutor, Registry
from patio.broker.tcp import TCPClientBroker

rpc = Registry(project="test", auto_naming=False)


async def main():
    async with NullExecutor(rpc) as executor, TCPClientBroker(executor) as broker:
        await broker.connect(address="127.0.0.1")
        await broker.connect(address="::1", port=12345)
        print(
            await asyncio.gather(*[broker.call("mul", i, i, timeout=1) for i in range(10)]),
        )


if __name__ == "__main__":
    asyncio.run(main())
