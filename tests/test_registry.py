"""Registry: decorator and mapping use, naming, locking, lookups, pickling."""

from __future__ import annotations

import pickle
from functools import reduce
from typing import Any

import pytest

from patio.errors import RegistryLockedError, TaskNotFoundError
from patio.registry import Registry


def mul(*args: int) -> int:
    return reduce(lambda x, y: x * y, args)


def div(a: float, b: float) -> float:
    return a / b


def test_decorator_with_and_without_name_returns_function_unchanged() -> None:
    rpc = Registry(project="example")

    @rpc
    def auto(a: int, b: int) -> int:
        return a * b

    @rpc("div")
    def named(a: int, b: int) -> float:
        return a / b

    @rpc()
    def empty_call() -> None:
        return None

    assert auto(2, 3) == 6 and auto.__name__ == "auto"
    assert named(6, 3) == 2
    assert rpc["div"] is named
    assert rpc.get_name(auto) == f"example.{__name__}.{auto.__qualname__}"
    assert rpc.get_name(empty_call).endswith("empty_call")
    assert len(rpc) == 3


def test_register_returns_name_and_mapping_interface() -> None:
    rpc = Registry(project="example")
    assert rpc.register(div, "div") == "div"
    generated = rpc.register(mul)
    assert generated == f"example.{__name__}.mul"
    rpc["m2"] = mul
    assert rpc["m2"] is mul
    assert set(rpc) == {"div", generated, "m2"}
    assert "div" in rpc and "nope" not in rpc
    assert dict(rpc.items())["div"] is div
    assert rpc.names == frozenset({"div", generated, "m2"})
    assert rpc.get_names(mul) == (generated, "m2")
    del rpc["m2"]
    assert rpc.get_names(mul) == (generated,)
    assert "m2" not in rpc.names
    with pytest.raises(KeyError):
        del rpc["m2"]


def test_generated_name_without_project() -> None:
    rpc = Registry()
    assert rpc.register(mul) == f"{__name__}.mul"


def test_strict_names_differ_between_versions_of_a_function() -> None:
    rpc = Registry(project="p", strict=True)

    def make_v1() -> Any:
        def task() -> int:
            return 1

        return task

    def make_v2() -> Any:
        def task() -> int:
            return 2

        return task

    v1, v2 = make_v1(), make_v2()
    # Same module and (apart from the factory) comparable qualnames; force equal
    # qualnames to show the hash alone separates them.
    v2.__qualname__ = v1.__qualname__
    n1, n2 = rpc.register(v1), rpc.register(v2)
    assert n1 != n2
    assert n1.startswith(f"p.{__name__}.{v1.__qualname__}.")
    assert len(n1.rsplit(".", 1)[1]) == 43  # base64 of a BLAKE2s digest, as patio 0.1.4
    # Deterministic: the same function always gets the same name.
    assert Registry(project="p", strict=True).make_name(v1) == n1


def test_auto_naming_disabled_requires_a_name() -> None:
    rpc = Registry(auto_naming=False)
    with pytest.raises(ValueError, match="auto_naming=False"):
        rpc.register(mul)
    with pytest.raises(ValueError, match="explicit name"):
        rpc(mul)
    assert rpc.register(mul, "mul") == "mul"


def test_registering_non_callable_raises_type_error() -> None:
    rpc = Registry()
    with pytest.raises(TypeError):
        rpc.register(42, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        rpc["x"] = "not callable"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        rpc[""] = mul
    assert len(rpc) == 0


def test_name_conflict_is_an_error_but_same_function_again_is_fine() -> None:
    rpc = Registry()
    rpc.register(mul, "task")
    rpc.register(mul, "task")
    assert rpc.get_names(mul) == ("task",)
    with pytest.raises(ValueError, match="already registered"):
        rpc.register(div, "task")
    assert rpc["task"] is mul


def test_lock_makes_registry_read_only() -> None:
    rpc = Registry(project="proj")
    rpc.register(mul, "mul")
    before = rpc.is_locked
    rpc.lock(by="TCPServerBroker")
    assert before is False
    assert rpc.is_locked
    with pytest.raises(RegistryLockedError, match="locked by 'TCPServerBroker'"):
        rpc.register(div, "div")
    with pytest.raises(RegistryLockedError, match="locked"):
        rpc["div"] = div
    with pytest.raises(RegistryLockedError):
        del rpc["mul"]
    with pytest.raises(RegistryLockedError):

        @rpc
        def late() -> None: ...

    assert set(rpc) == {"mul"}
    assert rpc.resolve("mul") is mul  # reads still work


def test_resolve() -> None:
    rpc = Registry(project="proj")
    rpc.register(mul, "mul")
    assert rpc.resolve("mul") is mul
    assert rpc.resolve(mul) is mul
    with pytest.raises(TaskNotFoundError, match=r"'nope'.*'proj'"):
        rpc.resolve("nope")
    with pytest.raises(TaskNotFoundError, match="not registered"):
        rpc.resolve(div)
    with pytest.raises(KeyError):  # TaskNotFoundError is a KeyError for old code
        rpc.resolve("nope")
    with pytest.raises(TaskNotFoundError):
        rpc.get_name(div)
    assert rpc.get_names(div) == ()


def test_unhashable_callable() -> None:
    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self) -> int:
            return 7

    rpc = Registry()
    obj = Unhashable()
    rpc.register(obj, "u")
    assert rpc.get_names(obj) == ("u",)
    assert rpc.resolve(obj) is obj
    del rpc["u"]
    assert rpc.get_names(obj) == ()


def test_pickle_round_trip_keeps_functions_and_lock() -> None:
    rpc = Registry(project="proj", strict=True, auto_naming=False)
    rpc.register(mul, "mul")
    rpc.register(div, "div")
    rpc.register(mul, "mul2")
    rpc.lock(by="broker")
    clone = pickle.loads(pickle.dumps(rpc))
    assert clone is not rpc
    assert clone.project == "proj" and clone.strict and not clone.auto_naming
    assert clone["mul"] is mul  # functions travel by reference
    assert clone.get_names(mul) == ("mul", "mul2")
    assert clone.is_locked
    with pytest.raises(RegistryLockedError, match="broker"):
        clone["x"] = div

    unlocked = pickle.loads(pickle.dumps(Registry()))
    assert not unlocked.is_locked
    unlocked["mul"] = mul


def test_names_snapshot_updates_after_writes() -> None:
    rpc = Registry()
    assert rpc.names == frozenset()
    rpc["a"] = mul
    first = rpc.names
    assert first == {"a"}
    assert rpc.names is first  # cached while unchanged
    rpc["b"] = div
    assert rpc.names == {"a", "b"}
