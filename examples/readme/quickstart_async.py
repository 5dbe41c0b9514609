import asyncio
from functools import reduce

from patio import Registry
from patio.broker import MemoryBroker
from patio.executor import AsyncExecutor

rpc = Registry()


@rpc("mul")
async def multiply(*args: int) -> int:
    # do something asynchronously
    await asyncio.sleep(0)
    return reduce(lambda x, y: x * y, args)


async def main():
    async with AsyncExecutor(rpc, max_workers=4) as executor, MemoryBroker(executor) as broker:
        print(await asyncio.gather(*[broker.call("mul", 1, 2, 3) for _ in range(100)]))


if __name__ == "__main__":
    asyncio.run(main())
