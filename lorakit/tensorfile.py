"""Reading safetensors files strictly: the whole header is checked before any tensor is read.

The format (huggingface/safetensors)::

    bytes 0..7        N, a little-endian u64: the length of the JSON header
    bytes 8..8+N      {"__metadata__": {str: str},
                       KEY: {"dtype": "F32", "shape": [r, k], "data_offsets": [begin, end]}, ...}
    bytes 8+N..       the data: tensor KEY is data[begin:end], row-major, little-endian

Checks, each naming the file, the key or field, expected vs actual: the file is at least 8
bytes; 2 <= N <= 100 MiB and the header fits in the file; the header is UTF-8 JSON, an
object, without duplicate keys; ``__metadata__`` maps strings to strings; every entry has
exactly dtype / shape / data_offsets, a known dtype, at most 8 non-negative integer dims,
and ``end - begin == numel * itemsize``; the tensors tile the data exactly (no overlap, no
gap, nothing past the end, no trailing bytes). Only then are the bytes read (``os.pread``
into one buffer, no mmap: a file truncated behind our back cannot crash the process).

Files inside an adapter folder are opened with :func:`open_inside`: never through a symlink
that leads out of the folder (a Hugging Face cache snapshot's links into its own ``blobs/``
excepted), and only regular files (not a FIFO or a device).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .errors import AdapterFormatError

MAX_HEADER_BYTES = 100 * 2**20          # safetensors' own limit
MAX_DIMS = 8
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16,
          "U32": torch.uint32, "U64": torch.uint64}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype (safetensors' name, e.g. "BF16"), shape, byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Header:
    """A checked header: the entries, the metadata, where the data starts and the file's size."""

    entries: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _bad(source, detail: str) -> AdapterFormatError:
    return AdapterFormatError(f"{source}: not a readable safetensors file: {detail}")


# ------------------------------------------------------------------------------ reading bytes
def read_exact(fd: int, n: int, offset: int, source) -> bytearray:
    """``n`` bytes at ``offset`` (pread; the file offset is not used)."""
    buf = bytearray(n)
    read_into(fd, memoryview(buf), offset, source)
    return buf


# ------------------------------------------------------------------------------ the header
def read_header(fd: int, source) -> Header:
    """Read and check the header of the open safetensors file ``fd`` (nothing else is read)."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise _bad(source, f"the file is {size} bytes; expected at least 8 (the header length) "
                           "followed by the JSON header" + (" (empty file)" if size == 0 else ""))
    n = int.from_bytes(read_exact(fd, 8, 0, source), "little")
    if n > MAX_HEADER_BYTES:
        raise _bad(source, f"header length (bytes 0-7) is {n}; expected at most {MAX_HEADER_BYTES}")
    if n < 2 or 8 + n > size:
        raise _bad(source, f"header length (bytes 0-7) is {n}, but the file has {size - 8} bytes after it "
                           f"(expected 2 <= length <= {size - 8})")
    raw = bytes(read_exact(fd, n, 8, source))
    obj = _parse_json(raw, source)
    metadata = _metadata(obj.pop("__metadata__", {}), source)
    entries = {key: _entry(key, value, source) for key, value in obj.items()}
    _check_tiling(entries, size - 8 - n, source)
    return Header(entries, metadata, 8 + n, size)


def _parse_json(raw: bytes, source) -> dict:
    def no_duplicates(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r} in the header")
            seen[k] = v
        return seen

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except UnicodeDecodeError as e:
        raise _bad(source, f"the header is not UTF-8 ({e.reason} at byte {8 + e.start})") from None
    except RecursionError:
        raise _bad(source, "the header's JSON is nested too deeply") from None
    except ValueError as e:
        raise _bad(source, f"the header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _bad(source, f"the header is a JSON {type(obj).__name__}; expected an object "
                           "{key: {dtype, shape, data_offsets}}")
    return obj


def _metadata(value, source) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _bad(source, f"'__metadata__' must map strings to strings, got {_short(value)}")
    return value


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(key: str, value, source) -> TensorInfo:
    where = f"key {key!r}"
    if not isinstance(value, dict):
        raise _bad(source, f"{where}: expected an object with dtype, shape, data_offsets; got {_short(value)}")
    if set(value) != _ENTRY_FIELDS:
        raise _bad(source, f"{where}: expected the fields {sorted(_ENTRY_FIELDS)}, got {sorted(value)}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _bad(source, f"{where}: unknown dtype {_short(dtype)}; expected one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise _bad(source, f"{where}: shape must be a list of at most {MAX_DIMS} integers >= 0, got {_short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _bad(source, f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                           f"got {_short(offsets)}")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    nbytes = info.numel * DTYPES[dtype].itemsize
    if info.end - info.begin != nbytes:
        raise _bad(source, f"{where}: data_offsets {offsets} hold {info.end - info.begin} bytes; "
                           f"expected {nbytes} for shape {shape} of {dtype}")
    return info


def _check_tiling(entries: dict[str, TensorInfo], data_len: int, source) -> None:
    """The tensors' byte ranges cover the data exactly once, in some order."""
    pos, prev = 0, None
    for key, info in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin < pos:
            raise _bad(source, f"key {key!r}: data_offsets [{info.begin}, {info.end}] overlap key {prev!r} "
                               f"(which ends at {pos})")
        if info.begin > pos:
            raise _bad(source, f"bytes [{pos}, {info.begin}) of the data belong to no tensor (before key {key!r})")
        pos, prev = info.end, key
    if pos > data_len:
        raise _bad(source, f"key {prev!r}: data_offsets end at {pos}, but the data is {data_len} bytes "
                           "(truncated file?)")
    if pos < data_len:
        raise _bad(source, f"{data_len - pos} bytes after the last tensor (expected the data to end at {pos})")


# ------------------------------------------------------------------------------ the tensors
def read_buffer(fd: int, header: Header, source, pin: bool = False) -> torch.Tensor:
    """The data section of a checked header as one uint8 tensor, read with pread. ``pin``: in
    pinned host memory (ready for one asynchronous copy to a GPU; its pages are already mapped).
    Otherwise in a bytearray: zero-filling it maps its pages in user space first, much cheaper
    than faulting fresh pages in during the read (measured on a 2-core VM, 21.5 MiB: 4 ms in
    all vs 12-17 ms for a read into torch.empty's untouched pages)."""
    n = header.file_size - header.data_start
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)
    if pin:
        buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        read_into(fd, memoryview(buf.numpy()), header.data_start, source)
        return buf
    raw = bytearray(n)
    read_into(fd, memoryview(raw), header.data_start, source)
    return torch.frombuffer(raw, dtype=torch.uint8)


def read_into(fd: int, view: memoryview, offset: int, source) -> None:
    """Fill ``view`` with the bytes at ``offset`` (pread; the file offset is not used)."""
    n, done = len(view), 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise _bad(source, f"the file ended after {offset + done} bytes while reading {n} bytes at {offset} "
                               "(truncated while being read?)")
        done += got


def split_buffer(buf: torch.Tensor, header: Header) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, list[str]]]]:
    """The tensors of the data section ``buf`` (uint8, on any device) as views of it, and its
    dtype runs: maximal runs of adjacent tensors of one dtype, each as one flat view with its keys
    (one reduction per run checks every value of a file; a file lorakit writes is one run).

    A run that starts at an offset that is not a multiple of its item size is copied (no aligned
    view exists); its tensors then view the copy. Each tensor is one ``as_strided`` of its run.
    """
    entries = header.entries
    tensors: dict[str, torch.Tensor] = {}
    runs: list[tuple[torch.Tensor, list[str]]] = []
    for dtype, begin, end, keys in _runs(entries):
        tdtype = DTYPES[dtype]
        size = tdtype.itemsize
        raw = buf[begin:end]
        flat = (raw if begin % size == 0 else raw.clone()).view(tdtype)
        base = flat.storage_offset()
        for key in keys:
            info = entries[key]
            tensors[key] = flat.as_strided(info.shape, _strides(info.shape), base + (info.begin - begin) // size)
        runs.append((flat, keys))
    empty = [key for key, info in entries.items() if info.begin == info.end]
    for key in empty:
        tensors[key] = torch.empty(entries[key].shape, dtype=entries[key].torch_dtype, device=buf.device)
    return {key: tensors[key] for key in entries}, runs         # in the header's order


def _runs(entries: dict[str, TensorInfo]) -> list[tuple[str, int, int, list[str]]]:
    """(dtype, begin, end, keys) of each maximal run of adjacent non-empty tensors of one dtype."""
    runs: list[tuple[str, int, int, list[str]]] = []
    for key, info in sorted(entries.items(), key=lambda kv: kv[1].begin):
        if info.end == info.begin:
            continue
        if runs and runs[-1][0] == info.dtype and runs[-1][2] == info.begin:
            dtype, begin, _, keys = runs[-1]
            keys.append(key)
            runs[-1] = (dtype, begin, info.end, keys)
        else:
            runs.append((info.dtype, info.begin, info.end, [key]))
    return runs


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of ``shape``."""
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def read_data(fd: int, header: Header, source, keys: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """The tensors of a checked header (all, or ``keys``), on the CPU, in one read of the data."""
    tensors = split_buffer(read_buffer(fd, header, source), header)[0]
    return tensors if keys is None else {key: tensors[key] for key in keys}


def read_file(path) -> tuple[Header, dict[str, torch.Tensor]]:
    """Header and tensors of the safetensors file at ``path`` (a path the caller chose: followed)."""
    with open_regular(path) as fd:
        header = read_header(fd, path)
        return header, read_data(fd, header, path)


# ------------------------------------------------------------------------------ writing
_NAMES = {v: k for k, v in DTYPES.items()}


def serialize(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> bytes:
    """The safetensors bytes of ``tensors`` (any device), byte-for-byte deterministic: tensors in
    key order, the header's JSON with sorted keys, padded with spaces to a multiple of 8 bytes."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, pos = [], 0
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


# ------------------------------------------------------------------------------ opening safely
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)   # a FIFO cannot block us


def open_regular_fd(path, what: str = "cannot open") -> int:
    """A read-only descriptor of the regular file ``path`` (a path the caller chose: followed);
    AdapterFormatError naming ``path`` when it cannot be opened or is not a regular file."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as e:
        raise AdapterFormatError(f"{path}: {what}: {e.strerror}") from None
    try:
        check_regular(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def open_regular(path, what: str = "cannot open"):
    """``with open_regular(path) as fd:``: open_regular_fd, closed on exit."""
    fd = open_regular_fd(path, what)
    try:
        yield fd
    finally:
        os.close(fd)


def check_regular(fd: int, path) -> None:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise AdapterFormatError(f"{path}: expected a regular file, found {kind}")


def open_inside(folder: Path, name: str, dir_fd: int) -> int:
    """Open ``folder/name`` (``dir_fd`` is the open folder) for reading: a regular file, reached
    without following a symlink out of the folder. Raises FileNotFoundError when absent."""
    flags = _READ_FLAGS
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        fd = os.open(link_target(folder, name), flags)
    try:
        check_regular(fd, folder / name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def link_target(folder: Path, name: str) -> str:
    """Where the symlink ``folder/name`` leads, if that is inside the folder (or, for a Hugging Face
    cache snapshot ``.../snapshots/REV/``, inside that repository's ``blobs/``); else an error."""
    real_folder = os.path.realpath(folder)
    target = os.path.realpath(folder / name)
    if os.path.commonpath([real_folder, target]) == real_folder and target != real_folder:
        return target
    snapshots = os.path.dirname(real_folder)
    if os.path.basename(snapshots) == "snapshots" and \
            os.path.dirname(target) == os.path.join(os.path.dirname(snapshots), "blobs"):
        return target
    raise AdapterFormatError(f"{folder / name}: a symlink to {target}, outside the adapter folder {folder}; "
                             "refusing to follow it (copy the file into the folder if you trust it)")


__all__ = ["TensorInfo", "Header", "read_header", "read_buffer", "split_buffer", "read_data", "read_file", "serialize", "open_inside", "link_target",
           "check_regular", "DTYPES", "FLOAT_DTYPES", "MAX_HEADER_BYTES"]
