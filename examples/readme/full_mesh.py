# Full mesh: three members, each listening and connected to the others;
# every member may call and every member executes.
import asyncio

from patio import AsyncExecutor, Registry, TCPMeshBroker

rpc = Registry(project="mesh-example", auto_naming=False)


@rpc("whoami")
async def whoami(node):
    return node


async def member(node_id, port, peers, ready):
    async with AsyncExecutor(rpc) as executor:
        async with TCPMeshBroker(executor, node_id=node_id, key=b"mesh-secret") as broker:
            await broker.listen("127.0.0.1", port)
            for peer in peers:
                broker.add_peer("127.0.0.1", peer)
            await ready.wait()
            results = await asyncio.gather(
                *[broker.call("whoami", node_id, timeout=5) for _ in range(30)]
            )
            print(node_id, "called", len(results), "times")


async def main():
    ready = asyncio.Event()
    ports = [15391, 15392, 15393]
    members = [
        asyncio.create_task(member(f"node-{i}", port, [p for p in ports if p != port], ready))
        for i, port in enumerate(ports)
    ]
    await asyncio.sleep(1)
    ready.set()
    await asyncio.gather(*members)


if __name__ == "__main__":
    asyncio.run(main())
