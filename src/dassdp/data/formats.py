"""File formats: hashing, IDX files, a restricted unpickler, CIFAR python batches.

Nothing here touches the network. Pickles are only ever read through
:func:`safe_load_pickle`, whose unpickler resolves a short allow-list of numpy
array-reconstruction globals and refuses every other global, so a malicious pickle
cannot run code.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


class DataError(Exception):
    """Base class of every error raised by :mod:`dassdp.data`."""


class HashMismatchError(DataError, ValueError):
    """A downloaded or local file does not have the expected hash."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The data a dataset needs is not where it was looked for."""


class DataFormatError(DataError, ValueError):
    """A file exists but does not have the expected format or contents."""


class FetchError(DataError, RuntimeError):
    """Fetching a source archive from a registry failed."""


# ---------------------------------------------------------------- hashing / atomic IO


def file_hash(path: str | os.PathLike, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`HashMismatchError` naming the file and both hashes on mismatch."""
    actual = file_hash(path)
    if actual != expected.lower():
        raise HashMismatchError(
            f"sha256 mismatch for {path}: expected {expected.lower()}, got {actual}"
        )


# ---------------------------------------------------------------- IDX (MNIST family)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def write_idx(f: BinaryIO, array: np.ndarray) -> None:
    """Write a uint8 array (labels ``[N]`` or images ``[N, H, W]``) as an IDX file."""
    if array.dtype != np.uint8:
        raise TypeError(f"write_idx expects uint8, got {array.dtype}")
    f.write(bytes([0, 0, 0x08, array.ndim]))
    f.write(np.asarray(array.shape, dtype=">u4").tobytes())
    f.write(np.ascontiguousarray(array).tobytes())


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array; raise on a bad format."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataFormatError(f"{path} is not an IDX file (bad magic number)")
    ndim, dtype = data[3], np.dtype(_IDX_DTYPES[data[2]])
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)) * dtype.itemsize:
        raise DataFormatError(f"{path}: IDX header says shape {shape} but the size differs")
    return np.frombuffer(data, dtype, offset=offset).reshape(shape)


def idx_header(path: Path) -> tuple[int, ...]:
    """Shape stored in an uncompressed IDX file's header, checked against the file size."""
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES:
            raise DataFormatError(f"{path} is not an IDX file (bad magic number)")
        shape = tuple(int(d) for d in np.frombuffer(f.read(4 * head[3]), ">u4"))
    item = np.dtype(_IDX_DTYPES[head[2]]).itemsize
    if path.stat().st_size != 4 + 4 * len(shape) + int(np.prod(shape)) * item:
        raise DataFormatError(f"{path}: truncated or oversized IDX file (shape {shape})")
    return shape


# ---------------------------------------------------------------- restricted unpickling


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_frombuffer() -> Any:
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.numeric import _frombuffer
    return _frombuffer


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    # Python 3 pickles of protocol < 3 store bytes as _codecs.encode(text, "latin1").
    ("_codecs", "encode"): lambda: codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy array-reconstruction globals (and ``codecs.encode``).

    Plain containers (dict, list, tuple, str, bytes, numbers) need no globals; any
    other global (``os.system``, ``builtins.eval``, ...) raises ``UnpicklingError``.
    """

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in data pickles")
        return factory()


def safe_load_pickle(data: bytes | BinaryIO, *, where: str = "pickle") -> Any:
    """Unpickle Python 2 or 3 data pickles (``encoding='latin1'``) without running code."""
    f = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        return RestrictedUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataFormatError(f"{where}: cannot read as a data pickle ({err})") from err


# ---------------------------------------------------------------- CIFAR python batches

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def cifar_batch_dict(images_hwc: np.ndarray, labels: np.ndarray, batch_label: str) -> dict:
    """CIFAR python-batch dict from images ``[N, 32, 32, 3]`` uint8 and labels ``[N]``.

    ``data`` is ``[N, 3072]`` uint8, each row the R, G, B planes (row-major), exactly as
    in the official files and as ``torchvision.datasets.CIFAR10`` reshapes it.
    """
    n = images_hwc.shape[0]
    data = np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2).reshape(n, 3072))
    return {"batch_label": batch_label, "labels": [int(v) for v in labels], "data": data}


def _key(entry: dict, name: str) -> Any:
    """Dict lookup that accepts str or (Python 2 era) bytes keys."""
    if name in entry:
        return entry[name]
    return entry[name.encode()]


def read_cifar_batch(path: Path, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch -> images ``[N, 32, 32, 3]`` uint8, labels ``[N]`` int64."""
    with open(path, "rb") as f:
        entry = safe_load_pickle(f, where=str(path))
    try:
        data = np.asarray(_key(entry, "data"), dtype=np.uint8)
        labels = np.asarray(_key(entry, label_key), dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except (KeyError, TypeError, ValueError) as err:
        raise DataFormatError(f"{path}: not a CIFAR python batch ({err})") from err
    if len(images) != len(labels):
        raise DataFormatError(f"{path}: {len(images)} images but {len(labels)} labels")
    return np.ascontiguousarray(images), labels


def read_cifar_meta(path: Path, key: str = "label_names") -> list[str]:
    """Class names from ``batches.meta`` (CIFAR-10, key ``label_names``) or ``meta``."""
    with open(path, "rb") as f:
        entry = safe_load_pickle(f, where=str(path))
    try:
        names = _key(entry, key)
    except (KeyError, TypeError) as err:
        raise DataFormatError(f"{path}: no {key!r} in CIFAR meta file") from err
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
