"""A registry for the Kubernetes examples: what `spec.registry: tasks:rpc` serves.

The image built from the repository's Dockerfile puts this file on the
workers' PYTHONPATH as `tasks`, so the example PatioClusters run it as is.
Your own image would install your package and name its registry instead.

Call it from anywhere that can reach the cluster's client Service, e.g.:

    kubectl get secret demo-auth -o jsonpath={.data.key} | base64 -d > key
    patio call --peer demo.default.svc:15383 --key-file key mul 6 7
"""

from __future__ import annotations

import asyncio
import hashlib
import socket

from patio import Registry

rpc = Registry(project="demo")


@rpc("mul")
def mul(*args: int) -> int:
    """CPU-trivial, so calls measure the mesh rather than the work."""
    result = 1
    for a in args:
        result *= a
    return result


@rpc("sleep")
async def sleep(seconds: float) -> float:
    """Holds a worker slot without CPU: shows draining and cancellation."""
    await asyncio.sleep(seconds)
    return seconds


@rpc("sha256")
def sha256(data: bytes, rounds: int = 1) -> str:
    """Some real CPU work (use the thread or process executor for it)."""
    digest = data
    for _ in range(max(1, rounds)):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


@rpc("whoami")
def whoami() -> str:
    """Which pod answered: watch calls spread over the mesh."""
    return socket.gethostname()
