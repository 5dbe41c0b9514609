"""The registry: a named collection of the functions a process can execute.

A :class:`Registry` is a mutable mapping of task name -> callable, usable as a
decorator. Brokers lock it when they start so the set of names a process
advertises to its peers cannot change under them.

Names are looked up on every call, so :meth:`Registry.resolve` with a string
is a single dictionary lookup. Auxiliary structures (the reverse index, the
cached :attr:`Registry.names` snapshot) are maintained on writes, which are
rare and happen before the broker starts.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import inspect
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any, TypeVar, overload

from patio.errors import DuplicateTaskNameError, RegistryLockedError, TaskNotFoundError

__all__ = [
    "AsyncTaskFunctionType",
    "Registry",
    "SyncTaskFunctionType",
    "T",
    "TaskFunctionType",
]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# The shapes of a task function, under the names patio 0.1.4 exports.
AsyncTaskFunctionType = Callable[..., Awaitable[T]]
SyncTaskFunctionType = Callable[..., T]
TaskFunctionType = AsyncTaskFunctionType[Any] | SyncTaskFunctionType[Any]


def _source_hash(func: Callable[..., Any]) -> str:
    """The hash of ``func``'s source that strict names end in, as patio 0.1.4 computes it.

    A BLAKE2s digest of the source text, base64 without padding, so a caller
    on patio 0.1.4 and an executor on this patio agree on the name. A function
    without source (built in C, made by ``exec``) is hashed by its bytecode.
    """
    target = inspect.unwrap(func)
    try:
        material = inspect.getsource(target).encode()
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        if code is not None:
            material = code.co_code + repr(code.co_consts).encode()
        else:
            material = repr(target).encode()
    return base64.b64encode(hashlib.blake2s(material).digest()).rstrip(b"=").decode()


class Registry(MutableMapping[str, Callable[..., Any]]):
    """Functions by task name.

    :param project: namespace prepended to generated names, so that two
        projects with a ``tasks.send`` function do not clash on one mesh.
        Callers and executors of one project must use the same value.
    :param strict: append a short hash of the function's source to generated
        names, so two versions of a function (during a rolling upgrade, say)
        get different names and a caller never runs a version it does not
        expect.
    :param auto_naming: when ``False``, every function must be registered
        with an explicit name; registering without one raises ``ValueError``.

    Use it as a decorator (``@rpc`` or ``@rpc("name")``, the function is
    returned unchanged), through :meth:`register`, or as a dictionary
    (``rpc["mul"] = mul``). One function may be registered under several names;
    one name maps to exactly one function.
    """

    __slots__ = (
        "_auto_naming",
        "_locked_by",
        "_names",
        "_project",
        "_reverse",
        "_store",
        "_strict",
    )

    def __init__(
        self,
        project: str | None = None,
        strict: bool = False,
        auto_naming: bool = True,
    ) -> None:
        self._project = project
        self._strict = strict
        self._auto_naming = auto_naming
        self._store: dict[str, Callable[..., Any]] = {}
        # Reverse index for hashable callables (nearly all of them); unhashable
        # ones are found by a scan of ``_store`` in :meth:`get_names`.
        self._reverse: dict[Callable[..., Any], list[str]] = {}
        self._locked_by: str | None = None
        self._names: frozenset[str] | None = None

    # -- configuration -------------------------------------------------

    @property
    def project(self) -> str | None:
        return self._project

    @property
    def strict(self) -> bool:
        return self._strict

    @property
    def auto_naming(self) -> bool:
        return self._auto_naming

    # -- locking -------------------------------------------------------

    def lock(self, by: object = None) -> None:
        """Make the registry read-only. ``by`` (usually the broker) is named in errors.

        Locking twice is harmless; the first locker is remembered.
        """
        if self._locked_by is None:
            self._locked_by = "a broker" if by is None else repr(by)

    @property
    def is_locked(self) -> bool:
        return self._locked_by is not None

    def _check_unlocked(self, action: str) -> None:
        if self._locked_by is not None:
            raise RegistryLockedError(
                f"cannot {action}: registry {self._describe()} was locked by "
                f"{self._locked_by} when it started; register functions before "
                f"starting the broker",
            )

    def _describe(self) -> str:
        return f"of project {self._project!r}" if self._project is not None else "(no project)"

    # -- naming --------------------------------------------------------

    def make_name(self, func: Callable[..., Any]) -> str:
        """The name ``func`` gets when registered without one.

        ``[project.]module.qualname[.sourcehash]``: deterministic, so a caller
        and an executor that import the same code agree on it.
        """
        module = getattr(func, "__module__", None) or "<unknown>"
        qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
        if qualname is None:
            qualname = type(func).__qualname__
        parts = [module, qualname]
        if self._project is not None:
            parts.insert(0, self._project)
        if self._strict:
            parts.append(_source_hash(func))
        return ".".join(parts)

    # -- registration --------------------------------------------------

    def register(self, func: Callable[..., Any], name: str | None = None) -> str:
        """Register ``func`` under ``name`` (generated when ``None``) and return the name."""
        if not callable(func):
            raise TypeError(f"only callables can be registered, got {type(func).__name__}")
        if name is None:
            if not self._auto_naming:
                raise ValueError(
                    f"registry {self._describe()} has auto_naming=False: register "
                    f"{getattr(func, '__qualname__', func)!r} with an explicit name",
                )
            name = self.make_name(func)
        self[name] = func
        return name

    @overload
    def __call__(self, func_or_name: F) -> F: ...

    @overload
    def __call__(self, func_or_name: str | None = None) -> Callable[[F], F]: ...

    def __call__(self, func_or_name: F | str | None = None) -> F | Callable[[F], F]:
        """Decorator: ``@rpc``, ``@rpc()`` or ``@rpc("name")``; returns the function unchanged."""
        if func_or_name is None or isinstance(func_or_name, str):
            name = func_or_name

            def decorator(func: F) -> F:
                self.register(func, name)
                return func

            return decorator
        self.register(func_or_name)
        return func_or_name

    # -- mapping interface ---------------------------------------------

    def __setitem__(self, name: str, func: Callable[..., Any]) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"task names are non-empty strings, got {name!r}")
        if not callable(func):
            raise TypeError(f"only callables can be registered, got {type(func).__name__}")
        self._check_unlocked(f"register {name!r}")
        existing = self._store.get(name)
        if existing is not None:
            if existing is func or existing == func:
                return
            raise DuplicateTaskNameError(
                f"task name {name!r} is already registered to {existing!r} in registry "
                f"{self._describe()}; delete it first to replace it",
            )
        self._store[name] = func
        self._names = None
        # Unhashable callables are not indexed; get_names finds them by a scan.
        with contextlib.suppress(TypeError):
            self._reverse.setdefault(func, []).append(name)

    def __delitem__(self, name: str) -> None:
        self._check_unlocked(f"unregister {name!r}")
        func = self._store.pop(name)
        self._names = None
        try:
            names = self._reverse.get(func)
        except TypeError:
            return
        if names is not None:
            names.remove(name)
            if not names:
                del self._reverse[func]

    def __getitem__(self, name: str) -> Callable[..., Any]:
        return self._store[name]

    def __contains__(self, name: object) -> bool:
        return name in self._store

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        state = "locked" if self.is_locked else "unlocked"
        return f"<Registry project={self._project!r} tasks={len(self._store)} {state}>"

    # -- lookups -------------------------------------------------------

    def resolve(self, func: str | Callable[..., Any]) -> Callable[..., Any]:
        """The callable to run for a task name, or ``func`` itself if it is registered.

        Raises :class:`~patio.errors.TaskNotFoundError` for unknown names and
        unregistered functions.
        """
        if isinstance(func, str):
            try:
                return self._store[func]
            except KeyError:
                raise TaskNotFoundError(
                    f"no task named {func!r} in registry {self._describe()}",
                ) from None
        if not self.get_names(func):
            raise TaskNotFoundError(
                f"function {func!r} is not registered in registry {self._describe()}",
            )
        return func

    def get_names(self, func: Callable[..., Any]) -> tuple[str, ...]:
        """Every name ``func`` is registered under, in registration order (maybe empty)."""
        try:
            return tuple(self._reverse.get(func, ()))
        except TypeError:
            return tuple(n for n, f in self._store.items() if f is func or f == func)

    def get_name(self, func: Callable[..., Any]) -> str:
        """The first name ``func`` was registered under; TaskNotFoundError if none."""
        names = self.get_names(func)
        if not names:
            raise TaskNotFoundError(
                f"function {func!r} is not registered in registry {self._describe()}",
            )
        return names[0]

    @property
    def names(self) -> frozenset[str]:
        """A snapshot of the registered names, for advertising to peers."""
        names = self._names
        if names is None:
            names = self._names = frozenset(self._store)
        return names

    # -- pickling (ProcessPoolExecutor ships the registry to children) --

    def __getstate__(self) -> dict[str, Any]:
        # Functions are pickled by reference (module + qualname), as pickle does.
        return {
            "project": self._project,
            "strict": self._strict,
            "auto_naming": self._auto_naming,
            "store": self._store,
            "locked_by": self._locked_by,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._project = state["project"]
        self._strict = state["strict"]
        self._auto_naming = state["auto_naming"]
        self._store = {}
        self._reverse = {}
        self._locked_by = None
        self._names = None
        for name, func in state["store"].items():
            self[name] = func
        self._locked_by = state["locked_by"]
