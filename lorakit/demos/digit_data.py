"""Data for the digits demo: scikit-learn's bundled 8x8 digits, or MNIST from its IDX files.

scikit-learn's digits (1,797 images, shipped inside the package, no download) are split per
digit with a seeded generator. MNIST is read from the four standard IDX files (gzipped or
not) with numpy alone: no torchvision, no download.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import LoraError


class DatasetError(LoraError):
    """A data set file is missing or malformed (the message names the file)."""


@dataclass
class Data:
    name: str
    x_train: Any        # (N, n_features) float32 in [0, 1]
    y_train: Any        # (N,) int64 digit labels
    x_test: Any
    y_test: Any

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


def load_data(dataset: str, data_dir: Optional[str], seed: int, test_fraction: float = 0.3) -> Data:
    """scikit-learn's digits split per digit with a seeded generator, or MNIST's own train/test files."""
    import numpy as np
    import torch
    if dataset == "mnist":
        x_tr, y_tr, x_te, y_te = load_mnist(data_dir)
        name = "MNIST"
    else:
        from sklearn.datasets import load_digits
        bunch = load_digits()
        x, y = bunch.data / 16.0, bunch.target                  # (1797, 64) pixels 0..16 -> [0, 1]
        rng = np.random.default_rng(seed)
        test = np.concatenate([rng.permutation(np.flatnonzero(y == d))[:round(test_fraction * (y == d).sum())]
                               for d in range(10)])
        is_test = np.zeros(len(y), bool)
        is_test[test] = True
        x_tr, y_tr, x_te, y_te = x[~is_test], y[~is_test], x[is_test], y[is_test]
        name = "scikit-learn digits"
    as_x = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    as_y = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))             # noqa: E731
    return Data(name, as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te))


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def find_idx(folder: Path, stem: str) -> Optional[Path]:
    """``stem``, ``stem.gz``, or the dotted spelling (train-images.idx3-ubyte) some mirrors use."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_mnist(data_dir: Optional[str]):
    """(x_train (N, rows*cols) in [0, 1], y_train, x_test, y_test) as numpy arrays from the IDX files."""
    folder = Path(data_dir or ".")
    if not folder.is_dir():
        raise DatasetError(f"--data-dir {folder}: no such folder")
    found = {stem: find_idx(folder, stem) for stem in MNIST_FILES}
    missing = [s for s, p in found.items() if p is None]
    if missing:
        raise DatasetError(f"{folder}: missing MNIST files {missing} (each may also be gzipped, '<name>.gz'); "
                           "expected the four standard IDX files from the MNIST distribution")
    arrays = [read_idx(found[s]) for s in MNIST_FILES]
    out = []
    for images, labels, (fi, fl) in ((arrays[0], arrays[1], MNIST_FILES[:2]), (arrays[2], arrays[3], MNIST_FILES[2:])):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"{found[fi]} / {found[fl]}: expected images (N, rows, cols) and labels (N,), got "
                               f"{list(images.shape)} and {list(labels.shape)}")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DatasetError(f"{found[fl]}: labels must be digits 0..9, "
                               f"found {int(labels.min())}..{int(labels.max())}")
        out += [images.reshape(len(images), -1) / 255.0, labels]
    if out[0].shape[1] != out[2].shape[1]:
        raise DatasetError(f"{folder}: train images have {out[0].shape[1]} pixels, test images {out[2].shape[1]}")
    return tuple(out)


_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path):
    """An IDX file (gzipped or not) as a numpy array.

    Layout: 2 zero bytes, a type code (0x08 = uint8, ...), the number of dimensions n, n big-endian
    uint32 sizes, then the values in C order.
    """
    import numpy as np
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DatasetError(f"{path}: corrupt gzip data: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'none'}, "
                           "expected 0000 + type code + number of dimensions)")
    ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions)")
    dims = tuple(int(v) for v in np.frombuffer(raw, ">u4", ndim, 4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(f"{path}: expected {expected} bytes for shape {list(dims)}, got {len(raw)}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)
