"""Verification pair sets in the insightface ``.bin`` format (LFW, CFP-FP, AgeDB-30, ...).

A ``.bin`` file is a pickle of ``(bins, issame_list)``: ``bins`` holds ``2 * P`` encoded images
and pair ``p`` is ``(bins[2p], bins[2p + 1])`` with ``issame_list[p]`` telling whether both show
the same person. Files made under Python 2 need ``encoding="bytes"`` to unpickle.

Plain unpickling runs code chosen by the file's author, and ``.bin`` sets come from third-party
mirrors, so :func:`load_bin` uses a restricted unpickler. It builds containers, bytes, strings,
numbers and bools, and admits only the globals that pickles of the published structure contain:
``_codecs.encode`` (bytes pickled by Python 3 at protocol < 3, ``latin-1`` only), ``bytearray``,
and numpy's bool / integer scalars and arrays (``numpy.dtype``, ``scalar``, ``_reconstruct``,
``_frombuffer``, under the ``numpy.core`` and ``numpy._core`` names). None of these reach a numpy
or Python constructor with the file's data: each is replaced by a function of this module that
checks its arguments (dtype kind bool or integer, raw bytes of the right length) and builds the
value with ``np.frombuffer``. Any other global is refused with a :class:`DataFormatError` naming
the file and the global, before anything runs. There is no opt-out: a file that needs another
global is not a verification set.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from robustface.data.image import decode_image
from robustface.errors import DataFormatError
from robustface.utils.io import atomic_path

__all__ = ["load_bin", "load_bin_images", "write_bin"]

# numpy dtypes a .bin may hold: bool flags and integer flags / image bytes
_DTYPE_SPECS = frozenset({"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"})


def _text(value: object, what: str) -> str:
    """A pickled string as ``str`` (Python 2 pickles read with ``encoding="bytes"`` give bytes)."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, str):
        return value
    raise pickle.UnpicklingError(f"{what} must be a string, got {type(value).__name__}")


def _raw(value: object, what: str) -> bytes:
    """Pickled raw data as bytes (a Python 2 ``str`` read as text holds latin-1 code points)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("latin-1")
    raise pickle.UnpicklingError(f"{what} must be bytes, got {type(value).__name__}")


class _DType:
    """``numpy.dtype(spec, align, copy)`` + its pickled state, for bool and integer specs only."""

    def __init__(self, spec: object, align: object = False, copy: object = True) -> None:
        self.spec = _text(spec, "numpy dtype")
        if self.spec not in _DTYPE_SPECS:
            raise pickle.UnpicklingError(f"numpy dtype {self.spec!r} is not allowed")
        self.byteorder = "="

    def __setstate__(self, state: object) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 2:
            raise pickle.UnpicklingError("malformed numpy dtype state")
        order = _text(state[1], "numpy byte order")
        if order not in ("|", "<", ">", "="):
            raise pickle.UnpicklingError(f"numpy byte order {order!r} is not allowed")
        self.byteorder = order

    def numpy(self) -> np.dtype:
        dtype = np.dtype(self.spec)
        return dtype if self.byteorder in ("|", "=") else dtype.newbyteorder(self.byteorder)


def _checked_dtype(dtype: object) -> np.dtype:
    if not isinstance(dtype, _DType):
        raise pickle.UnpicklingError(f"expected a numpy dtype, got {type(dtype).__name__}")
    return dtype.numpy()


def _array_from(raw: object, dtype: object, shape: object, order: str) -> np.ndarray:
    """A read-only array of ``shape`` over a copy of ``raw``, after checking that they agree."""
    dt = _checked_dtype(dtype)
    data = _raw(raw, "numpy array data")
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise pickle.UnpicklingError(f"malformed numpy array shape {shape!r}")
    if len(data) != dt.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise pickle.UnpicklingError(f"numpy array of shape {shape} does not fit {len(data)} bytes")
    return np.frombuffer(data, dtype=dt).reshape(shape, order=order)


class _Array:
    """``numpy.core.multiarray._reconstruct(ndarray, ...)`` + its pickled state (``BUILD``)."""

    def __init__(self, cls: object, shape: object = (0,), typecode: object = b"b") -> None:
        if cls is not _NDARRAY:
            raise pickle.UnpicklingError("_reconstruct may only build a numpy.ndarray")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 5:  # (version, shape, dtype, fortran, raw)
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise pickle.UnpicklingError("malformed numpy array state")
        shape, dtype, fortran, raw = state
        self.array = _array_from(raw, dtype, shape, "F" if fortran else "C")


def _frombuffer(buf: object, dtype: object, shape: object, order: object) -> _Array:
    """``numpy.core.numeric._frombuffer`` (numpy arrays at pickle protocol 5)."""
    built = _Array(_NDARRAY)
    built.array = _array_from(buf, dtype, shape, "F" if _text(order, "order") == "F" else "C")
    return built


def _scalar(dtype: object, data: object = b"") -> bool | int:
    """``numpy.core.multiarray.scalar``: a bool / integer scalar as a Python value."""
    dt = _checked_dtype(dtype)
    raw = _raw(data, "numpy scalar data")
    if len(raw) != dt.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar of {dt} does not fit {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dt)[0].item()


def _latin1_encode(text: object, encoding: object = "utf-8") -> bytes:
    """``_codecs.encode(text, "latin1")``: how Python 3 pickles bytes at protocol < 3."""
    if not isinstance(text, str) or _text(encoding, "encoding") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin-1 text")
    return text.encode("latin-1")


def _bytearray(data: object = b"", encoding: object = None) -> bytearray:
    """``bytearray(bytes)`` or ``bytearray(text, "latin-1")`` (protocol < 3)."""
    if encoding is not None:
        return bytearray(_latin1_encode(data, encoding))
    return bytearray(_raw(data, "bytearray data"))


class _Global:
    """What an allowed global unpickles to: callable (``REDUCE``), but not a class (so ``NEWOBJ``
    cannot skip the checks in ``__init__``) and unchangeable (``BUILD`` and ``setattr`` refused).
    """

    __slots__ = ("_build",)

    def __init__(self, build: Callable[..., object]) -> None:
        object.__setattr__(self, "_build", build)

    def __call__(self, *args: object) -> object:
        return self._build(*args)

    def __setattr__(self, name: str, value: object) -> None:
        raise pickle.UnpicklingError("a global cannot be modified")

    def __setstate__(self, state: object) -> None:
        raise pickle.UnpicklingError("a global cannot be modified")


def _not_callable(*args: object) -> None:
    raise pickle.UnpicklingError("numpy.ndarray may only be named as _reconstruct's argument")


# numpy.ndarray: only ever the first argument of _reconstruct
_NDARRAY = _Global(_not_callable)

_ALLOWED_GLOBALS: dict[tuple[str, str], _Global] = {
    ("_codecs", "encode"): _Global(_latin1_encode),
    ("builtins", "bytearray"): _Global(_bytearray),
    ("__builtin__", "bytearray"): _Global(_bytearray),
    ("numpy", "dtype"): _Global(_DType),
    ("numpy", "ndarray"): _NDARRAY,
    **{
        (f"{core}.{module}", name): _Global(build)
        for core in ("numpy.core", "numpy._core")
        for module, name, build in (
            ("multiarray", "scalar", _scalar),
            ("multiarray", "_reconstruct", _Array),
            ("numeric", "_frombuffer", _frombuffer),
        )
    },
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A global outside ``_ALLOWED_GLOBALS``; its argument is the dotted name."""


class _BinUnpickler(pickle.Unpickler):
    """Unpickles plain data only: every global comes from ``_ALLOWED_GLOBALS`` or is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _plain(value: object, path: Path) -> object:
    """``value`` with arrays built by the unpickler made numpy arrays (they must be complete)."""
    if isinstance(value, _Array):
        if value.array is None:
            raise DataFormatError(path, "a pickled numpy array without its data")
        return value.array
    return value


def _unpickle(path: Path) -> object:
    data = path.read_bytes()
    try:
        try:
            return _BinUnpickler(io.BytesIO(data)).load()
        except UnicodeDecodeError:  # a Python 2 pickle of str objects holding image bytes
            return _BinUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise DataFormatError(
            path,
            f"refused to unpickle {exc.args[0]}: a verification .bin holds only image bytes and "
            "same/different flags, so this file is not one (it may be crafted to run code); "
            "nothing in it was run",
        ) from None
    except Exception as exc:  # unpickling can fail in many ways on a corrupt file
        raise DataFormatError(path, f"cannot unpickle: {type(exc).__name__}: {exc}") from exc


def load_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """Load a verification ``.bin``: the encoded images and the ``issame`` flags (bool array)."""
    path = Path(path)
    obj = _unpickle(path)
    if not (isinstance(obj, tuple | list) and len(obj) == 2):
        raise DataFormatError(path, f"expected a pickled (bins, issame_list), got {type(obj)}")
    raw_bins, raw_issame = _plain(obj[0], path), _plain(obj[1], path)
    if not isinstance(raw_bins, list | tuple):
        raise DataFormatError(path, f"bins must be a list of bytes, got {type(raw_bins).__name__}")
    bins = []
    for i, b in enumerate(raw_bins):
        b = _plain(b, path)
        if isinstance(b, np.ndarray):
            b = b.tobytes()
        elif isinstance(b, bytearray | memoryview):
            b = bytes(b)
        if not isinstance(b, bytes):
            raise DataFormatError(path, f"image {i} is a {type(b).__name__}, not bytes", i)
        bins.append(b)
    if isinstance(raw_issame, list | tuple):
        raw_issame = [_plain(s, path) for s in raw_issame]
    flags = np.asarray(raw_issame).ravel()
    if flags.dtype != bool and not (
        np.issubdtype(flags.dtype, np.integer) and np.isin(flags, (0, 1)).all()
    ):
        raise DataFormatError(path, f"issame_list must hold booleans, got dtype {flags.dtype}")
    issame = flags.astype(bool)
    if len(bins) != 2 * issame.size:
        raise DataFormatError(
            path, f"{len(bins)} images for {issame.size} pairs; expected 2 images per pair"
        )
    return bins, issame


def load_bin_images(
    path: str | Path, image_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image of a ``.bin``: ``(N x H x W x 3 uint8 RGB, issame bool array)``.

    With ``image_size=(H, W)``, images of another size are resized with bicubic interpolation,
    as insightface's loader does (``mx.image.resize_short`` defaults to ``interp=2``, bicubic).
    Without it, all images must share one size.
    """
    path = Path(path)
    bins, issame = load_bin(path)
    images = None
    for i, data in enumerate(bins):
        image = decode_image(data, path, f"image {i} of pair {i // 2}")
        if image_size is not None and image.shape[:2] != tuple(image_size):
            image = cv2.resize(image, (image_size[1], image_size[0]), interpolation=cv2.INTER_CUBIC)
        if images is None:
            images = np.empty((len(bins), *image.shape), dtype=np.uint8)
        elif image.shape != images.shape[1:]:
            raise DataFormatError(
                path,
                f"image is {image.shape[0]}x{image.shape[1]}, the first one "
                f"{images.shape[1]}x{images.shape[2]}; pass image_size to resize",
                f"image {i} of pair {i // 2}",
            )
        images[i] = image
    if images is None:
        size = (0, 0) if image_size is None else tuple(image_size)
        images = np.empty((0, *size, 3), dtype=np.uint8)
    return images, issame


def write_bin(path: str | Path, bins: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a verification ``.bin`` atomically, in insightface's layout (pickle protocol 4)."""
    bins = [bytes(b) for b in bins]
    flags = [bool(s) for s in issame]
    if len(bins) != 2 * len(flags):
        raise ValueError(f"need 2 images per pair: got {len(bins)} images for {len(flags)} pairs")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump((bins, flags), f, protocol=4)
