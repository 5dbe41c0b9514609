"""Delay packets by a fixed time with NFQUEUE, where tc's netem is missing.

``python -m tests.partition.delay QUEUE MILLISECONDS`` binds netfilter queue
QUEUE (in the network namespace it runs in) and lets every packet queued to
it through after MILLISECONDS: an iptables rule ``-j NFQUEUE --queue-num
QUEUE`` chooses the packets. Packets keep their order (each waits the same
time). It prints READY once bound and stops on SIGTERM.

Raw netlink (nfnetlink_queue), so it needs no library: a bind command, the
copy mode "metadata only", then one verdict per packet id.
"""

from __future__ import annotations

import heapq
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, queue: int, attrs: bytes, seq: int, flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return (
        struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq, 0) + body
    )


def _check_ack(sock: socket.socket) -> None:
    data = sock.recv(65536)
    _, kind, _, _, _ = struct.unpack_from("=IHHII", data)
    if kind == NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", data, 16)
        if error != 0:
            raise OSError(-error, f"nfnetlink_queue refused the configuration: errno {-error}")


def _packet_ids(data: bytes) -> list[int]:
    ids = []
    pos = 0
    while pos + 16 <= len(data):
        length, kind, _, _, _ = struct.unpack_from("=IHHII", data, pos)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            apos = pos + 20  # netlink header + nfgenmsg
            while apos + 4 <= pos + length:
                alen, akind = struct.unpack_from("=HH", data, apos)
                if alen < 4:
                    break
                if akind & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from(">I", data, apos + 4)[0])
                apos += (alen + 3) & ~3
        pos += (length + 3) & ~3
    return ids


def main() -> None:
    queue, delay = int(sys.argv[1]), float(sys.argv[2]) / 1000
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    bind = _attr(NFQA_CFG_CMD, struct.pack(">BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, bind, 1, NLM_F_REQUEST | NLM_F_ACK))
    _check_ack(sock)
    params = _attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, params, 2, NLM_F_REQUEST | NLM_F_ACK))
    _check_ack(sock)
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    print("READY", flush=True)
    due: list[tuple[float, int]] = []
    seq = 3
    while running:
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, packet = heapq.heappop(due)
            verdict = _attr(NFQA_VERDICT_HDR, struct.pack(">II", NF_ACCEPT, packet))
            sock.send(_message(NFQNL_MSG_VERDICT, queue, verdict, seq))
            seq += 1
        wait = max(0.0, due[0][0] - now) if due else 0.2
        try:
            readable, _, _ = select.select([sock], [], [], wait)
        except InterruptedError:
            continue
        if readable:
            data = sock.recv(1 << 20)
            arrived = time.monotonic()
            for packet in _packet_ids(data):
                heapq.heappush(due, (arrived + delay, packet))


if __name__ == "__main__":
    main()
