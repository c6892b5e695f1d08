"""The memory allocator of a training process on the CPU (chosen by the ``dassdp`` CLI).

A training step allocates and frees activation tensors of tens to hundreds of MiB. glibc
serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it with ``munmap`` when freed, so each step faults every page of those tensors in
again (``spikingresformer_cifar``, batch 16, fp32, 1 thread: 0.7-1.2 M minor faults and
20-40 % of the CPU time in the kernel per step). Two fixes, measured in the ``train-step``
sections of ``docs/benchmarks.md``:

* **jemalloc** (or tcmalloc), preloaded: size-class arenas reuse freed blocks of the same
  size step after step, with almost no faults *and* little fragmentation. jemalloc runs with
  ``dirty_decay_ms:-1,muzzy_decay_ms:-1`` (freed pages are kept for reuse, not returned to
  the system and faulted in again; without it jemalloc is slower than glibc). At batch 16:
  1.2-1.3x the images/s of glibc's defaults at 0.78x its peak RSS (the base code, two runs).
* **glibc, tuned** (``mallopt``): ``M_MMAP_MAX = 0`` (large blocks come from the heap,
  reused step after step) and ``M_TRIM_THRESHOLD = -1`` (freed heap is kept): as fast, but
  heap fragmentation raises the peak RSS above glibc's defaults.

A library has to be loaded before the process starts (``LD_PRELOAD``), so the ``dassdp``
command (:func:`setup_allocator`, run by :func:`dassdp.cli.entry` before anything else)
re-executes itself once with the library preloaded. Child processes (data-loader workers,
DDP ranks, ``dassdp compare`` runs) inherit it.

``DASSDP_ALLOCATOR`` chooses (the table is :data:`CHOICES`):

``auto`` (default)   jemalloc if its library is installed, else tcmalloc, else glibc tuned
``jemalloc``         jemalloc (an error if ``libjemalloc`` is not installed)
``tcmalloc``         tcmalloc (an error if ``libtcmalloc_minimal`` / ``libtcmalloc`` is not)
``glibc``            glibc with the ``mallopt`` settings above
``system``           nothing changed (glibc's defaults)

On Debian / Ubuntu ``apt install libjemalloc2`` installs jemalloc (conda: ``jemalloc``). The
older switch ``DASSDP_MALLOC_TUNE=0`` means ``system``. :func:`active_allocator` says what
this process runs with; ``dassdp train`` records it in ``meta.json`` and the benchmarks next
to their numbers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from pathlib import Path

__all__ = [
    "ALLOCATOR_ENV",
    "CHOICES",
    "ENV",
    "JEMALLOC_CONF",
    "active_allocator",
    "allocator_tuned",
    "find_library",
    "preload_env",
    "requested_allocator",
    "setup_allocator",
    "tune_allocator",
]

ENV = "DASSDP_MALLOC_TUNE"  # "0": leave the allocator alone (same as DASSDP_ALLOCATOR=system)
ALLOCATOR_ENV = "DASSDP_ALLOCATOR"
CHOICES = ("auto", "jemalloc", "tcmalloc", "glibc", "system")
PRELOADED = ("jemalloc", "tcmalloc")  # the choices that are a library to preload
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# Set by the re-execution: the library it preloaded (so a failed preload does not loop).
_REEXEC_ENV = "_DASSDP_PRELOADED"
# Library file names, most specific first; searched in the dynamic linker's cache, then in
# the interpreter's prefix (conda, a venv's base) and the usual system folders.
_LIBRARIES = {
    "jemalloc": ("jemalloc",),
    "tcmalloc": ("tcmalloc_minimal", "tcmalloc"),
}
_SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib")  # fmt: skip

_M_TRIM_THRESHOLD = -1  # glibc malloc.h parameter numbers
_M_MMAP_MAX = -4
_TUNED: list[bool] = []  # set once tune_allocator applied the glibc settings in this process


def _off(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("0", "false", "no", "off")


def requested_allocator(environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    """The choice from ``DASSDP_ALLOCATOR`` (``auto`` if unset; ``system`` under
    ``DASSDP_MALLOC_TUNE=0``); anything outside :data:`CHOICES` is a ``ValueError``."""
    env = os.environ if environ is None else environ
    raw = env.get(ALLOCATOR_ENV, "").strip().lower()
    if not raw:
        return "system" if _off(env.get(ENV)) else "auto"
    if raw not in CHOICES:
        raise ValueError(
            f"{ALLOCATOR_ENV}={env[ALLOCATOR_ENV]!r} is not an allocator; "
            f"choose one of {', '.join(CHOICES)}"
        )
    return raw


def find_library(name: str) -> str | None:
    """The file of allocator ``name`` (``jemalloc`` / ``tcmalloc``) on this system, or None."""
    if name not in _LIBRARIES:
        raise ValueError(f"unknown allocator library {name!r}; choose one of {list(_LIBRARIES)}")
    dirs = [str(Path(sys.base_prefix) / "lib"), str(Path(sys.prefix) / "lib"), *_SEARCH_DIRS]
    for stem in _LIBRARIES[name]:
        for d in dirs:
            hits = sorted(glob.glob(os.path.join(d, f"lib{stem}.so*")))
            if hits:
                return hits[0]
        soname = ctypes.util.find_library(stem)  # the linker cache: a name, not a path
        if soname:
            return soname
    return None


def active_allocator() -> str:
    """What this process allocates with: ``jemalloc``, ``tcmalloc``, ``glibc tuned`` (the
    ``mallopt`` settings applied) or ``glibc``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for name, stems in _LIBRARIES.items():
        if any(f"/lib{stem}.so" in maps for stem in stems):
            return name
    return "glibc tuned" if _TUNED else "glibc"


def allocator_tuned() -> bool:
    """Whether this process runs with a tuned allocator (preloaded or the glibc settings)."""
    return active_allocator() != "glibc"


def tune_allocator() -> bool:
    """Apply the glibc settings (module docstring) unless a preloaded allocator is active or
    the choice is ``system``; True if this process runs with a tuned allocator afterwards."""
    choice = requested_allocator()
    if choice == "system":
        return False
    if active_allocator() in PRELOADED:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, -1) == 1 and ok
    if ok and not _TUNED:
        _TUNED.append(True)
    return ok


def preload_env(name: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default ``os.environ``) that starts a process with allocator
    ``name`` (one of :data:`CHOICES` but ``auto``): ``LD_PRELOAD`` holding the library (and
    jemalloc's settings in ``MALLOC_CONF`` unless set) for ``jemalloc`` / ``tcmalloc``, no
    preload and ``DASSDP_ALLOCATOR`` set for the others. A missing library is a
    ``ValueError`` saying how to install it."""
    env = dict(os.environ if environ is None else environ)
    env.pop(_REEXEC_ENV, None)
    ours = [f"lib{stem}.so" for stems in _LIBRARIES.values() for stem in stems]
    preload = [
        p
        for p in env.get("LD_PRELOAD", "").replace(":", " ").split()
        if not any(os.path.basename(p).startswith(o) for o in ours)
    ]
    if name != "jemalloc" and env.get("MALLOC_CONF") == JEMALLOC_CONF:
        del env["MALLOC_CONF"]  # ours, not the user's
    if name in PRELOADED:
        lib = find_library(name)
        if lib is None:
            hint = "libjemalloc2" if name == "jemalloc" else "libtcmalloc-minimal4"
            raise ValueError(
                f"{ALLOCATOR_ENV}={name}: its library is not installed on this system "
                f"(Debian / Ubuntu: apt install {hint}); choose one of {', '.join(CHOICES)}"
            )
        preload.insert(0, lib)
        if name == "jemalloc" and "MALLOC_CONF" not in env:
            env["MALLOC_CONF"] = JEMALLOC_CONF
    elif name not in CHOICES or name == "auto":
        raise ValueError(f"allocator {name!r}: choose one of {', '.join(CHOICES[1:])}")
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    env[ALLOCATOR_ENV] = name
    env.pop(ENV, None)
    return env


def setup_allocator() -> None:
    """Run at the start of the ``dassdp`` command: re-execute this process with the chosen
    library preloaded when it is not loaded yet (at most once; a preload the dynamic linker
    refused falls back to glibc tuned, with a note on stderr), then apply the glibc settings
    where no library is loaded. A bad ``DASSDP_ALLOCATOR`` or a missing library that was
    asked for by name is a ``ValueError``."""
    choice = requested_allocator()
    name = choice
    if choice == "auto":
        name = next((n for n in PRELOADED if find_library(n) is not None), "glibc")
    if name in PRELOADED and active_allocator() != name:
        env = preload_env(name)
        lib = env["LD_PRELOAD"].split()[0]
        if os.environ.get(_REEXEC_ENV) == lib:  # tried once already and it did not load
            print(f"dassdp: could not preload {lib}; using glibc (tuned)", file=sys.stderr)
        else:
            if choice == "auto":
                env[ALLOCATOR_ENV] = "auto"  # children choose the same way
            env[_REEXEC_ENV] = lib
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    tune_allocator()
