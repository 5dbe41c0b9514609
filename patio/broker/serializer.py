"""Serializers for call arguments, results and errors, and exception transport.

- :class:`MsgpackSerializer` (default): data only, cannot run code.
- :class:`RestrictedPickleSerializer`: pickle with an allow-list of globals.
- :class:`PickleSerializer`: full pickle; opt-in, runs code chosen by the peer.

Every failure to pack or unpack raises :class:`~patio.errors.SerializationError`.

Exceptions cross the wire as plain dicts (:func:`exception_to_payload`,
:func:`exception_from_payload`), never as pickles: the receiving side only
rebuilds exception classes it has already imported.
"""

from __future__ import annotations

import builtins
import datetime
import decimal
import enum
import io
import pickle
import re
import struct
import sys
import traceback
import types
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import msgpack
from msgpack import unpackb

from patio.errors import PickleRefusedError, RemoteError, SerializationError

__all__ = [
    "AbstractSerializer",
    "MsgpackSerializer",
    "PickleSerializer",
    "RestrictedPickleSerializer",
    "RestrictedUnpickler",
    "exception_from_payload",
    "exception_to_payload",
]


class AbstractSerializer(ABC):
    """Turns Python values into bytes and back."""

    @abstractmethod
    def pack(self, value: Any) -> bytes:
        """Serialize ``value``; SerializationError if it cannot be."""

    @abstractmethod
    def unpack(self, data: bytes) -> Any:
        """Deserialize ``data``; SerializationError if it is malformed or refused."""


# ---------------------------------------------------------------------------
# msgpack

#: Upper bound on one unpacked message. The wire protocol limits frames
#: further; this only stops a single value from claiming more memory.
DEFAULT_MAX_MESSAGE_SIZE: Final = 64 * 1024 * 1024

# Extension type codes (0..127 are for applications; -1 is msgpack's timestamp).
EXT_TUPLE: Final = 1
EXT_SET: Final = 2
EXT_FROZENSET: Final = 3
EXT_DATETIME: Final = 4
EXT_DATE: Final = 5
EXT_TIME: Final = 6
EXT_TIMEDELTA: Final = 7
EXT_COMPLEX: Final = 8
EXT_DECIMAL: Final = 9
EXT_UUID: Final = 10
EXT_BIGINT: Final = 11


class MsgpackSerializer(AbstractSerializer):
    """msgpack with extension types, the default serializer.

    Round-trips, with their types: ``None``, ``bool``, ``int`` (any size),
    ``float``, ``str``, ``bytes``, ``list``, ``dict`` (any
    hashable supported key), ``tuple``, ``set``, ``frozenset``,
    ``datetime.datetime``/``date``/``time``/``timedelta``, ``complex``,
    ``decimal.Decimal`` and ``uuid.UUID``, nested freely.

    ``bytearray`` comes back as ``bytes``. Subclasses of ``int``, ``float``,
    ``str``, ``bytes``, ``list`` and
    ``dict`` (enums, ``OrderedDict``, ``defaultdict``...) are packed as their
    base type. A timezone comes back as a fixed UTC offset (an aware datetime
    compares equal, but a ``ZoneInfo`` becomes a ``timezone``). Anything else
    raises :class:`~patio.errors.SerializationError` naming the type.

    One ``msgpack.Packer`` is reused for every top-level value, so an instance
    is not thread-safe: use one per event loop.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._packer = self._new_packer()
        self._spare_packers: list[Any] = []
        self._depth = 0
        # unpackb bounds every length by the size of the buffer it is given
        # (msgpack >= 1.0), which unpack checks against max_message_size first,
        # and decodes str as str by default: two keywords, not nine (the
        # keywords are parsed on every call).
        self._ext_hook_bound = self._ext_hook

    def _new_packer(self) -> Any:
        # strict_types: tuples and subclasses reach _default instead of being
        # silently packed as lists/base types.
        return msgpack.Packer(
            default=self._default,
            use_bin_type=True,
            strict_types=True,
            autoreset=True,
        )

    def pack(self, value: Any) -> bytes:
        try:
            data: bytes = self._packer.pack(value)
        except SerializationError:
            self._packer.reset()
            self._depth = 0
            raise
        except Exception as e:  # TypeError, OverflowError, RecursionError, ValueError...
            self._packer.reset()
            self._depth = 0
            raise SerializationError(f"cannot serialize value with msgpack: {e}") from e
        return data

    def _pack_nested(self, value: Any) -> bytes:
        # The shared packer is mid-pack when _default runs, so an extension's
        # payload is packed by another one: one spare packer per nesting depth,
        # created once (creating a Packer per tuple would cost more than the
        # packing itself).
        depth = self._depth
        spares = self._spare_packers
        if depth == len(spares):
            spares.append(self._new_packer())
        packer = spares[depth]
        self._depth = depth + 1
        try:
            data: bytes = packer.pack(value)
        except BaseException:
            packer.reset()
            raise
        finally:
            self._depth = depth
        return data

    def _default(self, obj: Any) -> Any:
        cls = type(obj)
        encoder = _ENCODERS.get(cls)
        if encoder is not None:
            code, encode = encoder
            return msgpack.ExtType(code, encode(self, obj))
        # Subclasses of the native types travel as their base type.
        for base in _NATIVE_BASES:
            if isinstance(obj, base):
                return base(obj)
        raise SerializationError(
            f"cannot serialize object of type {cls.__module__}.{cls.__qualname__} with "
            f"msgpack (supported: None, bool, int, float, str, bytes, list, "
            f"dict, tuple, set, frozenset, datetime/date/time/timedelta, complex, "
            f"Decimal, UUID)",
        )

    def _unpack_nested(self, data: bytes) -> Any:
        return unpackb(data, strict_map_key=False, ext_hook=self._ext_hook_bound)

    def _ext_hook(self, code: int, data: bytes) -> Any:
        decode = _DECODERS.get(code)
        if decode is None:
            raise ValueError(f"unknown msgpack extension type {code}")
        return decode(self, data)

    def unpack(self, data: bytes) -> Any:
        if len(data) > self.max_message_size:
            raise SerializationError(
                f"msgpack message of {len(data)} bytes exceeds the "
                f"{self.max_message_size} byte limit",
            )
        try:
            return unpackb(data, strict_map_key=False, ext_hook=self._ext_hook_bound)
        except SerializationError:
            raise
        except Exception as e:  # msgpack raises many types on malformed input
            raise SerializationError(f"cannot deserialize msgpack data: {e!r}") from e


# ---------------------------------------------------------------------------
# pickle


def _big_int(text: str) -> int:
    if len(text) > 4300:  # same bound as sys.int_info.default_max_str_digits
        raise ValueError("integer too large")
    return int(text)


def _timedelta(parts: list[int]) -> datetime.timedelta:
    days, seconds, microseconds = parts
    return datetime.timedelta(days=days, seconds=seconds, microseconds=microseconds)


def _complex(parts: list[float]) -> complex:
    real, imag = parts
    return complex(real, imag)


# Exact type -> (extension code, how its value becomes bytes). Exact, because a
# subclass (an IntEnum, a str subclass) travels as its native base type.
_ENCODERS: Final[dict[type, tuple[int, Callable[[MsgpackSerializer, Any], bytes]]]] = {
    tuple: (EXT_TUPLE, lambda s, o: s._pack_nested(list(o))),
    set: (EXT_SET, lambda s, o: s._pack_nested(list(o))),
    frozenset: (EXT_FROZENSET, lambda s, o: s._pack_nested(list(o))),
    datetime.datetime: (EXT_DATETIME, lambda s, o: o.isoformat().encode()),
    datetime.date: (EXT_DATE, lambda s, o: o.isoformat().encode()),
    datetime.time: (EXT_TIME, lambda s, o: o.isoformat().encode()),
    datetime.timedelta: (
        EXT_TIMEDELTA,
        lambda s, o: s._pack_nested([o.days, o.seconds, o.microseconds]),
    ),
    complex: (EXT_COMPLEX, lambda s, o: s._pack_nested([o.real, o.imag])),
    decimal.Decimal: (EXT_DECIMAL, lambda s, o: str(o).encode()),
    uuid.UUID: (EXT_UUID, lambda s, o: o.bytes),
    int: (EXT_BIGINT, lambda s, o: str(o).encode()),  # outside msgpack's 64-bit range
}
_NATIVE_BASES: Final[tuple[type[Any], ...]] = (bool, int, float, str, bytes, dict, list)
_DECODERS: Final[dict[int, Callable[[MsgpackSerializer, bytes], Any]]] = {
    EXT_TUPLE: lambda s, d: tuple(s._unpack_nested(d)),
    EXT_SET: lambda s, d: set(s._unpack_nested(d)),
    EXT_FROZENSET: lambda s, d: frozenset(s._unpack_nested(d)),
    EXT_DATETIME: lambda s, d: datetime.datetime.fromisoformat(d.decode()),
    EXT_DATE: lambda s, d: datetime.date.fromisoformat(d.decode()),
    EXT_TIME: lambda s, d: datetime.time.fromisoformat(d.decode()),
    EXT_TIMEDELTA: lambda s, d: _timedelta(s._unpack_nested(d)),
    EXT_COMPLEX: lambda s, d: _complex(s._unpack_nested(d)),
    EXT_DECIMAL: lambda s, d: decimal.Decimal(d.decode()),
    EXT_UUID: lambda s, d: uuid.UUID(bytes=d),
    EXT_BIGINT: lambda s, d: _big_int(d.decode()),
}


class PickleSerializer(AbstractSerializer):
    """Full pickle, for trusted meshes that need arbitrary Python objects.

    .. warning:: Unpickling runs code chosen by whoever produced the bytes:
       any authenticated peer can execute anything in this process. Prefer
       :class:`MsgpackSerializer` or :class:`RestrictedPickleSerializer`.
    """

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        self.protocol = protocol

    def pack(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=self.protocol)
        except Exception as e:  # PicklingError, TypeError, AttributeError, RecursionError...
            raise SerializationError(
                f"cannot pickle value of type {type(value).__qualname__}: {e}",
            ) from e

    def unpack(self, data: bytes) -> Any:
        try:
            return pickle.loads(data)
        except Exception as e:
            raise SerializationError(f"cannot unpickle data: {e!r}") from e


#: Builtins that are plain data types: calling them with any arguments only
#: builds a value. (``type``, ``getattr``, ``eval``... are deliberately absent.)
SAFE_BUILTINS: Final = frozenset(
    {
        "int",
        "float",
        "complex",
        "str",
        "bytes",
        "bytearray",
        "list",
        "tuple",
        "dict",
        "set",
        "frozenset",
        "bool",
        "slice",
        "range",
    },
)

#: Globals outside builtins that are safe data types.
SAFE_GLOBALS: Final = frozenset(
    {
        "datetime.datetime",
        "datetime.date",
        "datetime.time",
        "datetime.timedelta",
        "datetime.timezone",
        "decimal.Decimal",
        "fractions.Fraction",
        "uuid.UUID",
        "uuid.SafeUUID",
        "collections.OrderedDict",
        "collections.deque",
        "collections.defaultdict",
        "collections.Counter",
    },
)


def _is_builtin_exception(name: str) -> bool:
    obj = vars(builtins).get(name)
    return isinstance(obj, type) and issubclass(obj, BaseException)


#: Most items or bytes one constructor call in a restricted pickle may ask
#: for (``bytearray(n)``, ``bytes(n)``, ``list(range(n))``...). Pickling
#: never produces such calls (containers are pickled item by item, so their
#: size is paid for in the payload); only a hand-made payload does, to turn
#: a few bytes into gigabytes.
MAX_CONSTRUCTED_SIZE: Final = 64 * 1024


def _refuse(what: str) -> PickleRefusedError:
    return PickleRefusedError(f"refusing to unpickle {what}")


def _check_size_arguments(func: Any, args: Any, kwargs: Any = None) -> None:
    values = [*args, *(kwargs or {}).values()] if isinstance(args, tuple | list) else []
    for value in values:
        if isinstance(value, range):
            try:
                size = len(value)
            except OverflowError:
                size = MAX_CONSTRUCTED_SIZE + 1
            if size > MAX_CONSTRUCTED_SIZE:
                raise _refuse(f"a range of {size} items passed to {func!r}")
    if isinstance(func, type) and issubclass(func, bytes | bytearray) and values:
        first = values[0]
        if isinstance(first, int) and first > MAX_CONSTRUCTED_SIZE:
            raise _refuse(f"{func.__name__}({first}) would allocate {first} bytes")


#: Objects that exist once per process: changing one changes it for everyone.
_SHARED_KINDS: Final = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    enum.Enum,
)


class _RestrictedUnpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler with an allow-list and guarded opcodes.

    The pure-Python implementation (``pickle._Unpickler``, unchanged since
    Python 3.0 and used the same way by other projects) is the only one whose
    opcodes can be checked: the C unpickler only lets ``find_class`` be
    overridden, and filtering globals is not enough. Checked here:

    - no opcode that changes an object in place (BUILD, APPEND(S), SETITEM(S),
      ADDITEMS) may target a global returned by ``find_class``, a class, a
      module, a function or an enum member: those are shared by the whole
      process, and BUILD's slot state is a ``setattr`` on them (a 40-byte
      payload set ``Counter.__missing__ = str`` for every later caller);
    - no constructor call may ask for more than ``MAX_CONSTRUCTED_SIZE``
      items or bytes (``bytearray(200 * 2**20)`` is a 32-byte payload).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BytesIO, allowed: frozenset[str] = frozenset()) -> None:
        # fix_imports=False: Python 2 names are refused rather than remapped.
        super().__init__(file, fix_imports=False)
        self._allowed = allowed
        self._global_ids: set[int] = set()

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if (
            (module == "builtins" and (name in SAFE_BUILTINS or _is_builtin_exception(name)))
            or full in SAFE_GLOBALS
            or full in self._allowed
        ):
            found = super().find_class(module, name)
            self._global_ids.add(id(found))  # a global lives as long as its module
            return found
        raise _refuse(f"global {full!r}: not in the allow-list of RestrictedPickleSerializer")

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse("a persistent id")

    def _check_target(self, target: Any, opcode: str) -> None:
        if isinstance(target, _SHARED_KINDS) or id(target) in self._global_ids:
            raise _refuse(
                f"{opcode} on {type(target).__name__} {_safe_str(target)[:80]!r}: "
                "it would change an object shared by the whole process"
            )

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ
        _check_size_arguments(klass, args)
        super()._instantiate(klass, args)  # type: ignore[misc]


class _NamesGlobal(Exception):
    """The payload names a global: only the checked unpickler may read it."""


# The C unpickler sizes its memo by the largest index a PUT names: an 11-byte
# payload (LONG_BINPUT 150000000) took 2.3 GB and 5 s. A payload that may hold
# an index of 65536 or more (LONG_BINPUT with a high byte set, PUT with six
# digits or more) is read by the checked unpickler, whose memo is a dict. The
# pattern also matches such bytes inside strings: those only take the slower path.
_LARGE_MEMO_INDEX: Final = re.compile(rb"r..(?:[^\x00].|\x00[^\x00])|p\d{6}", re.DOTALL)


class _PlainDataUnpickler(pickle.Unpickler):
    """The fast path: the C unpickler, for payloads that name no global.

    Without a global nothing on the stack is shared or callable (REDUCE,
    NEWOBJ and BUILD have no class to work with), and every object's size is
    paid for in the payload, so there is nothing to check. Most call
    arguments (numbers, strings, lists, dicts, tuples) take this path; the
    first global aborts it and the checked unpickler starts over.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise _NamesGlobal

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse("a persistent id")


def _guard(opcode: bytes, check: Callable[[_RestrictedUnpickler, list[Any]], None]) -> None:
    base = _RestrictedUnpickler.dispatch[opcode[0]]

    def guarded(unpickler: Any) -> None:
        check(unpickler, unpickler.stack)
        base(unpickler)

    _RestrictedUnpickler.dispatch[opcode[0]] = guarded


def _mutation_of(offset: int, name: str) -> Callable[[_RestrictedUnpickler, list[Any]], None]:
    def check(unpickler: _RestrictedUnpickler, stack: list[Any]) -> None:
        if len(stack) >= offset:
            unpickler._check_target(stack[-offset], name)

    return check


# BUILD: stack is [..., target, state]. APPEND/SETITEM: the item(s) follow
# the target directly; APPENDS/SETITEMS/ADDITEMS: the target is below a mark,
# so they are checked where the items were popped (see _mark_target).
_guard(pickle.BUILD, _mutation_of(2, "BUILD"))
_guard(pickle.APPEND, _mutation_of(2, "APPEND"))
_guard(pickle.SETITEM, _mutation_of(3, "SETITEM"))


def _mark_target(name: str) -> Callable[[_RestrictedUnpickler, list[Any]], None]:
    def check(unpickler: Any, stack: list[Any]) -> None:  # metastack: not in typeshed
        # The items were pushed on a fresh stack after MARK; the target is the
        # top of the stack saved by MARK.
        saved = unpickler.metastack[-1] if unpickler.metastack else []
        if saved:
            unpickler._check_target(saved[-1], name)

    return check


for _opcode, _name in ((pickle.APPENDS, "APPENDS"), (pickle.SETITEMS, "SETITEMS")):
    _guard(_opcode, _mark_target(_name))
_guard(pickle.ADDITEMS, _mark_target("ADDITEMS"))


def _call_arguments(func: Any, args: Any, kwargs: Any = None) -> None:
    # The C unpickler takes only a tuple (a dict for keywords); pickle's own
    # star-expands anything: REDUCE with range(55_000_000) as its "arguments"
    # made a 2 GB tuple before failing (found by fuzzing).
    if type(args) is not tuple or (kwargs is not None and type(kwargs) is not dict):
        raise _refuse(f"call arguments of type {type(args).__name__}: only a tuple is")
    _check_size_arguments(func, args, kwargs)


_guard(pickle.REDUCE, lambda _u, stack: _call_arguments(stack[-2], stack[-1]))
_guard(pickle.NEWOBJ, lambda _u, stack: _call_arguments(stack[-2], stack[-1]))
_guard(pickle.NEWOBJ_EX, lambda _u, stack: _call_arguments(stack[-3], stack[-2], stack[-1]))


def _load_bytearray8(unpickler: Any) -> None:  # read and append: not in typeshed
    # pickle's own version allocates the declared size before reading: 18
    # bytes claiming 16 GiB made this process zero-fill 16 GiB (found by fuzzing).
    (size,) = struct.unpack("<Q", unpickler.read(8))
    data = unpickler.read(size)
    if len(data) != size:
        raise pickle.UnpicklingError("pickle data was truncated")
    unpickler.append(bytearray(data))


_RestrictedUnpickler.dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

#: patio 0.1.4's public name for its restricted unpickler: ``RestrictedUnpickler(file).load()``.
RestrictedUnpickler = _RestrictedUnpickler


class RestrictedPickleSerializer(PickleSerializer):
    """Pickle that only rebuilds allow-listed classes.

    Allowed without asking: the builtin data types (``int``, ``float``,
    ``complex``, ``str``, ``bytes``, ``bytearray``, ``list``, ``tuple``,
    ``dict``, ``set``, ``frozenset``, ``bool``, ``None``, ``slice``,
    ``range``), the builtin exception classes, ``datetime`` types, ``Decimal``,
    ``Fraction``, ``UUID`` and ``collections.OrderedDict``/``deque``/
    ``defaultdict``/``Counter``. Add your own classes with ``allowed``, as
    ``"module.QualName"`` strings or as the classes themselves.

    Any other global (``os.system``, ``subprocess.Popen``, ``builtins.eval``,
    ``builtins.getattr``...) raises :class:`~patio.errors.PickleRefusedError`
    (a ``SerializationError`` and a ``pickle.UnpicklingError``) naming it,
    before anything is called. So do payloads that would change a class or
    another process-wide object (``BUILD`` on a class sets its attributes)
    and constructor calls asking for more than ``MAX_CONSTRUCTED_SIZE`` items
    or bytes. Only allow classes whose constructor and ``__setstate__`` are
    harmless with arbitrary arguments. A payload that names any class is read
    by pickle's pure-Python unpickler, the one whose opcodes can be checked
    (several times slower than ``PickleSerializer``), and so is one whose
    bytes may name a memo slot of 65536 or more (the C unpickler would size
    its memo to it; text containing an ``r`` can look like that too); plain
    data (numbers, strings, bytes, lists, dicts, tuples, sets) by the C one.
    """

    def __init__(
        self,
        allowed: Iterable[str | type] = (),
        protocol: int = pickle.HIGHEST_PROTOCOL,
    ) -> None:
        super().__init__(protocol)
        names: set[str] = set()
        for item in allowed:
            if isinstance(item, str):
                names.add(item)
            elif isinstance(item, type):
                names.add(f"{item.__module__}.{item.__qualname__}")
            else:
                raise TypeError(
                    f"allowed entries are 'module.QualName' strings or classes: {item!r}"
                )
        self.allowed: frozenset[str] = frozenset(names)

    def unpack(self, data: bytes) -> Any:
        try:
            if _LARGE_MEMO_INDEX.search(data) is None:
                try:
                    return _PlainDataUnpickler(io.BytesIO(data), fix_imports=False).load()
                except _NamesGlobal:
                    pass
            return _RestrictedUnpickler(io.BytesIO(data), self.allowed).load()
        except PickleRefusedError:
            raise
        except Exception as e:
            raise PickleRefusedError(f"cannot unpickle data: {e!r}") from e


# ---------------------------------------------------------------------------
# exceptions over the wire

#: Longest traceback text sent with an error: enough for any real stack,
#: bounded so a deep recursion cannot produce a huge frame. The end of the
#: traceback (where it failed) is kept.
MAX_TRACEBACK_CHARS: Final = 64 * 1024


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception:
        try:
            return f"<unprintable {_type_name(type(obj))}>"
        except Exception:
            return "<unprintable>"


def _format_traceback(exc: BaseException) -> str:
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:
        return ""
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "...\n" + text[-MAX_TRACEBACK_CHARS:]
    return text


def exception_to_payload(exc: BaseException, serializer: AbstractSerializer) -> dict[str, Any]:
    """Describe ``exc`` as a dict the ``serializer`` can pack. Never raises.

    ``{"type": "module.QualName", "args": [...], "message": str(exc),
    "traceback": "..."}``. ``args`` are the exception's own arguments when the
    serializer can pack and unpack them, else their ``str()``, else empty.
    """
    try:
        type_name = _type_name(type(exc))
    except Exception:
        type_name = "builtins.Exception"
    message = _safe_str(exc)
    args: list[Any] = []
    try:
        raw_args = list(exc.args)
    except Exception:
        raw_args = []
    try:
        # A full round trip, not just pack: a restricted pickle packs objects
        # that it would then refuse to unpack on the other side.
        serializer.unpack(serializer.pack(raw_args))
        args = raw_args
    except Exception:
        try:
            as_text = [_safe_str(arg) for arg in raw_args]
            serializer.pack(as_text)
            args = as_text
        except Exception:
            args = []
    return {
        "type": type_name,
        "args": args,
        "message": message,
        "traceback": _format_traceback(exc),
    }


#: Longest remote exception type name that is looked up: far beyond any real
#: ``module.QualName``, short enough that a hostile one costs nothing.
MAX_TYPE_NAME_LENGTH: Final = 512

#: Most dots in a remote exception type name that is looked up (real names
#: have a handful). With the length limit this bounds the lookup to a few
#: thousand character operations whatever a peer sends.
MAX_TYPE_NAME_DOTS: Final = 32

#: Classes defined under these packages are never rebuilt from the wire: a
#: peer must not be able to raise patio's own control-flow errors
#: (``NoRouteError``, ``PeerConnectionError``, internal link errors...) in
#: the caller, where they would be taken for patio's own verdict.
_NEVER_REBUILT_PACKAGES: Final = ("patio", "patio_operator")


def _is_patio_class(cls: type) -> bool:
    module = getattr(cls, "__module__", None)
    if not isinstance(module, str):
        return True  # nothing to judge it by: refuse
    return module.partition(".")[0] in _NEVER_REBUILT_PACKAGES


def _lookup_loaded_class(type_name: str, modules: Mapping[str, Any] | None = None) -> type | None:
    """The class named ``type_name`` if its module is already imported, else None.

    Never imports anything and never triggers a module's ``__getattr__``:
    a peer must not be able to make us load code. Names longer than
    ``MAX_TYPE_NAME_LENGTH`` or with more than ``MAX_TYPE_NAME_DOTS`` dots are
    refused before any work, so the cost is bounded and linear in the name.
    ``modules`` defaults to ``sys.modules`` (a parameter so tests can count
    lookups).
    """
    if len(type_name) > MAX_TYPE_NAME_LENGTH or type_name.count(".") > MAX_TYPE_NAME_DOTS:
        return None
    if modules is None:
        modules = sys.modules
    parts = type_name.split(".")
    # Module names and qualnames both contain dots: try the longest loaded module.
    for split in range(len(parts) - 1, 0, -1):
        module = modules.get(".".join(parts[:split]))
        if module is None:
            continue
        obj: Any = module
        for attr in parts[split:]:
            namespace = getattr(obj, "__dict__", None)
            if not isinstance(namespace, Mapping):
                obj = None
                break
            obj = namespace.get(attr)
            if obj is None:
                break
        if isinstance(obj, type):
            return obj
        return None
    return None


def _remote_error(type_name: str, message: str, tb: str) -> RemoteError:
    error = RemoteError(type_name, message, tb)
    if tb:
        error.add_note(f"Remote traceback:\n{tb}")
    return error


def exception_from_payload(payload: Any) -> BaseException:
    """Rebuild the exception described by ``payload``. Never raises.

    Exception classes from ``builtins``, and classes whose module this process
    has already imported, are rebuilt with their arguments; anything else
    (unknown or unloaded type, constructor failing, malformed payload) becomes
    :class:`~patio.errors.RemoteError`. Exceptions that are not ``Exception``
    subclasses (``SystemExit``, ``KeyboardInterrupt``, ``CancelledError``...)
    also become ``RemoteError``: a peer must not make this process exit or
    look cancelled. So do patio's own classes (``patio.errors``, internal link
    errors): a peer must not forge patio's verdicts. Overlong type names are
    not looked up. The remote traceback is attached as a note.
    """
    if not isinstance(payload, Mapping):
        return RemoteError("<malformed>", f"malformed error payload: {_safe_str(payload)[:200]}")
    type_name = payload.get("type")
    message = payload.get("message")
    tb = payload.get("traceback")
    args = payload.get("args")
    type_name = type_name if isinstance(type_name, str) else "<unknown>"
    if len(type_name) > MAX_TYPE_NAME_LENGTH:
        type_name = type_name[:MAX_TYPE_NAME_LENGTH] + "...(truncated)"
    message = message if isinstance(message, str) else ""
    tb = tb if isinstance(tb, str) else ""
    if not isinstance(args, list | tuple):
        return _remote_error(type_name, message, tb)

    try:
        cls = _lookup_loaded_class(type_name)
        if cls is None or not issubclass(cls, Exception) or _is_patio_class(cls):
            return _remote_error(type_name, message, tb)
        exc: object = cls(*args)  # a __new__ may return anything
        if not isinstance(exc, BaseException):
            return _remote_error(type_name, message, tb)
        if tb:
            exc.add_note(f"Remote traceback:\n{tb}")
    except Exception:
        return _remote_error(type_name, message, tb)
    return exc
