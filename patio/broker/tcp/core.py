"""What the parts of a TCP broker read from the broker they belong to.

The parts (router, call sender, server, link table, dialer) never import the
facade; they get it as this narrow interface, so each part can be read, and
tested, knowing only the settings it uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from patio.broker.serializer import AbstractSerializer
from patio.executor import AbstractExecutor
from patio.registry import Registry
from patio.stats import BrokerStats
from patio.transport import LinkSettings


class BrokerCore(Protocol):
    node_id: str
    instance: str
    stats: BrokerStats
    serializer: AbstractSerializer
    executor: AbstractExecutor
    registry: Registry
    link_settings: LinkSettings
    draining: bool
    #: Mesh members execute calls themselves and forward outside callers' calls.
    local_execution: bool
    forwarding: bool
    prefer_local: bool
    route_wait: float
    connect_timeout: float
    retryable_tasks: frozenset[str]

    @property
    def closing(self) -> bool: ...

    @property
    def own_names(self) -> frozenset[str]: ...

    def running_loop(self) -> asyncio.AbstractEventLoop: ...

    def task_name(self, func: str | Callable[..., Any]) -> str: ...
