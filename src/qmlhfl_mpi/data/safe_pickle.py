"""Unpickling data files without running code from them.

``pickle.load`` calls whatever callables a file names (``os.system``,
``builtins.exec``, ...), so a data file could run arbitrary code.  The CIFAR-10
"python version" is a set of pickles, so this module reads them with
:class:`RestrictedUnpickler`, whose :meth:`~RestrictedUnpickler.find_class`
admits only the few globals that (de)serialising numeric numpy arrays needs
(:data:`ALLOWED_GLOBALS`) and refuses every other one with a
:class:`~qmlhfl_mpi.data.source.DataError` naming the file and the global.

Even the admitted globals are not numpy's own: each is a small stand-in that
checks its arguments and never hands numpy untrusted ``__setstate__`` data
(numpy's ``dtype.__setstate__`` accepts forged flags, e.g. marking ``uint8``
as holding Python objects).  ``numpy.ndarray``/``_reconstruct`` produce an
:class:`_ArrayProxy` that records the array's state; after loading, every proxy
in the result is replaced by an array made with :func:`numpy.frombuffer` from
the validated bytes, shape and a plain numeric dtype (bool, int, uint, float,
complex).  Containers, numbers, strings and bytes need no global: the pickle
opcodes build them directly.

What the different pickle protocols need (checked by pickling a CIFAR batch
``{b"data": uint8 array, b"labels": [...], ...}``):

* Python 2 files such as the official CIFAR-10 release (protocol 2):
  ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``;
* Python 3, protocols 3 and 4: ``numpy._core.multiarray._reconstruct`` (numpy 2;
  ``numpy.core...`` in numpy 1), ``numpy.ndarray``, ``numpy.dtype``;
* Python 3, protocols 0-2 additionally ``_codecs.encode`` (how ``bytes`` are
  written there; admitted only as ``encode(str, "latin1")``);
* protocol 5: ``numpy._core.numeric._frombuffer`` and ``numpy.dtype``;
* numpy scalars (e.g. labels saved as a list of ``np.int64``):
  ``numpy._core.multiarray.scalar``.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Union

import numpy as np

from .source import DataError

__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "load_file", "loads"]

PathLike = Union[str, "os.PathLike[str]"]

MAX_DEPTH = 64  # containers nested deeper than this in a data file are refused
_TYPECODE = re.compile(r"[biufc][0-9]{1,2}")  # plain numeric dtypes: b1, i8, u1, f4, c16, ...


class _Refused(Exception):
    """Raised inside the stand-ins; turned into a DataError naming the file."""


def _fail(what: str) -> NoReturn:
    raise _Refused(what)


# --------------------------------------------------------------------------- #
# stand-ins for the admitted globals
# --------------------------------------------------------------------------- #
class _DtypeSpec:
    """What ``numpy.dtype(typecode, align, copy)`` + ``__setstate__`` described."""

    __hash__ = None  # type: ignore[assignment]  # never a dict key / set member

    def __init__(self, typecode: Any = None, align: Any = False, copy: Any = True) -> None:
        del align, copy  # irrelevant for the plain numeric types admitted
        if isinstance(typecode, bytes):
            typecode = typecode.decode("latin1")
        if not isinstance(typecode, str) or not _TYPECODE.fullmatch(typecode):
            _fail(f"numpy dtype {typecode!r}: only plain numeric dtypes (bool, int, uint, float, complex) are "
                  "allowed; object, string and structured dtypes are not")
        try:
            self.base = np.dtype(typecode)
        except TypeError:
            _fail(f"numpy dtype {typecode!r} does not exist")
        if self.base.hasobject or self.base.kind not in "biufc":
            _fail(f"numpy dtype {typecode!r} is not a plain numeric dtype")
        self.endian = "="

    def __setstate__(self, state: Any) -> None:
        # numpy writes (version, endian, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            _fail(f"numpy dtype state {_short(state)}: expected numpy's (3|4, endian, None, None, None, ...) tuple")
        endian = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if endian not in ("<", ">", "=", "|") or any(s is not None for s in state[2:5]):
            _fail(f"numpy dtype state {_short(state)}: only plain numeric dtypes (no sub-arrays or fields) "
                  "are allowed")
        self.endian = endian

    def resolve(self) -> np.dtype[Any]:
        if self.endian == "<":
            return self.base.newbyteorder("<")
        return self.base.newbyteorder(">") if self.endian == ">" else self.base


def _as_dtype(obj: Any) -> np.dtype[Any]:
    if not isinstance(obj, _DtypeSpec):
        _fail(f"expected a numpy dtype, got {type(obj).__name__}")
    return obj.resolve()


def _as_buffer(data: Any, what: str) -> bytes:
    if isinstance(data, str):  # Python 2 str, decoded with latin1
        return data.encode("latin1")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, pickle.PickleBuffer):
        return bytes(data.raw())
    _fail(f"{what}: expected raw bytes, got {type(data).__name__} (object arrays are not allowed)")


def _as_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if (not isinstance(shape, tuple) or len(shape) > 32
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        _fail(f"numpy array shape {_short(shape)}: expected a tuple of non-negative integers")
    return shape


def _array(buf: bytes, dtype: np.dtype[Any], shape: tuple[int, ...], order: str) -> np.ndarray:
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if len(buf) != expected:
        _fail(f"numpy array of shape {shape} and dtype {dtype} needs {expected} bytes of data, the file holds "
              f"{len(buf)}")
    if order not in ("C", "F"):
        _fail(f"numpy array order {order!r}: expected 'C' or 'F'")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)  # type: ignore[call-overload]


class _ArrayProxy:
    """What ``_reconstruct(ndarray, ...)`` + ``__setstate__`` described; replaced after loading."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        # numpy writes (version, shape, dtype, is_fortran, rawdata); old files (shape, dtype, is_fortran, rawdata)
        if isinstance(state, tuple) and len(state) == 5 and isinstance(state[0], int):
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            _fail(f"numpy array state {_short(state)}: expected (version, shape, dtype, is_fortran, data)")
        shape, dtype, fortran, data = state
        self.array = _array(_as_buffer(data, "numpy array data"), _as_dtype(dtype), _as_shape(shape),
                            "F" if fortran else "C")


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ArrayProxy:
    """``numpy.core.multiarray._reconstruct``: only for plain ``numpy.ndarray``."""
    del shape, typecode  # numpy passes (0,) and b"b"; the real content comes with __setstate__
    if subtype is not _NDARRAY:
        _fail(f"_reconstruct of {_short(subtype)}: only numpy.ndarray is allowed")
    return _ArrayProxy()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """``numpy._core.numeric._frombuffer`` (pickle protocol 5)."""
    return _array(_as_buffer(buf, "numpy array data"), _as_dtype(dtype), _as_shape(shape), order)


def _scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy._core.multiarray.scalar``: a numpy number from its raw bytes."""
    dt = _as_dtype(dtype)
    return _array(_as_buffer(data, "numpy scalar data"), dt, (), "C")[()]


def _codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode``: Python 3 writes ``bytes`` as ``encode(str, "latin1")`` in protocols 0-2."""
    del errors
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        _fail(f"_codecs.encode({_short(obj)}, {encoding!r}): only encode(str, 'latin1') is allowed")
    return obj.encode("latin1")


class _Global:
    """A frozen callable standing in for an admitted global.

    Immutable (no ``__dict__``, no settable attributes) so that a pickle's
    ``BUILD`` opcode cannot change it, and not a class, so that ``NEWOBJ``
    refuses it.
    """

    __slots__ = ("_fn", "_label")
    _fn: Callable[..., Any]
    _label: str

    def __init__(self, label: str, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_label", label)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        _fail(f"cannot set {name!r} on {self._label}")

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __repr__(self) -> str:
        return f"<restricted {self._label}>"


def _not_callable(*args: Any) -> NoReturn:
    _fail("numpy.ndarray may only be passed to _reconstruct, not called")


_NDARRAY = _Global("numpy.ndarray", _not_callable)
_STANDINS: dict[tuple[str, str], _Global] = {("numpy", "ndarray"): _NDARRAY}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _STANDINS[(_mod, "_reconstruct")] = _Global(f"{_mod}._reconstruct", _reconstruct)
    _STANDINS[(_mod, "scalar")] = _Global(f"{_mod}.scalar", _scalar)
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _STANDINS[(_mod, "_frombuffer")] = _Global(f"{_mod}._frombuffer", _frombuffer)
_STANDINS[("numpy", "dtype")] = _Global("numpy.dtype", _DtypeSpec)
_STANDINS[("_codecs", "encode")] = _Global("_codecs.encode", _codecs_encode)

#: every ``(module, name)`` a data pickle may refer to; anything else is refused
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(_STANDINS)


def _short(value: Any) -> str:
    """A bounded repr of a value taken from the file (which may hold megabytes)."""
    return reprlib.repr(value)


# --------------------------------------------------------------------------- #
class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that runs no code from the file: see the module docstring.

    ``source`` names the file in error messages.  Refused globals raise
    :class:`DataError`; use :func:`loads`/:func:`load_file`, which also replace
    the array stand-ins by numpy arrays and turn malformed pickles into
    :class:`DataError`.
    """

    def __init__(self, file: io.BufferedIOBase, source: PathLike, *, encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding, errors="strict")
        self.source = os.fspath(source)

    def find_class(self, module: str, name: str) -> Any:
        """The stand-in for an admitted global; :class:`DataError` for every other one."""
        try:
            return _STANDINS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.source}: refused to load the global {module}.{name} from this pickle (that would let the "
                f"file run code): a data file may only hold numeric numpy arrays, numbers, strings, lists and "
                f"dicts. Do not use a file of unknown origin; if you made it yourself, save plain numpy arrays and "
                f"lists in it"
            ) from None

    def persistent_load(self, pid: Any) -> NoReturn:
        raise DataError(f"{self.source}: refused a persistent id {_short(pid)} in this pickle; data files may "
                        "only hold numeric numpy arrays, numbers, strings, lists and dicts")


def _resolve(obj: Any) -> Any:
    """``obj`` with every array stand-in replaced by its numpy array (containers rebuilt or updated)."""
    done: dict[int, Any] = {}

    def walk(o: Any, depth: int) -> Any:
        if isinstance(o, _ArrayProxy):
            if o.array is None:
                _fail("a numpy array without its data (no __setstate__)")
            return o.array
        if isinstance(o, _DtypeSpec):
            return o.resolve()
        if not isinstance(o, (list, dict, tuple)):
            return o
        if id(o) in done:
            return done[id(o)]
        if depth > MAX_DEPTH:
            _fail(f"containers nested more than {MAX_DEPTH} deep")
        if isinstance(o, list):
            done[id(o)] = o
            o[:] = [walk(v, depth + 1) for v in o]
        elif isinstance(o, dict):
            done[id(o)] = o
            for k, v in o.items():
                o[k] = walk(v, depth + 1)
        else:
            done[id(o)] = o
            new = tuple(walk(v, depth + 1) for v in o)
            o = done[id(o)] = new if any(a is not b for a, b in zip(new, o)) else o
        return o

    return walk(obj, 0)


def loads(data: bytes, source: PathLike) -> Any:
    """Unpickle ``data`` (read from the file ``source``) without running code from it.

    Raises :class:`DataError` naming ``source`` for a refused global or a
    truncated/malformed pickle.
    """
    where = os.fspath(source)
    try:
        return _resolve(RestrictedUnpickler(io.BytesIO(data), where).load())
    except DataError:
        raise
    except _Refused as exc:
        raise DataError(f"{where}: refused this pickle: {exc}") from None
    except RecursionError:
        raise DataError(f"{where}: refused this pickle: it is nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - a malformed pickle fails in many ways; no foreign code runs
        cut = isinstance(exc, EOFError) or "truncated" in str(exc)
        what = "truncated" if cut else "corrupt or not a pickle"
        raise DataError(f"{where} is {what} ({type(exc).__name__}: {exc}); expected a complete pickle file, "
                        f"e.g. a CIFAR-10 python batch; re-download or re-copy it") from None


def load_file(path: PathLike) -> Any:
    """:func:`loads` of the file ``path``; an unreadable file is a :class:`DataError` too."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {p}: {exc}") from None
    return loads(data, p)
