"""MXNet indexed RecordIO (``.rec`` + ``.idx``), read and written without MXNet.

File layout (dmlc-core ``recordio``): each record is framed as

    uint32 magic 0xced7230a | uint32 lrecord | payload | zero padding to a multiple of 4 bytes

where ``lrecord`` holds a continuation flag ``cflag`` in its upper 3 bits and the part length in
its lower 29 bits. dmlc escapes a payload that contains the magic number at a 4-byte aligned
position by cutting it there into parts (``cflag`` 1 = first, 2 = middle, 3 = last, 0 = whole
record) and dropping the magic; a reader puts the magic back between the parts. The ``.idx`` file
has one ``key<TAB>offset`` line per record.

An image record's payload starts with an ``IRHeader`` packed ``<IfQQ`` (flag, label, id, id2). When
``flag > 0`` the label is the ``flag`` float32 values that follow the header (the packed ``label``
field is then 0); the encoded image comes last.

Two dataset layouts exist. The insightface layout stores a header record at key 0 (array label
``(N + 1, end)``, no image), images at keys ``1..N`` and one record per identity at keys
``N + 1 .. end - 1`` whose label ``(start, stop)`` is the end-exclusive key range of its images; a
``property`` file next to it holds ``num_classes,H,W``. The flat layout has only image records.
"""

from __future__ import annotations

import contextlib
import mmap
import operator
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch.utils.data

from robustface.data.image import decode_image
from robustface.errors import DataFormatError
from robustface.utils.io import atomic_path, write_text_atomic

MAGIC = 0xCED7230A
MAX_RECORD_BYTES = (1 << 29) - 1
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
_LEN_MASK = (1 << 29) - 1

__all__ = [
    "IRHeader",
    "IndexedRecordReader",
    "RecordIODataset",
    "RecordIOWriter",
    "pack_record",
    "unpack_record",
    "write_flat_rec",
    "write_insightface_rec",
]


class IRHeader(NamedTuple):
    """Image record header; ``label`` is a float if ``flag == 0``, else ``flag`` float32 values."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_record(label: float | Sequence[float], payload: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Pack an ``IRHeader`` and ``payload`` (usually encoded image bytes) into a record body."""
    if isinstance(label, int | float | np.integer | np.floating):
        return _IR.pack(0, float(label), id, id2) + payload
    values = np.asarray(label, dtype="<f4").ravel()
    if values.size == 0:
        raise ValueError("label must be a number or a non-empty sequence of numbers, got []")
    return _IR.pack(values.size, 0.0, id, id2) + values.tobytes() + payload


def unpack_record(
    data: bytes, source: str | Path = "<record>", key: int | None = None
) -> tuple[IRHeader, bytes]:
    """Split a record body into its ``IRHeader`` and the remaining payload.

    ``source`` and ``key`` only serve the error message for a body too short for its header.
    """
    if len(data) < _IR.size:
        raise DataFormatError(
            source, f"record body has {len(data)} bytes, shorter than the 24-byte header", key
        )
    flag, label, id_, id2 = _IR.unpack_from(data)
    if flag == 0:
        return IRHeader(0, label, id_, id2), data[_IR.size :]
    end = _IR.size + 4 * flag
    if len(data) < end:
        raise DataFormatError(
            source,
            f"header announces {flag} float32 labels but the body has {len(data)} bytes",
            key,
        )
    values = np.frombuffer(data, dtype="<f4", count=flag, offset=_IR.size).astype(np.float32)
    return IRHeader(flag, values, id_, id2), data[end:]


def _frame(record: bytes) -> list[bytes]:
    """Frame ``record`` the dmlc way, splitting it where the magic occurs at an aligned offset."""
    cuts = []
    pos = record.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            cuts.append(pos)
            pos = record.find(_MAGIC_BYTES, pos + 4)
        else:
            pos = record.find(_MAGIC_BYTES, pos + 1)
    chunks = []
    start = 0
    for i, cut in enumerate(cuts):
        chunks.append(_FRAME.pack(MAGIC, ((1 if i == 0 else 2) << 29) | (cut - start)))
        chunks.append(record[start:cut])
        start = cut + 4
    chunks.append(_FRAME.pack(MAGIC, ((3 if cuts else 0) << 29) | (len(record) - start)))
    chunks.append(record[start:])
    chunks.append(b"\0" * (-len(record) % 4))
    return chunks


def _default_idx(rec_path: Path) -> Path:
    return rec_path.with_suffix(".idx")


class RecordIOWriter:
    """Write an indexed RecordIO pair atomically.

    Use as a context manager: both files are written to temporaries and renamed onto ``rec_path``
    and ``idx_path`` (default: ``rec_path`` with suffix ``.idx``) only when the block exits
    without an exception; otherwise nothing is left behind.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else _default_idx(self.rec_path)
        self._stack: contextlib.ExitStack | None = None
        self._rec: Any = None
        self._idx: Any = None
        self._pos = 0

    def __enter__(self) -> RecordIOWriter:
        stack = contextlib.ExitStack()
        try:
            tmp_rec = stack.enter_context(atomic_path(self.rec_path))
            tmp_idx = stack.enter_context(atomic_path(self.idx_path))
            self._rec = stack.enter_context(open(tmp_rec, "wb"))
            self._idx = stack.enter_context(open(tmp_idx, "w", encoding="ascii"))
        except BaseException as exc:
            stack.__exit__(type(exc), exc, exc.__traceback__)  # discards the temporaries
            raise
        self._stack = stack
        self._pos = 0
        return self

    def __exit__(self, *exc_info: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(*exc_info)

    def write(self, key: int, record: bytes) -> None:
        """Append ``record`` (a body from :func:`pack_record`) under the integer ``key``."""
        if self._stack is None:
            raise RuntimeError("RecordIOWriter.write() called outside its 'with' block")
        key = operator.index(key)
        if len(record) > MAX_RECORD_BYTES:
            # The format cannot hold it: multi-part records mean "a magic number was cut out here".
            raise ValueError(
                f"record {key} has {len(record)} bytes; RecordIO records hold at most "
                f"{MAX_RECORD_BYTES} bytes"
            )
        chunks = _frame(record)
        self._rec.writelines(chunks)
        self._idx.write(f"{key}\t{self._pos}\n")
        self._pos += sum(len(c) for c in chunks)

    def _overwrite(self, offset: int, record: bytes) -> None:
        """Replace the record framed at ``offset`` by ``record``, whose framing is as long."""
        self._rec.seek(offset)
        self._rec.writelines(_frame(record))
        self._rec.seek(0, os.SEEK_END)


def _parse_int_table(path: Path, columns: int) -> np.ndarray:
    """Parse a whitespace-separated table of integers into an ``(n, columns)`` int64 array."""
    text = path.read_text(encoding="ascii", errors="replace")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            values = np.fromstring(text, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            values = None
    if values is None or values.size % columns:
        for lineno, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if fields and (len(fields) != columns or not all(_is_int(f) for f in fields)):
                raise DataFormatError(
                    path, f"line {lineno}: expected {columns} integers, got {line.strip()!r}"
                )
        raise DataFormatError(path, f"expected {columns} integers per line")
    return values.reshape(-1, columns)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


class IndexedRecordReader:
    """Random access to the records of a ``.rec`` file through its ``.idx``.

    The file is memory-mapped (read-only) on first use and mapped again whenever the process id
    changes, so one reader can be shared by DataLoader workers (each maps it itself); the reader
    pickles without the map. Reading a record copies it out of the map: no ``seek``/``read``
    system calls per record.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else _default_idx(self.rec_path)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        if not self.idx_path.is_file():
            raise DataFormatError(self.rec_path, f"index file not found: expected {self.idx_path}")
        table = _parse_int_table(self.idx_path, 2)
        keys, offsets = table[:, 0], table[:, 1]
        file_size = self.rec_path.stat().st_size
        bad = (offsets < 0) | (offsets >= max(file_size, 1))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataFormatError(
                self.idx_path,
                f"offset {int(offsets[i])} is outside {self.rec_path} ({file_size} bytes)",
                int(keys[i]),
            )
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if dup.size:
            raise DataFormatError(
                self.idx_path, "key listed twice in the index", int(sorted_keys[dup[0]])
            )
        # A record may extend up to the next indexed offset (or the end of the file): reading
        # that many bytes fetches the whole record in one call, and reading past it is corruption.
        starts = np.unique(np.append(offsets, file_size))
        extents = starts[np.searchsorted(starts, offsets, side="right")] - offsets
        self.keys: np.ndarray = keys
        self._first = int(sorted_keys[0]) if keys.size else 0
        self._dense = bool(keys.size == 0 or sorted_keys[-1] - sorted_keys[0] == keys.size - 1)
        self._sorted_keys = sorted_keys
        self._offsets = offsets[order]
        self._extents = extents[order]
        self._mapped: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.keys.size)

    def __contains__(self, key: object) -> bool:
        try:
            self._slot(operator.index(key))  # type: ignore[arg-type]
        except (TypeError, KeyError):
            return False
        return True

    def missing(self, keys: np.ndarray) -> np.ndarray:
        """Return the entries of ``keys`` that are not in the index (vectorised)."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._dense:
            return keys[(keys < self._first) | (keys >= self._first + self.keys.size)]
        pos = np.searchsorted(self._sorted_keys, keys).clip(max=self.keys.size - 1)
        return keys[self._sorted_keys[pos] != keys]

    def _slot(self, key: int) -> int:
        n = self.keys.size
        if self._dense:
            j = key - self._first
            if 0 <= j < n:
                return j
        else:
            j = int(np.searchsorted(self._sorted_keys, key))
            if j < n and self._sorted_keys[j] == key:
                return j
        raise KeyError(key)

    def _map(self) -> mmap.mmap:
        """This process's read-only memory map of the ``.rec`` (made on first use)."""
        pid = os.getpid()
        if self._mapped is None or self._pid != pid:
            with open(self.rec_path, "rb") as fh:
                self._mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._pid = pid
        return self._mapped

    def close(self) -> None:
        """Close this process's memory map of the file (it is mapped again on the next read)."""
        if self._mapped is not None and self._pid == os.getpid():
            self._mapped.close()
        self._mapped = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_mapped"] = None
        state["_pid"] = None
        return state

    def __enter__(self) -> IndexedRecordReader:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def read(self, key: int, limit: int | None = None) -> bytes:
        """Return the body of record ``key``, reassembling multi-part records.

        With ``limit``, only the first ``limit`` bytes of the body are read and returned.
        """
        key = operator.index(key)
        try:
            j = self._slot(key)
        except KeyError:
            raise DataFormatError(
                self.rec_path, f"key not found in index {self.idx_path}", key
            ) from None
        offset, extent = int(self._offsets[j]), int(self._extents[j])
        data = self._map()  # no read calls: a record is a copy out of the page cache
        if limit is None and extent >= _FRAME.size:  # fast path: a whole single-part record
            magic, lrec = _FRAME.unpack_from(data, offset)
            if magic == MAGIC and lrec >> 29 == 0 and _FRAME.size + lrec <= extent:
                return data[offset + _FRAME.size : offset + _FRAME.size + lrec]
        first = extent if limit is None else min(extent, _FRAME.size + limit + 3)
        return self._read_parts(key, data, offset, extent, data[offset : offset + first], limit)

    def _read_parts(
        self, key: int, data: mmap.mmap, offset: int, extent: int, buf: bytes, limit: int | None
    ) -> bytes:
        """Parse the parts of the record at ``offset`` in ``data`` whose first bytes are ``buf``,
        copying more of its ``extent`` as needed."""

        def need(n: int) -> None:
            nonlocal buf
            if n > len(buf) and len(buf) < extent:
                buf += data[offset + len(buf) : offset + min(n, extent)]
            if n > len(buf):
                raise DataFormatError(
                    self.rec_path,
                    f"truncated record: needs {n} bytes from offset {offset}, "
                    f"only {len(buf)} available before the next record or end of file",
                    key,
                )

        parts: list[bytes] = []
        size = 0
        pos = 0
        while True:
            need(pos + _FRAME.size)
            magic, lrec = _FRAME.unpack_from(buf, pos)
            if magic != MAGIC:
                raise DataFormatError(
                    self.rec_path,
                    f"bad magic 0x{magic:08x} at offset {offset + pos} (expected 0x{MAGIC:08x})",
                    key,
                )
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if cflag not in ((0, 1) if pos == 0 else (2, 3)):
                raise DataFormatError(
                    self.rec_path,
                    f"unexpected continuation flag {cflag} at offset {offset + pos}",
                    key,
                )
            start = pos + _FRAME.size
            take = length if limit is None else min(length, limit - size)
            need(start + take)
            parts.append(buf[start : start + take])
            size += take
            if cflag in (0, 3) or (limit is not None and size >= limit):
                break
            parts.append(_MAGIC_BYTES)
            size += 4
            pos = start + ((length + 3) & ~3)
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        return body if limit is None else body[:limit]

    def read_header(self, key: int) -> IRHeader:
        """Return the ``IRHeader`` of record ``key`` without reading the image bytes."""
        data = self.read(key, limit=_IR.size + 8)  # room for the usual 2-value array label
        flag = _IR.unpack_from(data)[0] if len(data) >= _IR.size else 0
        if flag > 2:
            data = self.read(key, limit=_IR.size + 4 * flag)
        return unpack_record(data, self.rec_path, key)[0]


def _float32_exact(value: int, what: str) -> float:
    if float(np.float32(value)) != value:
        raise ValueError(f"{what} {value} cannot be stored exactly in a float32 label")
    return float(value)


def write_flat_rec(
    path_rec: str | Path, items: Iterable[tuple[bytes, float | Sequence[float]]]
) -> Path:
    """Write ``(image bytes, label)`` items as a flat RecordIO (keys ``0..N-1``, no header).

    The ``.idx`` goes next to ``path_rec``. Returns the ``.rec`` path.
    """
    path_rec = Path(path_rec)
    with RecordIOWriter(path_rec) as writer:
        for key, (payload, label) in enumerate(items):
            writer.write(key, pack_record(label, payload, id=key))
    return path_rec


def write_insightface_rec(
    out_dir: str | Path,
    items: Iterable[tuple[bytes, int]],
    *,
    image_size: tuple[int, int] = (112, 112),
    prefix: str = "train",
    num_classes: int | None = None,
) -> Path:
    """Write ``(image bytes, label)`` items in the insightface RecordIO layout.

    Creates ``{prefix}.rec``, ``{prefix}.idx`` and ``property`` (``num_classes,H,W``) in
    ``out_dir`` and returns the ``.rec`` path. Items are streamed; all samples of a class must
    come together in one run, and labels must cover ``0..num_classes-1`` (``num_classes``
    defaults to the largest label + 1). Nothing is written if any check fails.
    """
    out_dir = Path(out_dir)
    height, width = (int(v) for v in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be two positive ints (H, W), got {image_size}")
    if num_classes is not None and num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    rec_path = out_dir / f"{prefix}.rec"
    runs: dict[int, tuple[int, int]] = {}
    current = -1
    n = 0
    with RecordIOWriter(rec_path) as writer:
        # The header record has a fixed size, so it is written now and rewritten at the end.
        writer.write(0, pack_record([0.0, 0.0], b""))
        for i, (payload, label) in enumerate(items):
            label = operator.index(label)
            if label < 0 or (num_classes is not None and label >= num_classes):
                bound = "" if num_classes is None else f" < num_classes={num_classes}"
                raise ValueError(f"item {i}: label {label} must be >= 0{bound}")
            key = i + 1
            if label != current:
                if label in runs:
                    raise ValueError(
                        f"item {i}: label {label} appears again after another class; "
                        "all samples of a class must be consecutive"
                    )
                runs[label] = (key, key)
                current = label
            runs[label] = (runs[label][0], key + 1)
            writer.write(key, pack_record(float(label), payload, id=key))
            n = key
        if n == 0:
            raise ValueError("items is empty: nothing to write")
        classes = num_classes if num_classes is not None else max(runs) + 1
        absent = sorted(set(range(classes)) - runs.keys())
        if absent:
            raise ValueError(
                f"labels must cover 0..{classes - 1}; {len(absent)} classes have no samples, "
                f"first {absent[:10]}"
            )
        for label in range(classes):
            start, stop = runs[label]
            writer.write(n + 1 + label, pack_record([float(start), float(stop)], b""))
        end = n + 1 + classes
        header = [_float32_exact(n + 1, "image count + 1"), _float32_exact(end, "end key")]
        # Positive float32 labels never contain the magic, so the framing keeps its length.
        writer._overwrite(0, pack_record(header, b""))
    write_text_atomic(out_dir / "property", f"{classes},{height},{width}\n")
    return rec_path


def _resolve_rec(path: Path) -> Path:
    if path.is_dir():
        if (path / "train.rec").is_file():
            return path / "train.rec"
        recs = sorted(path.glob("*.rec"))
        if len(recs) != 1:
            found = ", ".join(p.name for p in recs) or "none"
            raise DataFormatError(
                path, f"expected train.rec or exactly one *.rec file, found {found}"
            )
        return recs[0]
    if path.suffix == ".rec" and path.is_file():
        return path
    raise FileNotFoundError(f"not a .rec file or a directory holding one: {path}")


def _read_property(path: Path) -> tuple[int, int, int] | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8").strip()
    fields = text.split(",")
    try:
        values = tuple(int(f) for f in fields)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise DataFormatError(path, f"expected 'num_classes,H,W' (positive ints), got {text!r}")
    return values  # type: ignore[return-value]


class RecordIODataset(torch.utils.data.Dataset):
    """Face images from an indexed RecordIO, in the insightface or the flat layout.

    ``path`` is a ``.rec`` file or a directory with ``train.rec`` (or exactly one ``*.rec``).
    ``ds[i]`` is ``(image, label)``: an ``HxWx3`` uint8 RGB array, or ``transform(image)``.
    Array labels count by their first value, as in insightface.
    """

    def __init__(
        self, path: str | Path, transform: Callable[[np.ndarray], Any] | None = None
    ) -> None:
        self.rec_path = _resolve_rec(Path(path))
        self.transform = transform
        self.reader = IndexedRecordReader(self.rec_path)
        prop = _read_property(self.rec_path.parent / "property")
        self._property_classes = prop[0] if prop else None
        self.image_size: tuple[int, int] | None = (prop[1], prop[2]) if prop else None
        self._labels: np.ndarray | None = None
        self._identity_range: tuple[int, int] | None = None
        self._image_keys = self.reader.keys
        if 0 in self.reader:
            header, rest = unpack_record(self.reader.read(0), self.rec_path, 0)
            if header.flag >= 2 and not rest:
                self._init_header_layout(header)
        if not len(self._image_keys):
            raise DataFormatError(self.rec_path, "no image records")
        self._label_bound = self._property_classes
        if self._label_bound is None and self._num_identities:
            self._label_bound = self._num_identities

    def _init_header_layout(self, header: IRHeader) -> None:
        first, end = float(header.label[0]), float(header.label[1])
        if not (first.is_integer() and end.is_integer() and 1 <= first <= end):
            raise DataFormatError(
                self.rec_path, f"header record label {header.label.tolist()} is not (N+1, end)", 0
            )
        num_images, end_key = int(first) - 1, int(end)
        missing = self.reader.missing(np.arange(1, end_key))
        if missing.size:
            raise DataFormatError(
                self.idx_path,
                f"header record promises keys 1..{end_key - 1}; key missing from the index",
                int(missing[0]),
            )
        self._image_keys = np.arange(1, num_images + 1, dtype=np.int64)
        self._identity_range = (num_images + 1, end_key)

    @property
    def _num_identities(self) -> int:
        if self._identity_range is None:
            return 0
        first, end = self._identity_range
        return end - first

    @property
    def idx_path(self) -> Path:
        """The ``.idx`` file read alongside the ``.rec``."""
        return self.reader.idx_path

    @property
    def layout(self) -> str:
        """``"insightface"`` (header record at key 0) or ``"flat"``."""
        return "flat" if self._identity_range is None else "insightface"

    @property
    def has_identity_records(self) -> bool:
        """Whether :attr:`labels` comes from identity records (else from every image header)."""
        return bool(self._num_identities)

    def __len__(self) -> int:
        return int(self._image_keys.size)

    def record_key(self, index: int) -> int:
        """The ``.rec`` key of image ``index`` (what error messages call the record)."""
        return int(self._image_keys[index])

    @property
    def label_bound(self) -> int | None:
        """Labels must be below this: ``property``'s class count, else the identity records'."""
        return self._label_bound

    def _class_label(self, header: IRHeader, key: int) -> int:
        value = float(header.label if header.flag == 0 else header.label[0])
        bound = self._label_bound
        if not value.is_integer() or value < 0 or (bound is not None and value >= bound):
            allowed = "a class id >= 0" if bound is None else f"a class id in [0, {bound})"
            raise DataFormatError(self.rec_path, f"label {value:g} is not {allowed}", key)
        return int(value)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        i = operator.index(index)
        if not 0 <= i < self._image_keys.size:
            raise IndexError(f"index {i} out of range for {self._image_keys.size} images")
        key = int(self._image_keys[i])
        header, payload = unpack_record(self.reader.read(key), self.rec_path, key)
        label = self._class_label(header, key)
        image = decode_image(payload, self.rec_path, key)
        if self.transform is not None:
            return self.transform(image), label
        return image, label

    @property
    def labels(self) -> np.ndarray:
        """Class label of every image (int64), computed once and cached."""
        if self._labels is None:
            if not self._num_identities:  # flat layout, or a header without identity records
                read = self.reader.read_header
                self._labels = np.array(
                    [self._class_label(read(int(k)), int(k)) for k in self._image_keys],
                    dtype=np.int64,
                )
            else:
                self._labels = self._labels_from_identities()
        return self._labels

    def _labels_from_identities(self) -> np.ndarray:
        first, end = self._identity_range  # type: ignore[misc]
        ranges = np.empty((end - first, 2), dtype=np.int64)
        for j, key in enumerate(range(first, end)):
            header = self.reader.read_header(key)
            values = np.atleast_1d(header.label)
            if header.flag < 2 or not np.all(values[:2] == np.round(values[:2])):
                raise DataFormatError(
                    self.rec_path,
                    f"identity record label {values.tolist()} is not (start, stop)",
                    key,
                )
            ranges[j] = values[:2]
        order = np.argsort(ranges[:, 0], kind="stable")
        starts, stops = ranges[order, 0], ranges[order, 1]
        expected_starts = np.concatenate(([1], stops[:-1]))
        bad = (stops < starts) | (starts != expected_starts)
        if bad.any() or stops[-1] != len(self) + 1:
            j = int(order[np.flatnonzero(bad)[0]]) if bad.any() else int(order[-1])
            raise DataFormatError(
                self.rec_path,
                f"identity ranges do not tile image keys 1..{len(self)} exactly "
                f"(this one is {ranges[j].tolist()})",
                first + j,
            )
        labels = np.repeat(order, stops - starts).astype(np.int64)
        # Identity j is class j in insightface files; check it against the images' own headers.
        for j in {int(order[0]), int(order[-1])}:
            key = int(ranges[j, 0])
            if ranges[j, 1] > key and self._class_label(self.reader.read_header(key), key) != j:
                raise DataFormatError(
                    self.rec_path, f"image label differs from its identity record {first + j}", key
                )
        return labels

    @property
    def num_classes(self) -> int:
        """Number of classes: from the ``property`` file if present, else the largest label + 1."""
        if self._property_classes is not None:
            return self._property_classes
        return int(self.labels.max()) + 1
