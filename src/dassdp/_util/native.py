"""Build, cache, verify and load a small C library shipped as source with the package (ctypes).

Any kernel can use it: describe the library with a :class:`NativeSource` (a ``.c`` file in the
package data, compiler flags, the symbols it must export) and call :func:`load`, which returns
the loaded ``ctypes.CDLL`` or raises :class:`NativeError` with a one-line reason.

Cache: ``$DASSDP_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/dassdp/kernels``, else
``~/.cache/dassdp/kernels``. A library is named ``<name>_<key>_<size>_<sha256>.so``: ``key``
hashes what decides the binary (the source, flags, the compiler's path and version, the CPU);
``size`` and ``sha256`` are those of the library as built, recorded in its name by the same
atomic rename that publishes it (concurrent builders, e.g. DDP ranks, are safe; there is no
second file to get out of step).

Verification: a cached library is read whole and loaded only if its size and sha256 match
its name; on Linux the verified bytes themselves are loaded (through an anonymous in-memory
file), so what was checked is what runs, whatever happens to the file afterwards. A file that
fails (truncated, overwritten, another library under the name) is removed with a warning and
the library is rebuilt. An unusable cache (not a folder, not writable) is an error naming the
path: the caller decides the fallback.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["CACHE_ENV", "NativeError", "NativeSource", "cache_dir", "compiler", "load"]

CACHE_ENV = "DASSDP_KERNEL_CACHE"


class NativeError(RuntimeError):
    """A native library cannot be built or loaded here; the message says why (one line)."""


@dataclass(frozen=True)
class NativeSource:
    """A C library to build from one source file.

    Attributes:
        name: file-name stem of the built library (``"lif"``).
        source: the ``.c`` file (``importlib.resources.files(package) / "x.c"``, or a path).
        symbols: functions the library must export.
        what: how messages name it (``"the CPU LIF kernels"``).
        flags: compiler flags (``-shared -fPIC`` included).
        libs: linker arguments after the source (``-lm``).
    """

    name: str
    source: Traversable | Path
    symbols: tuple[str, ...]
    what: str
    flags: tuple[str, ...] = ("-O2", "-fPIC", "-shared")
    libs: tuple[str, ...] = ("-lm",)


def compiler() -> str | None:
    """The C compiler: ``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on the path."""
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(cand) if cand else None
        if path:
            return path
    return None


def cache_dir() -> Path:
    """Where built libraries live: ``$DASSDP_KERNEL_CACHE`` or ``~/.cache/dassdp/kernels``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dassdp" / "kernels"


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def _key(src: NativeSource, text: str, cc: str) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    parts = [text, *src.flags, *src.libs, cc, version, _cpu_id()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def load(src: NativeSource, cache: Path | None = None) -> ctypes.CDLL:
    """The library ``src`` loaded from a verified cached build, built first when there is
    none (module docstring). ``cache`` overrides :func:`cache_dir`. Raises
    :class:`NativeError` (no compiler, a failed build, an unusable cache folder)."""
    cc = compiler()
    if cc is None:
        raise NativeError("no C compiler found (set CC, or install gcc or clang)")
    try:
        text = src.source.read_text()
        key = _key(src, text, cc)
    except OSError as err:  # a broken install, or a compiler that does not run
        raise NativeError(f"preparing {src.what} ({src.source}, {cc}) failed: {err}") from None
    folder = cache_dir() if cache is None else cache
    if folder.exists() and not folder.is_dir():
        raise NativeError(f"the kernel cache {folder} is not a folder (set {CACHE_ENV})")
    for path, size, sha in _candidates(folder, src.name, key):
        data, why = _read_verified(path, size, sha)
        if data is not None:
            return _open(src, data, path)
        _discard(path, why)
    data, path = _build(src, text, cc, folder, key)
    return _open(src, data, path)


def _candidates(folder: Path, name: str, key: str) -> Iterator[tuple[Path, int, str]]:
    """Cached builds of ``name`` with ``key``: ``(path, recorded size, recorded sha256)``."""
    pattern = re.compile(rf"{re.escape(name)}_{key}_(\d+)_([0-9a-f]{{64}})\.so")
    try:
        paths = sorted(folder.glob(f"{name}_{key}_*.so"))
    except OSError:
        return
    for path in paths:
        match = pattern.fullmatch(path.name)
        if match:
            yield path, int(match.group(1)), match.group(2)


def _read_verified(path: Path, size: int, sha: str) -> tuple[bytes | None, str]:
    """``(bytes, "")`` when ``path`` has the recorded size and sha256, else ``(None, why)``."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, f"unreadable: {err.strerror or err}"
    if len(data) != size:
        return None, f"{len(data)} bytes where {size} were built"
    if hashlib.sha256(data).hexdigest() != sha:
        return None, "its sha256 differs from the one recorded at build"
    return data, ""


def _discard(path: Path, why: str) -> None:
    warnings.warn(
        f"dassdp: the cached library {path} failed verification ({why}); removing it and "
        "building it again",
        RuntimeWarning,
        stacklevel=3,
    )
    with contextlib.suppress(OSError):  # a read-only cache: the rebuild reports it
        path.unlink()


def _build(src: NativeSource, text: str, cc: str, folder: Path, key: str) -> tuple[bytes, Path]:
    """Compile in a private folder inside the cache, then publish by one atomic rename."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{src.name}-build-", dir=folder))
    except OSError as err:
        raise NativeError(
            f"the kernel cache {folder} is not writable ({err.strerror or err}); set "
            f"{CACHE_ENV} to a writable folder"
        ) from None
    try:
        (tmp / f"{src.name}.c").write_text(text)
        cmd = [cc, *src.flags, f"{src.name}.c", "-o", f"{src.name}.so", *src.libs]
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            raise NativeError(f"building {src.what} with {cc} failed: {tail}")
        data = (tmp / f"{src.name}.so").read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        path = folder / f"{src.name}_{key}_{len(data)}_{digest}.so"
        os.replace(tmp / f"{src.name}.so", path)
    except OSError as err:
        raise NativeError(f"building {src.what} in {folder} failed: {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data, path


def _open(src: NativeSource, data: bytes, path: Path) -> ctypes.CDLL:
    """Load the verified ``data`` (built or cached at ``path``) and check its symbols."""
    lib = _dlopen_bytes(data, path)
    missing = [name for name in src.symbols if not hasattr(lib, name)]
    if missing:
        raise NativeError(f"{path} does not export {missing} ({src.what})")
    return lib


def _dlopen_bytes(data: bytes, path: Path) -> ctypes.CDLL:
    """``dlopen`` exactly ``data``: through an in-memory file on Linux; elsewhere (or where
    such a file may not be mapped executable) the file at ``path`` that was just verified."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create(path.name, os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            return ctypes.CDLL(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # e.g. vm.memfd_noexec: load the file instead
        finally:
            os.close(fd)
    try:
        return ctypes.CDLL(str(path))
    except OSError as err:
        raise NativeError(f"loading {path} failed: {err}") from None
