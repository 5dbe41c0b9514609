# Mixed mode, reversed: the client executes tasks, the server calls them.
import asyncio
from functools import reduce

from patio import NullExecutor, Registry, ThreadPoolExecutor
from patio.broker.tcp import TCPClientBroker, TCPServerBroker

rpc = Registry(project="test", auto_naming=False)


def mul(*args):
    return reduce(lambda x, y: x * y, args)


rpc.register(mul, "mul")


async def main():
    async with NullExecutor(Registry(project="test")) as null, TCPServerBroker(null) as server:
        await server.listen(address="127.0.0.1", port=15384)
        async with ThreadPoolExecutor(rpc) as executor, TCPClientBroker(executor) as client:
            await client.connect(address="127.0.0.1", port=15384)
            print(await server.call("mul", 6, 7, timeout=5))


if __name__ == "__main__":
    asyncio.run(main())
