"""The "ceiling": a minimal raw-asyncio RPC written for this benchmark only.

It does the least an RPC over TCP must do, the fast way:
- frames are a 4-byte big-endian length followed by a msgpack body
  (request ``[0, id, name, args]``, result ``[1, id, value]``,
  error ``[2, id, text]``);
- one streaming frame decoder per connection, fed by ``data_received`` with
  whatever bytes arrived (no ``readexactly`` per header/body);
- requests are pipelined over one connection, matched to plain futures by id
  (no task, no timer per call on the caller side);
- the frames produced in one loop iteration are written with one
  ``writelines`` (coalesced writes), with transport flow control honoured;
- the executing side runs each call's first step inline (a task only for
  calls that suspend, like the flood's sleeping task), at most ``workers`` at
  once (the rest wait in a FIFO), like a bounded executor; replies produced
  while handling a read are written at the end of that read;
- uvloop when the orchestrator asks for it.

No authentication, no deadlines, no reconnects: it stands for what the
hardware and interpreter allow, not for a product. Same roles and control
lines as ``patio_node.py``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import struct
import sys
from collections import deque
from collections.abc import Callable
from importlib import metadata
from itertools import count as counter
from typing import Any, cast

import _bench_common as common  # type: ignore[import-not-found]
import msgpack

HOST = "127.0.0.1"
HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
REQUEST, RESULT, ERROR = 0, 1, 2
TASKS: dict[str, Callable[..., Any]] = {"echo": common.echo, "slow": common.slow}


class FrameDecoder:
    """Streaming decoder of length-prefixed msgpack frames."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray = buf
        else:
            src = data
        size = len(src)
        pos = 0
        out: list[Any] = []
        unpack_from = HEADER.unpack_from
        unpackb = msgpack.unpackb
        with memoryview(src) as view:
            while size - pos >= 4:
                (length,) = unpack_from(view, pos)
                if length > MAX_FRAME:
                    raise ValueError(f"frame of {length} bytes is over the limit")
                end = pos + 4 + length
                if end > size:
                    break
                out.append(unpackb(view[pos + 4 : end]))
                pos = end
            rest = bytes(view[pos:]) if pos < size else b""
        self._buf = bytearray(rest)
        return out


class Connection(asyncio.Protocol):
    """One connection; both ends may call and execute (used for the mesh)."""

    def __init__(self, workers: int) -> None:
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ids = counter(1)
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.packb = msgpack.Packer(use_bin_type=True).pack
        self.can_write: asyncio.Future[None] | None = None
        self.workers = workers
        self.running = 0
        self.backlog: deque[list[Any]] = deque()
        self.closed = asyncio.Event()

    # --- transport callbacks ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        err = ConnectionError("connection lost")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()
        self.closed.set()

    def pause_writing(self) -> None:
        if self.can_write is None:
            self.can_write = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.can_write is not None:
            if not self.can_write.done():
                self.can_write.set_result(None)
            self.can_write = None

    def data_received(self, data: bytes) -> None:
        for msg in self.decoder.feed(data):
            kind = msg[0]
            if kind == REQUEST:
                if self.running < self.workers:
                    self.start(msg)
                else:
                    self.backlog.append(msg)
            else:
                fut = self.pending.pop(msg[1], None)
                if fut is None or fut.done():
                    continue
                if kind == RESULT:
                    fut.set_result(msg[2])
                else:
                    fut.set_exception(RuntimeError(msg[2]))
        if self.out:  # replies of calls that finished inline: write them now
            self.flush()

    # --- writing ---
    def send(self, obj: Any) -> None:
        body = self.packb(obj)
        self.out.append(HEADER.pack(len(body)))
        self.out.append(body)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        out, self.out = self.out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    # --- executing ---
    def start(self, msg: list[Any]) -> None:
        """Run the call's first step inline; only a call that suspends gets a
        task (which goes on driving the already started coroutine)."""
        self.running += 1
        msgid = msg[1]
        try:
            name = msg[2]
            func = TASKS.get(name) or (common.echo if name.startswith("echo") else TASKS[name])
            coro = func(*msg[3])
            yielded = coro.send(None)
        except StopIteration as stop:
            self.reply(msgid, stop.value, None)
            return
        except Exception as exc:
            self.reply(msgid, None, exc)
            return
        task = self.loop.create_task(_resume(coro, yielded))
        task.add_done_callback(lambda t: self.finish(msgid, t))

    def finish(self, msgid: int, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self.reply(msgid, None, RuntimeError("cancelled"))
            return
        exc = task.exception()
        if exc is not None:
            self.reply(msgid, None, exc)
        else:
            self.reply(msgid, task.result(), None)

    def reply(self, msgid: int, value: Any, exc: BaseException | None) -> None:
        self.running -= 1
        if exc is None:
            self.send((RESULT, msgid, value))
        else:
            self.send((ERROR, msgid, repr(exc)))
        if self.backlog and self.running < self.workers:
            self.start(self.backlog.popleft())

    # --- calling ---
    async def call(self, name: str, *args: Any) -> Any:
        if self.can_write is not None:
            await asyncio.shield(self.can_write)
        msgid = next(self.ids)
        fut = self.loop.create_future()
        self.pending[msgid] = fut
        self.send((REQUEST, msgid, name, args))
        return await fut

    async def call_with_timeout(self, timeout: float, name: str, *args: Any) -> Any:
        """A deadline as a plain timer handle on the loop (no task per call)."""
        if self.can_write is not None:
            await asyncio.shield(self.can_write)
        msgid = next(self.ids)
        fut = self.loop.create_future()
        self.pending[msgid] = fut
        self.send((REQUEST, msgid, name, args))
        handle = self.loop.call_at(self.loop.time() + timeout, self._expire, msgid)
        try:
            return await fut
        finally:
            handle.cancel()

    def _expire(self, msgid: int) -> None:
        fut = self.pending.pop(msgid, None)
        if fut is not None and not fut.done():
            fut.set_exception(TimeoutError("call timed out"))


class _Resume:
    """Awaitable that goes on driving a coroutine whose first step already ran
    (a hand-made eager start; Python 3.12 has ``asyncio.eager_task_factory``)."""

    __slots__ = ("coro", "yielded")

    def __init__(self, coro: Any, yielded: Any) -> None:
        self.coro = coro
        self.yielded = yielded

    def __await__(self) -> Any:
        coro, yielded = self.coro, self.yielded
        while True:
            try:
                yield yielded
            except BaseException as exc:  # e.g. cancellation: pass it in
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                yielded = coro.send(None)
            except StopIteration as stop:
                return stop.value


async def _resume(coro: Any, yielded: Any) -> Any:
    return await _Resume(coro, yielded)


class Client:
    """Round-robin over connections to one or more servers."""

    def __init__(self, conns: list[Connection], timeout: float | None = None) -> None:
        self.conns = conns
        self.next = 0
        self.timeout = timeout
        if timeout is not None:
            self.call = self._call_with_timeout  # type: ignore[method-assign]

    async def call(self, name: str, *args: Any) -> Any:
        conns = self.conns
        conn = conns[self.next % len(conns)]
        self.next += 1
        return await conn.call(name, *args)

    async def _call_with_timeout(self, name: str, *args: Any) -> Any:
        conns = self.conns
        conn = conns[self.next % len(conns)]
        self.next += 1
        return await conn.call_with_timeout(self.timeout, name, *args)  # type: ignore[arg-type]


async def connect(ports: list[int], workers: int, timeout: float | None = None) -> Client:
    loop = asyncio.get_running_loop()
    conns: list[Connection] = []
    for port in ports:
        _, proto = await loop.create_connection(lambda: Connection(workers), HOST, port)
        conns.append(proto)
    return Client(conns, timeout)


async def listen(port: int, workers: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Connection(workers), HOST, port)


def describe() -> dict[str, Any]:
    return {
        "msgpack_version": metadata.version("msgpack"),
        "python": sys.version.split()[0],
        "loop": common.loop_name(),
        "serializer": "msgpack",
    }


async def run_load(cfg: dict[str, Any], call: common.CallFn) -> dict[str, Any]:
    task = cfg["task"]
    args = (common.make_payload(cfg.get("payload", 0)),)
    if cfg["mode"] == "flood":
        flooded: dict[str, Any] = await common.flood(
            functools.partial(call, task), args, cfg["count"], cfg["max_seconds"]
        )
        return flooded

    async def one(*args: Any) -> Any:
        return await call(task, *args)

    looped: dict[str, Any] = await common.closed_loop(
        one, args, cfg["concurrency"], cfg["count"], cfg["max_seconds"], cfg["warmup"]
    )
    return looped


async def direct_call(name: str, *args: Any) -> Any:
    return await TASKS[name](*args)


async def main(cfg: dict[str, Any]) -> None:
    control = common.Control()
    role = cfg["role"]
    workers = cfg["workers"]
    if role == "memory":
        result = await run_load(cfg, direct_call)
        common.emit("result", **result, **describe(), usage=common.usage())
        return
    if role == "client":
        client = await connect(cfg["peers"], workers, cfg.get("call_timeout"))
        result = await run_load(cfg, client.call)
        common.emit("result", **result, **describe(), usage=common.usage())
        for conn in client.conns:
            if conn.transport is not None:
                conn.transport.close()
        return
    server = await listen(cfg["port"], workers)
    try:
        common.emit("ready", **describe(), mesh="server+client connections")
        if role == "mesh":
            await control.wait("go")
            client = await connect(cfg["peers"], workers)
            common.emit("connected")
            await control.wait("start")
            if cfg.get("remote_only"):
                cfg = {**cfg, "task": f"echo{cfg['index']}"}
            result = await run_load(cfg, client.call)
            common.emit("result", **result, **describe(), usage=common.usage())
        await control.wait("stop")
        common.emit("stats", usage=common.usage())
    finally:
        server.close()


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    if config.get("tracemalloc"):
        import tracemalloc

        tracemalloc.start(1)
    try:
        common.run(main(config), config["use_uvloop"])
    except Exception as exc:
        common.emit("error", error=f"{type(exc).__name__}: {exc}"[:1000])
        raise
